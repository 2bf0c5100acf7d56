//! The shard's side of presence and typing: keeping the presence board in step with the
//! connections this shard logs in and forgets, answering subscriptions and queries, and
//! relaying changes and typing indicators to the shards that hold the watchers and the
//! recipients. Nothing here touches the store except to resolve names and group members,
//! and nothing here is stored.

use std::sync::Arc;

use super::Shard;
use super::mailbox::ShardMsg;
use crate::ids::{ConnId, ShardId, UserId};
use crate::limits::{GROUP_MEMBERS_MAX, TYPING_INTERVAL_MS_MIN};
use crate::protocol::{
    ErrorCode, Kind, PresenceItem, PresencePush, PresenceState, TypingPush, conv_group,
};
use crate::routing::presence::{Change, Watcher};
use crate::session::Request;

/// Per-connection presence state kept by the shard.
#[derive(Debug, Default)]
pub(super) struct ConnPresence {
    /// Users this connection watches; at most `PRESENCE_WATCH_MAX`.
    pub watching: Vec<UserId>,
    /// Monotonic ms of the last typing indicator relayed for this connection.
    pub typing_at_ms: Option<u64>,
}

impl Shard {
    /// A connection of `user` logged in on this shard.
    pub(super) fn presence_connected(&mut self, user: UserId) {
        if let Some(change) = self.ctx.directory.presence.connected(user) {
            self.relay_presence(change);
        }
    }

    /// A logged-in connection of `user` was forgotten: drop its watches, and report the
    /// user offline if it was the last device.
    pub(super) fn presence_forgotten(&mut self, conn_id: ConnId, user: UserId) {
        if let Some(state) = self.presence_conns.remove(&conn_id) {
            let watcher = Watcher {
                shard: self.id,
                conn: conn_id,
            };
            for watched in state.watching {
                self.ctx.directory.presence.unsubscribe(watched, watcher);
            }
        }
        if let Some(change) = self.ctx.directory.presence.disconnected(user) {
            self.relay_presence(change);
        }
    }

    fn relay_presence(&mut self, change: Change) {
        let push = PresencePush {
            user_id: change.user.0,
            online: change.online,
            version: change.version,
        };
        for watcher in change.watchers {
            self.deliver_or_queue(
                watcher.shard,
                ShardMsg::Presence {
                    conn: watcher.conn,
                    push,
                },
            );
        }
    }

    /// Hands `msg` to its shard: at once on this one, through the mailbox on another, or,
    /// when that mailbox is full, on a later turn (a shard never waits for another).
    pub(super) fn deliver_or_queue(&mut self, shard: ShardId, msg: ShardMsg) {
        if shard == self.id {
            self.handle_ephemeral(msg);
            return;
        }
        let mailbox = &self.ctx.mailboxes[shard.0 as usize];
        match mailbox.try_put(msg) {
            Ok(()) => mailbox.wake(),
            Err(msg) => self.ephemeral_pending.push((shard, msg)),
        }
    }

    /// Retries what other shards' full mailboxes refused.
    pub(super) fn retry_ephemeral(&mut self) {
        for (shard, msg) in std::mem::take(&mut self.ephemeral_pending) {
            self.deliver_or_queue(shard, msg);
        }
    }

