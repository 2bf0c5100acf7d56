//! Groups in the store: the group table, memberships both ways (group → members, user →
//! groups), and the writer's side of group operations and group messages.
//!
//! A group message or membership change is stored once in `messages` as a record and
//! referenced from the timeline of every member (fan-out by reference), so every device
//! learns it through the same sync as a 1:1 message. Every membership rule (who may post,
//! add, remove) is checked here, inside the writer's transaction, so it holds against
//! concurrent changes; a refusal writes nothing.

use std::sync::Arc;

use heed::{PutFlags, RoTxn, RwTxn};

use super::StoreError;
use super::apply::{
    ack_first_send, ack_resend, archive_record, next_msg_id, put_message, put_new, refuse,
};
use super::conversations::NoteKind;
use super::journal::{Journal, LoggedEntry};
use super::read::ReadView;
use super::schema::{self, Dbs, META_NEXT_GROUP_ID};
use super::writer::{Delivery, OpResult, Origin, Reply};
use crate::ids::UserId;
use crate::limits::{GROUP_MEMBERS_MAX, GROUP_NAME_SIZE_MAX, USER_GROUPS_MAX};
use crate::protocol::{
    ErrorCode, GroupInfo, GroupMember, GroupSummary, Record, group_conv, group_op, record_kind,
};

const ROLE_MEMBER: u8 = 0;
const ROLE_OWNER: u8 = 1;

/// A `groups` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupRow {
    pub owner: UserId,
    pub created_at_ms: u64,
    pub member_count: u32,
    pub name: String,
}

impl GroupRow {
    fn encode(&self) -> Vec<u8> {
        let mut value = Vec::with_capacity(20 + self.name.len());
        value.extend_from_slice(&self.owner.0.to_be_bytes());
        value.extend_from_slice(&self.created_at_ms.to_be_bytes());
        value.extend_from_slice(&self.member_count.to_be_bytes());
        value.extend_from_slice(self.name.as_bytes());
        value
    }

    fn decode(bytes: &[u8]) -> Result<GroupRow, StoreError> {
        const WHAT: &str = "group value length";
        if bytes.len() < 20 {
            return Err(StoreError::Corrupt(WHAT));
        }
        let count: [u8; 4] = bytes[16..20].try_into().expect("4 bytes");
        Ok(GroupRow {
            owner: UserId(schema::decode_u64(&bytes[..8], WHAT)?),
            created_at_ms: schema::decode_u64(&bytes[8..16], WHAT)?,
            member_count: u32::from_be_bytes(count),
            name: std::str::from_utf8(&bytes[20..])
                .map_err(|_| StoreError::Corrupt("group name is not UTF-8"))?
                .to_owned(),
        })
    }
}

fn group_row(txn: &RoTxn, dbs: &Dbs, group_id: u64) -> Result<Option<GroupRow>, StoreError> {
    match dbs
        .groups
        .get(txn, &group_id.to_be_bytes())
        .map_err(StoreError::lmdb("read group"))?
    {
        Some(bytes) => Ok(Some(GroupRow::decode(bytes)?)),
        None => Ok(None),
    }
}

/// Members of a group with their roles, in user id order.
fn members(txn: &RoTxn, dbs: &Dbs, group_id: u64) -> Result<Vec<(UserId, u8)>, StoreError> {
    let mut out = Vec::new();
    for item in dbs
        .members
        .prefix_iter(txn, &group_id.to_be_bytes())
        .map_err(StoreError::lmdb("open members"))?
    {
        let (key, value) = item.map_err(StoreError::lmdb("read member"))?;
        let (_, user) = schema::decode_pair(key, "member key length")?;
        let role = *value.first().ok_or(StoreError::Corrupt("member role"))?;
        out.push((UserId(user), role));
    }
    Ok(out)
}

fn is_member(txn: &RoTxn, dbs: &Dbs, group_id: u64, user: UserId) -> Result<bool, StoreError> {
    Ok(dbs
        .members
        .get(txn, &schema::pair_key(group_id, user.0))
        .map_err(StoreError::lmdb("read member"))?
        .is_some())
}

