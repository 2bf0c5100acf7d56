//! Team messaging on the client: groups, group sends, history pages, the conversation list
//! and read marks. Requests go out through `ClientSession::team_request`; each answer comes
//! back as `Event::Team` carrying a `TeamAnswer`. `BlockingClient` gets one blocking call
//! per request.
//!
//! Group sends do not enter the persisted outbox: `BlockingClient::group_send` resends with
//! the same client message id after a lost connection (the node deduplicates), but a
//! process that dies before the ack loses the send. Group operations (create, add, remove,
//! leave, rename) are not idempotent and are not resent: after a lost connection the call
//! fails with `ClientError::Lost`, and `group_list` tells what happened.

use std::time::Instant;

use super::blocking::{BlockingClient, ClientError};
use super::session::{ClientSession, Event, ReceivedMessage, decode_entry};
use super::store::ClientStore;
use crate::limits::{GROUP_NAME_SIZE_MAX, MESSAGE_TEXT_SIZE_MAX, USER_NAME_SIZE_MAX};
use crate::protocol::{
    self, ArchivedConversationsPage, ArchivedErrorBody, ArchivedFileChunk, ArchivedFileInfo,
    ArchivedGroupInfo, ArchivedGroupListPage, ArchivedHistoryPage, ArchivedPresencePush,
    ArchivedPresenceState, ArchivedReadOk, ArchivedSendAck, ArchivedTypingPush, ArchivedUploadAck,
    ArchivedUploadReady, Conversations, ConversationsPage, FileChunk, FileInfo, GroupInfo,
    GroupList, GroupListPage, GroupOp, GroupQuery, GroupSend, History, Kind, PresenceItem,
    PresenceQuery, PresenceState, PresenceSubscribe, Read, ReadOk, SendAck, Typing, UploadAck,
    UploadReady, group_op,
};

/// The answer to one team request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TeamAnswer {
    Group(GroupInfo),
    Groups(GroupListPage),
    /// Entries newest first, and whether older ones remain.
    History {
        entries: Vec<ReceivedMessage>,
        has_more: bool,
    },
    Conversations(ConversationsPage),
    Read(ReadOk),
    /// A group send was stored durably.
    Sent(SendAck),
    Presence(PresenceState),
    UploadReady(UploadReady),
    UploadAck(UploadAck),
    File(FileInfo),
    Chunk(FileChunk),
    Devices(crate::protocol::DevicesPage),
    /// The node refused the request (`code` is an `ErrorCode` number).
    Failed {
        code: u16,
        message: String,
    },
}

/// Validates and copies out the answer frame of a team request; None if it is malformed
/// or of a kind no team request is answered with.
pub(super) fn decode_answer(kind: Kind, payload: &[u8]) -> Option<TeamAnswer> {
    use rkyv::rancor::Failure;
    Some(match kind {
        Kind::GroupInfo => {
            let info = protocol::access::<ArchivedGroupInfo>(kind, payload).ok()?;
            TeamAnswer::Group(rkyv::deserialize::<GroupInfo, Failure>(info).ok()?)
        }
        Kind::GroupListPage => {
            let page = protocol::access::<ArchivedGroupListPage>(kind, payload).ok()?;
            TeamAnswer::Groups(rkyv::deserialize::<GroupListPage, Failure>(page).ok()?)
        }
        Kind::HistoryPage => {
            let page = protocol::access::<ArchivedHistoryPage>(kind, payload).ok()?;
            let mut entries = Vec::with_capacity(page.entries.len());
            for entry in page.entries.iter() {
                entries.push(decode_entry(entry)?);
            }
            TeamAnswer::History {
                entries,
                has_more: page.has_more,
            }
        }
        Kind::ConversationsPage => {
            let page = protocol::access::<ArchivedConversationsPage>(kind, payload).ok()?;
            TeamAnswer::Conversations(rkyv::deserialize::<ConversationsPage, Failure>(page).ok()?)
        }
        Kind::ReadOk => {
            let ok = protocol::access::<ArchivedReadOk>(kind, payload).ok()?;
            TeamAnswer::Read(rkyv::deserialize::<ReadOk, Failure>(ok).ok()?)
        }
        Kind::SendAck => {
            let ack = protocol::access::<ArchivedSendAck>(kind, payload).ok()?;
            TeamAnswer::Sent(rkyv::deserialize::<SendAck, Failure>(ack).ok()?)
        }
        Kind::PresenceState => {
            let state = protocol::access::<ArchivedPresenceState>(kind, payload).ok()?;
            TeamAnswer::Presence(rkyv::deserialize::<PresenceState, Failure>(state).ok()?)
        }
        Kind::UploadReady => {
            let ready = protocol::access::<ArchivedUploadReady>(kind, payload).ok()?;
            TeamAnswer::UploadReady(rkyv::deserialize::<UploadReady, Failure>(ready).ok()?)
        }
        Kind::UploadAck => {
            let ack = protocol::access::<ArchivedUploadAck>(kind, payload).ok()?;
            TeamAnswer::UploadAck(rkyv::deserialize::<UploadAck, Failure>(ack).ok()?)
        }
        Kind::FileInfo => {
            let info = protocol::access::<ArchivedFileInfo>(kind, payload).ok()?;
            TeamAnswer::File(rkyv::deserialize::<FileInfo, Failure>(info).ok()?)
        }
        Kind::FileChunk => {
            let chunk = protocol::access::<ArchivedFileChunk>(kind, payload).ok()?;
            TeamAnswer::Chunk(rkyv::deserialize::<FileChunk, Failure>(chunk).ok()?)
        }
        Kind::DevicesPage => {
            let page = protocol::access::<protocol::ArchivedDevicesPage>(kind, payload).ok()?;
            TeamAnswer::Devices(rkyv::deserialize::<protocol::DevicesPage, Failure>(page).ok()?)
        }
        Kind::Error => {
            let body = protocol::access::<ArchivedErrorBody>(kind, payload).ok()?;
            TeamAnswer::Failed {
                code: body.code.to_native(),
                message: body.message.as_str().to_owned(),
            }
        }
        _ => return None,
    })
}

