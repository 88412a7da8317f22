//! Server-Sent Events made from the frames a WebSocket connection would have been sent.
//!
//! A client on the SSE transport gets exactly the messages of the WebSocket protocol: the
//! connection writes its usual server frames, and [`Translator`] turns each text frame into
//! one event whose `data` is the message, and the Close frame into a `close` event that ends
//! the stream. It also keeps the stream position of every channel announced by a `sub` push
//! and writes them as the event `id` after each `sub` and `pub` that moves one, so that a
//! client reconnecting with `Last-Event-ID` recovers what it missed. docs/protocol.md
//! (section 15) is the specification.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use serde::Deserialize;

use super::position::Position;

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;

/// Turns server frames into SSE events.
#[derive(Default)]
pub struct Translator {
    /// Frame bytes not yet complete.
    pending: BytesMut,
    /// The position of each recoverable channel announced by a `sub` push.
    positions: BTreeMap<String, Position>,
    closed: bool,
}

impl Translator {
    /// Adds frame bytes and writes the events of every frame now complete to `out`.
    /// Nothing is written once the Close frame has been translated.
    pub fn feed(&mut self, bytes: &[u8], out: &mut BytesMut) {
        self.pending.extend_from_slice(bytes);
        while !self.closed {
            let Some((opcode, header, len)) = head(&self.pending) else {
                break;
            };
            if self.pending.len() < header + len {
                break;
            }
            self.pending.advance(header);
            let payload = self.pending.split_to(len);
            match opcode {
                OP_TEXT => self.message(&payload, out),
                OP_CLOSE => {
                    close_event(&payload, out);
                    self.closed = true;
                }
                // Pongs answer WebSocket pings, which this transport never receives.
                _ => {}
            }
        }
        if self.closed {
            self.pending = BytesMut::new();
        }
    }

    /// True once the Close frame has been translated: the stream ends.
    pub fn closed(&self) -> bool {
        self.closed
    }

    fn message(&mut self, payload: &[u8], out: &mut BytesMut) {
        if self.track(payload) {
            out.put_slice(b"id: ");
            out.put_slice(&last_event_id(&self.positions));
            out.put_u8(b'\n');
        }
        // A publication's data is verbatim and may hold line breaks (JSON whitespace):
        // each line is a `data` line, which the reader joins with "\n".
        for line in payload.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            out.put_slice(b"data: ");
            for part in line.split(|&b| b == b'\r') {
                out.put_slice(part);
            }
            out.put_u8(b'\n');
        }
        out.put_u8(b'\n');
    }

    /// Follows the positions a message moves; true when one moved.
    fn track(&mut self, payload: &[u8]) -> bool {
        // Replies start with `{"id":`, and most pushes cannot move a position: only these
        // three are read.
        let kind = [&b"pub"[..], b"sub", b"unsub"].into_iter().find(|kind| {
            payload
                .strip_prefix(&b"{\"type\":\""[..])
                .and_then(|rest| rest.strip_prefix(*kind))
                .is_some_and(|rest| rest.first() == Some(&b'"'))
        });
        let Some(kind) = kind else {
            return false;
        };
        let Ok(head) = serde_json::from_slice::<Head>(payload) else {
            return false;
        };
        match kind {
            b"sub" => match (head.offset, head.epoch) {
                (Some(offset), Some(epoch)) => {
                    let epoch = Arc::from(epoch.as_ref());
                    self.positions
                        .insert(head.channel.into_owned(), Position { offset, epoch });
                    true
                }
                _ => false,
            },
            b"pub" => match (self.positions.get_mut(head.channel.as_ref()), head.offset) {
                (Some(position), Some(offset)) => {
                    position.offset = offset;
                    true
                }
                _ => false,
            },
            _ => {
                self.positions.remove(head.channel.as_ref());
                false
            }
        }
    }
}

/// What a position-moving message says, its other fields skipped.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    offset: Option<u64>,
    #[serde(borrow)]
    epoch: Option<Cow<'a, str>>,
}

/// `{"channel":{"offset":N,"epoch":"E"},…}`: the same object as `connect`'s `subs`.
fn last_event_id(positions: &BTreeMap<String, Position>) -> Vec<u8> {
    let map: serde_json::Map<String, serde_json::Value> = positions
        .iter()
        .map(|(channel, p)| {
            let position = serde_json::json!({"offset": p.offset, "epoch": &*p.epoch});
            (channel.clone(), position)
        })
        .collect();
    serde_json::to_vec(&map).expect("a map of positions encodes")
}

