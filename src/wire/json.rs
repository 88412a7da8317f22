//! Publication and message data: one JSON value, checked once where it enters the node.

/// Checks that `data` is one JSON value (what publications and messages carry).
pub fn validate(data: &[u8]) -> Result<(), String> {
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
    fn one_json_value_in_utf8() {
        assert!(validate(b"{\"a\":1}").is_ok());
        assert!(validate(b"{\"a\":").is_err());
        assert!(validate(b"1 2").is_err());
        assert!(validate(b"\"\xff\"").unwrap_err().contains("UTF-8"));
    }
}