/// Validates a presence or typing push and turns it into its event.
pub(super) fn decode_push(kind: Kind, payload: &[u8]) -> Option<Event> {
    match kind {
        Kind::PresencePush => {
            let push = protocol::access::<ArchivedPresencePush>(kind, payload).ok()?;
            Some(Event::Presence {
                user_id: push.user_id.to_native(),
                online: push.online,
                version: push.version.to_native(),
            })
        }
        Kind::TypingPush => {
            let push = protocol::access::<ArchivedTypingPush>(kind, payload).ok()?;
            Some(Event::Typing {
                conv: push.conv.to_native(),
                from_id: push.from_id.to_native(),
                from: push.from.as_str().to_owned(),
            })
        }
        _ => None,
    }
}

/// Why a team request was not sent.
fn check_names(name: &str, users: &[String], name_required: bool) -> Result<(), ClientError> {
    if (name_required || !name.is_empty()) && (name.is_empty() || name.len() > GROUP_NAME_SIZE_MAX)
    {
        return Err(ClientError::Invalid("group name must be 1..=64 bytes"));
    }
    if users
        .iter()
        .any(|u| u.is_empty() || u.len() > USER_NAME_SIZE_MAX)
    {
        return Err(ClientError::Invalid("user name empty or too long"));
    }
    Ok(())
}

impl<S: ClientStore> ClientSession<S> {
    /// Sends a group operation (`protocol::group_op`). None when not established.
    pub fn group_op(
        &mut self,
        op: u8,
        group_id: u64,
        name: &str,
        users: &[String],
        now: Instant,
    ) -> Option<u32> {
        let frame = GroupOp {
            op,
            group_id,
            name: name.to_owned(),
            users: users.to_vec(),
        };
        self.team_request(now, |tx, id| {
            protocol::encode(tx, Kind::GroupOp, id, &frame);
        })
    }

    pub fn group_query(&mut self, group_id: u64, now: Instant) -> Option<u32> {
        self.team_request(now, |tx, id| {
            protocol::encode(tx, Kind::GroupQuery, id, &GroupQuery { group_id });
        })
    }

    pub fn group_list(&mut self, after_group_id: u64, limit: u32, now: Instant) -> Option<u32> {
        self.team_request(now, |tx, id| {
            let list = GroupList {
                after_group_id,
                limit,
            };
            protocol::encode(tx, Kind::GroupList, id, &list);
        })
    }

    /// Sends a message to a group with the given client message id (nonzero; reuse it to
    /// resend).
    pub fn group_send(
        &mut self,
        group_id: u64,
        client_msg_id: u64,
        text: &str,
        now: Instant,
    ) -> Option<u32> {
        let frame = GroupSend {
            group_id,
            client_msg_id,
            text: text.to_owned(),
        };
        self.team_request(now, |tx, id| {
            protocol::encode(tx, Kind::GroupSend, id, &frame);
        })
    }

