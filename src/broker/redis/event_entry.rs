//! An event as an entry of a cluster event group's stream: its fields, one per part
//! (`k` the kind, `c` client, `u` user, `t` time in ms, then the kind's own), all
//! binary-safe, so a publish's data is stored as sent.

use std::sync::Arc;

use redis::streams::StreamId;

use crate::events::{Body, What};

/// The fields of an entry, in XADD order.
pub fn encode(body: &Body) -> Vec<(&'static str, Vec<u8>)> {
    let text = |s: &str| s.as_bytes().to_vec();
    let number = |n: u64| n.to_string().into_bytes();
    let (kind, own): (&str, Vec<(&'static str, Vec<u8>)>) = match &body.what {
        What::Connect { meta, info } => (
            "connect",
            vec![("meta", meta.clone()), ("info", info.clone())],
        ),
        What::Disconnect { code, reason } => (
            "disconnect",
            vec![("code", number(u64::from(*code))), ("reason", text(reason))],
        ),
        What::Subscribe {
            channel,
            server_side,
        } => (
            "subscribe",
            vec![
                ("ch", text(channel)),
                ("ss", number(u64::from(*server_side))),
            ],
        ),
        What::Unsubscribe { channel, code } => (
            "unsubscribe",
            vec![("ch", text(channel)), ("code", number(u64::from(*code)))],
        ),
        What::Publish {
            channel,
            data,
            offset,
            epoch,
        } => (
            "publish",
            vec![
                ("ch", text(channel)),
                ("data", data.clone()),
                ("off", number(*offset)),
                ("ep", text(epoch)),
            ],
        ),
        What::Rpc {
            rpc_id,
            method,
            data,
        } => (
            "rpc",
            vec![
                ("id", text(rpc_id)),
                ("method", text(method)),
                ("data", data.clone()),
            ],
        ),
        What::Lost {
            first_seq,
            last_seq,
        } => (
            "lost",
            vec![("first", number(*first_seq)), ("last", number(*last_seq))],
        ),
    };
    let mut fields = vec![
        ("k", text(kind)),
        ("c", text(&body.client)),
        ("u", text(&body.user)),
        ("t", number(body.time_ms)),
    ];
    fields.extend(own);
    fields
}

/// The entry's sequence number and event; None when it is not one this codec wrote.
pub fn decode(entry: &StreamId) -> Option<(u64, Body)> {
    let seq = entry.id.split_once('-')?.0.parse().ok()?;
    let bytes = |name: &str| entry.get::<Vec<u8>>(name);
    let text = |name: &str| bytes(name).and_then(|b| String::from_utf8(b).ok());
    let number = |name: &str| text(name)?.parse::<u64>().ok();
    let what = match text("k")?.as_str() {
        "connect" => What::Connect {
            meta: bytes("meta")?,
            info: bytes("info")?,
        },
        "disconnect" => What::Disconnect {
            code: u16::try_from(number("code")?).ok()?,
            reason: text("reason")?,
        },
        "subscribe" => What::Subscribe {
            channel: text("ch")?,
            server_side: number("ss")? != 0,
        },
        "unsubscribe" => What::Unsubscribe {
            channel: text("ch")?,
            code: u32::try_from(number("code")?).ok()?,
        },
        "publish" => What::Publish {
            channel: text("ch")?,
            data: bytes("data")?,
            offset: number("off")?,
            epoch: text("ep")?,
        },
        "rpc" => What::Rpc {
            rpc_id: text("id")?,
            method: text("method")?,
            data: bytes("data")?,
        },
        "lost" => What::Lost {
            first_seq: number("first")?,
            last_seq: number("last")?,
        },
        _ => return None,
    };
    Some((
        seq,
        Body {
            client: Arc::from(text("c").unwrap_or_default()),
            user: Arc::from(text("u").unwrap_or_default()),
            time_ms: number("t")?,
            what,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(what: What) {
        let body = Body {
            client: Arc::from("c1"),
            user: Arc::from("alice"),
            time_ms: 1_700_000_000_123,
            what,
        };
        let map = encode(&body)
            .into_iter()
            .map(|(k, v)| (k.to_string(), redis::Value::BulkString(v)))
            .collect();
        let entry = StreamId {
            id: "42-0".into(),
            map,
            ..StreamId::default()
        };
        let (seq, back) = decode(&entry).expect("decodes");
        assert_eq!(seq, 42);
        assert_eq!(
            (&*back.client, &*back.user, back.time_ms, &back.what),
            (&*body.client, &*body.user, body.time_ms, &body.what)
        );
    }

    #[test]
    fn every_kind_survives_the_stream() {
        round_trip(What::Connect {
            meta: b"{\"a\":1}".to_vec(),
            info: Vec::new(),
        });
        round_trip(What::Disconnect {
            code: 4004,
            reason: "slow consumer".into(),
        });
        round_trip(What::Subscribe {
            channel: "room:1".into(),
            server_side: true,
        });
        round_trip(What::Unsubscribe {
            channel: "room:1".into(),
            code: 2500,
        });
        round_trip(What::Publish {
            channel: "room:1".into(),
            data: vec![0, 255, b'"', b'\n'],
            offset: 7,
            epoch: "e".into(),
        });
        round_trip(What::Rpc {
            rpc_id: "r".into(),
            method: "m.x".into(),
            data: b"{}".to_vec(),
        });
        round_trip(What::Lost {
            first_seq: 3,
            last_seq: 9,
        });
    }

    #[test]
    fn an_entry_of_another_shape_is_refused() {
        let entry = StreamId {
            id: "1-0".into(),
            map: [("k".to_string(), redis::Value::BulkString(b"dance".to_vec()))]
                .into_iter()
                .collect(),
            ..StreamId::default()
        };
        assert!(decode(&entry).is_none());
    }
}