fn groups_of_count(txn: &RoTxn, dbs: &Dbs, user: UserId) -> Result<usize, StoreError> {
    let mut count = 0;
    for item in dbs
        .user_groups
        .prefix_iter(txn, &schema::user_key(user))
        .map_err(StoreError::lmdb("open user groups"))?
    {
        item.map_err(StoreError::lmdb("read user group"))?;
        count += 1;
    }
    Ok(count)
}

/// Whether every one of `users` can join one more group (`USER_GROUPS_MAX`).
fn have_group_room(txn: &RoTxn, dbs: &Dbs, users: &[UserId]) -> Result<bool, StoreError> {
    for &user in users {
        if groups_of_count(txn, dbs, user)? >= USER_GROUPS_MAX {
            return Ok(false);
        }
    }
    Ok(true)
}

fn refuse_user_groups_full(results: &mut Vec<OpResult>, origin: Origin) {
    refuse(
        results,
        origin,
        ErrorCode::GroupFull,
        "a user is in 256 groups already",
    );
}

fn group_info(
    txn: &RoTxn,
    dbs: &Dbs,
    group_id: u64,
    row: &GroupRow,
    seq: u64,
) -> Result<GroupInfo, StoreError> {
    let mut list = Vec::new();
    for (user, role) in members(txn, dbs, group_id)? {
        let name = dbs
            .user_names
            .get(txn, &schema::user_key(user))
            .map_err(StoreError::lmdb("read user name"))?
            .ok_or(StoreError::Corrupt("member without a user"))?;
        list.push(GroupMember {
            user_id: user.0,
            name: String::from_utf8_lossy(name).into_owned(),
            owner: role == ROLE_OWNER,
        });
    }
    Ok(GroupInfo {
        group_id,
        name: row.name.clone(),
        owner_id: row.owner.0,
        members: list,
        seq,
    })
}

/// A `WriteOp::GroupOp`, with ids resolved by the shard.
pub(super) struct GroupOpFields<'a> {
    pub origin: Origin,
    pub actor: UserId,
    pub actor_name: &'a str,
    pub op: u8,
    pub group_id: u64,
    pub name: &'a str,
    pub users: &'a [UserId],
    pub at_ms: u64,
}