    pub fn history(&mut self, conv: u64, before_seq: u64, limit: u32, now: Instant) -> Option<u32> {
        self.team_request(now, |tx, id| {
            let history = History {
                conv,
                before_seq,
                limit,
            };
            protocol::encode(tx, Kind::History, id, &history);
        })
    }

    pub fn conversations(&mut self, offset: u32, limit: u32, now: Instant) -> Option<u32> {
        self.team_request(now, |tx, id| {
            protocol::encode(
                tx,
                Kind::Conversations,
                id,
                &Conversations { offset, limit },
            );
        })
    }

    pub fn read(&mut self, conv: u64, up_to_seq: u64, now: Instant) -> Option<u32> {
        self.team_request(now, |tx, id| {
            protocol::encode(tx, Kind::Read, id, &Read { conv, up_to_seq });
        })
    }

    /// Watches exactly `users` (replacing the earlier set); changes arrive as
    /// `Event::Presence`. The set lasts as long as the connection: subscribe again after
    /// a reconnect.
    pub fn presence_subscribe(&mut self, users: &[String], now: Instant) -> Option<u32> {
        let frame = PresenceSubscribe {
            users: users.to_vec(),
        };
        self.team_request(now, |tx, id| {
            protocol::encode(tx, Kind::PresenceSubscribe, id, &frame);
        })
    }

    pub fn presence_query(&mut self, users: &[String], now: Instant) -> Option<u32> {
        let frame = PresenceQuery {
            users: users.to_vec(),
        };
        self.team_request(now, |tx, id| {
            protocol::encode(tx, Kind::PresenceQuery, id, &frame);
        })
    }

    /// Tells the other side of `conv` that this user is typing. Not answered; the node
    /// relays at most one per second per connection. False when not established.
    pub fn typing(&mut self, conv: u64) -> bool {
        self.fire_and_forget(|tx, id| {
            protocol::encode(tx, Kind::Typing, id, &Typing { conv });
        })
    }
}

/// What a blocking call does when the connection drops before the answer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum OnLost {
    /// Ask again on the next connection (reads and deduplicated sends).
    Retry,
    /// Fail with `ClientError::Lost` (operations that must not run twice).
    Fail,
}

impl<S: ClientStore> BlockingClient<S> {
    /// Issues a team request with `make` and waits for its answer.
    pub(super) fn team_call(
        &mut self,
        on_lost: OnLost,
        mut make: impl FnMut(&mut ClientSession<S>, Instant) -> Option<u32>,
    ) -> Result<TeamAnswer, ClientError> {
        loop {
            let deadline = Instant::now() + self.operation_timeout();
            self.wait_ready(deadline)?;
            let Some(request_id) = make(self.session_mut(), Instant::now()) else {
                continue;
            };
            let mut answer = None;
            let mut failure = None;
            let mut lost = false;
            self.run_until(deadline, |event| match event {
                Event::Team {
                    request_id: id,
                    answer: a,
                } if *id == request_id => {
                    answer = Some(a.clone());
                    true
                }
                Event::Disconnected { .. } => {
                    lost = true;
                    true
                }
                other => {
                    failure = super::blocking::stop_error(other);
                    failure.is_some()
                }
            });
            if let Some(err) = failure {
                return self.finish(Some(Err(err)));
            }
            match answer {
                Some(TeamAnswer::Failed { code, message }) => {
                    return Err(ClientError::RequestFailed { code, message });
                }
                Some(answer) => return Ok(answer),
                None if lost && on_lost == OnLost::Fail => return Err(ClientError::Lost),
                None if lost => continue,
                None => return Err(self.timed_out()),
            }
        }
    }

