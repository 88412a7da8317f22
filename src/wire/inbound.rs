//! Frames from the client (RFC 6455 §5.2): a pure decoder over a read buffer.
//!
//! `ws::reader` fills the buffer and calls [`decode`] for each frame. The decoder enforces what RFC 6455 asks of a client's frames (masked, no reserved bits
//! or opcodes, control frames short and unfragmented) and the configured frame size;
//! reassembling fragments and checking UTF-8 is the session's job.

use bytes::{Buf, BytesMut};

use super::close;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// One frame, its payload unmasked.
#[derive(Debug)]
pub struct Frame {
    pub fin: bool,
    pub opcode: OpCode,
    pub payload: BytesMut,
}

/// A frame that breaks the protocol; each is answered with [`FrameError::close_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("reserved bits set")]
    ReservedBits,
    #[error("reserved opcode {0}")]
    ReservedOpcode(u8),
    #[error("client frames must be masked")]
    Unmasked,
    #[error("fragmented control frame")]
    FragmentedControl,
    #[error("control frame longer than 125 bytes")]
    ControlTooLong,
    #[error("the most significant bit of a 64-bit length is set")]
    LengthHighBit,
    #[error("message too big")]
    TooBig,
}

impl FrameError {
    /// 1009 for a frame over the size limit, 1002 (protocol error) for the rest.
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::TooBig => close::TOO_BIG,
            _ => close::PROTOCOL_ERROR,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Frame(Frame),
    /// The buffer must hold at least this many bytes before the next frame can be decoded.
    Incomplete(usize),
}

impl PartialEq for Frame {
    fn eq(&self, other: &Frame) -> bool {
        (self.fin, self.opcode, &self.payload[..]) == (other.fin, other.opcode, &other.payload[..])
    }
}
impl Eq for Frame {}

