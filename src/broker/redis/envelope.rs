//! What travels on a channel's Redis pub/sub topic, between nodes: a publication (built by
//! `publish.lua`) or a membership change (a `join`/`leave` to relay).
//!
//! A publication is `p<offset>:<epoch>:<data>` (offset 0 and an empty epoch where the
//! channel keeps no history), or `r<ms>,<offset>:<epoch>:<data>` for one whose delivery
//! receipts are tallied, with that deadline; a traced one is either of these after
//! `t<traceparent>,`. A membership change is `m` and a JSON object.

use serde::{Deserialize, Serialize};

use crate::wire::TraceParent;

/// A decoded message of a channel's topic.
#[derive(Debug)]
pub enum Envelope<'a> {
    Publication {
        offset: u64,
        epoch: &'a str,
        data: &'a [u8],
        /// The deadline of its delivery receipts, when they are tallied.
        receipt: Option<std::time::Duration>,
        /// Its trace: the span that published it.
        trace: Option<TraceParent>,
    },
    Membership(Member),
}

/// A connection that joined or left a channel on node `node` (empty: a node found it
/// expired, so every node relays it).
#[derive(Debug, Serialize, Deserialize)]
pub struct Member {
    #[serde(rename = "n")]
    pub node: String,
    #[serde(rename = "j")]
    pub joined: bool,
    #[serde(rename = "c")]
    pub client: String,
    #[serde(rename = "u")]
    pub user: String,
    /// The token's `info` JSON, verbatim.
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Box<serde_json::value::RawValue>>,
}

impl Member {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = b"m".to_vec();
        serde_json::to_writer(&mut out, self).expect("a member encodes");
        out
    }
}

/// None for a message no node of this version sends.
pub fn decode(payload: &[u8]) -> Option<Envelope<'_>> {
    match payload.split_first()? {
        (b't', rest) => {
            let comma = rest.iter().position(|&b| b == b',')?;
            let parent = std::str::from_utf8(&rest[..comma]).ok()?;
            let parent = TraceParent::parse(parent).ok()?;
            match decode(&rest[comma + 1..])? {
                Envelope::Publication {
                    offset,
                    epoch,
                    data,
                    receipt,
                    trace: None,
                } => Some(Envelope::Publication {
                    offset,
                    epoch,
                    data,
                    receipt,
                    trace: Some(parent),
                }),
                _ => None,
            }
        }
        (b'r', rest) => {
            let comma = rest.iter().position(|&b| b == b',')?;
            let ms: u64 = std::str::from_utf8(&rest[..comma]).ok()?.parse().ok()?;
            let mut publication = decode_publication(&rest[comma + 1..])?;
            if let Envelope::Publication { receipt, .. } = &mut publication {
                *receipt = Some(std::time::Duration::from_millis(ms));
            }
            Some(publication)
        }
        (b'p', rest) => decode_publication(rest),
        (b'm', rest) => serde_json::from_slice(rest).ok().map(Envelope::Membership),
        _ => None,
    }
}

/// The head of a publication's envelope: `p`, or `r<ms>,` when its receipts are tallied,
/// after `t<traceparent>,` when it is traced.
pub fn publication_head(
    receipt: Option<std::time::Duration>,
    trace: Option<&TraceParent>,
) -> String {
    let trace = trace.map(|t| format!("t{t},")).unwrap_or_default();
    match receipt {
        None => format!("{trace}p"),
        Some(deadline) => format!("{trace}r{},", deadline.as_millis()),
    }
}

/// `<offset>:<epoch>:<data>`.
fn decode_publication(rest: &[u8]) -> Option<Envelope<'_>> {
    let colon = rest.iter().position(|&b| b == b':')?;
    let offset = std::str::from_utf8(&rest[..colon]).ok()?.parse().ok()?;
    let rest = &rest[colon + 1..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let epoch = std::str::from_utf8(&rest[..colon]).ok()?;
    Some(Envelope::Publication {
        offset,
        epoch,
        data: &rest[colon + 1..],
        receipt: None,
        trace: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_the_script_and_the_nodes_send() {
        assert!(matches!(
            decode(b"p12:00ab:{\"a\":\"x:y\"}"),
            Some(Envelope::Publication {
                offset: 12,
                epoch: "00ab",
                data: b"{\"a\":\"x:y\"}",
                receipt: None,
                trace: None,
            })
        ));
        let head = publication_head(Some(std::time::Duration::from_millis(1500)), None);
        let tallied = format!("{head}7:e:{{}}");
        assert!(matches!(
            decode(tallied.as_bytes()),
            Some(Envelope::Publication {
                offset: 7,
                epoch: "e",
                data: b"{}",
                receipt: Some(d),
                trace: None,
            }) if d.as_millis() == 1500
        ));
        assert!(matches!(
            decode(b"p0::1"),
            Some(Envelope::Publication {
                offset: 0,
                epoch: "",
                data: b"1",
                receipt: None,
                trace: None,
            })
        ));
        let parent =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        for receipt in [None, Some(std::time::Duration::from_millis(9))] {
            let traced = format!("{}3:e:[]", publication_head(receipt, Some(&parent)));
            let Some(Envelope::Publication {
                offset: 3,
                epoch: "e",
                data: b"[]",
                receipt: back,
                trace: Some(trace),
            }) = decode(traced.as_bytes())
            else {
                panic!("{traced}")
            };
            assert_eq!((back, trace), (receipt, parent));
        }
        let member = Member {
            node: "n1".into(),
            joined: true,
            client: "c".into(),
            user: "u".into(),
            info: Some(serde_json::value::RawValue::from_string("{\"x\":1}".into()).unwrap()),
        };
        let encoded = member.encode();
        let Some(Envelope::Membership(back)) = decode(&encoded) else {
            panic!()
        };
        assert_eq!(back.info.unwrap().get(), "{\"x\":1}");
        for bad in [
            &b""[..],
            b"p",
            b"px:e:1",
            b"p1",
            b"p1:e",
            b"m{",
            b"z1",
            b"r",
            b"r10",
            b"rx,1:e:1",
            b"r10,1:e",
            b"t00-bad,p1:e:1",
            b"t00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01,m{}",
            b"t00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01,t00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01,p1:e:1",
        ] {
            assert!(decode(bad).is_none(), "{bad:?}");
        }
    }
}
