//! Frames and stored records of team messaging: groups, group sends, history, the
//! conversation list and read marks. Added to protocol v1 as new kinds only; no v1 frame
//! changes.
//!
//! Timeline entries that are not 1:1 text messages (group messages, membership changes,
//! read receipts) are stored and sent as `RECORD_MARKER` followed by an archived `Record`.
//! The marker can never start an archived `Message` (see `is_record`), so a client tells
//! the two apart by the first eight bytes of `Entry.message`.

use rkyv::{Archive, Deserialize, Serialize};

/// Conversation ids: a 1:1 conversation is named by the other user's id (a note to oneself
/// by one's own id); a group by `GROUP_CONV_BIT | group_id`. User ids never reach 2⁶³.
pub const GROUP_CONV_BIT: u64 = 1 << 63;

/// First bytes of an entry that holds a `Record` rather than a `Message`.
pub const RECORD_MARKER: [u8; 8] = [0xFF; 8];

/// Whether stored entry bytes hold a record. A `Message` archive starts either with the
/// text of an out-of-line string (UTF-8, which never contains 0xFF) or with its root, whose
/// first field is a msg id below 2⁵⁶ (its eighth byte is 0).
pub fn is_record(entry: &[u8]) -> bool {
    entry.starts_with(&RECORD_MARKER)
}

/// The conversation id of a group.
pub fn group_conv(group_id: u64) -> u64 {
    GROUP_CONV_BIT | group_id
}

/// The group id of a conversation id, if it names a group.
pub fn conv_group(conv: u64) -> Option<u64> {
    (conv & GROUP_CONV_BIT != 0).then_some(conv & !GROUP_CONV_BIT)
}

/// `Record.kind` values. Numbers are protocol: only appended.
pub mod record_kind {
    /// A message to a group: `text`, `client_msg_id`.
    pub const GROUP_MESSAGE: u16 = 1;
    /// `from` created the group named `text` with members `users` (the creator included).
    pub const GROUP_CREATED: u16 = 2;
    /// `from` added `users`.
    pub const MEMBERS_ADDED: u16 = 3;
    /// `from` (the owner) removed `users`.
    pub const MEMBERS_REMOVED: u16 = 4;
    /// `from` left the group.
    pub const MEMBER_LEFT: u16 = 5;
    /// `from` renamed the group to `text`.
    pub const GROUP_RENAMED: u16 = 6;
    /// `from` read conversation `conv` up to and including the message `up_to` (a msg id).
    /// In the reader's own timeline it tells the reader's other devices; in a sender's
    /// timeline it is a read receipt, with `conv` as that sender sees the conversation.
    pub const READ: u16 = 7;
    /// Delivery receipt: a device of `from` stored this user's messages in conversation
    /// `conv` (as `from` names it) up to and including msg id `up_to`.
    pub const DELIVERED: u16 = 8;
    /// A message carrying a file (`attachments`, caption in `text`), 1:1 or to a group.
    /// For 1:1, `conv` is the recipient's id: the sender's conversation is `conv`, the
    /// recipient's is `from_id`.
    pub const FILE_MESSAGE: u16 = 9;
}

/// A stored timeline record (after `RECORD_MARKER`). Fields a kind does not use are 0 or
/// empty.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: u16,
    /// Id in the message map; records and messages share one id space.
    pub msg_id: u64,
    /// Conversation the record belongs to (`group_conv(id)` for group records).
    pub conv: u64,
    /// Who caused it: the sender, the member who added/removed/left/renamed, the reader.
    pub from_id: u64,
    pub from: String,
    /// Members added or removed; the initial members of a created group.
    pub users: Vec<u64>,
    pub client_msg_id: u64,
    pub sent_at_ms: u64,
    /// `READ`: the last msg id read.
    pub up_to: u64,
    /// Message text, or the group name.
    pub text: String,
    /// `FILE_MESSAGE`: the file (exactly one); empty otherwise.
    pub attachments: Vec<super::Attachment>,
}

/// `GroupOp.op` values.
pub mod group_op {
    /// Create a group named `name` with `users` (the caller becomes its owner).
    pub const CREATE: u8 = 1;
    /// Add `users` (any member may).
    pub const ADD: u8 = 2;
    /// Remove `users` (owner only; the owner cannot remove itself).
    pub const REMOVE: u8 = 3;
    /// Leave the group (the owner cannot leave).
    pub const LEAVE: u8 = 4;
    /// Rename the group to `name` (any member).
    pub const RENAME: u8 = 5;
}

/// Client → node: change a group. Answered by `GroupInfo` after the change is durable.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupOp {
    pub op: u8,
    /// 0 for `CREATE`.
    pub group_id: u64,
    pub name: String,
    pub users: Vec<String>,
}

/// Client → node: one group's details (members only). Answered by `GroupInfo`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupQuery {
    pub group_id: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    pub user_id: u64,
    pub name: String,
    pub owner: bool,
}

