//! Bounded mailboxes into shard threads, and the commit sink that fills them.
//!
//! The store writer and other shards put messages here; the owning shard drains its
//! mailbox once per loop turn. A producer that finds a mailbox full waits for room (the
//! writer may wait; shards never do, they only send kicks, which are retried next turn).

use std::sync::Arc;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;

use crate::ids::{ConnId, ShardId};
use crate::io::Wake;
use crate::routing::Directory;
use crate::storage::{CommitSink, Delivery, OpResult};

/// Pause of a writer waiting for room in a full mailbox.
const MAILBOX_FULL_BACKOFF: Duration = Duration::from_micros(200);

#[derive(Debug)]
pub enum ShardMsg {
    /// The outcome of a write operation that came from this shard.
    Result(OpResult),
    /// A committed timeline entry for a user with a device on this shard.
    Deliver(Delivery),
    /// Close this connection with `Kicked`: another login replaced its device, or its
    /// tokens were revoked.
    Kick { conn: ConnId, why: KickWhy },
    /// A hashing thread checked the password of a login on this shard.
    Login(super::login::LoginVerdict),
    /// A user watched by `conn` came online or went offline.
    Presence {
        conn: ConnId,
        push: crate::protocol::PresencePush,
    },
    /// Someone is typing to `user`, who has a device on this shard. Never stored.
    Typing {
        user: crate::ids::UserId,
        push: std::sync::Arc<crate::protocol::TypingPush>,
    },
}

/// Why a connection is kicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickWhy {
    /// Another login of the same device (`replaced_by_new_login`).
    Replaced,
    /// Its tokens were revoked (`revoked`); says by what.
    Revoked(&'static str),
}

pub struct Mailbox {
    queue: ArrayQueue<ShardMsg>,
    waker: Arc<dyn Wake>,
}

impl Mailbox {
    pub fn new(capacity: usize, waker: Arc<dyn Wake>) -> Mailbox {
        Mailbox {
            queue: ArrayQueue::new(capacity),
            waker,
        }
    }

    /// Queues `msg` without waking the shard; hands it back when full.
    pub fn try_put(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        self.queue.push(msg)
    }

    /// Queues `msg`, waking the shard and waiting while the mailbox is full.
    pub fn put_waiting(&self, mut msg: ShardMsg) {
        loop {
            match self.queue.push(msg) {
                Ok(()) => return,
                Err(back) => {
                    msg = back;
                    self.waker.wake();
                    std::thread::sleep(MAILBOX_FULL_BACKOFF);
                }
            }
        }
    }

    pub fn take(&self) -> Option<ShardMsg> {
        self.queue.pop()
    }

    pub fn wake(&self) {
        self.waker.wake();
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// Routes each committed batch: results to the shard that asked, entries to every shard
/// with a device of the user. One wake per touched shard per batch.
pub struct Router {
    pub directory: Arc<Directory>,
    pub mailboxes: Arc<[Mailbox]>,
    /// Scratch, reused across batches.
    touched: Vec<bool>,
    shards: Vec<ShardId>,
}

impl Router {
    pub fn new(directory: Arc<Directory>, mailboxes: Arc<[Mailbox]>) -> Router {
        let touched = vec![false; mailboxes.len()];
        Router {
            directory,
            mailboxes,
            touched,
            shards: Vec::new(),
        }
    }
}

impl CommitSink for Router {
    fn committed(&mut self, results: &mut Vec<OpResult>, deliveries: &mut Vec<Delivery>) {
        for result in results.drain(..) {
            let origin = result.origin();
            let shard = origin.shard.0 as usize;
            self.mailboxes[shard].put_waiting(ShardMsg::Result(result));
            self.touched[shard] = true;
        }
        for delivery in deliveries.drain(..) {
            self.shards.clear();
            self.directory.shards_of(delivery.user, &mut self.shards);
            for shard in &self.shards {
                let shard = shard.0 as usize;
                self.mailboxes[shard].put_waiting(ShardMsg::Deliver(delivery.clone()));
                self.touched[shard] = true;
            }
        }
        for (shard, touched) in self.touched.iter_mut().enumerate() {
            if std::mem::take(touched) {
                self.mailboxes[shard].wake();
            }
        }
    }
}
