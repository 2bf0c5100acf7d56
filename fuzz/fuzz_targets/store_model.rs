//! The store against a plain in-memory model: random sequences of 1:1 sends, resends,
//! group operations and group sends, read marks, device acks and restarts, on a real LMDB
//! store in a temporary folder, through the writer thread the node uses.
//!
//! The journal interval is an hour, so entries stay in the journal until a read mark, a
//! flush or a restart applies them. A restart either stops the writer (which applies the
//! journal on its way out) or cuts it off: the ops up to the next restart are then logged
//! as the writer logs them between applies (`log_batch`) and never applied, as in a node
//! killed before its apply, and `spawn_writer` must recover them; device acks held in
//! memory are lost there, as a kill loses them.
//!
//! Checked after every op: the writer's answer (acks with their msg id and seq, a resend
//! answered with its first ack, refusals, group infos, read results). Checked after a
//! flush, a restart and at the end: every user's timeline contiguous from 1 with exactly
//! the model's entries, each conversation's entries, last seq, read mark and unread count,
//! group memberships and owners, device ack cursors.
#![no_main]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::thread::JoinHandle;
use std::time::Duration;

use arbitrary::Arbitrary;
use crossbeam_channel::{Receiver, Sender};
use libfuzzer_sys::fuzz_target;
use rkyv::rancor::Failure;
use tern::ids::{ConnId, ShardId, UserId};
use tern::protocol::{
    ArchivedMessage, ArchivedRecord, ErrorCode, RECORD_MARKER, group_conv, group_op, is_record,
    record_kind,
};
use tern::storage::{
    CommitSink, Delivery, Durability, OpResult, Origin, Reply, Store, StoreConfig, WriteOp,
    WriterHandle, WriterStats, log_batch, spawn_writer,
};

/// Users 1..=USERS exist in every run.
const USERS: u64 = 4;
/// Ops of one run; keeps a run short and every bound of the store far away.
const OPS_MAX: usize = 64;
const DEVICES: [&str; 2] = ["laptop", "phone"];
/// Never reached while the writer works: only a hung writer fails on it.
const RESULT_TIMEOUT: Duration = Duration::from_secs(60);
const JOURNAL_INTERVAL_MS: u64 = 3_600_000;
const MAP_SIZE: usize = 64 << 20;

#[derive(Arbitrary, Debug)]
enum Op {
    Send {
        from: u8,
        to: u8,
        text: u8,
    },
    /// Sends again the `pick`-th client message id `from` used, 1:1 or to a group.
    Resend {
        from: u8,
        pick: u8,
        to: u8,
        group: bool,
    },
    GroupCreate {
        actor: u8,
        members: u8,
    },
    GroupAdd {
        actor: u8,
        group: u8,
        users: u8,
    },
    GroupRemove {
        actor: u8,
        group: u8,
        users: u8,
    },
    GroupLeave {
        actor: u8,
        group: u8,
    },
    GroupRename {
        actor: u8,
        group: u8,
        name: u8,
    },
    GroupSend {
        from: u8,
        group: u8,
        text: u8,
    },
    Read {
        user: u8,
        conv: u8,
        up_to: u8,
    },
    DeviceAck {
        user: u8,
        device: bool,
        up_to: u8,
    },
    Flush,
    Restart {
        cut_off: bool,
    },
}

fuzz_target!(|ops: Vec<Op>| {
    if ops.len() > OPS_MAX {
        return;
    }
    let mut run = Run::new();
    for (index, op) in ops.iter().enumerate() {
        run.op(op, 1_000 + index as u64);
    }
    run.flush();
    run.check();
    run.stop();
});

fn user(raw: u8) -> u64 {
    u64::from(raw) % USERS + 1
}

fn users(mask: u8) -> Vec<u64> {
    (0..8)
        .filter(|bit| mask & (1 << bit) != 0)
        .map(|bit| bit % USERS + 1)
        .collect()
}

fn name(user: u64) -> String {
    format!("u{user}")
}

// ----- the model ---------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Content {
    Direct {
        from: u64,
        to: u64,
        client_msg_id: u64,
        text: String,
    },
    Record {
        kind: u16,
        conv: u64,
        from: u64,
        users: Vec<u64>,
        up_to: u64,
        text: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    msg_id: u64,
    content: Content,
}

