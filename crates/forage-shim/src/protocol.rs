//! The shim protocol: the cloudlet daemon and one instance's shim, over a unix socket in
//! the daemon's private runtime folder (framing: `forage_proto::frame`).
//!
//! ```mermaid
//! sequenceDiagram
//!     participant C as cloudlet daemon
//!     participant S as shim (one per instance)
//!     Note over C: writes shim.json, starts forage-shim (own session)
//!     S->>C: Hello {instance, pid, view files, relay address}   (on every connection)
//!     C->>S: Call {id, AddSegment | Write | Read | Status | Mark | ...}
//!     S->>C: Reply {id, ...}
//!     S-->>C: Fetch {segment}   (early start: a read of the VM needs it)
//!     Note over C: the daemon may go away and come back: it connects again
//!     C->>S: Call {id, Shutdown}   (the instance ends: QEMU is stopped first)
//! ```
//!
//! A shim that loses its daemon while an overlay is still arriving (early start) fails
//! the assembly, stops the instance's QEMU and exits: the segments would never come.
//! Otherwise it keeps serving until told to shut down or its QEMU exits.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use forage_assembly::AssemblyStats;
use forage_format::Space;
use forage_proto::ErrorCode;
use serde::{Deserialize, Serialize};

/// Version of `shim.json` and of the protocol.
pub const SHIM_FORMAT: u32 = 1;
pub const SPEC_FILE: &str = "shim.json";

/// What a shim serves: `DIR/shim.json`, written by the daemon before it starts the shim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShimSpec {
    pub format: u32,
    /// The instance (session id).
    pub instance: String,
    /// The instance's folder: the view and the shim's log live here.
    pub dir: PathBuf,
    /// The control socket.
    pub control: PathBuf,
    #[serde(default)]
    pub view: Option<ViewSpec>,
    #[serde(default)]
    pub relay: Option<RelaySpec>,
}

/// The instance's memory and disk, served over FUSE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ViewSpec {
    /// A copy-on-write view of a saved VM (cached VM, provisioning, handoff): the view's
    /// snapshot folder is `DIR/view/snapshot`.
    Cow { saved: PathBuf, readahead: u32 },
    /// The launch VM of an overlay, assembled while its segments arrive (early start):
    /// the manifest (encoded as in the overlay) and the base's files; for an overlay
    /// naming Debian packages (format 3), their volume.
    Overlay {
        manifest: PathBuf,
        base_memory: PathBuf,
        base_disk: PathBuf,
        readahead: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        packages: Option<PathBuf>,
    },
}

/// The instance's service relay (`forage_proto::service`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySpec {
    pub listen: Ipv4Addr,
    /// 0: any free port (the first start); the same port again when re-adopted.
    pub port: u16,
    /// The guest's service port, forwarded to loopback by QEMU.
    pub target: SocketAddr,
    /// The instance's token, hex.
    pub token: String,
    /// The cloudlet's authority (`DATA/trust/cloudlet`): the relay's certificate.
    pub trust: PathBuf,
}

/// What the shim says first on every connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShimHello {
    pub format: u32,
    pub instance: String,
    pub pid: u32,
    /// The view's memory and disk files (on the FUSE mount), if it serves one.
    pub memory: Option<PathBuf>,
    pub disk: Option<PathBuf>,
    /// Where the relay listens (`host:port`), if there is one.
    pub relay: Option<String>,
    /// SHA-256 of the cloudlet's CA (the relay's certificate chains to it).
    pub ca_sha256: Option<String>,
}

/// One 4 KiB chunk's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkBytes {
    pub index: u64,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum ShimCall {
    /// A segment of the overlay (early start), as it arrived (checked by the shim).
    AddSegment {
        index: u32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Fail the view: every waiting read fails, with `why`.
    Fail {
        why: String,
    },
    Status,
    /// Chunks of `space` the VM wrote since the view started.
    WrittenChunks {
        space: Space,
    },
    /// Start a new generation of writes: what is written from now on is "since" it.
    Mark,
    WrittenSince {
        space: Space,
        mark: u64,
    },
    /// Write chunks into the view (a handoff's destination rebuilding the VM).
    Write {
        space: Space,
        chunks: Vec<ChunkBytes>,
    },
    /// Read chunks of the view (a handoff's source).
    Read {
        space: Space,
        indices: Vec<u64>,
    },
    /// Wait (at most `timeout_ms`) for the overlay's device state: its file.
    WaitDeviceState {
        timeout_ms: u64,
    },
    /// The instance's QEMU: the shim ends when it is gone.
    WatchQemu {
        pid: u32,
    },
    /// Stop watching QEMU: the daemon is about to save the VM (QEMU exits) and reads the
    /// saved files through the view afterwards; it shuts the shim down itself.
    UnwatchQemu,
    /// Count the relay's idleness from now (the instance was handed to its device).
    TouchRelay,
    /// Unmount, close the relay, exit.
    Shutdown,
}

/// What the shim knows now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShimStatus {
    pub complete: bool,
    pub failure: Option<String>,
    pub stats: AssemblyStats,
    /// Milliseconds since the relay last carried a byte (or since its start).
    pub relay_idle_ms: Option<u64>,
    /// Connections the relay admitted, in all.
    pub relay_connections: u64,
    /// Bytes the relay carried to the guest's service, in all (an older shim: 0).
    #[serde(default)]
    pub relay_bytes_to_guest: u64,
    /// Bytes the relay carried back from it, in all.
    #[serde(default)]
    pub relay_bytes_from_guest: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum ShimReply {
    Done,
    /// `AddSegment` of a segment that was already there.
    Repeated,
    Failed {
        message: String,
    },
    Status(ShimStatus),
    Chunks {
        indices: Vec<u64>,
    },
    Mark {
        generation: u64,
    },
    Data {
        chunks: Vec<ChunkBytes>,
    },
    DeviceState {
        path: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "m", rename_all = "snake_case")]
pub enum ShimMessage {
    Hello(ShimHello),
    Call {
        id: u64,
        call: ShimCall,
    },
    Reply {
        id: u64,
        reply: ShimReply,
    },
    /// Early start: a read of the VM needs this segment (ask the device for it now).
    Fetch {
        segment: u32,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

forage_proto::protocol_kinds!(ShimMessage, "shim", Hello = 64, Call = 65, Reply = 66, Fetch = 67, Error = 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let hello = ShimMessage::Hello(ShimHello {
            format: 1,
            instance: "i".into(),
            pid: 3,
            memory: Some("/m".into()),
            disk: None,
            relay: Some("127.0.0.1:4".into()),
            ca_sha256: None,
        });
        let f = forage_proto::encode(&hello);
        assert_eq!(forage_proto::decode::<ShimMessage>(&f[4..]).unwrap(), hello);
        let r = ShimMessage::Reply { id: 1, reply: ShimReply::Status(ShimStatus::default()) };
        let f = forage_proto::encode(&r);
        assert_eq!(forage_proto::decode::<ShimMessage>(&f[4..]).unwrap(), r);
        let c = ShimMessage::Call {
            id: 2,
            call: ShimCall::Write { space: Space::Disk, chunks: vec![ChunkBytes { index: 1, bytes: vec![1, 2] }] },
        };
        let f = forage_proto::encode(&c);
        assert_eq!(forage_proto::decode::<ShimMessage>(&f[4..]).unwrap(), c);
    }
}
