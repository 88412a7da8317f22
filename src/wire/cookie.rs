//! The session cookie of `auth_cookie`: its name checked at start, its value found in the
//! upgrade request's `Cookie` headers (RFC 6265 section 5.4: `name=value` pairs separated by
//! `; `, possibly over several headers).

use ::cookie::Cookie;

/// A cookie name is an RFC 7230 token: visible ASCII without separators.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The value of the first cookie called `name` in `headers`, without surrounding quotes;
/// None when absent or empty. A header that is not text, or a pair that does not parse, is
/// skipped.
pub fn find<'a>(headers: impl IntoIterator<Item = &'a [u8]>, name: &str) -> Option<String> {
    headers
        .into_iter()
        .filter_map(|header| std::str::from_utf8(header).ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|cookie| cookie.name() == name)
        .map(|cookie| cookie.value_trimmed().to_string())
        .filter(|value| !value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_tokens() {
        assert!(valid_name("sid"));
        assert!(valid_name("__Host-session.v2"));
        for bad in ["", "a b", "a=b", "a;b", "a,b", "\"a\"", "a/b", "é"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn finds_the_first_named_cookie_across_headers() {
        let one: &[&[u8]] = &[b"theme=dark; sid=eyJ.a.b; other=1"];
        assert_eq!(find(one.iter().copied(), "sid").as_deref(), Some("eyJ.a.b"));
        let several: &[&[u8]] = &[b"theme=dark", b"sid=\"eyJ.c.d\"", b"sid=later"];
        assert_eq!(
            find(several.iter().copied(), "sid").as_deref(),
            Some("eyJ.c.d")
        );
        // Names are compared exactly: a prefix or another case is another cookie.
        let near: &[&[u8]] = &[b"sid2=x; SID=y; xsid=z"];
        assert_eq!(find(near.iter().copied(), "sid"), None);
        let empty: &[&[u8]] = &[b"sid=; a=1"];
        assert_eq!(find(empty.iter().copied(), "sid"), None);
        let garbage: &[&[u8]] = &[b"\xff\xfe", b";;=;", b"sid=ok"];
        assert_eq!(find(garbage.iter().copied(), "sid").as_deref(), Some("ok"));
    }
}