#[derive(Debug, Default, Clone)]
struct Conv {
    last_seq: u64,
    read_seq: u64,
    unread: u64,
    /// (seq, msg id, sender, counts as unread)
    entries: Vec<(u64, u64, u64, bool)>,
}

#[derive(Debug, Clone)]
struct Group {
    owner: u64,
    name: String,
    members: BTreeSet<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ack {
    msg_id: u64,
    seq: u64,
    sent_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Note {
    Message,
    Membership,
}

#[derive(Default)]
struct Model {
    next_msg_id: u64,
    next_group_id: u64,
    timelines: BTreeMap<u64, Vec<Entry>>,
    convs: BTreeMap<(u64, u64), Conv>,
    groups: BTreeMap<u64, Group>,
    dedup: HashMap<(u64, u64), Ack>,
    /// Client message ids each user sent, first sends or refused ones alike.
    client_msg_ids: BTreeMap<u64, Vec<u64>>,
    cursors: BTreeMap<(u64, String), u64>,
    delivered: BTreeMap<u64, u64>,
    /// Device acks the writer holds in memory until its next apply.
    acks: BTreeMap<(u64, String), u64>,
    /// Something was logged or acked since the last apply.
    dirty: bool,
}

/// What the model says an op must answer.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Acked {
        ack: Ack,
        duplicate: bool,
    },
    Refused(ErrorCode),
    Group {
        group_id: u64,
        seq: u64,
        members: Vec<(u64, bool)>,
    },
    Read {
        conv: u64,
        read_seq: u64,
        unread: u32,
    },
    Flushed,
    Nothing,
}

impl Model {
    fn new() -> Model {
        Model {
            next_msg_id: 1,
            next_group_id: 1,
            ..Model::default()
        }
    }

    fn head(&self, user: u64) -> u64 {
        self.timelines.get(&user).map_or(0, |t| t.len() as u64)
    }

    fn msg_id(&mut self) -> u64 {
        let id = self.next_msg_id;
        self.next_msg_id += 1;
        id
    }

    /// Appends an entry to `user`'s timeline (and to a conversation); returns its seq.
    fn place(&mut self, user: u64, entry: &Entry, conv: Option<(u64, Note)>, from: u64) -> u64 {
        let timeline = self.timelines.entry(user).or_default();
        timeline.push(entry.clone());
        let seq = timeline.len() as u64;
        self.dirty = true;
        if let Some((conv, note)) = conv {
            let state = self.convs.entry((user, conv)).or_default();
            let counts = note == Note::Message && from != user;
            state.entries.push((seq, entry.msg_id, from, counts));
            state.last_seq = seq;
            if counts {
                state.unread += 1;
            } else if note == Note::Message {
                state.read_seq = seq;
                state.unread = 0;
            }
        }
        seq
    }

    fn resend(&self, from: u64, client_msg_id: u64) -> Option<Expect> {
        self.dedup
            .get(&(from, client_msg_id))
            .map(|ack| Expect::Acked {
                ack: *ack,
                duplicate: true,
            })
    }

    fn send(&mut self, from: u64, to: u64, client_msg_id: u64, text: &str, at_ms: u64) -> Expect {
        if let Some(expect) = self.resend(from, client_msg_id) {
            return expect;
        }
        let msg_id = self.msg_id();
        let entry = Entry {
            msg_id,
            content: Content::Direct {
                from,
                to,
                client_msg_id,
                text: text.to_owned(),
            },
        };
        let to_seq = self.place(to, &entry, Some((from, Note::Message)), from);
        let seq = if from == to {
            to_seq
        } else {
            self.place(from, &entry, Some((to, Note::Message)), from)
        };
        let ack = Ack {
            msg_id,
            seq,
            sent_at_ms: at_ms,
        };
        self.dedup.insert((from, client_msg_id), ack);
        Expect::Acked {
            ack,
            duplicate: false,
        }
    }

