//! Conversation indexes: which timeline entries belong to which conversation, each
//! conversation's last entry, read mark and unread count, and the order of conversations by
//! last activity. The writer keeps them in step with every timeline append (`note`) and
//! with read marks (`apply_read`); shards read them for history pages and the conversation
//! list (`ReadView::history`, `ReadView::conversations`).
//!
//! Nothing here opens or commits a transaction; the caller owns it.

use std::ops::Bound;
use std::sync::Arc;

use heed::{RoTxn, RwTxn};

use super::StoreError;
use super::apply::{archive_record, next_msg_id, put_message};
use super::journal::{Journal, LoggedEntry};
use super::read::ReadView;
use super::schema::{self, Dbs};
use super::writer::{Delivery, OpResult, Origin, Reply};
use crate::ids::UserId;
use crate::limits::{CONVERSATION_PREVIEW_SIZE_MAX, GROUP_MEMBERS_MAX};
use crate::protocol::{
    self, ArchivedMessage, ArchivedRecord, ConversationItem, ErrorCode, ReadOk, Record, conv_group,
    record_kind,
};

/// Value of `convs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ConvState {
    /// Seq of the conversation's last entry in the user's timeline.
    pub last_seq: u64,
    pub last_msg_id: u64,
    pub last_at_ms: u64,
    /// The user read every entry up to this seq.
    pub read_seq: u64,
    /// Messages from others with seq above `read_seq`.
    pub unread: u64,
}

const CONV_STATE_SIZE: usize = 40;

impl ConvState {
    fn encode(&self) -> [u8; CONV_STATE_SIZE] {
        let mut value = [0u8; CONV_STATE_SIZE];
        for (i, field) in [
            self.last_seq,
            self.last_msg_id,
            self.last_at_ms,
            self.read_seq,
            self.unread,
        ]
        .iter()
        .enumerate()
        {
            value[i * 8..i * 8 + 8].copy_from_slice(&field.to_be_bytes());
        }
        value
    }

    fn decode(bytes: &[u8]) -> Result<ConvState, StoreError> {
        const WHAT: &str = "conversation state length";
        if bytes.len() != CONV_STATE_SIZE {
            return Err(StoreError::Corrupt(WHAT));
        }
        let field = |i: usize| schema::decode_u64(&bytes[i * 8..i * 8 + 8], WHAT);
        Ok(ConvState {
            last_seq: field(0)?,
            last_msg_id: field(1)?,
            last_at_ms: field(2)?,
            read_seq: field(3)?,
            unread: field(4)?,
        })
    }
}

/// Value of `conv_entries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConvEntry {
    msg_id: u64,
    from_id: u64,
    /// A message from someone else: counts as unread until read.
    counts_unread: bool,
}

const CONV_ENTRY_SIZE: usize = 17;

impl ConvEntry {
    fn encode(&self) -> [u8; CONV_ENTRY_SIZE] {
        let mut value = [0u8; CONV_ENTRY_SIZE];
        value[..8].copy_from_slice(&self.msg_id.to_be_bytes());
        value[8..16].copy_from_slice(&self.from_id.to_be_bytes());
        value[16] = u8::from(self.counts_unread);
        value
    }

    fn decode(bytes: &[u8]) -> Result<ConvEntry, StoreError> {
        const WHAT: &str = "conversation entry length";
        if bytes.len() != CONV_ENTRY_SIZE || bytes[16] > 1 {
            return Err(StoreError::Corrupt(WHAT));
        }
        Ok(ConvEntry {
            msg_id: schema::decode_u64(&bytes[..8], WHAT)?,
            from_id: schema::decode_u64(&bytes[8..16], WHAT)?,
            counts_unread: bytes[16] == 1,
        })
    }
}

/// What kind of timeline entry `note` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NoteKind {
    /// A message (1:1 or group): unread for everyone but its sender, and a message of
    /// one's own marks the conversation read.
    Message,
    /// A membership change: part of the history and of last activity, never unread.
    Membership,
}

