//! What an assembly reports.

/// What the assembly has seen so far (for reports and the bench).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AssemblyStats {
    pub segments: u32,
    pub segments_arrived: u32,
    /// Segments asked for out of order because a read needed them.
    pub demand_fetches: u32,
    /// Compressed bytes of the segments that arrived.
    pub bytes_arrived: u64,
    /// Blobs of the overlay whose chunks the VM has read (or overwritten partly).
    pub blobs_accessed: u64,
    pub blobs: u64,
    /// Reads that had to wait for a segment, and how long they waited in total.
    pub reads_waited: u64,
    pub wait_ms: u64,
    /// Chunks the VM wrote (its changes against the launch VM).
    pub chunks_written: u64,
}