/// Applies one group operation: checks the rules, changes the memberships, writes one
/// membership record referenced from every member's timeline, and answers `GroupInfo`.
pub(super) fn apply_group_op(
    txn: &mut RwTxn,
    dbs: &Dbs,
    journal: &mut Journal,
    op: GroupOpFields<'_>,
    results: &mut Vec<OpResult>,
    deliveries: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    let origin = op.origin;
    if matches!(op.op, group_op::CREATE | group_op::RENAME)
        && (op.name.is_empty() || op.name.len() > GROUP_NAME_SIZE_MAX)
    {
        refuse(
            results,
            origin,
            ErrorCode::InvalidArgument,
            "group name must be 1..=64 bytes",
        );
        return Ok(());
    }
    if op.op == group_op::CREATE {
        return create_group(txn, dbs, journal, op, results, deliveries);
    }
    let Some(mut row) = group_row(txn, dbs, op.group_id)? else {
        refuse(results, origin, ErrorCode::UnknownGroup, "no such group");
        return Ok(());
    };
    if !is_member(txn, dbs, op.group_id, op.actor)? {
        refuse(
            results,
            origin,
            ErrorCode::NotMember,
            "not a member of this group",
        );
        return Ok(());
    }
    let before = members(txn, dbs, op.group_id)?;
    let is_in = |user: UserId| before.iter().any(|(u, _)| *u == user);
    // (record kind, record users, members to add, members to remove)
    let (kind, subjects, add, remove): (u16, Vec<UserId>, Vec<UserId>, Vec<UserId>) = match op.op {
        group_op::ADD => {
            let mut add: Vec<UserId> = Vec::new();
            for user in op.users {
                if !is_in(*user) && !add.contains(user) {
                    add.push(*user);
                }
            }
            if before.len() + add.len() > GROUP_MEMBERS_MAX {
                refuse(
                    results,
                    origin,
                    ErrorCode::GroupFull,
                    "the group would exceed 256 members",
                );
                return Ok(());
            }
            if !have_group_room(txn, dbs, &add)? {
                refuse_user_groups_full(results, origin);
                return Ok(());
            }
            if add.is_empty() {
                // Everyone named is a member already: nothing to record.
                let info = group_info(txn, dbs, op.group_id, &row, 0)?;
                results.push(OpResult::Answered {
                    origin,
                    reply: Reply::Group(info),
                });
                return Ok(());
            }
            (record_kind::MEMBERS_ADDED, add.clone(), add, Vec::new())
        }
        group_op::REMOVE => {
            if op.actor != row.owner {
                refuse(
                    results,
                    origin,
                    ErrorCode::NotOwner,
                    "only the owner may remove members",
                );
                return Ok(());
            }
            let mut remove: Vec<UserId> = Vec::new();
            for user in op.users {
                if *user == row.owner {
                    refuse(
                        results,
                        origin,
                        ErrorCode::InvalidArgument,
                        "the owner cannot be removed",
                    );
                    return Ok(());
                }
                if !is_in(*user) {
                    refuse(
                        results,
                        origin,
                        ErrorCode::NotMember,
                        "a named user is not a member",
                    );
                    return Ok(());
                }
                if !remove.contains(user) {
                    remove.push(*user);
                }
            }
            if remove.is_empty() {
                refuse(
                    results,
                    origin,
                    ErrorCode::InvalidArgument,
                    "name at least one member",
                );
                return Ok(());
            }
            (
                record_kind::MEMBERS_REMOVED,
                remove.clone(),
                Vec::new(),
                remove,
            )
        }
        group_op::LEAVE => {
            if op.actor == row.owner {
                refuse(
                    results,
                    origin,
                    ErrorCode::InvalidArgument,
                    "the owner cannot leave the group",
                );
                return Ok(());
            }
            (
                record_kind::MEMBER_LEFT,
                Vec::new(),
                Vec::new(),
                vec![op.actor],
            )
        }
        group_op::RENAME => (
            record_kind::GROUP_RENAMED,
            Vec::new(),
            Vec::new(),
            Vec::new(),
        ),
        _ => {
            refuse(
                results,
                origin,
                ErrorCode::InvalidArgument,
                "unknown group operation",
            );
            return Ok(());
        }
    };

    for user in &add {
        add_member(txn, dbs, op.group_id, *user, ROLE_MEMBER)?;
    }
    if op.op == group_op::RENAME {
        row.name = op.name.to_owned();
    }
    // Removed members and a leaver still get the record that takes them out.
    let mut audience: Vec<UserId> = before.iter().map(|(u, _)| *u).collect();
    audience.extend(add.iter().copied());
    for user in &remove {
        dbs.members
            .delete(txn, &schema::pair_key(op.group_id, user.0))
            .map_err(StoreError::lmdb("delete member"))?;
        dbs.user_groups
            .delete(txn, &schema::pair_key(user.0, op.group_id))
            .map_err(StoreError::lmdb("delete user group"))?;
    }
    row.member_count = (before.len() + add.len() - remove.len()) as u32;
    dbs.groups
        .put(txn, &op.group_id.to_be_bytes(), &row.encode())
        .map_err(StoreError::lmdb("write group"))?;
    let record = membership_record(&op, kind, &subjects, &row.name);
    let (_, actor_seq, entry) = fan_out(
        txn,
        dbs,
        journal,
        &audience,
        op.group_id,
        op.actor,
        op.at_ms,
        record,
        NoteKind::Membership,
        deliveries,
    )?;
    journal.log(txn, dbs, entry)?;
    let seq = if remove.contains(&op.actor) {
        0
    } else {
        actor_seq
    };
    let info = group_info(txn, dbs, op.group_id, &row, seq)?;
    results.push(OpResult::Answered {
        origin,
        reply: Reply::Group(info),
    });
    Ok(())
}