    fn group_send(
        &mut self,
        from: u64,
        group_id: u64,
        client_msg_id: u64,
        text: &str,
        at_ms: u64,
    ) -> Expect {
        if let Some(expect) = self.resend(from, client_msg_id) {
            return expect;
        }
        let Some(group) = self.groups.get(&group_id) else {
            return Expect::Refused(ErrorCode::UnknownGroup);
        };
        if !group.members.contains(&from) {
            return Expect::Refused(ErrorCode::NotMember);
        }
        let audience: Vec<u64> = group.members.iter().copied().collect();
        let record = Content::Record {
            kind: record_kind::GROUP_MESSAGE,
            conv: group_conv(group_id),
            from,
            users: Vec::new(),
            up_to: 0,
            text: text.to_owned(),
        };
        let seq = self.fan_out(&audience, group_id, from, record, Note::Message);
        let ack = Ack {
            msg_id: self.next_msg_id - 1,
            seq,
            sent_at_ms: at_ms,
        };
        self.dedup.insert((from, client_msg_id), ack);
        Expect::Acked {
            ack,
            duplicate: false,
        }
    }

    /// Stores a group record once and places it in every timeline of `audience`; returns
    /// the seq it got in `actor`'s timeline (0 if the actor is not in the audience).
    fn fan_out(
        &mut self,
        audience: &[u64],
        group_id: u64,
        actor: u64,
        content: Content,
        note: Note,
    ) -> u64 {
        let entry = Entry {
            msg_id: self.msg_id(),
            content,
        };
        let mut actor_seq = 0;
        for &user in audience {
            let seq = self.place(user, &entry, Some((group_conv(group_id), note)), actor);
            if user == actor {
                actor_seq = seq;
            }
        }
        actor_seq
    }

    fn group_expect(&self, group_id: u64, seq: u64) -> Expect {
        let group = &self.groups[&group_id];
        Expect::Group {
            group_id,
            seq,
            members: group
                .members
                .iter()
                .map(|&u| (u, u == group.owner))
                .collect(),
        }
    }

    fn group_op(&mut self, actor: u64, op: u8, group_id: u64, name: &str, users: &[u64]) -> Expect {
        if matches!(op, group_op::CREATE | group_op::RENAME) && (name.is_empty() || name.len() > 64)
        {
            return Expect::Refused(ErrorCode::InvalidArgument);
        }
        if op == group_op::CREATE {
            let mut all = vec![actor];
            for &u in users {
                if !all.contains(&u) {
                    all.push(u);
                }
            }
            let group_id = self.next_group_id;
            self.next_group_id += 1;
            self.groups.insert(
                group_id,
                Group {
                    owner: actor,
                    name: name.to_owned(),
                    members: all.iter().copied().collect(),
                },
            );
            let record = membership(
                record_kind::GROUP_CREATED,
                group_id,
                actor,
                all.clone(),
                name,
            );
            let seq = self.fan_out(&all, group_id, actor, record, Note::Membership);
            return self.group_expect(group_id, seq);
        }
        let Some(group) = self.groups.get(&group_id).cloned() else {
            return Expect::Refused(ErrorCode::UnknownGroup);
        };
        if !group.members.contains(&actor) {
            return Expect::Refused(ErrorCode::NotMember);
        }
        let before: Vec<u64> = group.members.iter().copied().collect();
        let (kind, subjects, add, remove) = match op {
            group_op::ADD => {
                let mut add = Vec::new();
                for &u in users {
                    if !group.members.contains(&u) && !add.contains(&u) {
                        add.push(u);
                    }
                }
                if add.is_empty() {
                    return self.group_expect(group_id, 0);
                }
                (record_kind::MEMBERS_ADDED, add.clone(), add, Vec::new())
            }
            group_op::REMOVE => {
                if actor != group.owner {
                    return Expect::Refused(ErrorCode::NotOwner);
                }
                let mut remove = Vec::new();
                for &u in users {
                    if u == group.owner {
                        return Expect::Refused(ErrorCode::InvalidArgument);
                    }
                    if !group.members.contains(&u) {
                        return Expect::Refused(ErrorCode::NotMember);
                    }
                    if !remove.contains(&u) {
                        remove.push(u);
                    }
                }
                if remove.is_empty() {
                    return Expect::Refused(ErrorCode::InvalidArgument);
                }
                (
                    record_kind::MEMBERS_REMOVED,
                    remove.clone(),
                    Vec::new(),
                    remove,
                )
            }
            group_op::LEAVE => {
                if actor == group.owner {
                    return Expect::Refused(ErrorCode::InvalidArgument);
                }
                (
                    record_kind::MEMBER_LEFT,
                    Vec::new(),
                    Vec::new(),
                    vec![actor],
                )
            }
            group_op::RENAME => (
                record_kind::GROUP_RENAMED,
                Vec::new(),
                Vec::new(),
                Vec::new(),
            ),
            _ => unreachable!("the target sends known ops only"),
        };
        let group = self.groups.get_mut(&group_id).expect("checked above");
        group.members.extend(add.iter().copied());
        if op == group_op::RENAME {
            group.name = name.to_owned();
        }
        let mut audience = before;
        audience.extend(add.iter().copied());
        for u in &remove {
            group.members.remove(u);
        }
        // A removal or leave carries the group's name as of that change (what a former
        // member keeps seeing); a rename carries the new name.
        let text = match kind {
            record_kind::GROUP_RENAMED => name.to_owned(),
            record_kind::MEMBERS_REMOVED | record_kind::MEMBER_LEFT => group.name.clone(),
            _ => String::new(),
        };
        let record = membership(kind, group_id, actor, subjects, &text);
        let seq = self.fan_out(&audience, group_id, actor, record, Note::Membership);
        let seq = if remove.contains(&actor) { 0 } else { seq };
        self.group_expect(group_id, seq)
    }

