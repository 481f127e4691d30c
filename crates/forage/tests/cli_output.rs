//! Output to a reader that went away (`forage ... | head`) ends forage quietly, as a shell
//! tool ended by SIGPIPE: no panic message, status 141.

use std::os::fd::FromRawFd;
use std::process::{Command, Stdio};

#[test]
fn a_closed_stdout_ends_forage_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills both slots with new descriptors on success.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just opened and nothing else owns them.
    let (reader, writer) = unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) };
    drop(reader);
    // `forage pair` on a cloudlet prints a one-time code: its first line meets the closed pipe.
    let out = Command::new(env!("CARGO_BIN_EXE_forage"))
        .arg("pair")
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::from(writer))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
}
