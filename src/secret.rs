//! `Secret`: the one type that holds a key, an upstream credential or key material in memory.
//!
//! Its `Debug` and `Display` print `***`, so a secret that slips into a log line or an error
//! message by accident shows nothing; its memory is zeroed when it is dropped.

use std::fmt;
use zeroize::Zeroizing;

/// A secret string: an API key, an upstream credential or an env var value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a value; the caller's copy should be dropped (or zeroized) right after.
    pub fn new(value: String) -> Self {
        Secret(Zeroizing::new(value))
    }

    /// The value itself, for the few places that must use it (injection, digests, encryption).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A preview that never reveals more than the last four characters: `****abcd`.
    /// Values of eight characters or fewer show nothing but the stars.
    pub fn preview(&self, prefix: &str) -> String {
        let chars: Vec<char> = self.0.chars().collect();
        if chars.len() <= 8 {
            return format!("{prefix}****");
        }
        let tail: String = chars[chars.len() - 4..].iter().collect();
        format!("{prefix}****{tail}")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Secrets arrive in JSON bodies (admin API): deserialize straight into the wrapper, so the
/// plain value never sits in a type that could be printed.
impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("sk-verysecretvalue1234".into());
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{:?}", Some(&s)), "Some(***)");
    }

    #[test]
    fn preview_shows_at_most_four_characters() {
        assert_eq!(Secret::new("abcdefghijkl".into()).preview(""), "****ijkl");
        assert_eq!(Secret::new("short".into()).preview(""), "****");
        assert_eq!(
            Secret::new("sk-aaaaaaaaaaaaWXYZ".into()).preview("sk-"),
            "sk-****WXYZ"
        );
    }
}
