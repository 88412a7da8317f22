//! Publication and message data: one JSON value, checked once where it enters the node.

/// How deep arrays and objects may nest in data. Receivers parse what sidecast fans out,
/// and many parsers recurse: Python's `json` fails near 1,000 levels, and others sooner.
pub const MAX_DEPTH: usize = 64;

/// Checks that `data` is one JSON value (what publications and messages carry), nested at
/// most [`MAX_DEPTH`] levels. Numbers pass as they are written, whatever their size.
pub fn validate(data: &[u8]) -> Result<(), String> {
    // Checked first and whole: skipping a value (IgnoredAny) does not validate the bytes
    // inside strings, and one invalid byte in a text frame makes browsers drop the socket.
    let text = std::str::from_utf8(data).map_err(|e| format!("data is not valid UTF-8: {e}"))?;
    // Skipping a value does not recurse, so any depth parses: the depth is checked after.
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map_err(|e| format!("data is not valid JSON: {e}"))?;
    check_depth(data)
}

/// Checks the nesting of data already known to be JSON (a client's, decoded with its
/// command): at most [`MAX_DEPTH`] levels.
pub fn check_depth(data: &[u8]) -> Result<(), String> {
    if depth(data) > MAX_DEPTH {
        return Err(format!(
            "data nests arrays and objects deeper than {MAX_DEPTH} levels"
        ));
    }
    Ok(())
}

/// The deepest nesting of arrays and objects in valid JSON text.
fn depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth -= 1,
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_json_value_in_utf8() {
        assert!(validate(b"{\"a\":1}").is_ok());
        assert!(validate(b"{\"a\":").is_err());
        assert!(validate(b"1 2").is_err());
        assert!(validate(b"\"\xff\"").unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn nesting_is_bounded_and_strings_do_not_count() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(validate(nested(MAX_DEPTH).as_bytes()).is_ok());
        assert!(validate(nested(MAX_DEPTH + 1).as_bytes())
            .unwrap_err()
            .contains("deeper than 64"));
        assert!(validate(nested(100_000).as_bytes()).is_err());
        let brackets_in_strings = format!(r#"{{"a":"{}","b":"\"[{{"}}"#, "[".repeat(500));
        assert_eq!(depth(brackets_in_strings.as_bytes()), 1);
        assert!(validate(b"123456789012345678901234567890").is_ok());
    }
}
