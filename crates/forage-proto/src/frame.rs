//! Framing, the same for every protocol: one message is one frame,
//! `u32 LE length | u8 kind | payload`, where `length` counts the kind byte and the
//! payload (at most [`MAX_FRAME`]) and the payload is the message as CBOR (byte strings
//! for bulk bytes). Kind numbers are unique across protocols, except Error (8), which
//! every protocol has; so the first frame of a connection tells which protocol it speaks
//! ([`read_frame`] + [`decode`]).

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest frame (kind + payload): a segment is at most 32 MiB compressed.
pub const MAX_FRAME: u32 = 33 << 20;

/// A protocol's message enum.
pub trait Protocol: Serialize + DeserializeOwned + Sized {
    /// Names the protocol in errors.
    const NAME: &'static str;
    /// The frame's kind byte.
    fn kind(&self) -> u8;
    /// The message's name, for errors and logs.
    fn name(&self) -> &'static str;
    /// Is `kind` one of this protocol's messages?
    fn has_kind(kind: u8) -> bool;
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(u64),
    #[error("empty frame")]
    Empty,
    #[error("message kind {kind} is not one of the {protocol} protocol's")]
    UnknownKind { kind: u8, protocol: &'static str },
    #[error("message kind {kind} does not match its payload ({payload})")]
    KindMismatch { kind: u8, payload: &'static str },
    #[error("unreadable {kind} message: {detail}")]
    Payload { kind: u8, detail: String },
    #[error("peer closed the connection")]
    Closed,
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

/// Encode a message as one frame.
pub fn encode<P: Protocol>(msg: &P) -> Vec<u8> {
    let mut payload = Vec::new();
    ciborium::into_writer(msg, &mut payload).expect("messages encode");
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.extend_from_slice(&((payload.len() + 1) as u32).to_le_bytes());
    frame.push(msg.kind());
    frame.extend_from_slice(&payload);
    frame
}

/// Check a frame length read off the wire.
pub fn check_len(len: u32) -> Result<(), ProtoError> {
    match len {
        0 => Err(ProtoError::Empty),
        l if l > MAX_FRAME => Err(ProtoError::TooLarge(l as u64)),
        _ => Ok(()),
    }
}

/// Decode a frame's body (kind byte + payload; untrusted bytes) as a message of `P`.
pub fn decode<P: Protocol>(body: &[u8]) -> Result<P, ProtoError> {
    let (&kind, payload) = body.split_first().ok_or(ProtoError::Empty)?;
    if !P::has_kind(kind) {
        return Err(ProtoError::UnknownKind { kind, protocol: P::NAME });
    }
    let msg: P = ciborium::from_reader(payload).map_err(|e| ProtoError::Payload { kind, detail: e.to_string() })?;
    if msg.kind() != kind {
        return Err(ProtoError::KindMismatch { kind, payload: msg.name() });
    }
    Ok(msg)
}

/// The kind of a frame body read with [`read_frame`].
pub fn kind_of(body: &[u8]) -> Option<u8> {
    body.first().copied()
}

/// Blocking I/O.
pub mod blocking {
    use std::io::{Read, Write};

    use super::*;

    /// Write one frame and flush it (see the asynchronous `write`).
    pub fn write<P: Protocol>(w: &mut impl Write, msg: &P) -> Result<(), ProtoError> {
        w.write_all(&encode(msg))?;
        w.flush()?;
        Ok(())
    }

    /// One frame's body (kind + payload), undecoded.
    pub fn read_frame(r: &mut impl Read) -> Result<Vec<u8>, ProtoError> {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ProtoError::Closed),
            other => other?,
        }
        let len = u32::from_le_bytes(len);
        check_len(len)?;
        let mut body = Vec::new();
        r.take(len as u64).read_to_end(&mut body)?;
        if body.len() != len as usize {
            return Err(ProtoError::Closed);
        }
        Ok(body)
    }

    pub fn read<P: Protocol>(r: &mut impl Read) -> Result<P, ProtoError> {
        decode(&read_frame(r)?)
    }
}

/// Asynchronous I/O (tokio).
#[cfg(feature = "tokio")]
pub mod asynchronous {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::*;

    /// Write one frame and flush it: over TLS the frame's last record otherwise waits in
    /// the TLS layer's buffer until the next write, and a peer waiting for it (a demand
    /// fetch) waits forever.
    pub async fn write<P: Protocol>(w: &mut (impl AsyncWrite + Unpin), msg: &P) -> Result<(), ProtoError> {
        w.write_all(&encode(msg)).await?;
        w.flush().await?;
        Ok(())
    }

    /// One frame's body (kind + payload), undecoded: to see which protocol a connection
    /// speaks before decoding its first message.
    pub async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> Result<Vec<u8>, ProtoError> {
        let len = match r.read_u32_le().await {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ProtoError::Closed),
            other => other?,
        };
        check_len(len)?;
        let mut body = Vec::new();
        r.take(len as u64).read_to_end(&mut body).await?;
        if body.len() != len as usize {
            return Err(ProtoError::Closed);
        }
        Ok(body)
    }

    pub async fn read<P: Protocol>(r: &mut (impl AsyncRead + Unpin)) -> Result<P, ProtoError> {
        decode(&read_frame(r).await?)
    }
}

/// `impl Protocol` for a message enum from its variants' kind numbers.
#[macro_export]
macro_rules! protocol_kinds {
    ($ty:ty, $name:literal, $($variant:ident = $kind:literal),+ $(,)?) => {
        impl $ty {
            /// The frame's kind byte.
            pub fn kind(&self) -> u8 {
                match self {
                    $(Self::$variant { .. } => $kind,)+
                }
            }
            /// The message's name, for errors and logs.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Self::$variant { .. } => stringify!($variant),)+
                }
            }
        }
        impl $crate::frame::Protocol for $ty {
            const NAME: &'static str = $name;
            fn kind(&self) -> u8 {
                <$ty>::kind(self)
            }
            fn name(&self) -> &'static str {
                <$ty>::name(self)
            }
            fn has_kind(kind: u8) -> bool {
                matches!(kind, $($kind)|+)
            }
        }
    };
}
