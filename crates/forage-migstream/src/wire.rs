//! The stream's numbers: magic, version, section types, RAM record flags.

/// Size of a target page (x86: `TARGET_PAGE_BITS` = 12).
pub const PAGE_SIZE: usize = 4096;
/// Default cap on the opaque device-state tail.
pub const DEFAULT_MAX_DEVICE_BYTES: usize = 64 << 20;

/// `QEVM`, the first four bytes of every stream.
pub const FILE_MAGIC: u32 = 0x5145_564d;
/// The stream version QEMU 7.2 writes and accepts.
pub const FILE_VERSION: u32 = 3;

/// Top-level section type bytes.
pub mod section {
    pub const EOF: u8 = 0x00;
    pub const START: u8 = 0x01;
    pub const PART: u8 = 0x02;
    pub const END: u8 = 0x03;
    pub const FULL: u8 = 0x04;
    pub const SUBSECTION: u8 = 0x05;
    pub const VMDESCRIPTION: u8 = 0x06;
    pub const CONFIGURATION: u8 = 0x07;
    pub const COMMAND: u8 = 0x08;
    pub const FOOTER: u8 = 0x7e;
}

/// Flags in the low bits of a RAM record's be64.
pub mod ram_flag {
    pub const ZERO: u64 = 0x02;
    pub const MEM_SIZE: u64 = 0x04;
    pub const PAGE: u64 = 0x08;
    pub const EOS: u64 = 0x10;
    pub const CONTINUE: u64 = 0x20;
    pub const XBZRLE: u64 = 0x40;
    pub const HOOK: u64 = 0x80;
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// Bits of the be64 that are flags rather than offset.
    pub const MASK: u64 = 0xfff;
}

/// The `idstr` of QEMU's RAM section.
pub const RAM_IDSTR: &str = "ram";
/// `MIG_CMD_PACKAGED`, the postcopy command that wraps a whole sub-stream.
pub const CMD_PACKAGED: u16 = 7;
