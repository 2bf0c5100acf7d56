//! The rules for user, device and group names, shared by the node, the store and the
//! admin tools.
//!
//! A name is stored and shown in Unicode NFC, so two encodings of the same accented name
//! are one name. It may not be empty, start or end with whitespace, or hold a control
//! character, so two names that look alike differ in something visible. User names are
//! also unique ignoring case: the store's key for a user is `user_key(name)`, the NFC
//! name lower-cased (Unicode's default lower-case mapping, then NFC again), so `Bob` and
//! `bob` are one account, and a login or a recipient may be spelled either way. No I/O.

use unicode_normalization::UnicodeNormalization;

/// Why a name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    Empty,
    /// Over the kind's byte limit after normalisation.
    TooLong,
    /// Starts or ends with whitespace.
    OuterWhitespace,
    /// Holds a control character (C0, DEL, C1).
    Control,
}

impl NameError {
    pub fn describe(self) -> &'static str {
        match self {
            NameError::Empty => "empty",
            NameError::TooLong => "too long",
            NameError::OuterWhitespace => "starts or ends with whitespace",
            NameError::Control => "holds a control character",
        }
    }
}

impl std::fmt::Display for NameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

impl std::error::Error for NameError {}

/// `raw` in NFC if it is a valid name of at most `size_max` bytes (after normalisation).
pub fn normalize(raw: &str, size_max: usize) -> Result<String, NameError> {
    let name: String = raw.nfc().collect();
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > size_max {
        return Err(NameError::TooLong);
    }
    if name.starts_with(char::is_whitespace) || name.ends_with(char::is_whitespace) {
        return Err(NameError::OuterWhitespace);
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::Control);
    }
    Ok(name)
}

/// The uniqueness key of a user name already in NFC: lower-cased, then NFC again. May be
/// longer than the name in a few scripts; keys are only compared, never shown.
pub fn user_key(name: &str) -> String {
    name.to_lowercase().nfc().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_encodings_of_one_name_are_one_name() {
        let composed = "Jos\u{e9}";
        let decomposed = "Jose\u{301}";
        assert_ne!(composed, decomposed);
        assert_eq!(normalize(decomposed, 64).unwrap(), composed);
        assert_eq!(
            user_key(&normalize(decomposed, 64).unwrap()),
            user_key(composed)
        );
    }

    #[test]
    fn case_does_not_make_another_user() {
        assert_eq!(user_key("BOB"), user_key("bob"));
        assert_eq!(user_key("\u{c9}mile"), user_key("\u{e9}mile"));
        assert_ne!(user_key("bob"), user_key("bobby"));
    }

    #[test]
    fn names_that_look_like_others_are_refused() {
        assert_eq!(normalize(" bob", 64), Err(NameError::OuterWhitespace));
        assert_eq!(normalize("bob ", 64), Err(NameError::OuterWhitespace));
        assert_eq!(
            normalize("\u{3000}bob", 64),
            Err(NameError::OuterWhitespace)
        );
        assert_eq!(normalize("   ", 64), Err(NameError::OuterWhitespace));
        assert_eq!(normalize("bo\u{0}b", 64), Err(NameError::Control));
        assert_eq!(normalize("bo\nb", 64), Err(NameError::Control));
        assert_eq!(normalize("bo\u{85}b", 64), Err(NameError::Control));
        assert_eq!(normalize("", 64), Err(NameError::Empty));
        assert_eq!(normalize("abc", 2), Err(NameError::TooLong));
        // Inner spaces are fine: "Team Rocket" is a group name.
        assert_eq!(normalize("Team Rocket", 64).unwrap(), "Team Rocket");
    }
}