/// One timeline entry of a conversation, as `note_run` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Noted {
    pub seq: u64,
    pub msg_id: u64,
    pub from: UserId,
    pub at_ms: u64,
    pub kind: NoteKind,
}

/// Records that `entries` (in increasing seq, all above the conversation's last seq) of
/// `user`'s timeline belong to conversation `conv`: one `conv_entries` row each, and the
/// conversation's state and place in the activity order moved once for all of them, as
/// if each had been noted in turn.
pub(super) fn note_run(
    txn: &mut RwTxn,
    dbs: &Dbs,
    user: UserId,
    conv: u64,
    entries: &[Noted],
) -> Result<(), StoreError> {
    let Some(last) = entries.last() else {
        return Ok(());
    };
    let key = schema::pair_key(user.0, conv);
    let old = match dbs
        .convs
        .get(txn, &key)
        .map_err(StoreError::lmdb("read conversation"))?
    {
        Some(bytes) => Some(ConvState::decode(bytes)?),
        None => None,
    };
    let mut state = old.unwrap_or_default();
    for noted in entries {
        // Entries only append, so the conversation's last seq only grows.
        debug_assert!(state.last_seq < noted.seq);
        let entry = ConvEntry {
            msg_id: noted.msg_id,
            from_id: noted.from.0,
            counts_unread: noted.kind == NoteKind::Message && noted.from != user,
        };
        dbs.conv_entries
            .put(
                txn,
                &schema::triple_key(user.0, conv, noted.seq),
                &entry.encode(),
            )
            .map_err(StoreError::lmdb("write conversation entry"))?;
        state.last_seq = noted.seq;
        state.last_msg_id = noted.msg_id;
        state.last_at_ms = noted.at_ms;
        if entry.counts_unread {
            state.unread += 1;
        } else if noted.kind == NoteKind::Message {
            // Writing in a conversation means having read it.
            state.read_seq = noted.seq;
            state.unread = 0;
        }
    }
    debug_assert_eq!(state.last_seq, last.seq);
    if let Some(old) = old {
        dbs.conv_recent
            .delete(txn, &schema::pair_key(user.0, old.last_seq))
            .map_err(StoreError::lmdb("delete conversation order"))?;
    }
    dbs.convs
        .put(txn, &key, &state.encode())
        .map_err(StoreError::lmdb("write conversation"))?;
    dbs.conv_recent
        .put(
            txn,
            &schema::pair_key(user.0, last.seq),
            &conv.to_be_bytes(),
        )
        .map_err(StoreError::lmdb("write conversation order"))
}

fn conv_state(
    txn: &RoTxn,
    dbs: &Dbs,
    user: UserId,
    conv: u64,
) -> Result<Option<ConvState>, StoreError> {
    match dbs
        .convs
        .get(txn, &schema::pair_key(user.0, conv))
        .map_err(StoreError::lmdb("read conversation"))?
    {
        Some(bytes) => Ok(Some(ConvState::decode(bytes)?)),
        None => Ok(None),
    }
}

