//! W3C Trace Context's `traceparent` (https://www.w3.org/TR/trace-context/#traceparent-header):
//! `00-<trace-id: 32 hex>-<parent-id: 16 hex>-<flags: 2 hex>`, lowercase. A backend's
//! Publish may carry one; the nodes hand it on with the publication (in the Redis envelope)
//! so that every hop's span joins the backend's trace.

use std::fmt;

/// A trace's id: 16 bytes, never all zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// A parsed `traceparent`: the trace, the caller's span in it, and its flags (bit 0:
/// sampled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub parent_id: [u8; 8],
    pub flags: u8,
}

/// Why a `traceparent` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadTraceParent {
    #[error(
        "traceparent must be version-traceid-parentid-flags in lowercase hex (00-<32>-<16>-<2>)"
    )]
    Shape,
    #[error("traceparent version ff is invalid")]
    Version,
    #[error("traceparent trace id and parent id must not be all zeros")]
    Zero,
}

impl TraceParent {
    /// Parses a `traceparent` value. A version above 00 is read by its first four fields, as
    /// the specification asks, and handed on as version 00.
    pub fn parse(text: &str) -> Result<TraceParent, BadTraceParent> {
        let bytes = text.as_bytes();
        let version = hex::<1>(bytes.get(..2).ok_or(BadTraceParent::Shape)?)?[0];
        if version == 0xff {
            return Err(BadTraceParent::Version);
        }
        // Version 00 is exactly 55 characters; a later one may add fields after a dash.
        let fits = bytes.len() == 55 || (version > 0 && bytes.get(55) == Some(&b'-'));
        if !fits || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(BadTraceParent::Shape);
        }
        let trace_id = hex::<16>(&bytes[3..35])?;
        let parent_id = hex::<8>(&bytes[36..52])?;
        let flags = hex::<1>(&bytes[53..55])?[0];
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return Err(BadTraceParent::Zero);
        }
        Ok(TraceParent {
            trace_id: TraceId(trace_id),
            parent_id,
            flags,
        })
    }

    /// Whether the caller records this trace (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-", self.trace_id)?;
        self.parent_id
            .iter()
            .try_for_each(|b| write!(f, "{b:02x}"))?;
        write!(f, "-{:02x}", self.flags)
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// `N` bytes from `2N` lowercase hex digits.
fn hex<const N: usize>(digits: &[u8]) -> Result<[u8; N], BadTraceParent> {
    if digits.len() != 2 * N {
        return Err(BadTraceParent::Shape);
    }
    let nibble = |d: u8| match d {
        b'0'..=b'9' => Ok(d - b'0'),
        b'a'..=b'f' => Ok(d - b'a' + 10),
        _ => Err(BadTraceParent::Shape),
    };
    let mut out = [0; N];
    for (i, pair) in digits.chunks(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_prints_the_specification_s_example() {
        let parent = TraceParent::parse(SAMPLE).unwrap();
        assert_eq!(
            parent.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            parent.parent_id,
            [0, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert!(parent.sampled());
        assert_eq!(parent.to_string(), SAMPLE);
        let unsampled = TraceParent::parse(&SAMPLE.replace("-01", "-00")).unwrap();
        assert!(!unsampled.sampled());
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let later = format!("{}-extra", SAMPLE.replacen("00", "01", 1));
        let parent = TraceParent::parse(&later).unwrap();
        assert_eq!(parent.to_string(), SAMPLE);
        // Version 00 has no extra fields.
        assert_eq!(
            TraceParent::parse(&format!("{SAMPLE}-extra")),
            Err(BadTraceParent::Shape)
        );
    }

    #[test]
    fn refuses_what_the_specification_refuses() {
        let zeros = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        let no_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01";
        for (bad, why) in [
            ("", BadTraceParent::Shape),
            ("00", BadTraceParent::Shape),
            (&SAMPLE[..54], BadTraceParent::Shape),
            (&SAMPLE.to_uppercase(), BadTraceParent::Shape),
            (&SAMPLE.replace('-', "_"), BadTraceParent::Shape),
            (&SAMPLE.replacen("00", "ff", 1), BadTraceParent::Version),
            (&SAMPLE.replace("4736", "473g"), BadTraceParent::Shape),
            (zeros, BadTraceParent::Zero),
            (no_parent, BadTraceParent::Zero),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
                BadTraceParent::Shape,
            ),
        ] {
            assert_eq!(TraceParent::parse(bad), Err(why), "{bad:?}");
        }
    }
}