    /// Pushes a presence change or typing indicator to this shard's connections.
    pub(super) fn handle_ephemeral(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Presence { conn, push } => {
                if let Some(c) = self.conn_mut(conn)
                    && c.is_authenticated()
                {
                    c.reply(Kind::PresencePush, 0, &push);
                    self.mark_dirty(conn);
                }
            }
            ShardMsg::Typing { user, push } => {
                let conns = self.online.get(&user).cloned().unwrap_or_default();
                for conn in conns {
                    if let Some(c) = self.conn_mut(conn) {
                        c.reply(Kind::TypingPush, 0, &*push);
                        self.mark_dirty(conn);
                    }
                }
            }
            other => unreachable!("not an ephemeral message: {other:?}"),
        }
    }

    /// Presence and typing requests. Returns the request back if it is not one of them.
    pub(super) fn handle_presence_request(
        &mut self,
        conn_id: ConnId,
        request: Request,
        now_ms: u64,
    ) -> Option<Request> {
        let identity = self.conn_mut(conn_id)?.identity().cloned()?;
        match request {
            Request::PresenceSubscribe { request_id, users } => {
                self.presence_state(conn_id, request_id, &users, true);
                None
            }
            Request::PresenceQuery { request_id, users } => {
                self.presence_state(conn_id, request_id, &users, false);
                None
            }
            Request::Typing { request_id, conv } => {
                self.typing(
                    conn_id,
                    identity.user,
                    identity.name,
                    request_id,
                    conv,
                    now_ms,
                );
                None
            }
            other => Some(other),
        }
    }

    /// Answers `PresenceSubscribe` (replacing the connection's watch set) or
    /// `PresenceQuery` with the users' presence now.
    fn presence_state(
        &mut self,
        conn_id: ConnId,
        request_id: u32,
        names: &[String],
        subscribe: bool,
    ) {
        let resolved = self.ctx.store.read().and_then(|view| {
            let mut found = Vec::with_capacity(names.len());
            for name in names {
                match view.user_by_name(name)? {
                    Some(record) => found.push((record.id, record.name)),
                    None => return Ok(Err(name.clone())),
                }
            }
            Ok(Ok(found))
        });
        let users = match resolved {
            Ok(Ok(users)) => users,
            Ok(Err(unknown)) => {
                return self.answer_error(
                    conn_id,
                    request_id,
                    ErrorCode::UnknownUser,
                    &format!("no such user: {unknown}"),
                );
            }
            Err(e) => {
                return self.answer_error(
                    conn_id,
                    request_id,
                    ErrorCode::StorageFailed,
                    &e.to_string(),
                );
            }
        };
        let board = &self.ctx.directory.presence;
        let watcher = Watcher {
            shard: self.id,
            conn: conn_id,
        };
        if subscribe {
            let state = self.presence_conns.entry(conn_id).or_default();
            for old in state.watching.drain(..) {
                board.unsubscribe(old, watcher);
            }
            for (user, _) in &users {
                if !state.watching.contains(user) {
                    state.watching.push(*user);
                }
            }
        }
        let items = users
            .into_iter()
            .map(|(user, name)| {
                let (online, version) = if subscribe {
                    board.subscribe(user, watcher)
                } else {
                    board.query(user)
                };
                PresenceItem {
                    user_id: user.0,
                    name,
                    online,
                    version,
                }
            })
            .collect();
        if let Some(conn) = self.conn_mut(conn_id) {
            conn.reply(
                Kind::PresenceState,
                request_id,
                &PresenceState { users: items },
            );
        }
        self.mark_dirty(conn_id);
    }

    /// Relays a typing indicator to the other side of `conv`: the other user of a 1:1
    /// conversation, or every other member of a group (the caller must be a member).
    fn typing(
        &mut self,
        conn_id: ConnId,
        user: UserId,
        name: String,
        request_id: u32,
        conv: u64,
        now_ms: u64,
    ) {
        let state = self.presence_conns.entry(conn_id).or_default();
        if state
            .typing_at_ms
            .is_some_and(|at| now_ms < at + TYPING_INTERVAL_MS_MIN)
        {
            return;
        }
        state.typing_at_ms = Some(now_ms);
        let recipients = self.ctx.store.read().and_then(|view| {
            Ok(match conv_group(conv) {
                Some(group_id) => match view.group_info(group_id)? {
                    None => Err((ErrorCode::UnknownGroup, "no such group")),
                    Some(info) if !info.members.iter().any(|m| m.user_id == user.0) => {
                        Err((ErrorCode::NotMember, "not a member of this group"))
                    }
                    Some(info) => Ok(info
                        .members
                        .iter()
                        .map(|m| UserId(m.user_id))
                        .filter(|u| *u != user)
                        .take(GROUP_MEMBERS_MAX)
                        .collect::<Vec<_>>()),
                },
                None => match view.user_name(UserId(conv))? {
                    None => Err((ErrorCode::UnknownUser, "no such user")),
                    Some(_) if conv == user.0 => Ok(Vec::new()),
                    Some(_) => Ok(vec![UserId(conv)]),
                },
            })
        });
        let recipients = match recipients {
            Ok(Ok(recipients)) => recipients,
            Ok(Err((code, message))) => {
                return self.answer_error(conn_id, request_id, code, message);
            }
            Err(e) => {
                return self.answer_error(
                    conn_id,
                    request_id,
                    ErrorCode::StorageFailed,
                    &e.to_string(),
                );
            }
        };
        // A group keeps its id; a 1:1 indicator names the conversation as its receiver does.
        let push = Arc::new(TypingPush {
            conv: if conv_group(conv).is_some() {
                conv
            } else {
                user.0
            },
            from_id: user.0,
            from: name,
        });
        let mut shards = Vec::new();
        for recipient in recipients {
            shards.clear();
            self.ctx.directory.shards_of(recipient, &mut shards);
            for shard in shards.clone() {
                self.deliver_or_queue(
                    shard,
                    ShardMsg::Typing {
                        user: recipient,
                        push: Arc::clone(&push),
                    },
                );
            }
        }
    }
}
