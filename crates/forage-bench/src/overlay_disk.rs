//! `forage bench overlay --disk-image`: the overlay table of a launch VM that forage did
//! not build, on a base forage did not build, as issue 16's operator makes them:
//!
//! 1. the disk image: `--disk FILE`, or the Debian disk of `scripts/debian-disk-image.sh`
//!    (MBR, ext4 root, GRUB, cloud-init, qemu-guest-agent), built once into
//!    `DATA/cache/disk-images/` (the `disk_image_base` test's path, .debs cached);
//! 2. the base: `forage base create NAME --disk FILE` (SeaBIOS, the disk's GRUB,
//!    cloud-init NoCloud seed);
//! 3. the launch VM by hand: `forage vm restore --base` (a qcow2 layer over the base's
//!    disk), changes made through qemu-guest-agent ([`HAND_CHANGE`]: a text corpus
//!    written, a service started), `forage vm save`;
//! 4. as `forage overlay create --from-vm` takes it (`forage_synth::saved`): the layer
//!    flattened, its written and discarded chunks; kept in `DATA/bench/launch/KEY/`.
//!
//! Then the same rows as every other app (`overlay::compare`): the baseline, `zstd
//! --patch-from`, the oracle, forage's variants. There is one launch VM: the peers and
//! forage's variants see the same one (nothing here closes the semantic gap at the save:
//! a hand-saved VM's file system is not known checkpointed, so ext4 introspection reads
//! it only when it shows itself clean).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use forage_datadir::DataDir;
use forage_synth::launch::LaunchVm;
use forage_synth::BaseVm;
use sha2::{Digest, Sha256};

use crate::cli::BenchOverlayArgs;
use crate::common::forage_exe;
use crate::launch_cache;

/// What the operator does to the resumed base through qemu-guest-agent: a text corpus of
/// about 12 MiB written (a data set that is in no base), a service on port 8080 that
/// answers with its line count, everything synced to the disk before the save.
pub const HAND_CHANGE: &str = r#"set -e
mkdir -p /srv/app
python3 - <<'PY'
import random
r = random.Random(16)
words = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(3, 10))) for _ in range(5000)]
with open("/srv/app/corpus.txt", "w") as f:
    for i in range(200000):
        f.write(" ".join(r.choice(words) for _ in range(8)) + "\n")
PY
cat > /usr/local/bin/corpus-server <<'PY'
import socketserver
class H(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        n = sum(1 for _ in open("/srv/app/corpus.txt"))
        self.wfile.write(("ok lines=%d\n" % n).encode())
socketserver.TCPServer.allow_reuse_address = True
socketserver.TCPServer(("0.0.0.0", 8080), H).serve_forever()
PY
systemd-run --unit=corpus python3 /usr/local/bin/corpus-server
sync
for i in $(seq 60); do
  python3 -c 'import socket; s = socket.create_connection(("127.0.0.1", 8080)); s.sendall(b"x\n"); print(s.recv(200).decode().strip())' && exit 0
  sleep 1
done
exit 1
"#;

/// The script that builds the Debian disk (in this source tree).
fn disk_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/debian-disk-image.sh")
}

fn forage(data: &DataDir) -> anyhow::Result<Command> {
    let mut c = Command::new(forage_exe()?);
    c.arg("--data-dir").arg(data.root());
    Ok(c)
}

/// Run a `forage` command to its end; its stdout, or an error with its last stderr line.
fn forage_ok(data: &DataDir, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = forage(data)?.args(args).output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("forage {}: {}", args.join(" "), err.lines().last().unwrap_or_default());
    }
    Ok(out.stdout)
}

