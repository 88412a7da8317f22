//! Channel names and grant patterns: pure validation and matching.
//!
//! Called by the node's use-cases (subscribe, publish, queries), token verification and the
//! configuration's namespaces; nothing here touches the network or the hub.
//!
//! A channel name is 1 to 255 bytes of ASCII letters, digits and `_ - . : @ / = + , ! ~ #`.
//! The part before the first `:` is its namespace (`chat:lobby` is in `chat`); a name
//! without `:` has no namespace. A pattern is a channel name that may end with a single
//! `*`, which matches any suffix, including the empty one: `chat:*` matches `chat:lobby`,
//! and `*` matches every channel.

use std::fmt;

pub const MAX_CHANNEL_LEN: usize = 255;

/// Why a channel name or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than {MAX_CHANNEL_LEN} bytes")]
    TooLong,
    #[error("channel name contains {0:?}, outside letters, digits and _-.:@/=+,!~#")]
    BadChar(char),
    #[error("channel name starts with ':' (empty namespace)")]
    EmptyNamespace,
    #[error("'*' may only end a pattern")]
    MisplacedWildcard,
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_-.:@/=+,!~#".contains(c)
}

/// Checks a channel name.
pub fn validate(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::TooLong);
    }
    if let Some(c) = name.chars().find(|&c| !allowed(c)) {
        return Err(ChannelError::BadChar(c));
    }
    if name.starts_with(':') {
        return Err(ChannelError::EmptyNamespace);
    }
    Ok(())
}

/// The namespace of a channel: the part before the first ':', if any.
pub fn namespace(name: &str) -> Option<&str> {
    name.split_once(':').map(|(ns, _)| ns)
}

/// A validated grant pattern from a token's `channels` or `publish` claim.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    text: Box<str>,
    prefix_len: Option<usize>,
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

// === impl Pattern ===

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, ChannelError> {
        let (body, wildcard) = match text.strip_suffix('*') {
            Some(body) => (body, true),
            None => (text, false),
        };
        if body.contains('*') {
            return Err(ChannelError::MisplacedWildcard);
        }
        if wildcard {
            if body.len() >= MAX_CHANNEL_LEN {
                return Err(ChannelError::TooLong);
            }
            if let Some(c) = body.chars().find(|&c| !allowed(c)) {
                return Err(ChannelError::BadChar(c));
            }
            if body.starts_with(':') {
                return Err(ChannelError::EmptyNamespace);
            }
        } else {
            validate(body)?;
        }
        Ok(Pattern {
            text: text.into(),
            prefix_len: wildcard.then_some(body.len()),
        })
    }

    pub fn matches(&self, channel: &str) -> bool {
        match self.prefix_len {
            Some(len) => channel.starts_with(&self.text[..len]),
            None => channel == &*self.text,
        }
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// True when any pattern of `grants` matches `channel`.
pub fn granted(grants: &[Pattern], channel: &str) -> bool {
    grants.iter().any(|p| p.matches(channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(validate("chat:lobby"), Ok(()));
        assert_eq!(validate("user#42"), Ok(()));
        assert_eq!(validate(""), Err(ChannelError::Empty));
        assert_eq!(validate(&"a".repeat(256)), Err(ChannelError::TooLong));
        assert_eq!(validate(&"a".repeat(255)), Ok(()));
        assert_eq!(validate("a b"), Err(ChannelError::BadChar(' ')));
        assert_eq!(validate("chat:*"), Err(ChannelError::BadChar('*')));
        assert_eq!(validate("é"), Err(ChannelError::BadChar('é')));
        assert_eq!(validate(":x"), Err(ChannelError::EmptyNamespace));
    }

    #[test]
    fn namespaces() {
        assert_eq!(namespace("chat:lobby:1"), Some("chat"));
        assert_eq!(namespace("lobby"), None);
    }

    #[test]
    fn patterns() {
        let p = Pattern::parse("chat:*").unwrap();
        assert!(p.matches("chat:lobby"));
        assert!(p.matches("chat:"));
        assert!(!p.matches("chatter"));
        assert!(!p.matches("news:x"));
        let exact = Pattern::parse("news").unwrap();
        assert!(exact.matches("news"));
        assert!(!exact.matches("news:1"));
        assert!(Pattern::parse("*").unwrap().matches("anything:at:all"));
        assert_eq!(Pattern::parse("a*b"), Err(ChannelError::MisplacedWildcard));
        assert_eq!(Pattern::parse("**"), Err(ChannelError::MisplacedWildcard));
        assert_eq!(Pattern::parse("a b*"), Err(ChannelError::BadChar(' ')));
        assert!(granted(&[exact, p], "chat:x"));
    }
}
