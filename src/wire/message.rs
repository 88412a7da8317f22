//! What the server sends a client in protocol v1: replies to its commands and pushes, as
//! one enum with one encoder.
//!
//! The node encodes a publication once ([`ServerMessage::Pub`]) and shares the frame with
//! every subscriber; the connection's command handler encodes its replies here. Nothing
//! here does I/O. docs/protocol.md is the specification; encoding only ever adds fields
//! within v1 (clients ignore fields they do not know).

use std::fmt::Write;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

pub use super::error_code::ErrorCode;
use super::frame;
use super::position::{Attach, Position, Publication, Recovery};
use super::traceparent::TraceId;

/// Why a subscription ended without the client asking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnsubReason {
    /// The backend unsubscribed the client (Control.Unsubscribe).
    Backend,
    /// A refreshed token no longer grants the channel.
    Revoked,
    /// The node may have missed publications of the channel (its link to the shared
    /// engine broke, or the stream restarted): subscribe again from the last position to
    /// recover them.
    Resubscribe,
}

impl UnsubReason {
    pub fn code(self) -> u32 {
        match self {
            UnsubReason::Backend => 2000,
            UnsubReason::Revoked => 2001,
            UnsubReason::Resubscribe => 2500,
        }
    }
    fn text(self) -> &'static str {
        match self {
            UnsubReason::Backend => "unsubscribed by the backend",
            UnsubReason::Revoked => "permission revoked",
            UnsubReason::Resubscribe => "resubscribe to recover",
        }
    }

    /// Whether the client should subscribe again at once, recovering from its position.
    pub fn resubscribe(self) -> bool {
        matches!(self, UnsubReason::Resubscribe)
    }
}

/// A presence entry: a client subscribed to a channel, with its public identity.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub client: String,
    pub user: String,
    /// The token's `info` claim, validated as a JSON object at connect.
    pub info: Option<Arc<RawValue>>,
}

/// The `connected` push.
#[derive(Serialize, Debug)]
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

/// `join` or `leave`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    Join,
    Leave,
}

