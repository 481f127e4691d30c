//! forage-agent: runs inside a forage guest (static binary in the initramfs) and serves the
//! protocol described in the library's module doc on TCP port 7000.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use forage_agent::{parse_request, Op, Response, AGENT_PORT, MAX_LINE, MAX_OUTPUT, MAX_PUT, PROTOCOL_VERSION};

fn main() {
    let port = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(AGENT_PORT);
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("forage-agent: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    let started = Instant::now();
    eprintln!("forage-agent: listening on port {port}");
    notify_systemd_ready();
    for conn in listener.incoming().flatten() {
        thread::spawn(move || {
            if let Err(e) = serve(conn, started) {
                eprintln!("forage-agent: connection ended: {e}");
            }
        });
    }
}

/// Under systemd (`Type=notify`), say that the agent listens: units ordered after it (the
/// ready marker) then start only once the host can reach it. The variable is removed so
/// that programs the agent spawns do not inherit it.
fn notify_systemd_ready() {
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(b"READY=1", &addr)
        } else {
            sock.send_to(b"READY=1", &path)
        }
    });
    if let Err(e) = sent {
        eprintln!("forage-agent: cannot notify systemd: {e}");
    }
    // Called from main before any thread is started.
    std::env::remove_var("NOTIFY_SOCKET");
}

fn serve(conn: TcpStream, started: Instant) -> std::io::Result<()> {
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let resp = match parse_request(&line) {
            Err(e) => {
                if line.len() > MAX_LINE {
                    // Cannot find the next request boundary reliably: answer and hang up.
                    write_response(&mut writer, &Response::failure(e))?;
                    return Ok(());
                }
                Response::failure(e)
            }
            Ok(req) => match req.op {
                Op::Ping => Response {
                    ok: true,
                    version: Some(PROTOCOL_VERSION),
                    uptime_s: Some(started.elapsed().as_secs_f64()),
                    ..Response::default()
                },
                Op::Put { path, mode, size } => {
                    if size > MAX_PUT {
                        write_response(&mut writer, &Response::failure(format!("file over {MAX_PUT} bytes")))?;
                        return Ok(());
                    }
                    match put(&mut reader, &path, mode, size) {
                        Ok(()) => ok(),
                        Err(e) => Response::failure(format!("put {path}: {e}")),
                    }
                }
                Op::Exec { argv, timeout_s } => exec(&argv, Duration::from_secs(timeout_s)),
                Op::Spawn { argv, log } => spawn(&argv, &log),
            },
        };
        write_response(&mut writer, &resp)?;
    }
}

fn ok() -> Response {
    Response { ok: true, ..Response::default() }
}

fn write_response(w: &mut TcpStream, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).expect("responses serialize");
    line.push(b'\n');
    w.write_all(&line)
}

/// Receive `size` bytes into `path`, via a temporary file so a cut connection leaves no
/// half-written file under the final name.
fn put(reader: &mut impl Read, path: &str, mode: u32, size: u64) -> std::io::Result<()> {
    let target = Path::new(path);
    let opened = (|| {
        if !target.is_absolute() {
            return Err(std::io::Error::other("path must be absolute"));
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode & 0o7777)
            .open(format!("{path}.forage-partial"))
    })();
    let tmp = format!("{path}.forage-partial");
    let mut file = match opened {
        Ok(f) => f,
        Err(e) => {
            // Consume the payload so the next request is read from the right place.
            std::io::copy(&mut reader.take(size), &mut std::io::sink())?;
            return Err(e);
        }
    };
    let copied = std::io::copy(&mut reader.take(size), &mut file)?;
    if copied != size {
        let _ = fs::remove_file(&tmp);
        return Err(std::io::Error::other(format!("connection ended after {copied} of {size} bytes")));
    }
    file.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode & 0o7777))?;
    fs::rename(&tmp, target)
}

/// Longest command timeout accepted (a day).
const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);
/// How long output is still collected after the command ended: a program it left running
/// in the background may hold the pipes open for ever.
const OUTPUT_GRACE: Duration = Duration::from_millis(300);

fn exec(argv: &[String], timeout: Duration) -> Response {
    use std::os::unix::process::CommandExt;
    let Some((prog, args)) = argv.split_first() else {
        return Response::failure("exec needs a program");
    };
    let mut child = match Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0) // so a timeout can kill everything it started
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Response::failure(format!("cannot start {prog}: {e}")),
    };
    let out = Collected::start(child.stdout.take().expect("piped"));
    let err = Collected::start(child.stderr.take().expect("piped"));
    let deadline = Instant::now() + timeout.min(MAX_TIMEOUT);
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                kill_group(child.id());
                break child.wait().ok();
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    let until = Instant::now() + OUTPUT_GRACE;
    Response {
        ok: true,
        code: Some(status.and_then(|s| s.code()).unwrap_or(-1)),
        stdout: Some(out.take(until)),
        stderr: Some(err.take(until)),
        timed_out: Some(timed_out),
        ..Response::default()
    }
}

fn kill_group(pid: u32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: plain syscall; a negative pid names the process group the child leads.
    unsafe {
        kill(-(pid as i32), 9);
    }
}

/// A child's stream read in a thread into a shared buffer (at most MAX_OUTPUT bytes).
struct Collected {
    buf: std::sync::Arc<std::sync::Mutex<(Vec<u8>, bool)>>,
}

impl Collected {
    fn start(stream: impl Read + Send + 'static) -> Self {
        let buf = std::sync::Arc::new(std::sync::Mutex::new((Vec::new(), false)));
        let b = buf.clone();
        thread::spawn(move || {
            let mut stream = stream;
            let mut chunk = [0u8; 8192];
            loop {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut g = b.lock().expect("output buffer");
                        let room = MAX_OUTPUT.saturating_sub(g.0.len());
                        g.0.extend_from_slice(&chunk[..n.min(room)]);
                    }
                }
            }
            b.lock().expect("output buffer").1 = true;
        });
        Self { buf }
    }

    /// What was read, once the stream ended or `until` passed.
    fn take(self, until: Instant) -> String {
        while Instant::now() < until && !self.buf.lock().expect("output buffer").1 {
            thread::sleep(Duration::from_millis(10));
        }
        let g = self.buf.lock().expect("output buffer");
        String::from_utf8_lossy(&g.0).into_owned()
    }
}

fn spawn(argv: &[String], log: &str) -> Response {
    let Some((prog, args)) = argv.split_first() else {
        return Response::failure("spawn needs a program");
    };
    if let Some(parent) = Path::new(log).parent() {
        let _ = fs::create_dir_all(parent);
    }
    let log_file = match OpenOptions::new().create(true).append(true).open(log) {
        Ok(f) => f,
        Err(e) => return Response::failure(format!("cannot open log {log}: {e}")),
    };
    let log_err = match log_file.try_clone() {
        Ok(f) => f,
        Err(e) => return Response::failure(format!("cannot open log {log}: {e}")),
    };
    match Command::new(prog)
        .args(args)
        .stdin(File::open("/dev/null").map(Stdio::from).unwrap_or(Stdio::null()))
        .stdout(log_file)
        .stderr(log_err)
        .spawn()
    {
        Ok(child) => {
            let pid = child.id();
            // Reap it when it ends so it does not linger as a zombie.
            thread::spawn(move || {
                let mut child = child;
                let _ = child.wait();
            });
            Response { ok: true, pid: Some(pid), ..Response::default() }
        }
        Err(e) => Response::failure(format!("cannot start {prog}: {e}")),
    }
}
