//! The destination's side of the segments: decode each one against the destination's
//! base (or nothing, without the base) and write its chunks into the VM being rebuilt.
//! Segments apply in sequence order; a later round's chunk overwrites an earlier one.

use crate::segment::{decode, ChunkId, SegmentError, Space, CHUNK};

/// A segment the destination cannot apply.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("segment {seq} arrived where {due} was due")]
    OutOfOrder { seq: u64, due: u64 },
    #[error("segment {seq}")]
    Segment {
        seq: u64,
        #[source]
        source: SegmentError,
    },
    #[error("segment {seq}: {space:?} chunk {index} is outside the VM ({limit} chunks)")]
    Outside { seq: u64, space: Space, index: u64, limit: u64 },
    #[error("segment {seq}: writing {space:?} chunk {index}")]
    Write {
        seq: u64,
        space: Space,
        index: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Where the destination's chunks live.
pub trait ChunkStore {
    /// The base VM's chunk at `id`, if the destination holds the base.
    fn base(&mut self, id: ChunkId) -> Option<Vec<u8>>;
    /// Put the rebuilt chunk at `id`.
    fn write(&mut self, id: ChunkId, data: &[u8]) -> std::io::Result<()>;
}

/// Totals of what was applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub segments: u64,
    pub chunks: u64,
    /// Chunks written (the others were already right: the base's, or zero).
    pub written: u64,
}

/// Applies segments in order, checking each one and every chunk's place.
pub struct Applier<S> {
    store: S,
    /// Chunks per space (memory, disk): a place beyond is refused.
    limits: [u64; 2],
    /// Chunks written so far, per space: until a chunk is written it holds the base's
    /// bytes (or zeros), so a chunk equal to those needs no write.
    written: [Vec<u64>; 2],
    next: u64,
    pub applied: Applied,
}

fn slot(space: Space) -> usize {
    match space {
        Space::Memory => 0,
        Space::Disk => 1,
    }
}

impl<S: ChunkStore> Applier<S> {
    pub fn new(store: S, memory_bytes: u64, disk_bytes: u64) -> Self {
        let limits = [memory_bytes / CHUNK as u64, disk_bytes / CHUNK as u64];
        let written = [vec![0; limits[0].div_ceil(64) as usize], vec![0; limits[1].div_ceil(64) as usize]];
        Self { store, limits, written, next: 0, applied: Applied::default() }
    }

    /// Apply segment `seq` (untrusted bytes). Segments must come in order from 0.
    pub fn apply(&mut self, seq: u64, bytes: &[u8]) -> Result<(), ApplyError> {
        if seq != self.next {
            return Err(ApplyError::OutOfOrder { seq, due: self.next });
        }
        let limits = self.limits;
        let store = &mut self.store;
        let mut own = |id: ChunkId| if id.index < limits[slot(id.space)] { store.base(id) } else { None };
        let chunks = decode(bytes, &mut own).map_err(|source| ApplyError::Segment { seq, source })?;
        for (id, data) in chunks {
            let s = slot(id.space);
            if id.index >= self.limits[s] {
                return Err(ApplyError::Outside { seq, space: id.space, index: id.index, limit: self.limits[s] });
            }
            let (word, bit) = ((id.index / 64) as usize, 1u64 << (id.index % 64));
            let already = self.written[s][word] & bit != 0;
            let unchanged = !already && {
                let base = self.store.base(id);
                match base {
                    Some(b) => b == data,
                    None => forage_format::chunk::is_zero(&data),
                }
            };
            if !unchanged {
                self.store.write(id, &data).map_err(|source| ApplyError::Write {
                    seq,
                    space: id.space,
                    index: id.index,
                    source,
                })?;
                self.written[s][word] |= bit;
                self.applied.written += 1;
            }
            self.applied.chunks += 1;
        }
        self.next += 1;
        self.applied.segments += 1;
        Ok(())
    }