/// Everything the server sends as a text message.
#[derive(Debug)]
pub enum ServerMessage<'a> {
    /// The push that answers `connect`.
    Connected(Connected<'a>),
    /// `{"id":N,"result":{}}`: the reply of commands that return nothing.
    Done { id: u64 },
    /// The reply to `subscribe`: the channel's position and what was recovered.
    Subscribed { id: u64, attach: &'a Attach },
    /// The reply to `refresh`.
    Refreshed { id: u64, expires_in: u64 },
    /// The reply to `history`: a page and the channel's position.
    History {
        id: u64,
        publications: &'a [Publication],
        position: &'a Position,
    },
    /// The reply to `presence`.
    Presence { id: u64, clients: &'a [ClientInfo] },
    /// The reply to `presence_stats`.
    PresenceStats {
        id: u64,
        clients: usize,
        users: usize,
    },
    /// The reply to `rpc` the backend answered with data (a JSON value).
    RpcData { id: u64, data: &'a [u8] },
    /// The reply to `rpc` the backend answered with an error.
    RpcError {
        id: u64,
        code: u32,
        message: &'a str,
    },
    /// An error reply.
    Error {
        id: u64,
        code: ErrorCode,
        message: &'a str,
    },
    /// A publication; `data` is the backend's JSON, verbatim.
    Pub {
        channel: &'a str,
        data: &'a [u8],
        offset: Option<u64>,
        /// The trace id of a traced publication, where its namespace has `trace_ids`.
        trace: Option<&'a TraceId>,
    },
    /// A subscription made by the server (the token's `subs`, Control.Subscribe).
    Sub {
        channel: &'a str,
        attach: &'a Attach,
    },
    /// A subscription ended by the server.
    Unsub {
        channel: &'a str,
        reason: UnsubReason,
    },
    /// Publications of a channel dropped from a slow subscriber's queue
    /// (`slow_consumer = "drop_oldest"` or `"conflate"`): how many, and the first and last
    /// offsets when the channel keeps history.
    Lost {
        channel: &'a str,
        count: u64,
        offsets: Option<(u64, u64)>,
    },
    /// Someone joined or left a channel with join_leave.
    JoinLeave {
        kind: Membership,
        channel: &'a str,
        client: &'a str,
        user: &'a str,
        info: Option<&'a RawValue>,
    },
    /// A direct message from the backend (Control.Send).
    Message { data: &'a [u8] },
    /// The heartbeat.
    Ping,
}

impl ServerMessage<'_> {
    /// The JSON text.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ServerMessage::Connected(c) => serde_json::to_vec(c).expect("connected serializes"),
            ServerMessage::Done { id } => format!(r#"{{"id":{id},"result":{{}}}}"#).into_bytes(),
            ServerMessage::Subscribed { id, attach } => {
                let mut out = format!(r#"{{"id":{id},"result":{{"#);
                subscription_fields(&mut out, attach);
                out.push_str("}}");
                out.into_bytes()
            }
            ServerMessage::Refreshed { id, expires_in } => {
                format!(r#"{{"id":{id},"result":{{"expires_in":{expires_in}}}}}"#).into_bytes()
            }
            ServerMessage::History {
                id,
                publications,
                position,
            } => {
                let mut out = format!(r#"{{"id":{id},"result":{{"publications":"#);
                write_publications(&mut out, publications);
                let _ = write!(
                    out,
                    r#","offset":{},"epoch":{}}}}}"#,
                    position.offset,
                    json_string(&position.epoch)
                );
                out.into_bytes()
            }
            ServerMessage::Presence { id, clients } => {
                let mut out = format!(r#"{{"id":{id},"result":{{"clients":{{"#);
                write_list(&mut out, clients, |out, c| {
                    // `info` was validated as a JSON object at connect: passed through verbatim.
                    let _ = write!(
                        out,
                        r#"{}:{{"user":{},"info":{}}}"#,
                        json_string(&c.client),
                        json_string(&c.user),
                        c.info.as_deref().map_or("null", RawValue::get)
                    );
                });
                out.push_str("}}}");
                out.into_bytes()
            }
            ServerMessage::PresenceStats { id, clients, users } => {
                format!(r#"{{"id":{id},"result":{{"num_clients":{clients},"num_users":{users}}}}}"#)
                    .into_bytes()
            }
            ServerMessage::RpcData { id, data } => {
                let mut out = format!(r#"{{"id":{id},"result":{{"data":"#).into_bytes();
                out.extend_from_slice(data);
                out.extend_from_slice(b"}}");
                out
            }
            ServerMessage::RpcError { id, code, message } => format!(
                r#"{{"id":{id},"error":{{"code":"rpc_error","message":{},"rpc_code":{code}}}}}"#,
                json_string(message)
            )
            .into_bytes(),
            ServerMessage::Error { id, code, message } => format!(
                r#"{{"id":{id},"error":{{"code":"{}","message":{}}}}}"#,
                code.as_str(),
                json_string(message)
            )
            .into_bytes(),
            ServerMessage::Pub {
                channel,
                data,
                offset,
                trace,
            } => {
                let channel = json_string(channel);
                let mut out = Vec::with_capacity(40 + channel.len() + data.len());
                out.extend_from_slice(br#"{"type":"pub","channel":"#);
                out.extend_from_slice(channel.as_bytes());
                out.extend_from_slice(br#","data":"#);
                out.extend_from_slice(data);
                if let Some(offset) = offset {
                    out.extend_from_slice(format!(r#","offset":{offset}"#).as_bytes());
                }
                if let Some(trace) = trace {
                    out.extend_from_slice(format!(r#","trace":"{trace}""#).as_bytes());
                }
                out.push(b'}');
                out
            }
            ServerMessage::Sub { channel, attach } => {
                let mut out = format!(r#"{{"type":"sub","channel":{},"#, json_string(channel));
                subscription_fields(&mut out, attach);
                out.push('}');
                out.into_bytes()
            }
            ServerMessage::Unsub { channel, reason } => format!(
                r#"{{"type":"unsub","channel":{},"code":{},"reason":"{}","resubscribe":{}}}"#,
                json_string(channel),
                reason.code(),
                reason.text(),
                reason.resubscribe()
            )
            .into_bytes(),
            ServerMessage::Lost {
                channel,
                count,
                offsets,
            } => {
                let mut out = format!(
                    r#"{{"type":"lost","channel":{},"count":{count}"#,
                    json_string(channel)
                );
                if let Some((from, to)) = offsets {
                    let _ = write!(out, r#","from":{from},"to":{to}"#);
                }
                out.push('}');
                out.into_bytes()
            }
            ServerMessage::JoinLeave {
                kind,
                channel,
                client,
                user,
                info,
            } => format!(
                r#"{{"type":"{}","channel":{},"client":{},"user":{},"info":{}}}"#,
                match kind {
                    Membership::Join => "join",
                    Membership::Leave => "leave",
                },
                json_string(channel),
                json_string(client),
                json_string(user),
                info.map_or("null", RawValue::get)
            )
            .into_bytes(),
            ServerMessage::Message { data } => {
                let mut out = Vec::with_capacity(data.len() + 32);
                out.extend_from_slice(br#"{"type":"message","data":"#);
                out.extend_from_slice(data);
                out.push(b'}');
                out
            }
            ServerMessage::Ping => br#"{"type":"ping"}"#.to_vec(),
        }
    }

    /// The encoded text frame, ready to share between connections.
    pub fn frame(&self) -> Bytes {
        frame::text(&self.encode())
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// The fields a new subscription reports: where the channel's stream stands and, when the
/// client gave a position, whether everything it missed follows (and what).
fn subscription_fields(out: &mut String, attach: &Attach) {
    match &attach.position {
        None => out.push_str(r#""recoverable":false"#),
        Some(position) => {
            let _ = write!(
                out,
                r#""recoverable":true,"offset":{},"epoch":{}"#,
                position.offset,
                json_string(&position.epoch)
            );
        }
    }
    if attach.receipts {
        out.push_str(r#","receipts":true"#);
    }
    match &attach.recovery {
        None => {}
        Some(Recovery::Impossible) => out.push_str(r#","recovered":false,"publications":[]"#),
        Some(Recovery::Complete(publications)) => {
            out.push_str(r#","recovered":true,"publications":"#);
            write_publications(out, publications);
        }
    }
}

fn write_publications(out: &mut String, publications: &[Publication]) {
    out.push('[');
    write_list(out, publications, |out, p| {
        // Kept data was validated JSON (UTF-8) at publish.
        let _ = write!(
            out,
            r#"{{"offset":{},"data":{}}}"#,
            p.offset,
            String::from_utf8_lossy(&p.data)
        );
    });
    out.push(']');
}

/// Writes `items` separated by commas.
fn write_list<T>(out: &mut String, items: &[T], mut one: impl FnMut(&mut String, &T)) {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        one(out, item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: ServerMessage<'_>) -> String {
        String::from_utf8(m.encode()).unwrap()
    }

    #[test]
    fn encodes() {
        assert_eq!(
            text(ServerMessage::Done { id: 4 }),
            r#"{"id":4,"result":{}}"#
        );
        assert_eq!(
            text(ServerMessage::Error {
                id: 4,
                code: ErrorCode::Forbidden,
                message: "no \"grant\""
            }),
            r#"{"id":4,"error":{"code":"forbidden","message":"no \"grant\""}}"#
        );
        let publication = |offset| ServerMessage::Pub {
            channel: "c",
            data: b"[1]",
            offset,
            trace: None,
        };
        assert_eq!(
            text(publication(None)),
            r#"{"type":"pub","channel":"c","data":[1]}"#
        );
        assert_eq!(
            text(publication(Some(9))),
            r#"{"type":"pub","channel":"c","data":[1],"offset":9}"#
        );
        let trace = TraceId([0xab; 16]);
        assert_eq!(
            text(ServerMessage::Pub {
                channel: "c",
                data: b"1",
                offset: Some(2),
                trace: Some(&trace),
            }),
            r#"{"type":"pub","channel":"c","data":1,"offset":2,"trace":"abababababababababababababababab"}"#
        );
        let v: serde_json::Value = serde_json::from_slice(
            &ServerMessage::Unsub {
                channel: "c",
                reason: UnsubReason::Revoked,
            }
            .encode(),
        )
        .unwrap();
        assert_eq!(v["code"], 2001);
        let v: serde_json::Value = serde_json::from_slice(
            &ServerMessage::JoinLeave {
                kind: Membership::Join,
                channel: "c",
                client: "id",
                user: "u",
                info: None,
            }
            .encode(),
        )
        .unwrap();
        assert_eq!(v["type"], "join");
        assert_eq!(v["info"], serde_json::Value::Null);
    }

    #[test]
    fn replies_are_json() {
        let position = Position {
            offset: 2,
            epoch: Arc::from("e"),
        };
        let publications = [Publication {
            offset: 2,
            data: Bytes::from_static(b"{\"a\":1}"),
        }];
        let attach = Attach {
            position: Some(position.clone()),
            recovery: Some(Recovery::Complete(publications.to_vec())),
            receipts: false,
        };
        let info = RawValue::from_string(r#"{"n":1}"#.into()).unwrap();
        let clients = [ClientInfo {
            client: "c1".into(),
            user: "u".into(),
            info: Some(Arc::from(info)),
        }];
        for (message, expected) in [
            (
                ServerMessage::Subscribed {
                    id: 1,
                    attach: &attach,
                },
                serde_json::json!({"id":1,"result":{"recoverable":true,"offset":2,"epoch":"e","recovered":true,"publications":[{"offset":2,"data":{"a":1}}]}}),
            ),
            (
                ServerMessage::History {
                    id: 2,
                    publications: &publications,
                    position: &position,
                },
                serde_json::json!({"id":2,"result":{"publications":[{"offset":2,"data":{"a":1}}],"offset":2,"epoch":"e"}}),
            ),
            (
                ServerMessage::Presence {
                    id: 3,
                    clients: &clients,
                },
                serde_json::json!({"id":3,"result":{"clients":{"c1":{"user":"u","info":{"n":1}}}}}),
            ),
            (
                ServerMessage::PresenceStats {
                    id: 4,
                    clients: 2,
                    users: 1,
                },
                serde_json::json!({"id":4,"result":{"num_clients":2,"num_users":1}}),
            ),
            (
                ServerMessage::RpcData {
                    id: 5,
                    data: b"[1]",
                },
                serde_json::json!({"id":5,"result":{"data":[1]}}),
            ),
            (
                ServerMessage::RpcError {
                    id: 6,
                    code: 7,
                    message: "no",
                },
                serde_json::json!({"id":6,"error":{"code":"rpc_error","message":"no","rpc_code":7}}),
            ),
            (
                ServerMessage::Refreshed {
                    id: 7,
                    expires_in: 60,
                },
                serde_json::json!({"id":7,"result":{"expires_in":60}}),
            ),
            (
                ServerMessage::Sub {
                    channel: "c",
                    attach: &attach,
                },
                serde_json::json!({"type":"sub","channel":"c","recoverable":true,"offset":2,"epoch":"e","recovered":true,"publications":[{"offset":2,"data":{"a":1}}]}),
            ),
            (
                ServerMessage::Message { data: b"1" },
                serde_json::json!({"type":"message","data":1}),
            ),
            (ServerMessage::Ping, serde_json::json!({"type":"ping"})),
        ] {
            let got: serde_json::Value = serde_json::from_slice(&message.encode()).unwrap();
            assert_eq!(got, expected);
        }
    }
}
