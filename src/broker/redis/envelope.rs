//! What travels on a channel's Redis pub/sub topic, between nodes: a publication (built by
//! `publish.lua`) or a membership change (a `join`/`leave` to relay).
//!
//! A publication is `p<offset>:<epoch>:<data>` (offset 0 and an empty epoch where the
//! channel keeps no history); a membership change is `m` and a JSON object.

use serde::{Deserialize, Serialize};

/// A decoded message of a channel's topic.
#[derive(Debug)]
pub enum Envelope<'a> {
    Publication {
        offset: u64,
        epoch: &'a str,
        data: &'a [u8],
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
        (b'p', rest) => {
            let colon = rest.iter().position(|&b| b == b':')?;
            let offset = std::str::from_utf8(&rest[..colon]).ok()?.parse().ok()?;
            let rest = &rest[colon + 1..];
            let colon = rest.iter().position(|&b| b == b':')?;
            let epoch = std::str::from_utf8(&rest[..colon]).ok()?;
            Some(Envelope::Publication {
                offset,
                epoch,
                data: &rest[colon + 1..],
            })
        }
        (b'm', rest) => serde_json::from_slice(rest).ok().map(Envelope::Membership),
        _ => None,
    }
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
                data: b"{\"a\":\"x:y\"}"
            })
        ));
        assert!(matches!(
            decode(b"p0::1"),
            Some(Envelope::Publication {
                offset: 0,
                epoch: "",
                data: b"1"
            })
        ));
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
        for bad in [&b""[..], b"p", b"px:e:1", b"p1", b"p1:e", b"m{", b"z1"] {
            assert!(decode(bad).is_none(), "{bad:?}");
        }
    }
}