/// `event: close` with the frame's code and reason.
fn close_event(payload: &[u8], out: &mut BytesMut) {
    let code = match payload {
        [a, b, ..] => u16::from_be_bytes([*a, *b]),
        _ => super::close::NORMAL,
    };
    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default());
    let data = serde_json::json!({"code": code, "reason": reason});
    out.put_slice(b"event: close\ndata: ");
    out.put_slice(data.to_string().as_bytes());
    out.put_slice(b"\n\n");
}

/// A server frame's opcode, header length and payload length, once its header is complete.
/// Server frames are never masked.
fn head(buf: &[u8]) -> Option<(u8, usize, usize)> {
    let [first, second, ..] = *buf else {
        return None;
    };
    let opcode = first & 0x0F;
    match second & 0x7F {
        126 => {
            let len = u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?);
            Some((opcode, 4, len as usize))
        }
        127 => {
            let len = u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?);
            Some((opcode, 10, len as usize))
        }
        len => Some((opcode, 2, len as usize)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame;
    use super::super::message::ServerMessage;
    use super::super::position::Attach;
    use super::*;

    fn translate(frames: &[bytes::Bytes]) -> String {
        let mut translator = Translator::default();
        let mut out = BytesMut::new();
        // Byte by byte: a frame split anywhere is still one event.
        for frame in frames {
            for byte in frame.iter() {
                translator.feed(&[*byte], &mut out);
            }
        }
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn messages_become_events_and_close_ends_the_stream() {
        let text = translate(&[
            frame::text(br#"{"id":1,"result":{}}"#),
            frame::text(b"{\"type\":\"pub\",\"channel\":\"a\",\"data\":{\n\"x\":1\r\n}}"),
            frame::close(4002, "token expired"),
            frame::text(br#"{"id":2,"result":{}}"#),
        ]);
        assert_eq!(
            text,
            "data: {\"id\":1,\"result\":{}}\n\n\
             data: {\"type\":\"pub\",\"channel\":\"a\",\"data\":{\n\
             data: \"x\":1\n\
             data: }}\n\n\
             event: close\ndata: {\"code\":4002,\"reason\":\"token expired\"}\n\n"
        );
    }

    #[test]
    fn positions_of_sub_channels_are_the_event_id() {
        let attach = Attach {
            position: Some(Position {
                offset: 7,
                epoch: Arc::from("e1"),
            }),
            recovery: None,
            receipts: false,
        };
        let sub = ServerMessage::Sub {
            channel: "room:1",
            attach: &attach,
        }
        .frame();
        let publication = |channel: &str, offset: u64| {
            ServerMessage::Pub {
                channel,
                data: b"{}",
                offset: Some(offset),
                trace: None,
            }
            .frame()
        };
        let unsub = frame::text(br#"{"type":"unsub","channel":"room:1","code":2000}"#);
        let text = translate(&[
            sub,
            publication("room:1", 8),
            publication("other", 3),
            unsub,
            publication("room:1", 9),
        ]);
        let ids: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("id: "))
            .collect();
        assert_eq!(
            ids,
            [
                r#"{"room:1":{"epoch":"e1","offset":7}}"#,
                r#"{"room:1":{"epoch":"e1","offset":8}}"#,
            ]
        );
    }

    proptest::proptest! {
        /// However the socket's bytes are cut, the events are the same.
        #[test]
        fn any_cut_gives_the_same_events(
            texts in proptest::collection::vec("[ -~\n\r]{0,300}", 1..6),
            cuts in proptest::collection::vec(1usize..200, 1..20),
        ) {
            let frames: Vec<bytes::Bytes> = texts.iter().map(|t| frame::text(t.as_bytes())).collect();
            let whole: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
            let mut one = Translator::default();
            let mut expected = BytesMut::new();
            one.feed(&whole, &mut expected);
            let mut cut = Translator::default();
            let mut got = BytesMut::new();
            let mut rest = &whole[..];
            for size in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (head, tail) = rest.split_at((*size).min(rest.len()));
                cut.feed(head, &mut got);
                rest = tail;
            }
            proptest::prop_assert_eq!(&got[..], &expected[..]);
            // One event per frame, none of whose lines holds a line break.
            let text = String::from_utf8(expected.to_vec()).unwrap();
            proptest::prop_assert_eq!(text.matches("\n\n").count(), frames.len());
            proptest::prop_assert!(!text.contains('\r'));
        }
    }

    #[test]
    fn long_frames_are_read_whole() {
        let data = format!("\"{}\"", "x".repeat(70_000));
        let frame = frame::text(format!(r#"{{"type":"message","data":{data}}}"#).as_bytes());
        let text = translate(&[frame]);
        assert_eq!(text.len(), "data: \n\n".len() + 70_002 + 26);
    }
}
