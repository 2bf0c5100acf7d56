//! Login: token checks on the shard, password checks on the node's hashing threads, and
//! failed-login throttling.
//!
//! A token costs one HMAC and is checked in place. A password costs an argon2id run (tens
//! of ms, 19 MiB), which must never stall a shard's other connections: the shard hands it
//! to `HashPool` (`LOGIN_HASH_THREADS` threads behind a queue of `LOGIN_HASH_QUEUE_MAX`;
//! a full queue answers `busy` at once), and the verdict comes back through the shard's
//! mailbox (`ShardMsg::Login`). The connection waits in the session's logging-in phase
//! meanwhile, holding what its client pipelined. Failed password logins are counted per
//! account and per source address (`auth::LoginThrottle`, one per node); while either
//! must wait, a password login is refused with `throttled` without being checked.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::mailbox::{KickWhy, Mailbox, ShardMsg};
use super::{Shard, storage_failed, wall_clock_ms};
use crate::auth::{self, LoginThrottle, TokenClaims};
use crate::ids::{ConnId, ShardId, UserId};
use crate::limits::{LOGIN_HASH_QUEUE_MAX, LOGIN_HASH_THREADS, LOGIN_THROTTLE_ANSWER_HOLD_MS_MAX};
use crate::protocol::{ErrorCode, LoginOk};
use crate::session::{Credential, Identity};

/// Nice value of the hashing threads: below the shards, so a storm of password checks
/// takes the CPU the shards leave rather than theirs.
const HASH_THREAD_NICE: i32 = 10;

/// A password check for a hashing thread.
#[derive(Debug)]
pub struct PasswordCheck {
    pub shard: ShardId,
    pub conn: ConnId,
    pub request_id: u32,
    /// The account, or None when no user has the name (checked against a stand-in hash so
    /// the answer takes as long as for a real account).
    pub account: Option<UserId>,
    pub name: String,
    pub device: String,
    pub password: String,
    pub phc_hash: String,
    /// The user's token generation when the check was asked for: a password change that
    /// commits meanwhile makes the login fail rather than get a fresh token.
    pub user_generation: u64,
    /// A password change (`ChangePassword`): the new password, hashed on the same thread
    /// once the old one matched.
    pub new_password: Option<String>,
}

/// The outcome of a `PasswordCheck`, back on the connection's shard.
#[derive(Debug)]
pub struct LoginVerdict {
    pub conn: ConnId,
    pub request_id: u32,
    pub account: Option<UserId>,
    pub name: String,
    pub device: String,
    pub valid: bool,
    pub user_generation: u64,
    /// For a password change: the new password's hash (None if hashing failed).
    pub new_hash: Option<Option<String>>,
}

/// The node's password-checking threads. Cheap to clone (a channel sender); the threads
/// end when the last clone is dropped.
#[derive(Clone)]
pub struct HashPool {
    jobs: Sender<PasswordCheck>,
}