/// Node → client: a group as of the answer. After a `GroupOp`, `seq` is the seq of the
/// membership record in the caller's timeline (0 after `LEAVE`, which takes the caller
/// out, and after a `GroupQuery`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub group_id: u64,
    pub name: String,
    pub owner_id: u64,
    pub members: Vec<GroupMember>,
    pub seq: u64,
}

/// Client → node: the caller's groups with id above `after_group_id`, at most `limit`
/// (0 or over the maximum: the maximum). Answered by `GroupListPage`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupList {
    pub after_group_id: u64,
    pub limit: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    pub group_id: u64,
    pub name: String,
    pub owner_id: u64,
    pub members: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupListPage {
    pub groups: Vec<GroupSummary>,
    pub has_more: bool,
}

/// Client → node: a message to a group. Answered by `SendAck` after commit; deduplicated
/// on (sender, `client_msg_id`) like `Send`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupSend {
    pub group_id: u64,
    pub client_msg_id: u64,
    pub text: String,
}

/// Client → node: entries of one conversation with timeline seq below `before_seq` (0:
/// from the newest), newest first, at most `limit`. Answered by `HistoryPage`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    pub conv: u64,
    pub before_seq: u64,
    pub limit: u32,
}

/// Node → client: `entries` in descending seq order (the same `Entry` as in `SyncPage`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    pub entries: Vec<super::Entry>,
    pub has_more: bool,
}

/// Encoding-side twin of `HistoryPage`, borrowing the stored bytes.
#[derive(Archive, Serialize)]
pub struct HistoryPageRef<'a> {
    pub entries: Vec<super::EntryRef<'a>>,
    pub has_more: bool,
}

/// Client → node: the caller's conversations by last activity, newest first. Answered by
/// `ConversationsPage`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conversations {
    pub offset: u32,
    pub limit: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ConversationItem {
    pub conv: u64,
    /// The other user's name, or the group's name.
    pub title: String,
    /// Timeline seq and time of the last entry in the conversation.
    pub last_seq: u64,
    pub last_at_ms: u64,
    /// Who wrote the last message and its first bytes (cut on a char boundary).
    pub last_from: String,
    pub preview: String,
    /// Messages from others after the caller's read mark.
    pub unread: u32,
    /// The caller's read mark (a timeline seq).
    pub read_seq: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ConversationsPage {
    pub items: Vec<ConversationItem>,
    /// Conversations the caller has in all.
    pub total: u32,
}

/// Client → node: the caller read conversation `conv` up to timeline seq `up_to_seq`.
/// Answered by `ReadOk` after commit. Marks only move forward.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    pub conv: u64,
    pub up_to_seq: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOk {
    pub conv: u64,
    pub read_seq: u64,
    pub unread: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Message;

    #[test]
    fn record_marker_never_starts_a_message() {
        for text in ["", "hi", "a longer text than eight bytes"] {
            let msg = Message {
                msg_id: (1 << 56) - 1,
                from_id: u64::MAX,
                from: "alice".into(),
                to_id: u64::MAX,
                to: "bob".into(),
                client_msg_id: u64::MAX,
                sent_at_ms: u64::MAX,
                text: text.into(),
            };
            let bytes = rkyv::to_bytes::<rkyv::rancor::Failure>(&msg).unwrap();
            assert!(!is_record(&bytes));
        }
        let mut bytes = RECORD_MARKER.to_vec();
        bytes.extend_from_slice(&[1, 2, 3]);
        assert!(is_record(&bytes));
    }

    /// Root sizes as documented in docs/protocol.md §11.
    #[test]
    fn archived_sizes_match_the_documentation() {
        use std::mem::size_of;
        assert_eq!(size_of::<ArchivedRecord>(), 82);
        assert_eq!(size_of::<ArchivedGroupOp>(), 25);
        assert_eq!(size_of::<ArchivedGroupQuery>(), 8);
        assert_eq!(size_of::<ArchivedGroupMember>(), 17);
        assert_eq!(size_of::<ArchivedGroupInfo>(), 40);
        assert_eq!(size_of::<ArchivedGroupList>(), 12);
        assert_eq!(size_of::<ArchivedGroupListPage>(), 9);
        assert_eq!(size_of::<ArchivedGroupSummary>(), 28);
        assert_eq!(size_of::<ArchivedGroupSend>(), 24);
        assert_eq!(size_of::<ArchivedHistory>(), 20);
        assert_eq!(size_of::<ArchivedHistoryPage>(), 9);
        assert_eq!(size_of::<ArchivedConversations>(), 8);
        assert_eq!(size_of::<ArchivedConversationsPage>(), 12);
        assert_eq!(size_of::<ArchivedConversationItem>(), 60);
        assert_eq!(size_of::<ArchivedRead>(), 16);
        assert_eq!(size_of::<ArchivedReadOk>(), 20);
    }

    #[test]
    fn conversation_ids_round_trip() {
        assert_eq!(conv_group(group_conv(7)), Some(7));
        assert_eq!(conv_group(7), None);
    }
}
