//! Input echoed in an error message, clipped: a status or reply stays small whatever the
//! caller sent (grpc-core clients refuse a status whose message is too large, and report
//! RESOURCE_EXHAUSTED instead of the code that was sent).

/// Bytes of the input an error message quotes; the rest is counted, not shown.
const SHOWN: usize = 64;

/// `s` quoted as `{:?}` does, or its first 64 bytes followed by its length.
pub fn clip(s: &str) -> String {
    if s.len() <= SHOWN {
        return format!("{s:?}");
    }
    let mut end = SHOWN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn short_input_is_quoted_whole_and_long_input_is_clipped_on_a_char_boundary() {
        assert_eq!(clip("chat:1"), "\"chat:1\"");
        let long = format!("{}é{}", "a".repeat(63), "b".repeat(100));
        let clipped = clip(&long);
        assert_eq!(clipped, format!("\"{}\"… (165 bytes)", "a".repeat(63)));
    }
}
