//! The shard's side of team messaging: resolving names, reading groups, history pages and
//! the conversation list in short read transactions, and handing group operations, group
//! sends and read marks to the store writer. Membership rules for writes are checked by
//! the writer (inside its transaction); reads check membership here.

use super::{Shard, wall_clock_ms};
use crate::ids::{ConnId, UserId};
use crate::limits::{
    CONNECTION_INFLIGHT_MAX, CONVERSATIONS_PAGE_MAX, GROUP_LIST_PAGE_MAX, HISTORY_PAGE_ENTRIES_MAX,
    SYNC_PAGE_BYTES_MAX,
};
use crate::protocol::{
    ConversationsPage, EntryRef, ErrorCode, GroupListPage, HistoryPageRef, Kind, conv_group,
};
use crate::session::{Identity, Request};
use crate::storage::{Origin, Reply, StoreError, WriteOp};

/// `limit` 0 or above `max` means `max`.
fn clamp(limit: u32, max: u32) -> u32 {
    if limit == 0 { max } else { limit.min(max) }
}

impl Shard {
    fn identity_of(&mut self, conn_id: ConnId) -> Option<Identity> {
        self.conn_mut(conn_id).and_then(|c| c.identity().cloned())
    }

    /// Answers a read request with its page, or `storage_failed` if the read failed.
    fn answer_read<T>(
        &mut self,
        conn_id: ConnId,
        request_id: u32,
        kind: Kind,
        result: Result<T, crate::storage::StoreError>,
    ) where
        T: for<'a> rkyv::Serialize<
                rkyv::api::high::HighSerializer<
                    Vec<u8>,
                    rkyv::ser::allocator::ArenaHandle<'a>,
                    rkyv::rancor::Failure,
                >,
            >,
    {
        match result {
            Ok(page) => {
                if let Some(conn) = self.conn_mut(conn_id) {
                    conn.reply(kind, request_id, &page);
                }
                self.mark_dirty(conn_id);
            }
            Err(e) => self.answer_error(
                conn_id,
                request_id,
                ErrorCode::StorageFailed,
                &e.to_string(),
            ),
        }
    }

    pub(super) fn answer_error(
        &mut self,
        conn_id: ConnId,
        request_id: u32,
        code: ErrorCode,
        message: &str,
    ) {
        if let Some(conn) = self.conn_mut(conn_id) {
            conn.reply_error(request_id, code, message);
        }
        self.mark_dirty(conn_id);
    }

    /// Hands `op` to the writer, counting it against the connection's in-flight bound.
    /// Returns whether it was queued; if not, the refusal was answered.
    pub(super) fn submit(&mut self, conn_id: ConnId, request_id: u32, op: WriteOp) -> bool {
        let Some(conn) = self.conn_mut(conn_id) else {
            return false;
        };
        if conn.inflight >= CONNECTION_INFLIGHT_MAX {
            conn.reply_error(request_id, ErrorCode::Busy, "too many requests in flight");
            self.mark_dirty(conn_id);
            return false;
        }
        let submitted = self.hand_to_writer(op);
        let conn = self.conn_mut(conn_id).expect("looked up above");
        match submitted {
            Ok(()) => {
                conn.inflight += 1;
                true
            }
            Err(_) => {
                conn.reply_error(request_id, ErrorCode::Busy, "store queue full; retry later");
                self.mark_dirty(conn_id);
                false
            }
        }
    }

