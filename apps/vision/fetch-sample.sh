#!/usr/bin/env bash
# The vision app's sample photo, taken from a Debian package (never the web):
# scikit-image's "astronaut" (Eileen Collins, NASA, public domain) from python3-skimage.
#
#   fetch-sample.sh OUT_DIR [DEB_CACHE]
#
# The package is fetched with `apt-get download` into DEB_CACHE (default: OUT_DIR/../.debs)
# once; the photo is read out of it with dpkg-deb, nothing is installed.
set -euo pipefail
out=$1
cache=${2:-$out/../.debs}
pkg=python3-skimage
member=./usr/lib/python3/dist-packages/skimage/data/astronaut.png
mkdir -p "$out" "$cache"
[ -s "$out/astronaut.png" ] && exit 0
deb=$(ls "$cache"/${pkg}_*.deb 2>/dev/null | tail -n 1 || true)
if [ -z "$deb" ]; then
  (cd "$cache" && apt-get download -q "$pkg" >/dev/null 2>&1) ||
    { echo "fetch-sample.sh: apt-get download $pkg failed (apt-get update first?)" >&2; exit 1; }
  deb=$(ls "$cache"/${pkg}_*.deb | tail -n 1)
fi
dpkg-deb --fsys-tarfile "$deb" | tar -xO "$member" > "$out/astronaut.png.partial"
mv "$out/astronaut.png.partial" "$out/astronaut.png"