    fn read(&mut self, user: u64, conv: u64, up_to_seq: u64) -> Expect {
        if self.dirty {
            self.apply();
        }
        let Some(state) = self.convs.get(&(user, conv)).cloned() else {
            return Expect::Refused(ErrorCode::NotMember);
        };
        let up_to = up_to_seq.min(state.last_seq);
        if up_to <= state.read_seq {
            return Expect::Read {
                conv,
                read_seq: state.read_seq,
                unread: state.unread as u32,
            };
        }
        let mut senders = Vec::new();
        let mut last_read_msg = 0;
        let mut unread = 0;
        for &(seq, msg_id, from, counts) in &state.entries {
            if seq <= state.read_seq {
                continue;
            }
            if seq <= up_to {
                last_read_msg = msg_id;
                if counts && !senders.contains(&from) {
                    senders.push(from);
                }
            } else if counts {
                unread += 1;
            }
        }
        let conv_state = self.convs.get_mut(&(user, conv)).expect("exists");
        conv_state.read_seq = up_to;
        conv_state.unread = unread;
        let entry = Entry {
            msg_id: self.msg_id(),
            content: Content::Record {
                kind: record_kind::READ,
                conv,
                from: user,
                users: Vec::new(),
                up_to: last_read_msg,
                text: String::new(),
            },
        };
        self.place(user, &entry, None, user);
        for sender in senders.into_iter().filter(|s| *s != user) {
            self.place(sender, &entry, None, user);
        }
        Expect::Read {
            conv,
            read_seq: up_to,
            unread: unread as u32,
        }
    }

    /// A device stored every entry up to `up_to`: held until the next apply, and never
    /// past the entries that exist when the writer takes the ack.
    fn device_ack(&mut self, user: u64, device: &str, up_to: u64) {
        let up_to = up_to.min(self.head(user));
        let held = self.acks.entry((user, device.to_owned())).or_insert(0);
        *held = (*held).max(up_to);
        self.dirty = true;
    }

    /// The writer applies its journal: device cursors move and delivery receipts follow.
    fn apply(&mut self) {
        let acks = std::mem::take(&mut self.acks);
        for ((user, device), up_to) in acks {
            let cursor = self.cursors.entry((user, device)).or_insert(0);
            *cursor = (*cursor).max(up_to);
            let acked = *cursor;
            let delivered = self.delivered.get(&user).copied().unwrap_or(0);
            if acked <= delivered {
                continue;
            }
            // (sender, conversation as the user names it, newest msg id)
            let mut receipts: Vec<(u64, u64, u64)> = Vec::new();
            for entry in &self.timelines[&user][delivered as usize..acked as usize] {
                let (sender, conv) = match &entry.content {
                    Content::Direct { from, .. } => (*from, *from),
                    Content::Record {
                        kind: record_kind::GROUP_MESSAGE,
                        conv,
                        from,
                        ..
                    } => (*from, *conv),
                    Content::Record { .. } => continue,
                };
                if sender == user {
                    continue;
                }
                match receipts
                    .iter_mut()
                    .find(|(s, c, _)| *s == sender && *c == conv)
                {
                    Some(receipt) => receipt.2 = receipt.2.max(entry.msg_id),
                    None => receipts.push((sender, conv, entry.msg_id)),
                }
            }
            self.delivered.insert(user, acked);
            for (sender, conv, up_to) in receipts {
                let entry = Entry {
                    msg_id: self.msg_id(),
                    content: Content::Record {
                        kind: record_kind::DELIVERED,
                        conv,
                        from: user,
                        users: Vec::new(),
                        up_to,
                        text: String::new(),
                    },
                };
                self.place(sender, &entry, None, user);
            }
        }
        self.dirty = false;
    }
}

