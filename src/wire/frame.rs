//! Server-to-client WebSocket frames (RFC 6455 §5.2), encoded once into shared `Bytes`.
//!
//! The hub and the session build frames here; the outbox writes them to the socket as
//! they are. Server frames are never masked, so one encoded frame can go to any
//! number of connections without a copy.

use bytes::{BufMut, Bytes, BytesMut};

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PONG: u8 = 0xA;

fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut out = BytesMut::with_capacity(len + 10);
    out.put_u8(0x80 | opcode);
    if len < 126 {
        out.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        out.put_u8(126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
    out.put_slice(payload);
    out.freeze()
}

/// A final text frame. `payload` must be UTF-8 (every JSON we send is).
pub fn text(payload: &[u8]) -> Bytes {
    frame(OP_TEXT, payload)
}

pub fn pong(payload: &[u8]) -> Bytes {
    frame(OP_PONG, payload)
}

/// A close frame; the reason is cut to 123 bytes at a UTF-8 boundary, as §5.5 requires.
pub fn close(code: u16, reason: &str) -> Bytes {
    let reason = truncate_reason(reason);
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    frame(OP_CLOSE, &payload)
}

pub fn truncate_reason(reason: &str) -> &str {
    const MAX: usize = 123;
    if reason.len() <= MAX {
        return reason;
    }
    let mut end = MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths() {
        assert_eq!(&text(b"hi")[..], &[0x81, 2, b'h', b'i']);
        let f = text(&[b'a'; 200]);
        assert_eq!(&f[..4], &[0x81, 126, 0, 200]);
        let f = text(&vec![b'a'; 70_000]);
        assert_eq!(&f[..2], &[0x81, 127]);
        assert_eq!(f.len(), 70_010);
    }

    #[test]
    fn close_reason_is_cut_at_a_char_boundary() {
        let long = "é".repeat(100);
        let f = close(4004, &long);
        assert_eq!(f[0], 0x88);
        let len = f[1] as usize;
        assert!(len <= 125);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
        assert_eq!(&f[2..4], &4004u16.to_be_bytes());
    }
}
