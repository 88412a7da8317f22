//! Client commands of protocol v1: pure decoding of a complete text message.
//!
//! The connection's command handler (`ws::commands`) calls [`decode`] on every complete
//! text message. docs/protocol.md is the specification; this file follows it. Within v1
//! both sides ignore fields they do not know, so decoding never rejects an unknown field.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::value::RawValue;

use super::position::Position;

/// A command from the client.
#[derive(Debug)]
pub enum Command {
    /// `subs`: positions to recover the token's server-side subscriptions from. Without a
    /// token, the connection's session cookie (`auth_cookie`) stands in for it.
    Connect {
        token: Option<String>,
        subs: Vec<(String, Position)>,
    },
    Refresh {
        token: String,
    },
    Subscribe {
        channel: String,
        since: Option<Position>,
    },
    History {
        channel: String,
        since: Option<Position>,
        limit: usize,
        reverse: bool,
    },
    Unsubscribe {
        channel: String,
    },
    Publish {
        channel: String,
        data: Box<RawValue>,
    },
    Presence {
        channel: String,
    },
    PresenceStats {
        channel: String,
    },
    /// A call answered by a backend (docs/backend.md); `data` defaults to null.
    Rpc {
        method: String,
        data: Box<RawValue>,
    },
    /// Every publication of the channel up to `offset` is handled (`receipts` channels).
    Ack {
        channel: String,
        offset: u64,
    },
    Ping,
    Pong,
}

