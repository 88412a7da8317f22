//! The inbound WebSocket frame decoder, fed a byte stream cut at arbitrary points: whatever
//! the cuts, it decodes the same frames and stops at the same error as when the stream
//! arrives whole; it never asks for fewer bytes than it has, and no frame it returns breaks
//! the limits (payload within max_payload, control frames final and at most 125 bytes).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sidecast::wire::inbound::{decode, Decoded, Frame, FrameError, OpCode};

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Frames(Vec<Frame>),
    Error(Vec<Frame>, FrameError),
}

/// Decodes `chunks` arriving one after the other, as the connection's reader does.
fn run<'a>(chunks: impl Iterator<Item = &'a [u8]>, max_payload: usize) -> Outcome {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let had = buf.len();
            match decode(&mut buf, max_payload) {
                Ok(Decoded::Frame(frame)) => {
                    assert!(frame.payload.len() <= max_payload);
                    if matches!(frame.opcode, OpCode::Close | OpCode::Ping | OpCode::Pong) {
                        assert!(frame.fin && frame.payload.len() <= 125, "{frame:?}");
                    }
                    assert!(buf.len() < had, "a frame consumes bytes");
                    frames.push(frame);
                }
                Ok(Decoded::Incomplete(needed)) => {
                    assert!(needed > had, "asks for {needed} bytes with {had} in hand");
                    break;
                }
                Err(error) => return Outcome::Error(frames, error),
            }
        }
    }
    Outcome::Frames(frames)
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    // The limit and the cuts come from the first byte.
    let max_payload = [0usize, 1, 125, 126, 65_535, 65_536, 1 << 20][usize::from(control % 7)];
    let step = usize::from(control >> 3).max(1);
    let whole = run(std::iter::once(stream), max_payload);
    let cut = run(stream.chunks(step), max_payload);
    assert_eq!(whole, cut, "cut every {step} bytes");
    let bytewise = run(stream.chunks(1), max_payload);
    assert_eq!(whole, bytewise, "one byte at a time");
});