fn create_group(
    txn: &mut RwTxn,
    dbs: &Dbs,
    journal: &mut Journal,
    op: GroupOpFields<'_>,
    results: &mut Vec<OpResult>,
    deliveries: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    let origin = op.origin;
    let mut all = vec![op.actor];
    for user in op.users {
        if !all.contains(user) {
            all.push(*user);
        }
    }
    if all.len() > GROUP_MEMBERS_MAX {
        refuse(
            results,
            origin,
            ErrorCode::GroupFull,
            "a group has at most 256 members",
        );
        return Ok(());
    }
    if !have_group_room(txn, dbs, &all)? {
        refuse_user_groups_full(results, origin);
        return Ok(());
    }
    let group_id = schema::counter_next(txn, dbs, META_NEXT_GROUP_ID)?;
    schema::counter_set(txn, dbs, META_NEXT_GROUP_ID, group_id + 1)?;
    let row = GroupRow {
        owner: op.actor,
        created_at_ms: op.at_ms,
        member_count: all.len() as u32,
        name: op.name.to_owned(),
    };
    put_new(
        dbs.groups,
        txn,
        PutFlags::NO_OVERWRITE,
        &group_id.to_be_bytes(),
        &row.encode(),
        "write group",
        "group id reused",
    )?;
    for user in &all {
        let role = if *user == op.actor {
            ROLE_OWNER
        } else {
            ROLE_MEMBER
        };
        add_member(txn, dbs, group_id, *user, role)?;
    }
    let op = GroupOpFields { group_id, ..op };
    let record = membership_record(&op, record_kind::GROUP_CREATED, &all, &row.name);
    let (_, seq, entry) = fan_out(
        txn,
        dbs,
        journal,
        &all,
        group_id,
        op.actor,
        op.at_ms,
        record,
        NoteKind::Membership,
        deliveries,
    )?;
    journal.log(txn, dbs, entry)?;
    let info = group_info(txn, dbs, group_id, &row, seq)?;
    results.push(OpResult::Answered {
        origin,
        reply: Reply::Group(info),
    });
    Ok(())
}

fn add_member(
    txn: &mut RwTxn,
    dbs: &Dbs,
    group_id: u64,
    user: UserId,
    role: u8,
) -> Result<(), StoreError> {
    dbs.members
        .put(txn, &schema::pair_key(group_id, user.0), &[role])
        .map_err(StoreError::lmdb("write member"))?;
    dbs.user_groups
        .put(txn, &schema::pair_key(user.0, group_id), &[])
        .map_err(StoreError::lmdb("write user group"))
}

fn membership_record(op: &GroupOpFields<'_>, kind: u16, users: &[UserId], name: &str) -> Record {
    Record {
        kind,
        msg_id: 0,
        conv: group_conv(op.group_id),
        from_id: op.actor.0,
        from: op.actor_name.to_owned(),
        users: users.iter().map(|u| u.0).collect(),
        client_msg_id: 0,
        sent_at_ms: op.at_ms,
        up_to: 0,
        // A removal or leave carries the group's name as of that change: the members it
        // takes out see nothing of the group after it, so their conversation keeps this
        // name (never one given later).
        text: if matches!(
            kind,
            record_kind::GROUP_CREATED
                | record_kind::GROUP_RENAMED
                | record_kind::MEMBERS_REMOVED
                | record_kind::MEMBER_LEFT
        ) {
            name.to_owned()
        } else {
            String::new()
        },
        attachments: Vec::new(),
    }
}

/// Stores `record` once (giving it the next msg id) and appends it to the timeline and
/// the group's conversation index of every user in `audience`. Returns the seq it got in
/// `actor`'s timeline (0 if the actor is not in the audience) with the record's msg id.
#[allow(clippy::too_many_arguments)]
fn fan_out(
    txn: &mut RwTxn,
    dbs: &Dbs,
    journal: &mut Journal,
    audience: &[UserId],
    group_id: u64,
    actor: UserId,
    at_ms: u64,
    mut record: Record,
    kind: NoteKind,
    deliveries: &mut Vec<Delivery>,
) -> Result<(u64, u64, LoggedEntry), StoreError> {
    let msg_id = next_msg_id(txn, dbs)?;
    record.msg_id = msg_id;
    let bytes: Arc<[u8]> = archive_record(&record)?.into();
    put_message(txn, dbs, msg_id, &bytes)?;
    let conv = group_conv(group_id);
    let mut entry = LoggedEntry::new(msg_id, actor, at_ms);
    let mut actor_seq = 0;
    for user in audience {
        let seq = journal.place(txn, dbs, &mut entry, *user, Some((conv, kind)))?;
        if *user == actor {
            actor_seq = seq;
        }
        deliveries.push(Delivery {
            user: *user,
            seq,
            message: Arc::clone(&bytes),
        });
    }
    Ok((msg_id, actor_seq, entry))
}