/// Takes the next whole frame off the front of `buf`, refusing payloads over `max_payload`
/// as soon as the header announces them.
pub fn decode(buf: &mut BytesMut, max_payload: usize) -> Result<Decoded, FrameError> {
    if buf.len() < 2 {
        return Ok(Decoded::Incomplete(2));
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let opcode = match b0 & 0x0f {
        0 => OpCode::Continuation,
        1 => OpCode::Text,
        2 => OpCode::Binary,
        8 => OpCode::Close,
        9 => OpCode::Ping,
        10 => OpCode::Pong,
        other => return Err(FrameError::ReservedOpcode(other)),
    };
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 == 0 {
        return Err(FrameError::Unmasked);
    }
    let (extended, header) = match b1 & 0x7f {
        126 => (2, 8),
        127 => (8, 14),
        _ => (0, 6),
    };
    if buf.len() < 2 + extended {
        return Ok(Decoded::Incomplete(header));
    }
    let length = match extended {
        0 => u64::from(b1 & 0x7f),
        2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
        _ => u64::from_be_bytes(buf[2..10].try_into().expect("eight bytes")),
    };
    if opcode.is_control() {
        if !fin {
            return Err(FrameError::FragmentedControl);
        }
        if length > 125 {
            return Err(FrameError::ControlTooLong);
        }
    }
    if length >> 63 != 0 {
        return Err(FrameError::LengthHighBit);
    }
    if length > max_payload as u64 {
        return Err(FrameError::TooBig);
    }
    let length = length as usize;
    let Some(total) = header.checked_add(length) else {
        return Err(FrameError::TooBig);
    };
    if buf.len() < total {
        return Ok(Decoded::Incomplete(total));
    }
    let mask: [u8; 4] = buf[header - 4..header].try_into().expect("four bytes");
    buf.advance(header);
    let mut payload = buf.split_to(length);
    fastwebsockets::unmask(&mut payload, mask);
    Ok(Decoded::Frame(Frame {
        fin,
        opcode,
        payload,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: FIN and opcode byte, payload, masked with a fixed key.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Decoded {
        Decoded::Frame(Frame {
            fin,
            opcode,
            payload: BytesMut::from(payload),
        })
    }

    #[test]
    fn decodes_frames_of_every_length_byte_by_byte() {
        let big = vec![b'x'; 70_000];
        let mut wire = client_frame(0x81, b"hello");
        wire.extend(client_frame(0x01, &big[..300]));
        wire.extend(client_frame(0x80, &big));
        wire.extend(client_frame(0x89, b"p"));
        wire.extend(client_frame(0x88, &[0x03, 0xe8]));
        let expected = [
            frame(true, OpCode::Text, b"hello"),
            frame(false, OpCode::Text, &big[..300]),
            frame(true, OpCode::Continuation, &big),
            frame(true, OpCode::Ping, b"p"),
            frame(true, OpCode::Close, &[0x03, 0xe8]),
        ];
        // Fed one byte at a time, then all at once: the same frames.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in &wire {
            buf.extend_from_slice(&[*byte]);
            while let Decoded::Frame(f) = decode(&mut buf, 100_000).unwrap() {
                got.push(Decoded::Frame(f));
            }
        }
        assert_eq!(got, expected);
        let mut buf = BytesMut::from(&wire[..]);
        for e in &expected {
            assert_eq!(&decode(&mut buf, 100_000).unwrap(), e);
        }
        assert!(buf.is_empty());
        assert_eq!(decode(&mut buf, 100_000).unwrap(), Decoded::Incomplete(2));
    }

    #[test]
    fn says_how_much_it_needs() {
        let wire = client_frame(0x81, &[b'a'; 200]);
        let mut buf = BytesMut::from(&wire[..1]);
        assert_eq!(decode(&mut buf, 1000).unwrap(), Decoded::Incomplete(2));
        let mut buf = BytesMut::from(&wire[..3]);
        assert_eq!(decode(&mut buf, 1000).unwrap(), Decoded::Incomplete(8));
        let mut buf = BytesMut::from(&wire[..20]);
        assert_eq!(decode(&mut buf, 1000).unwrap(), Decoded::Incomplete(208));
    }

    #[test]
    fn refuses_what_the_protocol_forbids() {
        let cases: [(Vec<u8>, FrameError); 8] = [
            (client_frame(0xc1, b"x"), FrameError::ReservedBits),
            (client_frame(0x83, b"x"), FrameError::ReservedOpcode(3)),
            (client_frame(0x8b, b"x"), FrameError::ReservedOpcode(11)),
            (vec![0x81, 0x01, b'x'], FrameError::Unmasked),
            (client_frame(0x09, b"x"), FrameError::FragmentedControl),
            (client_frame(0x89, &[0; 126]), FrameError::ControlTooLong),
            (client_frame(0x81, &[0; 101]), FrameError::TooBig),
            (
                vec![0x81, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
                FrameError::LengthHighBit,
            ),
        ];
        for (wire, error) in cases {
            let mut buf = BytesMut::from(&wire[..]);
            assert_eq!(decode(&mut buf, 100), Err(error.clone()), "{error}");
        }
        // Too big is known from the header alone, before the payload arrives.
        let wire = client_frame(0x81, &[0; 70_000]);
        let mut buf = BytesMut::from(&wire[..10]);
        assert_eq!(decode(&mut buf, 65_536), Err(FrameError::TooBig));
        // With a limit near usize::MAX, the largest legal length neither overflows the
        // frame's total size nor reserves it.
        let mut huge = vec![0x81, 0xff];
        huge.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        let mut buf = BytesMut::from(&huge[..]);
        let total = 14 + (u64::MAX >> 1) as usize;
        assert_eq!(decode(&mut buf, usize::MAX), Ok(Decoded::Incomplete(total)));
        assert_eq!(FrameError::TooBig.close_code(), 1009);
        assert_eq!(FrameError::Unmasked.close_code(), 1002);
    }
}