    pub fn store(&mut self) -> &mut S {
        &mut self.store
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::adapt::parse_mode;
    use crate::segment::{encode, Modified};

    #[derive(Default)]
    struct Mem {
        base: HashMap<ChunkId, Vec<u8>>,
        now: HashMap<ChunkId, Vec<u8>>,
        has_base: bool,
    }

    impl ChunkStore for Mem {
        fn base(&mut self, id: ChunkId) -> Option<Vec<u8>> {
            self.has_base.then(|| self.base.get(&id).cloned().unwrap_or_else(|| vec![0; CHUNK]))
        }
        fn write(&mut self, id: ChunkId, data: &[u8]) -> std::io::Result<()> {
            self.now.insert(id, data.to_vec());
            Ok(())
        }
    }

    /// The error's whole chain, as a peer is told it.
    fn chain(e: &dyn std::error::Error) -> String {
        std::iter::successors(Some(e), |e| e.source()).map(|e| e.to_string()).collect::<Vec<_>>().join(": ")
    }

    fn id(space: Space, index: u64) -> ChunkId {
        ChunkId { space, index }
    }

    #[test]
    fn rounds_overwrite_and_unchanged_chunks_are_not_written() {
        let b = vec![5u8; CHUNK];
        let mut store = Mem { has_base: true, ..Default::default() };
        store.base.insert(id(Space::Memory, 1), b.clone());
        let mut a = Applier::new(store, 8 * CHUNK as u64, 8 * CHUNK as u64);
        let mode = parse_mode("xor+zstd1").unwrap();
        let first = [
            Modified { chunk: id(Space::Memory, 1), data: b.clone(), base: Some(b.clone()) },
            Modified { chunk: id(Space::Memory, 2), data: vec![9; CHUNK], base: Some(vec![0; CHUNK]) },
            Modified { chunk: id(Space::Disk, 0), data: vec![3; CHUNK], base: Some(vec![0; CHUNK]) },
        ];
        a.apply(0, &encode(mode, &first).0).unwrap();
        assert_eq!(a.applied.written, 2, "the chunk equal to the base is not written");
        // Round two: chunk 2 goes back to zero, which must now be written.
        let second = [Modified { chunk: id(Space::Memory, 2), data: vec![0; CHUNK], base: Some(vec![0; CHUNK]) }];
        a.apply(1, &encode(mode, &second).0).unwrap();
        assert_eq!(a.store().now[&id(Space::Memory, 2)], vec![0; CHUNK]);
        assert_eq!(a.store().now[&id(Space::Disk, 0)], vec![3; CHUNK]);
        // Out of order and out of range are refused.
        assert!(matches!(a.apply(5, &encode(mode, &second).0), Err(ApplyError::OutOfOrder { seq: 5, due: 2 })));
        let far = [Modified { chunk: id(Space::Disk, 8), data: vec![1; CHUNK], base: None }];
        assert!(matches!(a.apply(2, &encode(mode, &far).0), Err(ApplyError::Outside { index: 8, limit: 8, .. })));
    }

    #[test]
    fn without_the_base_deltas_are_refused() {
        let mut a = Applier::new(Mem::default(), 8 * CHUNK as u64, 0);
        let mode = parse_mode("xor+none").unwrap();
        let c = [Modified { chunk: id(Space::Memory, 0), data: vec![1; CHUNK], base: Some(vec![2; CHUNK]) }];
        let refused = a.apply(0, &encode(mode, &c).0).unwrap_err();
        assert!(matches!(&refused, ApplyError::Segment { source: SegmentError::NoBase { .. }, .. }));
        assert!(chain(&refused).contains("does not have"), "the cause is kept: {refused:?}");
        let mut a = Applier::new(Mem::default(), 8 * CHUNK as u64, 0);
        let c = [Modified { chunk: id(Space::Memory, 0), data: vec![1; CHUNK], base: None }];
        a.apply(0, &encode(mode, &c).0).unwrap();
        assert_eq!(a.applied.written, 1);
    }
}