fn membership(kind: u16, group_id: u64, actor: u64, users: Vec<u64>, text: &str) -> Content {
    Content::Record {
        kind,
        conv: group_conv(group_id),
        from: actor,
        users,
        up_to: 0,
        text: text.to_owned(),
    }
}

// ----- the store side ----------------------------------------------------------------

struct Sink {
    results: Sender<OpResult>,
}

impl CommitSink for Sink {
    fn committed(&mut self, results: &mut Vec<OpResult>, deliveries: &mut Vec<Delivery>) {
        deliveries.clear();
        for result in results.drain(..) {
            self.results
                .send(result)
                .expect("the run outlives its writer");
        }
    }
}

enum Writer {
    Running {
        handle: WriterHandle,
        thread: JoinHandle<WriterStats>,
        results: Receiver<OpResult>,
    },
    /// Cut off: ops are logged without a writer thread and never applied.
    CutOff,
}

struct Run {
    dir: tempfile::TempDir,
    store: Option<Store>,
    writer: Writer,
    model: Model,
    next_request_id: u32,
}

fn config() -> StoreConfig {
    StoreConfig {
        map_size: MAP_SIZE,
        durability: Durability::None,
        journal_interval_ms: JOURNAL_INTERVAL_MS,
    }
}

impl Run {
    fn new() -> Run {
        let dir = tempfile::tempdir().expect("temporary folder");
        let store = Store::open(dir.path(), &config()).expect("open store");
        for id in 1..=USERS {
            assert_eq!(
                store
                    .add_user(&name(id), "$argon2id$fuzz")
                    .expect("add user"),
                UserId(id)
            );
        }
        let writer = start(&store);
        Run {
            dir,
            store: Some(store),
            writer,
            model: Model::new(),
            next_request_id: 1,
        }
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("the store is open between ops")
    }

    fn origin(&mut self) -> Origin {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        Origin {
            shard: ShardId(0),
            conn: ConnId {
                index: 0,
                generation: 1,
            },
            request_id,
        }
    }