/// A `Read` request: moves `user`'s read mark in `conv` forward to `up_to_seq` (cut to the
/// conversation's last entry), recounts unread, and writes one `READ` record into the
/// reader's timeline (for the reader's other devices) and into the timeline of each sender
/// whose messages the mark passed (their read receipt).
#[allow(clippy::too_many_arguments)]
///
/// The caller applied the journal first in this transaction: the mark moves over the
/// derived `conv_entries` and `convs`.
pub(super) fn apply_read(
    txn: &mut RwTxn,
    dbs: &Dbs,
    journal: &mut Journal,
    origin: Origin,
    user: UserId,
    user_name: &str,
    conv: u64,
    up_to_seq: u64,
    at_ms: u64,
    results: &mut Vec<OpResult>,
    deliveries: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    let Some(mut state) = conv_state(txn, dbs, user, conv)? else {
        results.push(OpResult::Refused {
            origin,
            code: ErrorCode::NotMember,
            message: "no such conversation",
        });
        return Ok(());
    };
    let up_to = up_to_seq.min(state.last_seq);
    if up_to <= state.read_seq {
        results.push(OpResult::Answered {
            origin,
            reply: Reply::Read(ReadOk {
                conv,
                read_seq: state.read_seq,
                unread: state.unread.min(u64::from(u32::MAX)) as u32,
            }),
        });
        return Ok(());
    }
    // The senders whose messages the mark passes, and the last message it passes.
    let mut senders: Vec<UserId> = Vec::new();
    let mut last_read_msg = 0;
    let mut unread = 0u64;
    {
        let start = schema::triple_key(user.0, conv, state.read_seq + 1);
        let end = schema::triple_key(user.0, conv, u64::MAX);
        let range = (Bound::Included(&start[..]), Bound::Included(&end[..]));
        for item in dbs
            .conv_entries
            .range(txn, &range)
            .map_err(StoreError::lmdb("open conversation range"))?
        {
            let (key, value) = item.map_err(StoreError::lmdb("read conversation entry"))?;
            let seq = schema::decode_u64(&key[16..], "conversation entry key")?;
            let entry = ConvEntry::decode(value)?;
            if seq <= up_to {
                last_read_msg = entry.msg_id;
                let sender = UserId(entry.from_id);
                if entry.counts_unread
                    && senders.len() < GROUP_MEMBERS_MAX
                    && !senders.contains(&sender)
                {
                    senders.push(sender);
                }
            } else if entry.counts_unread {
                unread += 1;
            }
        }
    }
    state.read_seq = up_to;
    state.unread = unread;
    dbs.convs
        .put(txn, &schema::pair_key(user.0, conv), &state.encode())
        .map_err(StoreError::lmdb("write conversation"))?;

    let msg_id = next_msg_id(txn, dbs)?;
    let record = Record {
        kind: record_kind::READ,
        msg_id,
        conv,
        from_id: user.0,
        from: user_name.to_owned(),
        users: Vec::new(),
        client_msg_id: 0,
        sent_at_ms: at_ms,
        up_to: last_read_msg,
        text: String::new(),
        attachments: Vec::new(),
    };
    let bytes: Arc<[u8]> = archive_record(&record)?.into();
    put_message(txn, dbs, msg_id, &bytes)?;
    let mut entry = LoggedEntry::new(msg_id, user, at_ms);
    for reader_or_sender in std::iter::once(user).chain(senders.into_iter().filter(|s| *s != user))
    {
        let seq = journal.place(txn, dbs, &mut entry, reader_or_sender, None)?;
        deliveries.push(Delivery {
            user: reader_or_sender,
            seq,
            message: Arc::clone(&bytes),
        });
    }
    journal.log(txn, dbs, entry)?;
    results.push(OpResult::Answered {
        origin,
        reply: Reply::Read(ReadOk {
            conv,
            read_seq: up_to,
            unread: unread.min(u64::from(u32::MAX)) as u32,
        }),
    });
    Ok(())
}

/// The title of a group conversation for a former member: the group's name carried by its
/// last entry there (the record that took it out), or a neutral one for records stored
/// before removals carried the name.
fn former_group_title(bytes: &[u8]) -> String {
    if protocol::is_record(bytes)
        && let Ok(record) = rkyv::access::<ArchivedRecord, rkyv::rancor::Failure>(
            &bytes[protocol::RECORD_MARKER.len()..],
        )
        && matches!(
            record.kind.to_native(),
            record_kind::MEMBERS_REMOVED | record_kind::MEMBER_LEFT
        )
        && !record.text.is_empty()
    {
        return record.text.as_str().to_owned();
    }
    "a former group".to_owned()
}

