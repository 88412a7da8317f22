//! Allowed Origins for browser upgrades: the defence against cross-site WebSocket hijacking.
//!
//! A browser sends `Origin` with every WebSocket upgrade, and a page on any site can open a
//! WebSocket to sidecast. With `allowed_origins` set, an upgrade whose Origin matches none of
//! the patterns is refused with 403 before the upgrade. Requests without Origin (servers,
//! mobile apps) are not browsers and pass. Patterns are origins (`https://app.example.com`,
//! compared without regard to case), `*` in place of a host label
//! (`https://*.example.com`, one or more labels), or `*` alone for any origin.

/// A validated pattern, lowercased. Read from and written to configuration as its text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct OriginPattern(String);

impl TryFrom<String> for OriginPattern {
    type Error = String;
    fn try_from(text: String) -> Result<OriginPattern, String> {
        OriginPattern::parse(&text)
    }
}

impl From<OriginPattern> for String {
    fn from(pattern: OriginPattern) -> String {
        pattern.0
    }
}

impl OriginPattern {
    pub fn parse(text: &str) -> Result<OriginPattern, String> {
        let text = text.trim().to_ascii_lowercase();
        if text == "*" {
            return Ok(OriginPattern(text));
        }
        let Some((scheme, host)) = text.split_once("://") else {
            return Err(format!(
                "{text:?} is not an origin (scheme://host[:port], e.g. https://app.example.com)"
            ));
        };
        if scheme.is_empty() || host.is_empty() || host.contains('/') {
            return Err(format!(
                "{text:?} is not an origin (no path, no trailing slash)"
            ));
        }
        if host.matches('*').count() > 1 || (host.contains('*') && !host.starts_with("*.")) {
            return Err(format!(
                "{text:?}: a wildcard may only stand for the leading labels (https://*.example.com)"
            ));
        }
        Ok(OriginPattern(text))
    }

    /// True for `*`, which lets every origin in.
    pub fn is_any(&self) -> bool {
        self.0 == "*"
    }

    fn matches(&self, origin: &str) -> bool {
        let pattern = self.0.as_str();
        if pattern == "*" {
            return true;
        }
        match pattern.split_once("://*.") {
            // `*.` stands for one or more labels: "https://a.example.com" and
            // "https://a.b.example.com" match "https://*.example.com"; the bare domain does not.
            Some((scheme, suffix)) => origin
                .strip_prefix(scheme)
                .and_then(|rest| rest.strip_prefix("://"))
                .and_then(|host| host.strip_suffix(suffix))
                .is_some_and(|labels| labels.len() > 1 && labels.ends_with('.')),
            None => origin == pattern,
        }
    }
}

/// True when the upgrade may proceed: no patterns configured, no Origin sent, or a match.
pub fn allowed(patterns: &[OriginPattern], origin: Option<&str>) -> bool {
    let Some(origin) = origin else { return true };
    if patterns.is_empty() {
        return true;
    }
    let origin = origin.trim().to_ascii_lowercase();
    patterns.iter().any(|p| p.matches(&origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(list: &[&str]) -> Vec<OriginPattern> {
        list.iter()
            .map(|p| OriginPattern::parse(p).unwrap())
            .collect()
    }

    #[test]
    fn exact_wildcard_and_absent() {
        let p = patterns(&["https://app.example.com", "https://*.example.org"]);
        assert!(allowed(&p, Some("https://app.example.com")));
        assert!(allowed(&p, Some("HTTPS://APP.EXAMPLE.COM")));
        assert!(!allowed(&p, Some("http://app.example.com")));
        assert!(!allowed(&p, Some("https://app.example.com.evil.io")));
        assert!(allowed(&p, Some("https://a.example.org")));
        assert!(allowed(&p, Some("https://a.b.example.org")));
        assert!(!allowed(&p, Some("https://example.org")));
        assert!(!allowed(&p, Some("https://evilexample.org")));
        assert!(!allowed(&p, Some("null")));
        assert!(allowed(&p, None), "no Origin: not a browser");
        assert!(allowed(&[], Some("https://anything")));
        assert!(allowed(&patterns(&["*"]), Some("https://anything")));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "example.com",
            "https://",
            "https://a.com/",
            "https://a.*.com",
            "https://*.*.com",
        ] {
            assert!(OriginPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