    fn op(&mut self, op: &Op, at_ms: u64) {
        match *op {
            Op::Send { from, to, text } => {
                let (from, to) = (user(from), user(to));
                let client_msg_id = self.fresh_client_msg_id(from);
                let text = format!("m{text}");
                let expect = self.model.send(from, to, client_msg_id, &text, at_ms);
                let op = self.send_op(from, to, client_msg_id, text, at_ms);
                self.submit(op, expect);
            }
            Op::Resend {
                from,
                pick,
                to,
                group,
            } => {
                let from = user(from);
                let Some(ids) = self.model.client_msg_ids.get(&from) else {
                    return;
                };
                let client_msg_id = ids[usize::from(pick) % ids.len()];
                let text = "again".to_owned();
                if group {
                    let group_id = u64::from(to % 4) + 1;
                    let expect = self
                        .model
                        .group_send(from, group_id, client_msg_id, &text, at_ms);
                    let op = self.group_send_op(from, group_id, client_msg_id, text, at_ms);
                    self.submit(op, expect);
                } else {
                    let to = user(to);
                    let expect = self.model.send(from, to, client_msg_id, &text, at_ms);
                    let op = self.send_op(from, to, client_msg_id, text, at_ms);
                    self.submit(op, expect);
                }
            }
            Op::GroupCreate { actor, members } => {
                self.group_op(actor, group_op::CREATE, 0, "team", users(members), at_ms)
            }
            Op::GroupAdd {
                actor,
                group,
                users: mask,
            } => self.group_op(
                actor,
                group_op::ADD,
                u64::from(group % 4) + 1,
                "",
                users(mask),
                at_ms,
            ),
            Op::GroupRemove {
                actor,
                group,
                users: mask,
            } => self.group_op(
                actor,
                group_op::REMOVE,
                u64::from(group % 4) + 1,
                "",
                users(mask),
                at_ms,
            ),
            Op::GroupLeave { actor, group } => self.group_op(
                actor,
                group_op::LEAVE,
                u64::from(group % 4) + 1,
                "",
                Vec::new(),
                at_ms,
            ),
            Op::GroupRename { actor, group, name } => {
                // 0 gives an empty name, which is refused.
                let name = "n".repeat(usize::from(name % 4));
                self.group_op(
                    actor,
                    group_op::RENAME,
                    u64::from(group % 4) + 1,
                    &name,
                    Vec::new(),
                    at_ms,
                )
            }
            Op::GroupSend { from, group, text } => {
                let from = user(from);
                let group_id = u64::from(group % 4) + 1;
                let client_msg_id = self.fresh_client_msg_id(from);
                let text = format!("g{text}");
                let expect = self
                    .model
                    .group_send(from, group_id, client_msg_id, &text, at_ms);
                let op = self.group_send_op(from, group_id, client_msg_id, text, at_ms);
                self.submit(op, expect);
            }
            Op::Read {
                user: u,
                conv,
                up_to,
            } => {
                let u = user(u);
                // 1:1 conversations with each user, then groups 1..=3.
                let conv = match conv % 7 {
                    c @ 0..4 => u64::from(c) + 1,
                    c => group_conv(u64::from(c) - 3),
                };
                let up_to_seq = u64::from(up_to);
                if matches!(self.writer, Writer::CutOff) {
                    // No writer: the ack memory of a cut-off node is gone.
                    self.model.acks.clear();
                }
                let expect = self.model.read(u, conv, up_to_seq);
                let op = WriteOp::Read {
                    origin: self.origin(),
                    user: UserId(u),
                    user_name: name(u),
                    conv,
                    up_to_seq,
                    at_ms,
                };
                self.submit(op, expect);
            }
            Op::DeviceAck {
                user: u,
                device,
                up_to,
            } => {
                let u = user(u);
                let device = DEVICES[usize::from(device)];
                let up_to_seq = u64::from(up_to);
                let op = WriteOp::DeviceAck {
                    user: UserId(u),
                    device: device.to_owned(),
                    up_to_seq,
                };
                if matches!(self.writer, Writer::Running { .. }) {
                    self.model.device_ack(u, device, up_to_seq);
                }
                self.submit(op, Expect::Nothing);
            }
            Op::Flush => {
                self.flush();
                self.check();
            }
            Op::Restart { cut_off } => {
                self.restart(cut_off);
                self.check();
            }
        }
    }

    fn fresh_client_msg_id(&mut self, from: u64) -> u64 {
        let ids = self.model.client_msg_ids.entry(from).or_default();
        let id = ids.len() as u64 + 1;
        ids.push(id);
        id
    }

    fn send_op(
        &mut self,
        from: u64,
        to: u64,
        client_msg_id: u64,
        text: String,
        at_ms: u64,
    ) -> WriteOp {
        WriteOp::Send {
            origin: self.origin(),
            from: UserId(from),
            from_name: name(from),
            to: UserId(to),
            to_name: name(to),
            client_msg_id,
            text,
            sent_at_ms: at_ms,
        }
    }

    fn group_send_op(
        &mut self,
        from: u64,
        group_id: u64,
        client_msg_id: u64,
        text: String,
        at_ms: u64,
    ) -> WriteOp {
        WriteOp::GroupSend {
            origin: self.origin(),
            from: UserId(from),
            from_name: name(from),
            group_id,
            client_msg_id,
            text,
            sent_at_ms: at_ms,
        }
    }

    fn group_op(
        &mut self,
        actor: u8,
        op: u8,
        group_id: u64,
        group_name: &str,
        users: Vec<u64>,
        at_ms: u64,
    ) {
        let actor = user(actor);
        let expect = self.model.group_op(actor, op, group_id, group_name, &users);
        let op = WriteOp::GroupOp {
            origin: self.origin(),
            actor: UserId(actor),
            actor_name: name(actor),
            op,
            group_id,
            name: group_name.to_owned(),
            users: users.into_iter().map(UserId).collect(),
            at_ms,
        };
        self.submit(op, expect);
    }

