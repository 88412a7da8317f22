//! How configuration values are written: durations, secrets, networks, and an empty string
//! for "not set". Each is read and written by serde, so the configuration's one struct
//! (`Config`) says every key's type once.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest duration any key accepts: longer ones are mistakes (and overflow clocks).
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Parses a duration as `humantime` does (`250ms`, `10s`, `5m`, `1h`, `1h30m`), written
/// without spaces, up to 30 days.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let expected = || format!("expected a duration like 500ms, 10s, 5m or 1h, got {text:?}");
    if text.contains(char::is_whitespace) {
        return Err(expected());
    }
    let duration = humantime::parse_duration(text).map_err(|_| expected())?;
    if duration > MAX_DURATION {
        return Err(format!("{text:?} is longer than the maximum of 30 days"));
    }
    Ok(duration)
}

/// Writes a duration the way the configuration reads it: `24h`, `5m`, `10s`, `250ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".into(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

/// `#[serde(with = "duration")]`: a duration field.
pub mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// `#[serde(deserialize_with = "nonempty")]`: an optional value where "" means not set.
pub fn nonempty<'de, D: Deserializer<'de>, T: From<String>>(d: D) -> Result<Option<T>, D::Error> {
    let text = Option::<String>::deserialize(d)?;
    Ok(text.filter(|t| !t.is_empty()).map(T::from))
}

/// `#[serde(with = "nets")]`: addresses or networks, `10.0.0.1` or `10.0.0.0/8`.
pub mod nets {
    use super::*;

    pub fn serialize<S: Serializer>(nets: &[ipnet::IpNet], s: S) -> Result<S::Ok, S::Error> {
        nets.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|text| {
                let text = text.trim();
                text.parse::<ipnet::IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        serde::de::Error::custom(format!(
                            "{text:?} is not an address or a network (10.0.0.0/8)"
                        ))
                    })
            })
            .collect()
    }
}

/// A value never printed in full: Debug and `config print` show only that it is set.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// `redis://user:secret@host` → `redis://***@host`: credentials stay out of logs and errors.
pub fn redact(address: &str) -> String {
    match (address.split_once("://"), address.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://***{}", &address[at..]),
        _ => address.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_are_redacted() {
        assert_eq!(
            super::redact("redis://:s3cret@10.0.0.5:6379/0"),
            "redis://***@10.0.0.5:6379/0"
        );
        assert_eq!(super::redact("redis://u:p@h:1"), "redis://***@h:1");
        assert_eq!(
            super::redact("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("99999999999999999h").is_err());
        assert!(parse_duration("31d").is_err());
        assert!(parse_duration("721h").is_err());
        for d in [0, 250, 10_000, 300_000, 86_400_000] {
            let d = Duration::from_millis(d);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "round trip");
        }
    }
}
