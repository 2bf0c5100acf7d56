//! Presence and typing frames (kinds 27–32). Presence is per user: online while any of the
//! user's devices is connected. Typing indicators are ephemeral pushes, never stored.

use rkyv::{Archive, Deserialize, Serialize};

/// Client → node: watch exactly these users (replacing the connection's earlier set; an
/// empty list stops watching). Answered by `PresenceState`; then each change of a watched
/// user arrives as a `PresencePush`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PresenceSubscribe {
    pub users: Vec<String>,
}

/// Client → node: these users' presence now, without watching. Answered by
/// `PresenceState`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PresenceQuery {
    pub users: Vec<String>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PresenceItem {
    pub user_id: u64,
    pub name: String,
    pub online: bool,
    /// Grows with each online/offline change of the user; of two reports about one user,
    /// the higher version is the newer.
    pub version: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PresenceState {
    pub users: Vec<PresenceItem>,
}

/// Node → client, unsolicited: a watched user came online or went offline.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresencePush {
    pub user_id: u64,
    pub online: bool,
    pub version: u64,
}

/// Client → node: the caller is typing in conversation `conv`. No answer unless refused;
/// relayed to the other side's online devices and never stored.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Typing {
    pub conv: u64,
}

/// Node → client, unsolicited: `from` is typing in `conv` (as the receiver names it).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TypingPush {
    pub conv: u64,
    pub from_id: u64,
    pub from: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archived_sizes_match_the_documentation() {
        use std::mem::size_of;
        assert_eq!(size_of::<ArchivedPresenceSubscribe>(), 8);
        assert_eq!(size_of::<ArchivedPresenceQuery>(), 8);
        assert_eq!(size_of::<ArchivedPresenceItem>(), 25);
        assert_eq!(size_of::<ArchivedPresenceState>(), 8);
        assert_eq!(size_of::<ArchivedPresencePush>(), 17);
        assert_eq!(size_of::<ArchivedTyping>(), 8);
        assert_eq!(size_of::<ArchivedTypingPush>(), 24);
    }
}