    /// Hands `op` to the writer (or logs it, cut off) and compares its answer.
    fn submit(&mut self, op: WriteOp, expect: Expect) {
        let result = match &self.writer {
            Writer::Running {
                handle, results, ..
            } => {
                let mut op = op;
                loop {
                    match handle.try_submit(op) {
                        Ok(()) => break,
                        Err(back) => {
                            op = back;
                            std::thread::yield_now();
                        }
                    }
                }
                if expect == Expect::Nothing {
                    return;
                }
                results
                    .recv_timeout(RESULT_TIMEOUT)
                    .expect("the writer answers")
            }
            Writer::CutOff => {
                let mut results = Vec::new();
                let mut deliveries = Vec::new();
                log_batch(self.store(), &mut [op], &mut results, &mut deliveries)
                    .expect("log batch");
                if expect == Expect::Nothing {
                    assert!(results.is_empty());
                    return;
                }
                assert_eq!(results.len(), 1, "one result per op");
                results.pop().expect("one result")
            }
        };
        let got = match result {
            OpResult::SendAcked { ack, .. } => Expect::Acked {
                ack: Ack {
                    msg_id: ack.msg_id,
                    seq: ack.seq,
                    sent_at_ms: ack.sent_at_ms,
                },
                duplicate: ack.duplicate,
            },
            OpResult::Refused { code, .. } => Expect::Refused(code),
            OpResult::Answered {
                reply: Reply::Group(info),
                ..
            } => Expect::Group {
                group_id: info.group_id,
                seq: info.seq,
                members: info.members.iter().map(|m| (m.user_id, m.owner)).collect(),
            },
            OpResult::Answered {
                reply: Reply::Read(ok),
                ..
            } => Expect::Read {
                conv: ok.conv,
                read_seq: ok.read_seq,
                unread: ok.unread,
            },
            OpResult::Flushed { .. } => Expect::Flushed,
            other => panic!("unexpected answer {other:?}"),
        };
        assert_eq!(got, expect, "the writer's answer differs from the model's");
    }

    /// Applies the journal: a `Flush` through the running writer, or a cut-off log batch.
    fn flush(&mut self) {
        if matches!(self.writer, Writer::CutOff) {
            self.model.acks.clear();
        }
        if self.model.dirty {
            self.model.apply();
        }
        let op = WriteOp::Flush {
            origin: self.origin(),
        };
        self.submit(op, Expect::Flushed);
    }

    fn stop(&mut self) {
        if let Writer::Running { handle, thread, .. } =
            std::mem::replace(&mut self.writer, Writer::CutOff)
        {
            drop(handle);
            let stats = thread.join().expect("the writer exits cleanly");
            assert_eq!(stats.ops_failed, 0, "the writer failed an op");
            // On its way out the writer applies what it holds.
            if self.model.dirty {
                self.model.apply();
            }
        }
    }

    fn restart(&mut self, cut_off: bool) {
        self.stop();
        // Close the environment before opening it again.
        self.store = None;
        let store = Store::open(self.dir.path(), &config()).expect("reopen store");
        // The start applies whatever journal a cut-off run left.
        self.writer = start(&store);
        self.store = Some(store);
        self.model.acks.clear();
        self.model.dirty = false;
        if cut_off {
            // Nothing is held: the writer stops without writing anything.
            self.stop();
        }
    }