/// Who wrote a stored entry and a preview of it.
fn preview(bytes: &[u8]) -> Result<(String, String), StoreError> {
    if protocol::is_record(bytes) {
        let record = rkyv::access::<ArchivedRecord, rkyv::rancor::Failure>(
            &bytes[protocol::RECORD_MARKER.len()..],
        )
        .map_err(|_| StoreError::Corrupt("stored record"))?;
        let text = match record.kind.to_native() {
            record_kind::GROUP_MESSAGE => record.text.as_str().to_owned(),
            // A file message shows its caption, or else the file's name.
            record_kind::FILE_MESSAGE => match (record.text.as_str(), record.attachments.first()) {
                ("", Some(file)) => file.name.as_str().to_owned(),
                (caption, _) => caption.to_owned(),
            },
            record_kind::GROUP_CREATED => format!("created the group {}", record.text.as_str()),
            record_kind::MEMBERS_ADDED => format!("added {} member(s)", record.users.len()),
            record_kind::MEMBERS_REMOVED => format!("removed {} member(s)", record.users.len()),
            record_kind::MEMBER_LEFT => "left the group".to_owned(),
            record_kind::GROUP_RENAMED => format!("renamed the group to {}", record.text.as_str()),
            _ => String::new(),
        };
        return Ok((record.from.as_str().to_owned(), cut(&text).to_owned()));
    }
    let message = rkyv::access::<ArchivedMessage, rkyv::rancor::Failure>(bytes)
        .map_err(|_| StoreError::Corrupt("stored message"))?;
    Ok((
        message.from.as_str().to_owned(),
        cut(message.text.as_str()).to_owned(),
    ))
}