/// The disk image: `--disk`, or the Debian disk, built when absent.
fn disk_image(data: &DataDir, args: &BenchOverlayArgs, say: &dyn Fn(&str)) -> anyhow::Result<PathBuf> {
    if let Some(d) = &args.disk {
        return Ok(d.clone());
    }
    let dir = data.root().join("cache").join("disk-images");
    std::fs::create_dir_all(&dir)?;
    let img = dir.join("debian-12-grub.raw");
    if !img.exists() {
        say("building the Debian disk image (scripts/debian-disk-image.sh) ...");
        let out = Command::new("bash")
            .arg(disk_script())
            .arg(&img)
            .arg(data.root().join("cache").join("mmdebstrap"))
            .output()
            .context("running scripts/debian-disk-image.sh")?;
        if !out.status.success() {
            bail!("building the disk image: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        say(&format!("  {}", String::from_utf8_lossy(&out.stdout).trim()));
    }
    Ok(img)
}

/// The base of the disk image: kept, or `forage base create NAME --disk FILE`.
pub fn disk_base(data: &DataDir, name: &str, args: &BenchOverlayArgs, say: &dyn Fn(&str)) -> anyhow::Result<BaseVm> {
    if let Ok(b) = BaseVm::open(data, name) {
        return Ok(b);
    }
    let disk = disk_image(data, args, say)?;
    let disk = disk.to_str().context("the disk image's path is not UTF-8")?;
    let format = if disk.ends_with(".qcow2") { "qcow2" } else { "raw" };
    say(&format!("creating base {name} from {disk} (forage base create --disk) ..."));
    let t = Instant::now();
    forage_ok(data, &["base", "create", name, "--disk", disk, "--format", format, "--memory-mib", "512", "--json"])?;
    say(&format!("  in {:.0} s", t.elapsed().as_secs_f64()));
    Ok(BaseVm::open(data, name)?)
}

/// The launch VM changed by hand on `base`: kept from an earlier run, or made now.
pub async fn hand_made_launch(
    data: &DataDir,
    base: &BaseVm,
    base_name: &str,
    fresh: bool,
    say: &dyn Fn(&str),
) -> anyhow::Result<LaunchVm> {
    let key = format!("{}-hand-{}", &base.digest()[..12], &hex::encode(Sha256::digest(HAND_CHANGE))[..8]);
    let dir = launch_cache::root(data)?.join(key);
    if !fresh {
        if let Ok(l) = launch_cache::reopen(&dir) {
            say("hand-made launch VM: kept from an earlier run");
            return Ok(l);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let vm = format!("bench-hand-{}", std::process::id());
    let r = make_by_hand(data, base_name, &vm, &dir, say).await;
    let _ = forage(data)?.args(["vm", "rm", &vm]).output();
    r
}

async fn make_by_hand(
    data: &DataDir,
    base_name: &str,
    vm: &str,
    dir: &Path,
    say: &dyn Fn(&str),
) -> anyhow::Result<LaunchVm> {
    say(&format!("launch VM by hand: forage vm restore {vm} --base {base_name}, changes through qemu-ga ..."));
    let t = Instant::now();
    let mut restored =
        forage(data)?.args(["vm", "restore", vm, "--base", base_name, "--json"]).stdout(Stdio::piped()).spawn()?;
    let mut out = std::io::BufReader::new(restored.stdout.take().context("piped")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let ev: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("forage vm restore: {line:?}"))?;
    if ev["event"] != "running" {
        let _ = restored.kill();
        bail!("forage vm restore: {ev}");
    }
    let record = forage_image::vms::VmPaths::new(data, vm)?.load()?;
    let changed = async {
        let ga = record.spec.guest_agent.clone().context("the base has no qemu-ga channel")?;
        let mut ga = forage_vm::qga::GuestAgent::connect(&ga.socket, Duration::from_secs(60)).await?;
        let st = ga.run("/bin/sh", &["-c", HAND_CHANGE], Duration::from_secs(900)).await?;
        let said = String::from_utf8_lossy(&st.stdout).to_string();
        anyhow::ensure!(said.contains("ok lines="), "the change: {said} {}", String::from_utf8_lossy(&st.stderr));
        anyhow::Ok(said.trim().to_string())
    }
    .await;
    let said = match changed {
        Ok(s) => s,
        Err(e) => {
            let _ = restored.kill();
            return Err(e);
        }
    };
    forage_ok(data, &["vm", "save", vm, "--json"])?;
    line.clear();
    out.read_line(&mut line)?;
    if !restored.wait()?.success() {
        bail!("forage vm restore {vm} failed after the save: {line}");
    }
    say(&format!("  changed ({said}) and saved in {:.0} s", t.elapsed().as_secs_f64()));

    let paths = forage_image::vms::VmPaths::new(data, vm)?;
    let saved = forage_vm::Snapshot::open(&paths.snapshot)?;
    let partial = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    let flat = forage_synth::saved::flatten_saved_vm(&saved, &partial);
    let flat = match flat {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e.into());
        }
    };
    say(&format!("  {}", flat.tracking));
    let app = forage_agent::app::AppManifest {
        format: 1,
        name: "hand-made".into(),
        port: 8080,
        start: vec!["python3".into(), "/usr/local/bin/corpus-server".into()],
        install: None,
        probe: Some("count".into()),
        probe_expect: Some("ok lines=".into()),
        debs: Vec::new(),
    };
    let l = LaunchVm {
        snapshot: flat.snapshot,
        written_disk_chunks: flat.written,
        discarded_disk_chunks: flat.discarded,
        app,
        install_time: t.elapsed(),
        debs: None,
        checkpoint: forage_synth::ext4::Checkpoint::Unknown,
    };
    launch_cache::keep(l, &partial, dir)
}