impl HashPool {
    /// Starts `LOGIN_HASH_THREADS` threads that answer into `mailboxes`.
    pub fn spawn(mailboxes: Arc<[Mailbox]>) -> std::io::Result<(HashPool, Vec<JoinHandle<()>>)> {
        let (jobs, queue) = crossbeam_channel::bounded(LOGIN_HASH_QUEUE_MAX);
        let mut threads = Vec::with_capacity(LOGIN_HASH_THREADS);
        for i in 0..LOGIN_HASH_THREADS {
            let queue = queue.clone();
            let mailboxes = mailboxes.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("tern-login-{i}"))
                    .spawn(move || hash_thread(queue, mailboxes))?,
            );
        }
        Ok((HashPool { jobs }, threads))
    }

    /// Queues a check; false when the queue is full (or the threads are gone), and the
    /// check is dropped.
    pub fn try_submit(&self, check: PasswordCheck) -> bool {
        match self.jobs.try_send(check) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

fn hash_thread(queue: Receiver<PasswordCheck>, mailboxes: Arc<[Mailbox]>) {
    // SAFETY: setpriority(2) on the calling thread (who = 0; Linux nice values are per
    // thread); a failure only leaves the default priority.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, HASH_THREAD_NICE) };
    static STAND_IN: OnceLock<String> = OnceLock::new();
    while let Ok(check) = queue.recv() {
        let valid = match check.account {
            Some(_) => auth::verify_password(&check.password, &check.phc_hash),
            None => {
                // Same cost as a real check; a password never matches a random salt's
                // hash of a password nobody knows.
                let stand_in = STAND_IN.get_or_init(|| {
                    let mut secret = [0u8; 16];
                    let _ = getrandom::fill(&mut secret);
                    let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
                    auth::hash_password(&secret).unwrap_or_default()
                });
                let _ = auth::verify_password(&check.password, stand_in);
                false
            }
        };
        let new_hash = check
            .new_password
            .map(|new| valid.then(|| auth::hash_password(&new).ok()).flatten());
        let verdict = LoginVerdict {
            conn: check.conn,
            request_id: check.request_id,
            account: check.account,
            name: check.name,
            device: check.device,
            valid,
            user_generation: check.user_generation,
            new_hash,
        };
        let mailbox = &mailboxes[check.shard.0 as usize];
        mailbox.put_waiting(ShardMsg::Login(verdict));
        mailbox.wake();
    }
}

/// A `throttled` answer waiting to be sent (`LOGIN_THROTTLE_ANSWER_HOLD_MS_MAX`).
#[derive(Debug)]
pub(super) struct HeldRefusal {
    /// Shard ms at which to answer.
    due_ms: u64,
    /// Shard ms at which the throttle's wait ends (the answer states what is left).
    wait_end_ms: u64,
    conn: ConnId,
    request_id: u32,
}

/// The node's `LoginThrottle` with the clock it counts in, shared by every shard (a short
/// lock per password login).
pub struct SharedThrottle {
    epoch: Instant,
    inner: Mutex<LoginThrottle>,
}

impl Default for SharedThrottle {
    fn default() -> SharedThrottle {
        SharedThrottle {
            epoch: Instant::now(),
            inner: Mutex::new(LoginThrottle::new()),
        }
    }
}

impl SharedThrottle {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LoginThrottle> {
        // A panic elsewhere cannot leave the records inconsistent: every update is one
        // map operation.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn wait_ms(&self, account: Option<UserId>, address: IpAddr) -> u64 {
        let now_ms = self.now_ms();
        self.lock().wait_ms(account, address, now_ms)
    }

    pub(super) fn failed(&self, account: Option<UserId>, address: IpAddr) {
        let now_ms = self.now_ms();
        self.lock().failed(account, address, now_ms);
    }

    fn succeeded(&self, account: UserId) {
        self.lock().succeeded(account);
    }
}

impl Shard {
    pub(super) fn login(
        &mut self,
        conn_id: ConnId,
        request_id: u32,
        user: String,
        device: String,
        credential: Credential,
        now_ms: u64,
    ) {
        let looked_up = self.ctx.store.read().and_then(|view| {
            let Some(record) = view.user_by_name(&user)? else {
                return Ok(None);
            };
            let generations = view.generations(record.id, &device)?;
            Ok(Some((record, generations)))
        });
        let found = match looked_up {
            Ok(found) => found,
            Err(e) => {
                let (code, message) = storage_failed(e);
                return self.refuse_login(conn_id, request_id, code, &message);
            }
        };
        match credential {
            Credential::Token(token) => {
                // Valid: signed for this device, unexpired, for this user, and issued
                // under the current generations (nothing revoked it since).
                let claims = self
                    .ctx
                    .token_key
                    .verify(&token, &device, wall_clock_ms())
                    .ok();
                match (found, claims) {
                    (Some((record, (user_gen, device_gen))), Some(claims))
                        if claims
                            == (TokenClaims {
                                user: record.id,
                                user_generation: user_gen,
                                device_generation: device_gen,
                            }) =>
                    {
                        self.complete_login(
                            conn_id,
                            request_id,
                            record.id,
                            record.name,
                            device,
                            Some(user_gen),
                            now_ms,
                        )
                    }
                    _ => self.refuse_login(
                        conn_id,
                        request_id,
                        ErrorCode::AuthFailed,
                        "wrong user or credential",
                    ),
                }
            }
            Credential::Password(password) => {
                let user_generation = found.as_ref().map_or(0, |(_, (g, _))| *g);
                let record = found.map(|(record, _)| record);
                let check = PasswordCheck {
                    shard: self.id,
                    conn: conn_id,
                    request_id,
                    account: record.as_ref().map(|r| r.id),
                    // The stored spelling names the session.
                    name: record.as_ref().map_or(user, |r| r.name.clone()),
                    device,
                    password,
                    phc_hash: record.map(|r| r.password_hash).unwrap_or_default(),
                    user_generation,
                    new_password: None,
                };
                self.check_password(check)
            }
        }
    }

    /// Queues a password check on the hashing threads, unless the account or the source
    /// address must wait (then a `throttled` answer is held) or the queue is full (`busy`).
    pub(super) fn check_password(&mut self, check: PasswordCheck) {
        let (conn_id, request_id) = (check.conn, check.request_id);
        let Some(conn) = self.conn_mut(conn_id) else {
            return;
        };
        if conn.is_closing() {
            // A request pipelined behind one that already failed.
            return;
        }
        // A login waits in the session, one per connection; a password change comes from
        // an established connection that could pipeline many, so it is never held.
        let holdable = conn.is_logging_in();
        let address = self.peer(conn_id);
        let wait_ms = self.ctx.throttle.wait_ms(check.account, address);
        if wait_ms > 0 && !holdable {
            let message = format!("too many failed logins; retry in {wait_ms} ms");
            return self.refuse_login(conn_id, request_id, ErrorCode::Throttled, &message);
        }
        if wait_ms > 0 {
            // Answered later, so a guessing loop cannot spin on quick refusals. The
            // connection stays in the table of those waiting to log in meanwhile.
            let now_ms = self.now_ms;
            self.held_refusals.push(HeldRefusal {
                due_ms: now_ms + wait_ms.min(LOGIN_THROTTLE_ANSWER_HOLD_MS_MAX),
                wait_end_ms: now_ms + wait_ms,
                conn: conn_id,
                request_id,
            });
            return;
        }
        if !self.ctx.hash_pool.try_submit(check) {
            self.refuse_login(
                conn_id,
                request_id,
                ErrorCode::Busy,
                "too many password checks in progress; retry later",
            );
        }
    }

    /// Sends the held `throttled` answers that are due; returns ms until the next one.
    pub(super) fn answer_held_refusals(&mut self, now_ms: u64) -> Option<u64> {
        if self.held_refusals.is_empty() {
            return None;
        }
        let mut held = std::mem::take(&mut self.held_refusals);
        held.retain(|refusal| {
            if refusal.due_ms > now_ms {
                return true;
            }
            let left_ms = refusal.wait_end_ms.saturating_sub(now_ms);
            let message = format!("too many failed logins; retry in {left_ms} ms");
            self.refuse_login(
                refusal.conn,
                refusal.request_id,
                ErrorCode::Throttled,
                &message,
            );
            false
        });
        // Connections that closed meanwhile need no answer; the rest stay bounded by the
        // table of connections waiting to log in.
        held.retain(|refusal| self.conn_mut(refusal.conn).is_some());
        let next = held.iter().map(|r| r.due_ms - now_ms).min();
        self.held_refusals = held;
        next
    }

    /// A hashing thread's verdict on a password login of this shard.
    pub(super) fn login_verified(&mut self, verdict: LoginVerdict, now_ms: u64) {
        if verdict.new_hash.is_some() {
            return self.password_change_checked(verdict);
        }
        let address = self.peer(verdict.conn);
        let account = match (verdict.valid, verdict.account) {
            (true, Some(account)) => account,
            _ => {
                // Counted even when the connection is gone: closing it must not hide a guess.
                self.ctx.throttle.failed(verdict.account, address);
                return self.refuse_login(
                    verdict.conn,
                    verdict.request_id,
                    ErrorCode::AuthFailed,
                    "wrong user or credential",
                );
            }
        };
        self.ctx.throttle.succeeded(account);
        self.complete_login(
            verdict.conn,
            verdict.request_id,
            account,
            verdict.name,
            verdict.device,
            Some(verdict.user_generation),
            now_ms,
        );
    }

    /// Where `conn_id` connected from (unspecified if it is gone).
    pub(super) fn peer(&self, conn_id: ConnId) -> IpAddr {
        self.slots
            .get(conn_id.index as usize)
            .filter(|slot| slot.generation == conn_id.generation)
            .map_or(IpAddr::from([0, 0, 0, 0]), |slot| slot.peer)
    }

    /// Answers a login with an error (which closes the connection), if the connection is
    /// still waiting for it.
    pub(super) fn refuse_login(
        &mut self,
        conn_id: ConnId,
        request_id: u32,
        code: ErrorCode,
        message: &str,
    ) {
        let Some(conn) = self.conn_mut(conn_id) else {
            return;
        };
        if conn.is_logging_in() {
            conn.login_failed(request_id, code, message);
        } else {
            // A password change on an established connection.
            conn.fail(request_id, code, message);
        }
        self.mark_dirty(conn_id);
    }

    /// Registers the device, issues a token and answers `LoginOk`, if the connection is
    /// still waiting for it and the user's generation is still `user_generation` (the one
    /// its credential was checked under).
    #[allow(clippy::too_many_arguments)]
    fn complete_login(
        &mut self,
        conn_id: ConnId,
        request_id: u32,
        user_id: UserId,
        name: String,
        device: String,
        user_generation: Option<u64>,
        now_ms: u64,
    ) {
        if !self.conn_mut(conn_id).is_some_and(|c| c.is_logging_in()) {
            return;
        }
        let cursors = self.ctx.store.read().and_then(|view| {
            Ok((
                view.head_seq(user_id)?,
                view.device_acked_seq(user_id, &device)?,
                view.generations(user_id, &device)?,
            ))
        });
        let (head_seq, acked_seq, (user_gen, device_gen)) = match cursors {
            Ok(found) => found,
            Err(e) => {
                let (code, message) = storage_failed(e);
                return self.refuse_login(conn_id, request_id, code, &message);
            }
        };
        if user_generation.is_some_and(|g| g != user_gen) {
            // The password changed (or everything was logged out) while this was checked.
            return self.refuse_login(
                conn_id,
                request_id,
                ErrorCode::AuthFailed,
                "the credentials changed; log in again",
            );
        }
        // Register before answering, so every entry committed from now on is pushed; the
        // client's sync after login covers everything before.
        if let Some(old) = self
            .ctx
            .directory
            .register(user_id, &device, self.id, conn_id)
        {
            self.kick(old.shard, old.conn, KickWhy::Replaced);
        }
        let claims = TokenClaims {
            user: user_id,
            user_generation: user_gen,
            device_generation: device_gen,
        };
        let (token, token_expires_at_ms) =
            self.ctx.token_key.issue(claims, &device, wall_clock_ms());
        let ok = LoginOk {
            user_id: user_id.0,
            token,
            token_expires_at_ms,
            head_seq,
            acked_seq,
        };
        let identity = Identity {
            user: user_id,
            name,
            device,
        };
        let mut requests = std::mem::take(&mut self.requests);
        let session = self.ctx.session.clone();
        let conn = self.conn_mut(conn_id).expect("checked above");
        conn.login_ok(request_id, identity, &ok, now_ms, &session, &mut requests);
        self.requests = requests;
        self.leave_preauth(conn_id);
        self.stats.logins += 1;
        self.online.entry(user_id).or_default().push(conn_id);
        self.presence_connected(user_id);
        self.mark_dirty(conn_id);
        // What the client pipelined behind its login runs now.
        self.handle_requests(conn_id, now_ms);
    }
}
