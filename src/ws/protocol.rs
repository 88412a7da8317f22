//! Client protocol v1: pure decoding of client commands and encoding of replies and pushes.
//!
//! The session calls [`decode`] on every complete text message and the `encode_*`
//! functions for what it answers; the hub calls [`encode_pub`] once per publication.
//! Nothing here does I/O. docs/protocol.md is the specification; this file follows it.
//! Within v1 both sides ignore fields they do not know, so decoding never rejects an
//! unknown field, and encoding only ever adds fields.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::broker::{Attach, Entry, Position, Recovery};

pub const PROTOCOL_VERSION: u32 = 1;
pub const SUBPROTOCOL: &str = "sidecast.v1";

/// A command from the client.
#[derive(Debug)]
pub enum Command {
    /// `subs`: positions to recover the token's server-side subscriptions from.
    Connect {
        token: String,
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

/// The closed set of error codes in replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    NotAvailable,
    AlreadySubscribed,
    UnrecoverablePosition,
    LimitExceeded,
    Unavailable,
    Internal,
    RpcError,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NotAvailable => "not_available",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::UnrecoverablePosition => "unrecoverable_position",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::RpcError => "rpc_error",
        }
    }

    /// Every code, in declaration order (`code as usize` indexes this).
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::NotAvailable,
        ErrorCode::AlreadySubscribed,
        ErrorCode::UnrecoverablePosition,
        ErrorCode::LimitExceeded,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::RpcError,
    ];
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
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok());
    let Some(id) = id else {
        return match op.as_deref() {
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
            _ => Err(ProtocolError::Unanswerable("missing id")),
        };
    };
    let bad = |message: String| ProtocolError::BadCommand { id, message };
    let op = op.ok_or_else(|| bad("missing op".into()))?;
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
            token: field("token")?,
            subs: match fields.get("subs") {
                Some(raw) => serde_json::from_str::<HashMap<String, &RawValue>>(raw.get())
                    .map_err(|_| bad("subs must be an object of positions".into()))?
                    .into_iter()
                    .map(|(channel, raw)| Ok((channel, position(raw).map_err(bad)?)))
                    .collect::<Result<_, ProtocolError>>()?,
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
        "ping" => Command::Ping,
        "pong" => Command::Pong,
        other => return Err(bad(format!("unknown op {other:?}"))),
    };
    Ok(Request {
        id: Some(id),
        command,
    })
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