/// A `WriteOp::GroupSend`.
pub(super) struct GroupSendFields<'a> {
    pub origin: Origin,
    pub from: UserId,
    pub from_name: &'a str,
    pub group_id: u64,
    pub client_msg_id: u64,
    pub text: &'a str,
    pub sent_at_ms: u64,
}

/// A message to a group: deduplicated like a 1:1 send, refused unless the sender is a
/// member, stored once and referenced from every member's timeline.
pub(super) fn apply_group_send(
    txn: &mut RwTxn,
    dbs: &Dbs,
    journal: &mut Journal,
    send: GroupSendFields<'_>,
    results: &mut Vec<OpResult>,
    deliveries: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    if ack_resend(
        txn,
        dbs,
        journal,
        send.from,
        send.client_msg_id,
        send.origin,
        results,
    )? {
        return Ok(());
    }
    if group_row(txn, dbs, send.group_id)?.is_none() {
        refuse(
            results,
            send.origin,
            ErrorCode::UnknownGroup,
            "no such group",
        );
        return Ok(());
    }
    if !is_member(txn, dbs, send.group_id, send.from)? {
        refuse(
            results,
            send.origin,
            ErrorCode::NotMember,
            "not a member of this group",
        );
        return Ok(());
    }
    let audience: Vec<UserId> = members(txn, dbs, send.group_id)?
        .into_iter()
        .map(|(u, _)| u)
        .collect();
    let record = Record {
        kind: record_kind::GROUP_MESSAGE,
        msg_id: 0,
        conv: group_conv(send.group_id),
        from_id: send.from.0,
        from: send.from_name.to_owned(),
        users: Vec::new(),
        client_msg_id: send.client_msg_id,
        sent_at_ms: send.sent_at_ms,
        up_to: 0,
        text: send.text.to_owned(),
        attachments: Vec::new(),
    };
    let (msg_id, from_seq, mut entry) = fan_out(
        txn,
        dbs,
        journal,
        &audience,
        send.group_id,
        send.from,
        send.sent_at_ms,
        record,
        NoteKind::Message,
        deliveries,
    )?;
    debug_assert!(from_seq > 0, "a member is in its group's audience");
    entry.set_dedup(send.client_msg_id, from_seq);
    journal.log(txn, dbs, entry)?;
    ack_first_send(send.origin, msg_id, from_seq, send.sent_at_ms, results);
    Ok(())
}

impl<'s> ReadView<'s> {
    pub(crate) fn group_name(&self, group_id: u64) -> Result<Option<String>, StoreError> {
        Ok(group_row(self.txn(), self.dbs(), group_id)?.map(|row| row.name))
    }

    /// Whether `user` is a member of group `group_id` now.
    pub fn is_group_member(&self, group_id: u64, user: UserId) -> Result<bool, StoreError> {
        is_member(self.txn(), self.dbs(), group_id, user)
    }

    /// The group's details, or None if there is no such group.
    pub fn group_info(&self, group_id: u64) -> Result<Option<GroupInfo>, StoreError> {
        match group_row(self.txn(), self.dbs(), group_id)? {
            Some(row) => Ok(Some(group_info(self.txn(), self.dbs(), group_id, &row, 0)?)),
            None => Ok(None),
        }
    }

    /// `user`'s groups with id above `after_group_id`, at most `limit`; and whether more
    /// follow.
    pub fn user_groups(
        &self,
        user: UserId,
        after_group_id: u64,
        limit: u32,
    ) -> Result<(Vec<GroupSummary>, bool), StoreError> {
        let mut out = Vec::new();
        for item in self
            .dbs()
            .user_groups
            .prefix_iter(self.txn(), &schema::user_key(user))
            .map_err(StoreError::lmdb("open user groups"))?
        {
            let (key, _) = item.map_err(StoreError::lmdb("read user group"))?;
            let (_, group_id) = schema::decode_pair(key, "user group key length")?;
            if group_id <= after_group_id {
                continue;
            }
            if out.len() >= limit as usize {
                return Ok((out, true));
            }
            let row = group_row(self.txn(), self.dbs(), group_id)?
                .ok_or(StoreError::Corrupt("membership of a missing group"))?;
            out.push(GroupSummary {
                group_id,
                name: row.name,
                owner_id: row.owner.0,
                members: row.member_count,
            });
        }
        Ok((out, false))
    }
}
