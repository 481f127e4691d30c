//! libvirt's save-image header (`virsh save`), read so that the QEMU stream behind it can
//! be imported. Written here because libvirt ships no library that reads it without a
//! running daemon; the layout is libvirt's `src/qemu/qemu_saveimage.h`:
//!
//! ```text
//! offset  size  field
//! 0       16    magic "LibvirtQemudSave" ("LibvirtQemudPart": the save never finished)
//! 16      4     version (2; 1 = no cookie)        all u32 in the saving host's byte
//! 20      4     data_len: bytes of XML + cookie    order: a version that reads as more
//! 24      4     was_running                        than 2 is taken byte-swapped, as
//! 28      4     format: 0 raw, 1 gzip, 2 bzip2,    libvirt does
//!               3 xz, 4 lzop, 5 zstd
//! 32      4     cookieOffset (inside the data)
//! 36      56    unused[14]
//! 92      data_len   domain XML (NUL-terminated), cookie XML, padding
//! 92+data_len        the QEMU migration stream ("QEVM" ...)
//! ```
//!
//! Only `format` 0 carries a plain QEMU stream; compressed saves are refused (decompress
//! with the named tool first). The XML is capped at [`MAX_DATA_LEN`].

/// `sizeof(virQEMUSaveHeader)`.
pub const HEADER_LEN: usize = 92;
pub const MAGIC_SAVE: &[u8; 16] = b"LibvirtQemudSave";
pub const MAGIC_PARTIAL: &[u8; 16] = b"LibvirtQemudPart";
/// The newest header version this reader knows.
pub const VERSION: u32 = 2;
/// Largest XML + cookie accepted (libvirt's own domain XML limit is 10 MB).
pub const MAX_DATA_LEN: u32 = 16 << 20;

/// A decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtHeader {
    pub version: u32,
    pub data_len: u32,
    pub was_running: bool,
    /// The saving host's byte order was the other one.
    pub swapped: bool,
}

impl LibvirtHeader {
    /// Where the QEMU stream starts in the file.
    pub fn stream_offset(&self) -> u64 {
        HEADER_LEN as u64 + self.data_len as u64
    }
}

/// Why a libvirt header was refused; `offset` is the byte in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LibvirtHeaderError {
    #[error("byte 0: a libvirt save that never finished (magic LibvirtQemudPart)")]
    Partial,
    #[error("byte 0: no libvirt magic (LibvirtQemudSave)")]
    Magic,
    #[error("byte {offset}: the file ends inside libvirt's {HEADER_LEN}-byte header")]
    Truncated { offset: u64 },
    #[error("byte 16: libvirt save-image version {found}, this reader knows 1 and 2")]
    Version { found: u32 },
    #[error("byte 28: the saved state is compressed ({format}); decompress it first (virsh save-image-edit cannot, use the tool named)")]
    Compressed { format: &'static str },
    #[error("byte 20: {found} bytes of domain XML announced, at most {MAX_DATA_LEN} accepted")]
    DataTooLarge { found: u32 },
    #[error("byte 32: cookie offset {cookie} lies outside the {data_len} bytes of XML data")]
    Cookie { cookie: u32, data_len: u32 },
}

/// Whether `head` (the file's first bytes) starts with a libvirt magic.
pub fn is_libvirt(head: &[u8]) -> bool {
    head.starts_with(MAGIC_SAVE) || head.starts_with(MAGIC_PARTIAL)
}

