//! The assembly as a FUSE file system with two files, `memory.raw` and `disk0.raw`, that
//! QEMU opens like any snapshot's files (memory with `share=on`, so the guest's writes
//! reach [`Assembly::write`] at writeback, copy-on-write, never touching the base).
//!
//! The FUSE session runs on one thread. A read or write that can be answered now is
//! answered there; one that needs a segment still on its way is handed to a thread of
//! its own that waits for the segment and replies, so one blocked read never holds up
//! reads of chunks that are already here.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use forage_format::Space;
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request,
};

use crate::{Assembly, AssemblyError};

pub const MEMORY_FILE: &str = "memory.raw";
pub const DISK_FILE: &str = "disk0.raw";
const ROOT: u64 = 1;
const MEMORY_INO: u64 = 2;
const DISK_INO: u64 = 3;
const CHUNK: u64 = forage_format::CHUNK_SIZE as u64;
/// A declined read repeated within this is a retry.
const RETRY_WINDOW: Duration = Duration::from_millis(50);
const TTL: Duration = Duration::from_secs(3600);
/// How long a read may wait for its segment before it fails (the session normally fails
/// it much sooner, through [`Assembly::fail`], when the device stops answering).
const READ_WAIT: Duration = Duration::from_secs(600);

struct AssemblyFs {
    assembly: Arc<Assembly>,
    /// Read-ahead requests declined in the last moment, and when.
    declined: std::collections::HashMap<(Space, u64, u64), std::time::Instant>,
    readahead: u32,
    uid: u32,
    gid: u32,
}

fn space_of(ino: u64) -> Option<Space> {
    match ino {
        MEMORY_INO => Some(Space::Memory),
        DISK_INO => Some(Space::Disk),
        _ => None,
    }
}

fn errno(e: &AssemblyError) -> i32 {
    match e {
        AssemblyError::OutOfRange { .. } => libc::EINVAL,
        _ => libc::EIO,
    }
}

impl AssemblyFs {
    /// Was this exact request declined a moment ago? (Then it is a retry: serve it.)
    fn is_retry(&mut self, space: Space, off: u64, len: u64) -> bool {
        self.declined.retain(|_, at| at.elapsed() < RETRY_WINDOW);
        match self.declined.remove(&(space, off, len)) {
            Some(_) => true,
            None => {
                self.declined.insert((space, off, len), std::time::Instant::now());
                false
            }
        }
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, size, perm, nlink) = match space_of(ino) {
            Some(space) => (FileType::RegularFile, self.assembly.size(space), 0o600, 1),
            None => (FileType::Directory, 0, 0o700, 2),
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for AssemblyFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        let _ = config.set_max_readahead(self.readahead);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let ino = match (parent, name.to_str()) {
            (ROOT, Some(MEMORY_FILE)) => MEMORY_INO,
            (ROOT, Some(DISK_FILE)) => DISK_INO,
            _ => return reply.error(libc::ENOENT),
        };
        reply.entry(&TTL, &self.attr(ino), 0);
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match ino {
            ROOT | MEMORY_INO | DISK_INO => reply.attr(&TTL, &self.attr(ino)),
            _ => reply.error(libc::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        // The files have the VM's fixed sizes; times and modes are ignored.
        let attr = self.attr(ino);
        match size {
            Some(s) if s != attr.size => reply.error(libc::EPERM),
            _ => reply.attr(&TTL, &attr),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match space_of(ino) {
            Some(_) => reply.opened(0, 0),
            None => reply.error(libc::EISDIR),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(space) = space_of(ino) else { return reply.error(libc::EISDIR) };
        let (off, len) = (offset as u64, size as u64);
        tracing::trace!(space = space.name(), off, len, "read");
        let answer = move |a: &Assembly, reply: ReplyData| match a.read(space, off, len, READ_WAIT) {
            Ok(data) => reply.data(&data),
            Err(e) => {
                tracing::warn!("read of {} at {off}: {e}", space.name());
                reply.error(errno(&e))
            }
        };
        let profiling = self.assembly.profiling();
        if !profiling && self.assembly.ready(space, off, len) {
            answer(&self.assembly, reply);
        } else if len > CHUNK && flags & libc::O_DIRECT == 0 && !self.is_retry(space, off, len) {
            // A page-cache read of more than a page that needs missing chunks is the
            // kernel reading ahead (for QEMU's guest RAM, 2 MiB around every fault, since
            // QEMU marks it MADV_HUGEPAGE). Fetching for it would pull in most of the
            // overlay, so it is declined: the kernel then reads the page actually needed
            // on its own, and that read waits for its segment. The same request repeated
            // at once is served (a retry that needs exactly this range).
            reply.error(libc::EIO);
        } else {
            let a = self.assembly.clone();
            std::thread::spawn(move || answer(&a, reply));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _wf: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Some(space) = space_of(ino) else { return reply.error(libc::EISDIR) };
        let off = offset as u64;
        let answer = move |a: &Assembly, data: &[u8], reply: ReplyWrite| match a.write(space, off, data, READ_WAIT) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => {
                tracing::warn!("write of {} at {off}: {e}", space.name());
                reply.error(errno(&e))
            }
        };
        if self.assembly.ready(space, off, data.len() as u64) {
            answer(&self.assembly, data, reply);
        } else {
            let (a, data) = (self.assembly.clone(), data.to_vec());
            std::thread::spawn(move || answer(&a, &data, reply));
        }
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(space) = space_of(ino) else { return reply.error(libc::EISDIR) };
        if mode == 0 {
            return reply.ok(); // allocation: the files are always "allocated"
        }
        if mode != libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE {
            return reply.error(libc::EOPNOTSUPP);
        }
        let (off, len) = (offset as u64, length as u64);
        let a = self.assembly.clone();
        std::thread::spawn(move || match a.punch(space, off, len, READ_WAIT) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        reply.ok(); // a session's instance is transient: nothing to make durable
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        if ino != ROOT {
            return reply.error(libc::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (MEMORY_INO, FileType::RegularFile, MEMORY_FILE),
            (DISK_INO, FileType::RegularFile, DISK_FILE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as i64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// The assembly mounted on a folder; unmounted when dropped.
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    dir: PathBuf,
}

impl Mount {
    /// Mount `assembly` on the (existing, empty) folder `dir`. `readahead` bounds how much
    /// the kernel asks for around a read: the granularity of demand fetching.
    pub fn new(assembly: Arc<Assembly>, dir: &Path, readahead: u32) -> Result<Self, AssemblyError> {
        let fs = AssemblyFs {
            assembly,
            declined: Default::default(),
            readahead,
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
        };
        let options = [
            MountOption::FSName("forage-assembly".into()),
            MountOption::AllowOther,
            MountOption::NoExec,
            MountOption::NoSuid,
            MountOption::NoDev,
        ];
        let session = fuser::spawn_mount2(fs, dir, &options)
            .map_err(|source| AssemblyError::Mount { path: dir.to_path_buf(), source })?;
        Ok(Self { session: Some(session), dir: dir.to_path_buf() })
    }

    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }

    pub fn disk_path(&self) -> PathBuf {
        self.dir.join(DISK_FILE)
    }
}

impl Drop for Mount {
    /// Detach the mount lazily (a QEMU that is still exiting may hold the files; a plain
    /// unmount would fail as busy and waiting for the session thread would hang). The
    /// session thread ends by itself once the last user of the files is gone.
    fn drop(&mut self) {
        let detached = std::process::Command::new("fusermount3")
            .arg("-uzq")
            .arg(&self.dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !detached {
            tracing::warn!("could not detach {}", self.dir.display());
        }
        drop(self.session.take());
    }
}