fn cut(text: &str) -> &str {
    if text.len() <= CONVERSATION_PREVIEW_SIZE_MAX {
        return text;
    }
    let mut end = CONVERSATION_PREVIEW_SIZE_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl<'s> ReadView<'s> {
    /// `user`'s state of conversation `conv`, if the user has one.
    #[cfg(test)]
    pub(crate) fn conversation_state(
        &self,
        user: UserId,
        conv: u64,
    ) -> Result<Option<ConvState>, StoreError> {
        conv_state(self.txn(), self.dbs(), user, conv)
    }

    /// Calls `f(seq, entry_bytes)` for the entries of conversation `conv` in `user`'s
    /// timeline with seq below `before_seq` (0: no bound), newest first, at most `limit`,
    /// stopping before the entry that would take the bytes past `bytes_max` (the first is
    /// always handed out). Returns whether older entries remain. Membership is the
    /// caller's check.
    pub fn history<'v>(
        &'v self,
        user: UserId,
        conv: u64,
        before_seq: u64,
        limit: u32,
        bytes_max: usize,
        mut f: impl FnMut(u64, &'v [u8]),
    ) -> Result<bool, StoreError> {
        let before = if before_seq == 0 {
            u64::MAX
        } else {
            before_seq
        };
        let start = schema::triple_key(user.0, conv, 0);
        let end = schema::triple_key(user.0, conv, before);
        let range = (Bound::Included(&start[..]), Bound::Excluded(&end[..]));
        let mut bytes_taken = 0usize;
        let entries = self
            .dbs()
            .conv_entries
            .rev_range(self.txn(), &range)
            .map_err(StoreError::lmdb("open history range"))?;
        for (taken, item) in entries.enumerate() {
            let (key, value) = item.map_err(StoreError::lmdb("read history"))?;
            if taken >= limit as usize {
                return Ok(true);
            }
            let seq = schema::decode_u64(&key[16..], "conversation entry key")?;
            let entry = ConvEntry::decode(value)?;
            let message = self
                .dbs()
                .messages
                .get(self.txn(), &schema::msg_key(entry.msg_id))
                .map_err(StoreError::lmdb("read message"))?
                .ok_or(StoreError::Corrupt("conversation entry without message"))?;
            if taken > 0 && bytes_taken.saturating_add(message.len()) > bytes_max {
                return Ok(true);
            }
            f(seq, message);
            bytes_taken = bytes_taken.saturating_add(message.len());
        }
        Ok(false)
    }

    /// `user`'s conversations by last activity, newest first: `limit` of them after
    /// skipping `offset`, and how many there are in all.
    pub fn conversations(
        &self,
        user: UserId,
        offset: u32,
        limit: u32,
    ) -> Result<(Vec<ConversationItem>, u32), StoreError> {
        let mut items = Vec::new();
        let mut total = 0u32;
        let prefix = schema::user_key(user);
        for item in self
            .dbs()
            .conv_recent
            .rev_prefix_iter(self.txn(), &prefix)
            .map_err(StoreError::lmdb("open conversation order"))?
        {
            let (_, value) = item.map_err(StoreError::lmdb("read conversation order"))?;
            total = total.saturating_add(1);
            if total <= offset || items.len() >= limit as usize {
                continue;
            }
            let conv = schema::decode_u64(value, "conversation order value")?;
            let state = conv_state(self.txn(), self.dbs(), user, conv)?.ok_or(
                StoreError::Corrupt("conversation order without conversation"),
            )?;
            let message = self
                .dbs()
                .messages
                .get(self.txn(), &schema::msg_key(state.last_msg_id))
                .map_err(StoreError::lmdb("read message"))?
                .ok_or(StoreError::Corrupt("conversation without its last message"))?;
            let title = match conv_group(conv) {
                // A former member sees the name as of its removal (its last entry there),
                // never the group's state after it.
                Some(group_id) if !self.is_group_member(group_id, user)? => {
                    former_group_title(message)
                }
                Some(group_id) => self
                    .group_name(group_id)?
                    .ok_or(StoreError::Corrupt("conversation of a missing group"))?,
                None => self
                    .user_name(UserId(conv))?
                    .ok_or(StoreError::Corrupt("conversation with a missing user"))?,
            };
            let (last_from, preview) = preview(message)?;
            items.push(ConversationItem {
                conv,
                title,
                last_seq: state.last_seq,
                last_at_ms: state.last_at_ms,
                last_from,
                preview,
                unread: state.unread.min(u64::from(u32::MAX)) as u32,
                read_seq: state.read_seq,
            });
        }
        Ok((items, total))
    }
}

/// `Store::audit`'s check of `user`'s conversations: each stored unread count against a
/// recount of the conversation's entries after its read mark.
pub(super) fn audit_unread(
    txn: &RoTxn<'_, heed::WithoutTls>,
    dbs: &Dbs,
    user: UserId,
    audit: &mut super::Audit,
) -> Result<(), StoreError> {
    let start = schema::pair_key(user.0, 0);
    let end = schema::pair_key(user.0, u64::MAX);
    let range = (Bound::Included(&start[..]), Bound::Included(&end[..]));
    for item in dbs
        .convs
        .range(txn, &range)
        .map_err(StoreError::lmdb("open conversations"))?
    {
        let (key, value) = item.map_err(StoreError::lmdb("read conversation"))?;
        let conv = schema::decode_u64(&key[8..], "conversation key")?;
        let state = ConvState::decode(value)?;
        audit.conversations += 1;
        let first = schema::triple_key(user.0, conv, state.read_seq.saturating_add(1));
        let last = schema::triple_key(user.0, conv, u64::MAX);
        let entries = (Bound::Included(&first[..]), Bound::Included(&last[..]));
        let mut recount = 0u64;
        for item in dbs
            .conv_entries
            .range(txn, &entries)
            .map_err(StoreError::lmdb("open conversation range"))?
        {
            let (_, value) = item.map_err(StoreError::lmdb("read conversation entry"))?;
            recount += u64::from(ConvEntry::decode(value)?.counts_unread);
        }
        if recount != state.unread {
            audit.unread_mismatches += 1;
            audit.problem(|| {
                format!(
                    "user {} conversation {conv}: unread {} stored, {recount} counted",
                    user.0, state.unread
                )
            });
        }
    }
    Ok(())
}