/// A decoded command with the id its reply echoes. Only `pong` and `refresh` may omit the id.
#[derive(Debug)]
pub struct Request {
    pub id: Option<u64>,
    pub command: Command,
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    /// Not a JSON object with an id: it cannot be answered, so the connection closes (4500).
    #[error("{0}")]
    Unanswerable(&'static str),
    /// A command with an id that is wrong in itself: answered with `bad_request`.
    #[error("{message}")]
    BadCommand { id: u64, message: String },
}

/// Decodes one complete text message.
pub fn decode(text: &[u8]) -> Result<Request, ProtocolError> {
    let fields: HashMap<String, &RawValue> = serde_json::from_slice(text)
        .map_err(|_| ProtocolError::Unanswerable("expected a JSON object"))?;
    let id = match fields.get("id") {
        Some(raw) => Some(
            serde_json::from_str::<u64>(raw.get())
                .map_err(|_| ProtocolError::Unanswerable("id must be a non-negative integer"))?,
        ),
        None => None,
    };
    let op = fields
        .get("op")
        .map(|raw| serde_json::from_str::<String>(raw.get()).ok());
    let Some(id) = id else {
        return match op.as_ref().and_then(|op| op.as_deref()) {
            Some("pong") => Ok(Request {
                id: None,
                command: Command::Pong,
            }),
            Some("refresh") => Ok(Request {
                id: None,
                command: Command::Refresh {
                    token: string_field(&fields, "token").map_err(|_| {
                        ProtocolError::Unanswerable("refresh without id needs a token")
                    })?,
                },
            }),
            Some("ack") => Ok(Request {
                id: None,
                command: ack(&fields).map_err(|_| {
                    ProtocolError::Unanswerable("ack without id needs a channel and an offset")
                })?,
            }),
            _ => Err(ProtocolError::Unanswerable("missing id")),
        };
    };
    let bad = |message: String| ProtocolError::BadCommand { id, message };
    let op = match op {
        None => return Err(bad("missing op".into())),
        Some(op) => op.ok_or_else(|| bad("op must be a string".into()))?,
    };
    let field = |name: &'static str| string_field(&fields, name).map_err(bad);
    let since = || {
        fields
            .get("since")
            .map(|raw| position(raw))
            .transpose()
            .map_err(bad)
    };
    let command = match op.as_str() {
        "connect" => Command::Connect {
            token: match fields.contains_key("token") {
                true => Some(field("token")?),
                false => None,
            },
            subs: match fields.get("subs") {
                Some(raw) => positions(raw.get()).map_err(bad)?,
                None => Vec::new(),
            },
        },
        "refresh" => Command::Refresh {
            token: field("token")?,
        },
        "subscribe" => Command::Subscribe {
            channel: field("channel")?,
            since: since()?,
        },
        "history" => Command::History {
            channel: field("channel")?,
            since: since()?,
            limit: match fields.get("limit") {
                Some(raw) => serde_json::from_str::<usize>(raw.get())
                    .map_err(|_| bad("limit must be a non-negative integer".into()))?,
                None => 0,
            },
            reverse: match fields.get("reverse") {
                Some(raw) => serde_json::from_str::<bool>(raw.get())
                    .map_err(|_| bad("reverse must be a boolean".into()))?,
                None => false,
            },
        },
        "unsubscribe" => Command::Unsubscribe {
            channel: field("channel")?,
        },
        "publish" => Command::Publish {
            channel: field("channel")?,
            data: fields
                .get("data")
                .map(|raw| (*raw).to_owned())
                .ok_or_else(|| bad("publish needs data".into()))?,
        },
        "presence" => Command::Presence {
            channel: field("channel")?,
        },
        "presence_stats" => Command::PresenceStats {
            channel: field("channel")?,
        },
        "rpc" => Command::Rpc {
            method: field("method")?,
            data: match fields.get("data") {
                Some(raw) => (*raw).to_owned(),
                None => RawValue::from_string("null".into()).expect("null is JSON"),
            },
        },
        "ack" => ack(&fields).map_err(bad)?,
        "ping" => Command::Ping,
        "pong" => Command::Pong,
        other => return Err(bad(format!("unknown op {other:?}"))),
    };
    Ok(Request {
        id: Some(id),
        command,
    })
}

/// `ack`'s fields: a channel, and an offset.
fn ack(fields: &HashMap<String, &RawValue>) -> Result<Command, String> {
    let channel = string_field(fields, "channel")?;
    let offset = fields
        .get("offset")
        .and_then(|raw| serde_json::from_str::<u64>(raw.get()).ok())
        .ok_or_else(|| "ack needs an offset (a non-negative integer)".to_string())?;
    Ok(Command::Ack { channel, offset })
}

/// `{"channel":{"offset":17,"epoch":"..."},…}`: `connect`'s `subs`, and the SSE transport's
/// `Last-Event-ID`.
pub fn positions(text: &str) -> Result<Vec<(String, Position)>, String> {
    serde_json::from_str::<HashMap<String, &RawValue>>(text)
        .map_err(|_| "subs must be an object of positions".to_string())?
        .into_iter()
        .map(|(channel, raw)| Ok((channel, position(raw)?)))
        .collect()
}

/// `{"offset":17,"epoch":"..."}`.
fn position(raw: &RawValue) -> Result<Position, String> {
    #[derive(serde::Deserialize)]
    struct Wire {
        offset: u64,
        epoch: String,
    }
    let wire: Wire = serde_json::from_str(raw.get())
        .map_err(|_| r#"a position is {"offset": integer, "epoch": string}"#.to_string())?;
    Ok(Position {
        offset: wire.offset,
        epoch: Arc::from(wire.epoch),
    })
}

fn string_field(fields: &HashMap<String, &RawValue>, name: &'static str) -> Result<String, String> {
    let raw = fields.get(name).ok_or_else(|| format!("missing {name}"))?;
    serde_json::from_str::<String>(raw.get()).map_err(|_| format!("{name} must be a string"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_commands() {
        let r = decode(br#"{"id":2,"op":"subscribe","channel":"chat:lobby","extra":[1]}"#).unwrap();
        assert_eq!(r.id, Some(2));
        assert!(
            matches!(r.command, Command::Subscribe { channel, since: None } if channel == "chat:lobby")
        );
        let r = decode(
            br#"{"id":3,"op":"subscribe","channel":"c","since":{"offset":17,"epoch":"e1"}}"#,
        )
        .unwrap();
        assert!(
            matches!(r.command, Command::Subscribe { since: Some(p), .. } if p.offset == 17 && &*p.epoch == "e1")
        );
        let r = decode(
            br#"{"id":4,"op":"connect","token":"t","subs":{"u:1":{"offset":2,"epoch":"x"}}}"#,
        )
        .unwrap();
        assert!(
            matches!(r.command, Command::Connect { subs, .. } if subs.len() == 1 && subs[0].0 == "u:1")
        );
        let r =
            decode(br#"{"id":5,"op":"history","channel":"c","limit":10,"reverse":true}"#).unwrap();
        assert!(matches!(
            r.command,
            Command::History {
                limit: 10,
                reverse: true,
                since: None,
                ..
            }
        ));
        let r = decode(br#"{"id":3,"op":"publish","channel":"c","data":{"a":[1, 2]}}"#).unwrap();
        match r.command {
            Command::Publish { data, .. } => assert_eq!(data.get(), r#"{"a":[1, 2]}"#),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(br#"{"op":"pong"}"#).unwrap().command,
            Command::Pong
        ));
        let r = decode(br#"{"op":"refresh","token":"t"}"#).unwrap();
        assert_eq!(r.id, None);
        assert!(matches!(r.command, Command::Refresh { token } if token == "t"));
    }

    #[test]
    fn unanswerable_frames() {
        for text in [
            &b"[]"[..],
            b"not json",
            b"{}",
            br#"{"id":-1,"op":"ping"}"#,
            br#"{"id":"1"}"#,
            b"",
            br#"{"op":"ping"}"#,
        ] {
            assert!(
                matches!(decode(text), Err(ProtocolError::Unanswerable(_))),
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn bad_commands_keep_the_id() {
        for (text, needle) in [
            (&br#"{"id":7,"op":"dance"}"#[..], "unknown op"),
            (br#"{"id":7}"#, "missing op"),
            (br#"{"id":7,"op":5}"#, "op must be a string"),
            (br#"{"id":7,"op":"a\udA4cb"}"#, "op must be a string"),
            (br#"{"id":7,"op":"subscribe"}"#, "missing channel"),
            (
                br#"{"id":7,"op":"subscribe","channel":5}"#,
                "channel must be a string",
            ),
            (br#"{"id":7,"op":"publish","channel":"c"}"#, "needs data"),
            (
                br#"{"id":7,"op":"subscribe","channel":"c","since":{"offset":-1}}"#,
                "position",
            ),
            (
                br#"{"id":7,"op":"history","channel":"c","limit":"all"}"#,
                "limit",
            ),
        ] {
            match decode(text) {
                Err(ProtocolError::BadCommand { id: 7, message }) => {
                    assert!(message.contains(needle), "{message}")
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
