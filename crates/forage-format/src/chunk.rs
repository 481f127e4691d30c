//! Chunks and the references that describe them.

use serde::{Deserialize, Serialize};

/// Granularity of everything: 4 KiB, the page size of common guests (the paper's choice).
pub const CHUNK_SIZE: usize = 4096;

/// Which part of the VM a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Space {
    Disk,
    Memory,
}

impl Space {
    pub fn name(self) -> &'static str {
        match self {
            Space::Disk => "disk",
            Space::Memory => "memory",
        }
    }
}

/// How a modified chunk of the launch VM is rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkRef {
    /// All zero bytes (rule 4).
    Zero,
    /// Free in the guest (trimmed, free in the file system, or a reported free page): not
    /// carried; rebuilt as zeros.
    Free,
    /// Equal to chunk N of the base disk (rule 1).
    BaseDisk(u64),
    /// Equal to chunk N of the base memory (rule 2).
    BaseMemory(u64),
    /// The first occurrence of blob N.
    New(u32),
    /// A duplicate of blob N first seen in the same space (rule 3).
    SameSpace(u32),
    /// A duplicate of blob N first seen in the other space, memory <-> disk (rule 5).
    CrossSpace(u32),
    /// Equal to block N of the overlay's package volume (format 3: the regular files of
    /// the Debian packages it lists, in 4 KiB blocks).
    Package(u64),
}

impl ChunkRef {
    pub fn blob(self) -> Option<u32> {
        match self {
            ChunkRef::New(b) | ChunkRef::SameSpace(b) | ChunkRef::CrossSpace(b) => Some(b),
            _ => None,
        }
    }

    /// Name of the reference kind, as counted by `overlay inspect`.
    pub fn kind(self) -> &'static str {
        match self {
            ChunkRef::Zero => "zero",
            ChunkRef::Free => "free",
            ChunkRef::BaseDisk(_) => "base_disk",
            ChunkRef::BaseMemory(_) => "base_memory",
            ChunkRef::New(_) => "new",
            ChunkRef::SameSpace(_) => "same_space",
            ChunkRef::CrossSpace(_) => "cross_space",
            ChunkRef::Package(_) => "package",
        }
    }
}

/// One modified chunk of the launch VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    pub space: Space,
    pub index: u64,
    #[serde(rename = "ref")]
    pub reference: ChunkRef,
}

pub fn is_zero(chunk: &[u8]) -> bool {
    // Compare in u64 words; the compiler vectorizes this.
    chunk.chunks_exact(8).all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
        && chunk.chunks_exact(8).remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut c = vec![0u8; CHUNK_SIZE];
        assert!(is_zero(&c));
        c[4095] = 1;
        assert!(!is_zero(&c));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn blob_refs() {
        assert_eq!(ChunkRef::CrossSpace(3).blob(), Some(3));
        assert_eq!(ChunkRef::BaseDisk(3).blob(), None);
        assert_eq!(ChunkRef::SameSpace(0).kind(), "same_space");
    }
}