    /// Carries out a team request. Returns the request back if it is not one.
    pub(super) fn handle_team_request(
        &mut self,
        conn_id: ConnId,
        request: Request,
    ) -> Option<Request> {
        let identity = self.identity_of(conn_id)?;
        let origin = |request_id| Origin {
            shard: self.id,
            conn: conn_id,
            request_id,
        };
        match request {
            Request::GroupOp {
                request_id,
                op,
                group_id,
                name,
                users,
            } => {
                let resolved = self.ctx.store.read().and_then(|view| {
                    let mut ids = Vec::with_capacity(users.len());
                    for user in &users {
                        match view.user_by_name(user)? {
                            Some(record) => ids.push(record.id),
                            None => return Ok(Err(user.clone())),
                        }
                    }
                    Ok(Ok(ids))
                });
                match resolved {
                    Ok(Ok(ids)) => {
                        let op = WriteOp::GroupOp {
                            origin: origin(request_id),
                            actor: identity.user,
                            actor_name: identity.name,
                            op,
                            group_id,
                            name,
                            users: ids,
                            at_ms: wall_clock_ms(),
                        };
                        self.submit(conn_id, request_id, op);
                    }
                    Ok(Err(unknown)) => self.answer_error(
                        conn_id,
                        request_id,
                        ErrorCode::UnknownUser,
                        &format!("no such user: {unknown}"),
                    ),
                    Err(e) => self.answer_error(
                        conn_id,
                        request_id,
                        ErrorCode::StorageFailed,
                        &e.to_string(),
                    ),
                }
            }
            Request::GroupSend {
                request_id,
                group_id,
                client_msg_id,
                text,
            } => {
                let op = WriteOp::GroupSend {
                    origin: origin(request_id),
                    from: identity.user,
                    from_name: identity.name,
                    group_id,
                    client_msg_id,
                    text,
                    sent_at_ms: wall_clock_ms(),
                };
                self.submit(conn_id, request_id, op);
            }
            Request::Read {
                request_id,
                conv,
                up_to_seq,
            } => {
                let op = WriteOp::Read {
                    origin: origin(request_id),
                    user: identity.user,
                    user_name: identity.name,
                    conv,
                    up_to_seq,
                    at_ms: wall_clock_ms(),
                };
                self.submit(conn_id, request_id, op);
            }
            Request::GroupQuery {
                request_id,
                group_id,
            } => {
                let found = self.ctx.store.read().and_then(|view| {
                    let info = view.group_info(group_id)?;
                    let member = view.is_group_member(group_id, identity.user)?;
                    Ok((info, member))
                });
                match found {
                    Ok((None, _)) => self.answer_error(
                        conn_id,
                        request_id,
                        ErrorCode::UnknownGroup,
                        "no such group",
                    ),
                    Ok((Some(_), false)) => self.answer_error(
                        conn_id,
                        request_id,
                        ErrorCode::NotMember,
                        "not a member of this group",
                    ),
                    Ok((Some(info), true)) => {
                        if let Some(conn) = self.conn_mut(conn_id) {
                            conn.reply(Kind::GroupInfo, request_id, &info);
                        }
                        self.mark_dirty(conn_id);
                    }
                    Err(e) => self.answer_error(
                        conn_id,
                        request_id,
                        ErrorCode::StorageFailed,
                        &e.to_string(),
                    ),
                }
            }
            Request::GroupList {
                request_id,
                after_group_id,
                limit,
            } => {
                let limit = clamp(limit, GROUP_LIST_PAGE_MAX);
                let page = self.ctx.store.read().and_then(|view| {
                    let (groups, has_more) =
                        view.user_groups(identity.user, after_group_id, limit)?;
                    Ok(GroupListPage { groups, has_more })
                });
                self.answer_read(conn_id, request_id, Kind::GroupListPage, page);
            }
            Request::History {
                request_id,
                conv,
                before_seq,
                limit,
            } => self.history(conn_id, identity.user, request_id, conv, before_seq, limit),
            Request::Conversations {
                request_id,
                offset,
                limit,
            } => {
                let limit = clamp(limit, CONVERSATIONS_PAGE_MAX);
                let page = self.ctx.store.read().and_then(|view| {
                    let (items, total) = view.conversations(identity.user, offset, limit)?;
                    Ok(ConversationsPage { items, total })
                });
                self.answer_read(conn_id, request_id, Kind::ConversationsPage, page);
            }
            other => return Some(other),
        }
        None
    }

    fn history(
        &mut self,
        conn_id: ConnId,
        user: UserId,
        request_id: u32,
        conv: u64,
        before_seq: u64,
        limit: u32,
    ) {
        let limit = clamp(limit, HISTORY_PAGE_ENTRIES_MAX);
        let store = self.ctx.store.clone();
        let Some(conn) = self.conn_mut(conn_id) else {
            return;
        };
        // Err(Ok(code, message)): refused; Err(Err(e)): the store failed.
        let result = (|| -> Result<(), Result<(ErrorCode, &'static str), StoreError>> {
            let view = store.read().map_err(Err)?;
            if let Some(group_id) = conv_group(conv) {
                if view.group_name(group_id).map_err(Err)?.is_none() {
                    return Err(Ok((ErrorCode::UnknownGroup, "no such group")));
                }
                // A member who left or was removed reads no more of the group, old
                // entries included.
                if !view.is_group_member(group_id, user).map_err(Err)? {
                    return Err(Ok((ErrorCode::NotMember, "not a member of this group")));
                }
            }
            let mut entries = Vec::new();
            let has_more = view
                .history(
                    user,
                    conv,
                    before_seq,
                    limit,
                    SYNC_PAGE_BYTES_MAX,
                    |seq, message| {
                        entries.push(EntryRef { seq, message });
                    },
                )
                .map_err(Err)?;
            // The entries borrow the map; encode them before the read transaction ends.
            conn.reply(
                Kind::HistoryPage,
                request_id,
                &HistoryPageRef { entries, has_more },
            );
            Ok(())
        })();
        match result {
            Ok(()) => {}
            Err(Ok((code, message))) => conn.reply_error(request_id, code, message),
            Err(Err(e)) => conn.reply_error(request_id, ErrorCode::StorageFailed, &e.to_string()),
        }
        self.mark_dirty(conn_id);
    }

    /// Answers a team op the writer finished.
    pub(super) fn answer_reply(&mut self, conn_id: ConnId, request_id: u32, reply: Reply) {
        let reply = match reply {
            // Kicks reach other connections too, whether or not this one is still here.
            Reply::Revoked(revoked) => return self.revoked(conn_id, request_id, revoked),
            other => other,
        };
        let Some(conn) = self.conn_mut(conn_id) else {
            return;
        };
        match reply {
            Reply::Revoked(_) => unreachable!("answered above"),
            Reply::Group(info) => conn.reply(Kind::GroupInfo, request_id, &info),
            Reply::Read(ok) => conn.reply(Kind::ReadOk, request_id, &ok),
            Reply::File(info) => conn.reply(Kind::FileInfo, request_id, &info),
        }
        self.mark_dirty(conn_id);
    }
}