    fn group_call(
        &mut self,
        op: u8,
        group_id: u64,
        name: &str,
        users: &[String],
    ) -> Result<GroupInfo, ClientError> {
        match self.team_call(OnLost::Fail, |s, now| {
            s.group_op(op, group_id, name, users, now)
        })? {
            TeamAnswer::Group(info) => Ok(info),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Creates a group with the caller as owner and `members` (user names).
    pub fn group_create(
        &mut self,
        name: &str,
        members: &[String],
    ) -> Result<GroupInfo, ClientError> {
        check_names(name, members, true)?;
        self.group_call(group_op::CREATE, 0, name, members)
    }

    pub fn group_add(&mut self, group_id: u64, users: &[String]) -> Result<GroupInfo, ClientError> {
        check_names("", users, false)?;
        self.group_call(group_op::ADD, group_id, "", users)
    }

    /// Removes members (owner only).
    pub fn group_remove(
        &mut self,
        group_id: u64,
        users: &[String],
    ) -> Result<GroupInfo, ClientError> {
        check_names("", users, false)?;
        self.group_call(group_op::REMOVE, group_id, "", users)
    }

    pub fn group_leave(&mut self, group_id: u64) -> Result<GroupInfo, ClientError> {
        self.group_call(group_op::LEAVE, group_id, "", &[])
    }

    pub fn group_rename(&mut self, group_id: u64, name: &str) -> Result<GroupInfo, ClientError> {
        check_names(name, &[], true)?;
        self.group_call(group_op::RENAME, group_id, name, &[])
    }

    pub fn group_info(&mut self, group_id: u64) -> Result<GroupInfo, ClientError> {
        match self.team_call(OnLost::Retry, |s, now| s.group_query(group_id, now))? {
            TeamAnswer::Group(info) => Ok(info),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Every group the user belongs to, page by page.
    pub fn group_list(&mut self) -> Result<Vec<protocol::GroupSummary>, ClientError> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = match self.team_call(OnLost::Retry, |s, now| s.group_list(after, 0, now))? {
                TeamAnswer::Groups(page) => page,
                _ => return Err(ClientError::Unexpected),
            };
            let last = page.groups.last().map(|g| g.group_id);
            all.extend(page.groups);
            match last {
                Some(last) if page.has_more => after = last,
                _ => return Ok(all),
            }
        }
    }

    /// Sends a message to a group and waits until the node stored it; resent with the same
    /// client message id after a lost connection.
    pub fn group_send(&mut self, group_id: u64, text: &str) -> Result<SendAck, ClientError> {
        if text.len() > MESSAGE_TEXT_SIZE_MAX {
            return Err(ClientError::Invalid("text too long"));
        }
        let client_msg_id = self.session_mut().fresh_client_msg_id();
        match self.team_call(OnLost::Retry, |s, now| {
            s.group_send(group_id, client_msg_id, text, now)
        })? {
            TeamAnswer::Sent(ack) => Ok(ack),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// One page of a conversation's history before `before_seq` (0: the newest), newest
    /// first; and whether older entries remain.
    pub fn history(
        &mut self,
        conv: u64,
        before_seq: u64,
        limit: u32,
    ) -> Result<(Vec<ReceivedMessage>, bool), ClientError> {
        match self.team_call(OnLost::Retry, |s, now| {
            s.history(conv, before_seq, limit, now)
        })? {
            TeamAnswer::History { entries, has_more } => Ok((entries, has_more)),
            _ => Err(ClientError::Unexpected),
        }
    }

    pub fn conversations(
        &mut self,
        offset: u32,
        limit: u32,
    ) -> Result<ConversationsPage, ClientError> {
        match self.team_call(OnLost::Retry, |s, now| s.conversations(offset, limit, now))? {
            TeamAnswer::Conversations(page) => Ok(page),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Watches `users`' presence (replacing the earlier set); returns their presence now.
    /// Changes arrive as `Event::Presence` during later calls.
    pub fn presence_subscribe(
        &mut self,
        users: &[String],
    ) -> Result<Vec<PresenceItem>, ClientError> {
        check_names("", users, false)?;
        match self.team_call(OnLost::Retry, |s, now| s.presence_subscribe(users, now))? {
            TeamAnswer::Presence(state) => Ok(state.users),
            _ => Err(ClientError::Unexpected),
        }
    }

    pub fn presence_query(&mut self, users: &[String]) -> Result<Vec<PresenceItem>, ClientError> {
        check_names("", users, false)?;
        match self.team_call(OnLost::Retry, |s, now| s.presence_query(users, now))? {
            TeamAnswer::Presence(state) => Ok(state.users),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Sends a typing indicator for `conv` (nothing waits for an answer).
    pub fn typing(&mut self, conv: u64) -> Result<(), ClientError> {
        let deadline = Instant::now() + self.operation_timeout();
        self.wait_ready(deadline)?;
        if !self.session_mut().typing(conv) {
            return Err(ClientError::NotConnected);
        }
        self.pump(Instant::now());
        Ok(())
    }

    /// Marks conversation `conv` read up to timeline seq `up_to_seq`.
    pub fn read(&mut self, conv: u64, up_to_seq: u64) -> Result<ReadOk, ClientError> {
        match self.team_call(OnLost::Retry, |s, now| s.read(conv, up_to_seq, now))? {
            TeamAnswer::Read(ok) => Ok(ok),
            _ => Err(ClientError::Unexpected),
        }
    }
}
