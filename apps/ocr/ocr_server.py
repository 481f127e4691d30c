#!/usr/bin/env python3
"""ocr: an OCR service for forage guests (tesseract from Debian's packages).

Protocol, one line each way (as hashsearch's):
    ocr <base64 image>      ->  ok words=<W1,W2,...> chars=<n> served=<count> ms=<elapsed>
    ocr-file <sample>       ->  the same, for an image the app ships in samples/
    count                   ->  ok served=<count>
    anything else           ->  error <reason>

The words are the recognized text in upper case, split at anything that is not a letter
or a digit, so that a client can check them. `served` counts the requests answered since
the service started (a VM saved and resumed carries it on).
"""
import base64
import binascii
import os
import re
import socketserver
import subprocess
import sys
import threading
import time

MAX_LINE = 16 << 20
SAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples")
lock = threading.Lock()
served = 0


def recognize(image):
    """The words tesseract reads in `image` (PNG, JPEG, TIFF... bytes)."""
    run = subprocess.run(
        ["tesseract", "stdin", "stdout", "-l", "eng"],
        input=image,
        capture_output=True,
        timeout=300,
    )
    if run.returncode != 0:
        raise ValueError("tesseract failed: " + run.stderr.decode(errors="replace").strip()[-200:])
    text = run.stdout.decode(errors="replace")
    return [w for w in re.split(r"[^A-Z0-9]+", text.upper()) if w]


def answer(line):
    global served
    verb, _, arg = line.strip().partition(" ")
    if verb == "count":
        with lock:
            return "ok served=%d" % served
    if verb == "ocr":
        try:
            image = base64.b64decode(arg.strip(), validate=True)
        except (binascii.Error, ValueError) as e:
            return "error the image is not base64: %s" % e
    elif verb == "ocr-file":
        name = arg.strip()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            return "error a sample is named by a plain file name"
        try:
            with open(os.path.join(SAMPLES, name), "rb") as f:
                image = f.read()
        except OSError as e:
            return "error no sample %s: %s" % (name, e.strerror)
    else:
        return "error unknown request (ocr BASE64 | ocr-file NAME | count)"
    if not image:
        return "error empty image"
    start = time.monotonic()
    try:
        words = recognize(image)
    except (ValueError, subprocess.TimeoutExpired) as e:
        return "error %s" % e
    with lock:
        served += 1
        count = served
    ms = int((time.monotonic() - start) * 1000)
    return "ok words=%s chars=%d served=%d ms=%d" % (",".join(words), sum(map(len, words)), count, ms)


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        while True:
            line = self.rfile.readline(MAX_LINE)
            if not line:
                return
            if not line.endswith(b"\n"):
                self.wfile.write(b"error request line too long\n")
                return
            reply = answer(line.decode("ascii", errors="replace"))
            self.wfile.write(reply.encode() + b"\n")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8081
    with Server(("0.0.0.0", port), Handler) as server:
        print("ocr: listening on port %d" % port, file=sys.stderr, flush=True)
        server.serve_forever()