/// Decode the header from the file's first bytes (at least [`HEADER_LEN`] of them).
pub fn decode(head: &[u8]) -> Result<LibvirtHeader, LibvirtHeaderError> {
    if head.starts_with(MAGIC_PARTIAL) {
        return Err(LibvirtHeaderError::Partial);
    }
    if head.len() < HEADER_LEN {
        return Err(LibvirtHeaderError::Truncated { offset: head.len() as u64 });
    }
    if !head.starts_with(MAGIC_SAVE) {
        return Err(LibvirtHeaderError::Magic);
    }
    let native = |at: usize| u32::from_ne_bytes(head[at..at + 4].try_into().expect("4 bytes"));
    let mut swapped = false;
    let mut word: Box<dyn Fn(usize) -> u32> = Box::new(native);
    if native(16) > VERSION {
        swapped = true;
        word = Box::new(move |at| native(at).swap_bytes());
    }
    let version = word(16);
    if version == 0 || version > VERSION {
        return Err(LibvirtHeaderError::Version { found: native(16) });
    }
    let data_len = word(20);
    let format = match word(28) {
        0 => None,
        1 => Some("gzip"),
        2 => Some("bzip2"),
        3 => Some("xz"),
        4 => Some("lzop"),
        5 => Some("zstd"),
        _ => Some("an unknown format"),
    };
    if let Some(format) = format {
        return Err(LibvirtHeaderError::Compressed { format });
    }
    if data_len > MAX_DATA_LEN {
        return Err(LibvirtHeaderError::DataTooLarge { found: data_len });
    }
    let cookie = word(32);
    if version >= 2 && cookie > data_len {
        return Err(LibvirtHeaderError::Cookie { cookie, data_len });
    }
    Ok(LibvirtHeader { version, data_len, was_running: word(24) != 0, swapped })
}

/// A header as libvirt writes it (this host's byte order), for tests and tools that
/// wrap a QEMU stream as a `virsh save` file: `xml` is padded with NULs to `data_len`.
pub fn encode(xml: &str, was_running: bool, data_len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN + data_len as usize);
    h.extend_from_slice(MAGIC_SAVE);
    for w in [VERSION, data_len, was_running as u32, 0, 0] {
        h.extend_from_slice(&w.to_ne_bytes());
    }
    h.resize(HEADER_LEN, 0);
    h.extend_from_slice(xml.as_bytes());
    h.resize(HEADER_LEN + data_len as usize, 0);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_libvirt_writes_in_either_byte_order() {
        let h = encode("<domain/>", true, 4096);
        let d = decode(&h).unwrap();
        assert_eq!(d, LibvirtHeader { version: 2, data_len: 4096, was_running: true, swapped: false });
        assert_eq!(d.stream_offset(), 92 + 4096);
        let mut other = h.clone();
        for at in (16..36).step_by(4) {
            other[at..at + 4].reverse();
        }
        assert!(decode(&other).unwrap().swapped);
        assert_eq!(decode(&other).unwrap().data_len, 4096);
    }

    #[test]
    fn refuses_what_is_not_a_plain_finished_save() {
        let mut h = encode("<domain/>", false, 64);
        h[..16].copy_from_slice(MAGIC_PARTIAL);
        assert_eq!(decode(&h), Err(LibvirtHeaderError::Partial));
        let mut z = encode("<domain/>", false, 64);
        z[28..32].copy_from_slice(&5u32.to_ne_bytes());
        assert_eq!(decode(&z), Err(LibvirtHeaderError::Compressed { format: "zstd" }));
        assert_eq!(decode(&encode("", false, 64)[..40]), Err(LibvirtHeaderError::Truncated { offset: 40 }));
        let mut big = encode("", false, 0);
        big[20..24].copy_from_slice(&(MAX_DATA_LEN + 1).to_ne_bytes());
        assert!(matches!(decode(&big), Err(LibvirtHeaderError::DataTooLarge { .. })));
        let mut v = encode("", false, 0);
        v[16..20].copy_from_slice(&0u32.to_ne_bytes());
        assert!(matches!(decode(&v), Err(LibvirtHeaderError::Version { .. })));
        let mut c = encode("", false, 8);
        c[32..36].copy_from_slice(&9u32.to_ne_bytes());
        assert!(matches!(decode(&c), Err(LibvirtHeaderError::Cookie { .. })));
        assert_eq!(decode(&[b'Q'; 100]), Err(LibvirtHeaderError::Magic));
    }
}