// === encoding ===

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// `{"id":N,"result":RESULT}`; `result` must be a JSON value.
pub fn encode_result(id: u64, result: &str) -> Vec<u8> {
    format!(r#"{{"id":{id},"result":{result}}}"#).into_bytes()
}

/// `{"id":N,"error":{"code":"...","message":"..."}}`.
pub fn encode_error(id: u64, code: ErrorCode, message: &str) -> Vec<u8> {
    format!(
        r#"{{"id":{id},"error":{{"code":"{}","message":{}}}}}"#,
        code.as_str(),
        json_string(message)
    )
    .into_bytes()
}

/// A publication, encoded once and shared by every subscriber. `data` is the backend's JSON, verbatim.
pub fn encode_pub(channel: &str, data: &[u8], offset: Option<u64>) -> Vec<u8> {
    let channel = json_string(channel);
    let mut out = Vec::with_capacity(40 + channel.len() + data.len());
    out.extend_from_slice(br#"{"type":"pub","channel":"#);
    out.extend_from_slice(channel.as_bytes());
    out.extend_from_slice(br#","data":"#);
    out.extend_from_slice(data);
    if let Some(offset) = offset {
        out.extend_from_slice(format!(r#","offset":{offset}"#).as_bytes());
    }
    out.push(b'}');
    out
}

#[derive(Serialize)]
pub struct Connected<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub version: u32,
    pub server: &'static str,
    pub client: &'a str,
    pub user: &'a str,
    /// Seconds until the token expires.
    pub expires_in: u64,
    /// Seconds between server pings.
    pub ping_interval: u64,
    /// Seconds a pong may take.
    pub pong_timeout: u64,
}

pub fn encode_connected(c: &Connected<'_>) -> Vec<u8> {
    serde_json::to_vec(c).expect("connected serializes")
}

/// The fields a new subscription reports: where the channel's stream stands and, when the
/// client gave a position, whether everything it missed follows (and what).
fn subscription_fields(out: &mut String, attach: &Attach) {
    match &attach.position {
        None => out.push_str(r#""recoverable":false"#),
        Some(position) => {
            out.push_str(&format!(
                r#""recoverable":true,"offset":{},"epoch":{}"#,
                position.offset,
                json_string(&position.epoch)
            ));
        }
    }
    match &attach.recovery {
        None => {}
        Some(Recovery::Impossible) => out.push_str(r#","recovered":false,"publications":[]"#),
        Some(Recovery::Complete(entries)) => {
            out.push_str(r#","recovered":true,"publications":"#);
            publications(out, entries);
        }
    }
}

fn publications(out: &mut String, entries: &[Entry]) {
    out.push('[');
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Kept data was validated JSON (UTF-8) at publish.
        out.push_str(&format!(
            r#"{{"offset":{},"data":{}}}"#,
            entry.offset,
            String::from_utf8_lossy(&entry.data)
        ));
    }
    out.push(']');
}

/// The reply to `subscribe`.
pub fn encode_subscribe_result(id: u64, attach: &Attach) -> Vec<u8> {
    let mut out = format!(r#"{{"id":{id},"result":{{"#);
    subscription_fields(&mut out, attach);
    out.push_str("}}");
    out.into_bytes()
}

/// `{"type":"sub","channel":"...",...}`: a subscription made by the server.
pub fn encode_sub(channel: &str, attach: &Attach) -> Vec<u8> {
    let mut out = format!(r#"{{"type":"sub","channel":{},"#, json_string(channel));
    subscription_fields(&mut out, attach);
    out.push('}');
    out.into_bytes()
}

/// The result of `history`: a page of publications and the channel's position.
pub fn encode_history(entries: &[Entry], position: &Position) -> String {
    let mut out = String::from(r#"{"publications":"#);
    publications(&mut out, entries);
    out.push_str(&format!(
        r#","offset":{},"epoch":{}}}"#,
        position.offset,
        json_string(&position.epoch)
    ));
    out
}

/// Why a subscription ended without the client asking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnsubReason {
    /// The backend unsubscribed the client (Control.Unsubscribe).
    Backend,
    /// A refreshed token no longer grants the channel.
    Revoked,
}

impl UnsubReason {
    pub fn code(self) -> u32 {
        match self {
            UnsubReason::Backend => 2000,
            UnsubReason::Revoked => 2001,
        }
    }
    fn text(self) -> &'static str {
        match self {
            UnsubReason::Backend => "unsubscribed by the backend",
            UnsubReason::Revoked => "permission revoked",
        }
    }
}

pub fn encode_unsub(channel: &str, reason: UnsubReason) -> Vec<u8> {
    format!(
        r#"{{"type":"unsub","channel":{},"code":{},"reason":"{}","resubscribe":false}}"#,
        json_string(channel),
        reason.code(),
        reason.text()
    )
    .into_bytes()
}

/// `join` or `leave`, with the client's public identity.
pub fn encode_presence_event(
    kind: &str,
    channel: &str,
    client: &str,
    user: &str,
    info: Option<&RawValue>,
) -> Vec<u8> {
    format!(
        r#"{{"type":"{kind}","channel":{},"client":{},"user":{},"info":{}}}"#,
        json_string(channel),
        json_string(client),
        json_string(user),
        info.map_or("null", RawValue::get)
    )
    .into_bytes()
}

/// The error reply to an rpc the backend answered with an error.
pub fn encode_rpc_error(id: u64, code: u32, message: &str) -> Vec<u8> {
    format!(
        r#"{{"id":{id},"error":{{"code":"rpc_error","message":{},"rpc_code":{code}}}}}"#,
        json_string(message)
    )
    .into_bytes()
}

/// `{"type":"message","data":...}`: a direct message from the backend.
pub fn encode_message(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 32);
    out.extend_from_slice(br#"{"type":"message","data":"#);
    out.extend_from_slice(data);
    out.push(b'}');
    out
}

pub const PING: &[u8] = br#"{"type":"ping"}"#;

/// Checks that `data` is one JSON value (what publications and messages carry).
pub fn validate_json(data: &[u8]) -> Result<(), String> {
    // Checked first and whole: skipping a value (IgnoredAny) does not validate the bytes
    // inside strings, and one invalid byte in a text frame makes browsers drop the socket.
    let text = std::str::from_utf8(data).map_err(|e| format!("data is not valid UTF-8: {e}"))?;
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(|_| ())
        .map_err(|e| format!("data is not valid JSON: {e}"))
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

    #[test]
    fn encodes() {
        assert_eq!(encode_result(4, "{}"), br#"{"id":4,"result":{}}"#);
        assert_eq!(
            String::from_utf8(encode_error(4, ErrorCode::Forbidden, "no \"grant\"")).unwrap(),
            r#"{"id":4,"error":{"code":"forbidden","message":"no \"grant\""}}"#
        );
        assert_eq!(
            encode_pub("c", b"[1]", None),
            br#"{"type":"pub","channel":"c","data":[1]}"#
        );
        assert_eq!(
            encode_pub("c", b"1", Some(9)),
            br#"{"type":"pub","channel":"c","data":1,"offset":9}"#
        );
        let v: serde_json::Value =
            serde_json::from_slice(&encode_unsub("c", UnsubReason::Revoked)).unwrap();
        assert_eq!(v["code"], 2001);
        let v: serde_json::Value =
            serde_json::from_slice(&encode_presence_event("join", "c", "id", "u", None)).unwrap();
        assert_eq!(v["info"], serde_json::Value::Null);
        assert!(validate_json(b"{\"a\":1}").is_ok());
        assert!(validate_json(b"{\"a\":").is_err());
        assert!(validate_json(b"1 2").is_err());
        assert!(validate_json(b"\"\xff\"").unwrap_err().contains("UTF-8"));
    }
}