    /// Everything the store shows equals the model. Only after a flush or a restart: the
    /// derived tables are complete then.
    fn check(&self) {
        let view = self.store().read().expect("read view");
        for u in 1..=USERS {
            let expected = self.model.timelines.get(&u).map_or(&[][..], |t| &t[..]);
            let mut got = Vec::new();
            let more = view
                .timeline(UserId(u), 0, u32::MAX, usize::MAX, |seq, bytes| {
                    got.push((seq, decode(bytes)));
                })
                .expect("timeline reads");
            assert!(!more);
            assert_eq!(got.len(), expected.len(), "user {u}: timeline length");
            for (index, ((seq, entry), want)) in got.iter().zip(expected).enumerate() {
                assert_eq!(*seq, index as u64 + 1, "user {u}: timeline not contiguous");
                assert_eq!(entry, want, "user {u}: entry {seq}");
            }
            assert_eq!(
                view.head_seq(UserId(u)).expect("head"),
                expected.len() as u64
            );

            let (items, total) = view
                .conversations(UserId(u), 0, u32::MAX)
                .expect("conversations");
            let convs: BTreeMap<u64, &Conv> = self
                .model
                .convs
                .iter()
                .filter(|((owner, _), _)| *owner == u)
                .map(|((_, conv), state)| (*conv, state))
                .collect();
            assert_eq!(total as usize, convs.len(), "user {u}: conversation count");
            for item in &items {
                let state = convs
                    .get(&item.conv)
                    .unwrap_or_else(|| panic!("user {u}: extra conversation {}", item.conv));
                assert_eq!(
                    item.last_seq, state.last_seq,
                    "user {u} conv {}: last seq",
                    item.conv
                );
                assert_eq!(
                    item.read_seq, state.read_seq,
                    "user {u} conv {}: read mark",
                    item.conv
                );
                assert_eq!(
                    u64::from(item.unread),
                    state.unread,
                    "user {u} conv {}: unread",
                    item.conv
                );
                let mut seqs = Vec::new();
                view.history(UserId(u), item.conv, 0, u32::MAX, usize::MAX, |seq, _| {
                    seqs.push(seq)
                })
                .expect("history reads");
                seqs.reverse();
                let want: Vec<u64> = state.entries.iter().map(|e| e.0).collect();
                assert_eq!(seqs, want, "user {u} conv {}: history", item.conv);
            }
            // Activity order: newest last entry first.
            assert!(items.windows(2).all(|w| w[0].last_seq > w[1].last_seq));

            let (groups, _) = view
                .user_groups(UserId(u), 0, u32::MAX)
                .expect("user groups");
            let got: Vec<u64> = groups.iter().map(|g| g.group_id).collect();
            let want: Vec<u64> = self
                .model
                .groups
                .iter()
                .filter(|(_, g)| g.members.contains(&u))
                .map(|(id, _)| *id)
                .collect();
            assert_eq!(got, want, "user {u}: groups");
            for device in DEVICES {
                let cursor = self
                    .model
                    .cursors
                    .get(&(u, device.to_owned()))
                    .copied()
                    .unwrap_or(0);
                assert_eq!(
                    view.device_acked_seq(UserId(u), device).expect("cursor"),
                    cursor,
                    "user {u} {device}: ack cursor"
                );
            }
        }
        for (group_id, group) in &self.model.groups {
            let info = view
                .group_info(*group_id)
                .expect("group info")
                .expect("the group exists");
            assert_eq!(info.owner_id, group.owner);
            assert_eq!(info.name, group.name);
            let members: BTreeSet<u64> = info.members.iter().map(|m| m.user_id).collect();
            assert_eq!(members, group.members, "group {group_id}: members");
        }
        assert!(
            view.group_info(self.model.next_group_id)
                .expect("group info")
                .is_none()
        );
    }
}

fn start(store: &Store) -> Writer {
    let (tx, results) = crossbeam_channel::unbounded();
    let (handle, thread) =
        spawn_writer(store.clone(), Sink { results: tx }).expect("writer starts");
    Writer::Running {
        handle,
        thread,
        results,
    }
}

/// A stored entry in the model's terms.
fn decode(bytes: &[u8]) -> Entry {
    if is_record(bytes) {
        let record = rkyv::access::<ArchivedRecord, Failure>(&bytes[RECORD_MARKER.len()..])
            .expect("a stored record validates");
        let kind = record.kind.to_native();
        Entry {
            msg_id: record.msg_id.to_native(),
            content: Content::Record {
                kind,
                conv: record.conv.to_native(),
                from: record.from_id.to_native(),
                users: record.users.iter().map(|u| u.to_native()).collect(),
                up_to: record.up_to.to_native(),
                text: record.text.as_str().to_owned(),
            },
        }
    } else {
        let message =
            rkyv::access::<ArchivedMessage, Failure>(bytes).expect("a stored message validates");
        Entry {
            msg_id: message.msg_id.to_native(),
            content: Content::Direct {
                from: message.from_id.to_native(),
                to: message.to_id.to_native(),
                client_msg_id: message.client_msg_id.to_native(),
                text: message.text.as_str().to_owned(),
            },
        }
    }
}
