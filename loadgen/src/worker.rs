//! One worker process: event-loop threads that each own a share of the simulated devices,
//! and the process-level coordination of the run's phases.
//!
//! Thread-per-core like the node: each thread runs one mio loop over its clients' sockets
//! and `ClientSession`s, with their timers in a binary heap. Threads share nothing but the
//! phase flag and per-thread progress flags; measurements go to the process thread once a
//! second, and ledgers at the end.
//!
//! Phases: `Run` (ramp, sends, background and flaps), `Drain` (no new sends; everyone comes
//! back online until every outbox is empty), `FinalSync` (every device syncs again, after
//! the last ack), `Stop`. Only then is delivery verified.

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};
use tern::client::{
    Action, BUSY_RETRY_MS_DEFAULT, BlockingClient, ClientConfig, ClientSession, Event, MemoryStore,
    SendError, TeamAnswer,
};
use tern::protocol::ErrorCode;
use tern::transport::tls::{self, HandshakeKind, Inbound, ServerName, TlsLayer};

use crate::hist::{Hists, Metric, WireHists};
use crate::net::{self, Connector};
use crate::outage::{DeviceOutage, OutageResult, outage_result};
use crate::schedule::OpenLoop;
use crate::spec::{Pattern, WorkerSpec, group_blocks, parse_size};
use crate::sys::{Rng, self_sample, unix_ms};
use crate::verify::{AckedMsg, DeviceLog, To, Verdict, verify};

/// TLS tickets each simulated device keeps (its own cache, as on a phone): the node sends
/// two per handshake (`limits::TLS_TICKETS_PER_HANDSHAKE`).
const TLS_SESSIONS_PER_DEVICE: usize = 2;

/// Bytes read per read call, one buffer per thread.
const READ_BUFFER_SIZE: usize = 64 * 1024;
/// Most events taken per poll.
const EVENTS_PER_POLL: usize = 1024;
/// Most scheduled operations (sends, connects) started in one loop turn, so sockets are
/// still served while a backlog is worked off.
const OPS_PER_TURN_MAX: usize = 2048;
/// Longest poll wait: phase changes are noticed at least this often.
const POLL_WAIT_MAX: Duration = Duration::from_millis(50);
/// How often a draining or syncing thread checks whether all its clients are done (a
/// scan of every client).
const FLAG_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// Foreground and background periods of a background-cycling client, in ms.
const FOREGROUND_MS: (u64, u64) = (5_000, 20_000);
const BACKGROUND_MS: (u64, u64) = (3_000, 15_000);
/// Reconnect attempts before a load client gives up: effectively never within a run (a node
/// restart must not make clients give up).
const RECONNECT_ATTEMPTS_MAX: u32 = 10_000;
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Pause of a client's group sends after the node answered one with `busy`: the same as
/// the session's for 1:1 sends.
const GROUP_BUSY_RETRY: Duration = Duration::from_millis(BUSY_RETRY_MS_DEFAULT);
/// Longest wait for one group to be created before the run (connect, login, create).
const GROUP_SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Device name of the short-lived logins that create the groups, apart from the load
/// devices so their sync state is untouched.
const GROUP_SETUP_DEVICE: &str = "loadgen-setup";

const PHASE_RUN: u8 = 0;
const PHASE_DRAIN: u8 = 1;
const PHASE_FINAL_SYNC: u8 = 2;
const PHASE_STOP: u8 = 3;

const THREAD_BUSY: u8 = 0;
const THREAD_DRAINED: u8 = 1;
const THREAD_SYNCED: u8 = 2;

/// Counters, cumulative or per interval.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Counts {
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub errors: u64,
    pub connects: u64,
    pub logins: u64,
    pub flaps: u64,
    pub background_cycles: u64,
    /// Sends the node answered with `busy` (each is retried after a pause, so the same
    /// message may count more than once).
    pub busy: u64,
    /// TLS handshakes that completed in full, and resumed ones (`--transport tls`).
    #[serde(default)]
    pub tls_full: u64,
    #[serde(default)]
    pub tls_resumed: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.sent += o.sent;
        self.acked += o.acked;
        self.delivered += o.delivered;
        self.errors += o.errors;
        self.connects += o.connects;
        self.logins += o.logins;
        self.flaps += o.flaps;
        self.background_cycles += o.background_cycles;
        self.busy += o.busy;
        self.tls_full += o.tls_full;
        self.tls_resumed += o.tls_resumed;
    }

    fn minus(&self, o: &Counts) -> Counts {
        Counts {
            sent: self.sent - o.sent,
            acked: self.acked - o.acked,
            delivered: self.delivered - o.delivered,
            errors: self.errors - o.errors,
            connects: self.connects - o.connects,
            logins: self.logins - o.logins,
            flaps: self.flaps - o.flaps,
            background_cycles: self.background_cycles - o.background_cycles,
            busy: self.busy - o.busy,
            tls_full: self.tls_full - o.tls_full,
            tls_resumed: self.tls_resumed - o.tls_resumed,
        }
    }
}

/// One second of one worker process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tick {
    /// Seconds since the worker started.
    pub sec: u64,
    /// Established sessions at the end of the second.
    pub connected: u64,
    /// Sends that were due but not yet started at the end of the second: non-zero means
    /// the load generator itself fell behind its schedule.
    pub send_backlog: u64,
    pub counts: Counts,
    pub hists: WireHists,
}

/// Everything a worker process reports at the end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerResult {
    pub clients: u64,
    /// Groups created for a `group:K` run.
    pub groups: u64,
    /// Time taken to create them, before this process's clients started.
    pub group_setup_seconds: f64,
    /// Clients that logged in at least once.
    pub clients_connected: u64,
    pub counts: Counts,
    pub verdict: Verdict,
    /// Sends still unacknowledged when the drain timed out.
    pub unacked: u64,
    pub errors: BTreeMap<String, u64>,
    pub hists: WireHists,
    pub cpu_seconds: f64,
    pub drain_seconds: f64,
    pub final_sync_seconds: f64,
    /// With `--outage-at`: how the devices of this process came through it.
    pub outage: Option<OutageResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WorkerMsg {
    Tick(Tick),
    Done(Box<WorkerResult>),
    Failed(String),
}

struct Shared {
    phase: AtomicU8,
    threads: Vec<AtomicU8>,
}

/// The groups of a `group:K` run in this process (none for other patterns).
#[derive(Debug, Default)]
struct Groups {
    /// Node group id of each group.
    ids: Vec<u64>,
    /// Member users (global indexes) of each group.
    members: Vec<Vec<u32>>,
    /// Group index of each user of the process, by `user - user_lo`.
    of_user: Vec<u32>,
}

/// A group send not yet acknowledged. Group sends do not go through the session's outbox:
/// the load client keeps them, resends them on each new connection and after a `busy`
/// pause, always with the same client message id (the node deduplicates).
#[derive(Debug)]
struct GroupOut {
    client_msg_id: u64,
    text: String,
    /// Intended send time, µs since the epoch.
    intended_us: u64,
    /// Request id on the current connection; None when not on the wire.
    request: Option<u32>,
}

struct ThreadTick {
    sec: u64,
    connected: u64,
    send_backlog: u64,
    counts: Counts,
    hists: Hists,
}

struct ThreadOutcome {
    logs: Vec<DeviceLog>,
    /// Parallel to `logs`; empty without an outage.
    outages: Vec<DeviceOutage>,
    acked: Vec<AckedMsg>,
    hists: Hists,
    counts: Counts,
    errors: BTreeMap<String, u64>,
    unacked: u64,
    clients_connected: u64,
}

/// Runs this process's share of the run; `emit` gets a tick a second and the result.
pub fn run_process(spec: WorkerSpec, emit: &mut dyn FnMut(WorkerMsg)) {
    match run_process_inner(spec, emit) {
        Ok(result) => emit(WorkerMsg::Done(Box::new(result))),
        Err(message) => emit(WorkerMsg::Failed(message)),
    }
}

fn run_process_inner(
    spec: WorkerSpec,
    emit: &mut dyn FnMut(WorkerMsg),
) -> Result<WorkerResult, String> {
    let _ = tern::node::prepare_fd_table();
    let spec = Arc::new(spec);
    let threads = spec.threads.max(1);
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(PHASE_RUN),
        threads: (0..threads).map(|_| AtomicU8::new(THREAD_BUSY)).collect(),
    });
    let tokens = mint_tokens(&spec)?;
    let setup_started = Instant::now();
    let groups = Arc::new(create_groups(&spec, &tokens)?);
    let group_setup_seconds = setup_started.elapsed().as_secs_f64();
    let epoch = Instant::now();
    let (tick_tx, tick_rx) = mpsc::channel::<ThreadTick>();
    let mut handles = Vec::new();
    for t in 0..threads {
        let spec = Arc::clone(&spec);
        let shared = Arc::clone(&shared);
        let tick_tx = tick_tx.clone();
        let tokens = tokens.clone();
        let groups = Arc::clone(&groups);
        let handle = std::thread::Builder::new()
            .name(format!("load-{t}"))
            .spawn(move || -> Result<ThreadOutcome, String> {
                let mut thread =
                    ClientThread::new(spec, shared, groups, t, epoch, tick_tx, &tokens)?;
                thread.run()
            })
            .map_err(|e| format!("spawn thread: {e}"))?;
        handles.push(handle);
    }
    drop(tick_tx);

    let args = &spec.args;
    let run_end = epoch + secs(args.duration);
    let drain_timeout = secs(args.drain_timeout);
    let mut pending: BTreeMap<u64, (u32, ThreadTick)> = BTreeMap::new();
    let mut drain_started = None;
    let mut sync_started = None;
    let mut drain_seconds = 0.0;
    let mut final_sync_seconds = 0.0;
    let mut outage = OutageHook::new(&spec, epoch);
    loop {
        let wait = outage.next_at().map_or(PROCESS_WAIT_MAX, |at| {
            at.saturating_duration_since(Instant::now())
                .min(PROCESS_WAIT_MAX)
        });
        match tick_rx.recv_timeout(wait) {
            Ok(tick) => merge_tick(&mut pending, tick, threads, emit),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        outage.poll(now);
        let all = |state: u8| {
            shared
                .threads
                .iter()
                .all(|s| s.load(Ordering::Acquire) >= state)
        };
        match shared.phase.load(Ordering::Acquire) {
            PHASE_RUN if now >= run_end => {
                drain_started = Some(now);
                shared.phase.store(PHASE_DRAIN, Ordering::Release);
            }
            PHASE_DRAIN => {
                let started = drain_started.expect("set when entering drain");
                if all(THREAD_DRAINED) || now >= started + drain_timeout {
                    drain_seconds = now.duration_since(started).as_secs_f64();
                    sync_started = Some(now);
                    shared.phase.store(PHASE_FINAL_SYNC, Ordering::Release);
                }
            }
            PHASE_FINAL_SYNC => {
                let started = sync_started.expect("set when entering final sync");
                if all(THREAD_SYNCED) || now >= started + drain_timeout {
                    final_sync_seconds = now.duration_since(started).as_secs_f64();
                    shared.phase.store(PHASE_STOP, Ordering::Release);
                }
            }
            _ => {}
        }
    }
    // The link comes back even when the run ended first.
    outage.finish();
    // Threads dropped their senders: they are done. Flush partial seconds.
    for (sec, (_, tick)) in std::mem::take(&mut pending) {
        emit(WorkerMsg::Tick(Tick {
            sec,
            connected: tick.connected,
            send_backlog: tick.send_backlog,
            counts: tick.counts,
            hists: tick.hists.to_wire(),
        }));
    }
    let mut outcomes = Vec::new();
    for handle in handles {
        let outcome = handle
            .join()
            .map_err(|_| "a load thread panicked".to_owned())??;
        outcomes.push(outcome);
    }
    let mut hists = Hists::new();
    let mut counts = Counts::default();
    let mut errors = BTreeMap::new();
    let mut acked = Vec::new();
    let mut logs = Vec::new();
    let mut device_outages = Vec::new();
    let mut unacked = 0;
    let mut clients_connected = 0;
    for outcome in outcomes {
        hists.add(&outcome.hists);
        counts.add(&outcome.counts);
        for (k, v) in outcome.errors {
            *errors.entry(k).or_insert(0) += v;
        }
        acked.extend(outcome.acked);
        logs.extend(outcome.logs);
        device_outages.extend(outcome.outages);
        unacked += outcome.unacked;
        clients_connected += outcome.clients_connected;
    }
    let verdict = verify(&acked, spec.args.devices.max(1), &groups.members, &logs);
    let outage = outage.result().map(|(down, up, command_error)| {
        let us = |at: Instant| at.saturating_duration_since(epoch).as_micros() as u64;
        OutageResult {
            command_error,
            ..outage_result(
                &acked,
                spec.args.devices.max(1),
                &groups.members,
                &logs,
                &device_outages,
                us(down),
                us(up),
            )
        }
    });
    Ok(WorkerResult {
        clients: logs.len() as u64,
        groups: groups.ids.len() as u64,
        group_setup_seconds,
        clients_connected,
        counts,
        verdict,
        unacked,
        errors,
        hists: hists.to_wire(),
        cpu_seconds: self_sample().map_or(0.0, |s| s.cpu_seconds),
        drain_seconds,
        final_sync_seconds,
        outage,
    })
}

/// Longest wait of the process loop between looks at the phase and the outage plan.
const PROCESS_WAIT_MAX: Duration = Duration::from_millis(100);

/// The `--outage-at` plan of one process: the first process runs `--outage-cmd down` and
/// `up` at their times and notes when each returned; the others take the planned times.
struct OutageHook {
    cmd: Option<String>,
    down_at: Option<Instant>,
    up_at: Option<Instant>,
    /// When the link went down and came back, once it did.
    down: Option<Instant>,
    up: Option<Instant>,
    error: Option<String>,
}

impl OutageHook {
    fn new(spec: &WorkerSpec, epoch: Instant) -> OutageHook {
        let args = &spec.args;
        let down_at = args.outage_at.map(|at| epoch + secs(at));
        OutageHook {
            cmd: args.outage_cmd.clone().filter(|_| spec.process == 0),
            down_at,
            up_at: down_at.map(|at| at + secs(args.outage_seconds)),
            down: None,
            up: None,
            error: None,
        }
    }

    fn next_at(&self) -> Option<Instant> {
        match (self.down, self.up) {
            (None, _) => self.down_at,
            (Some(_), None) => self.up_at,
            _ => None,
        }
    }

    fn poll(&mut self, now: Instant) {
        if self.down.is_none() && self.down_at.is_some_and(|at| now >= at) {
            self.down = Some(self.run("down"));
        }
        if self.down.is_some() && self.up.is_none() && self.up_at.is_some_and(|at| now >= at) {
            self.up = Some(self.run("up"));
        }
    }

    fn finish(&mut self) {
        if self.down.is_some() && self.up.is_none() {
            self.up = Some(self.run("up"));
        }
    }

    /// Runs the command with `what`; returns when it finished (the planned time for a
    /// process that does not run it).
    fn run(&mut self, what: &str) -> Instant {
        let Some(cmd) = &self.cmd else {
            let planned = if what == "down" {
                self.down_at
            } else {
                self.up_at
            };
            return planned.expect("an outage is planned");
        };
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{cmd} {what}"))
            .stdin(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                self.error
                    .get_or_insert(format!("outage command `{cmd} {what}`: {s}"));
            }
            Err(e) => {
                self.error
                    .get_or_insert(format!("outage command `{cmd} {what}`: {e}"));
            }
        }
        Instant::now()
    }

    /// (down, up, command error) once the outage happened.
    fn result(&self) -> Option<(Instant, Instant, Option<String>)> {
        Some((self.down?, self.up?, self.error.clone()))
    }
}

fn merge_tick(
    pending: &mut BTreeMap<u64, (u32, ThreadTick)>,
    tick: ThreadTick,
    threads: u32,
    emit: &mut dyn FnMut(WorkerMsg),
) {
    let sec = tick.sec;
    let entry = pending.entry(sec).or_insert_with(|| {
        (
            0,
            ThreadTick {
                sec,
                connected: 0,
                send_backlog: 0,
                counts: Counts::default(),
                hists: Hists::new(),
            },
        )
    });
    entry.0 += 1;
    entry.1.connected += tick.connected;
    entry.1.send_backlog += tick.send_backlog;
    entry.1.counts.add(&tick.counts);
    entry.1.hists.add(&tick.hists);
    if entry.0 == threads {
        let (_, done) = pending.remove(&sec).expect("entry just updated");
        emit(WorkerMsg::Tick(Tick {
            sec,
            connected: done.connected,
            send_backlog: done.send_backlog,
            counts: done.counts,
            hists: done.hists.to_wire(),
        }));
    }
}

/// Tokens for this process's users, when the node's secret is at hand.
fn mint_tokens(spec: &WorkerSpec) -> Result<Option<Arc<Vec<String>>>, String> {
    let (Some(dir), Some(ids)) = (&spec.token_dir, &spec.user_ids) else {
        return Ok(None);
    };
    let key = tern::auth::TokenKey::load_or_create(dir)
        .map_err(|e| format!("read node secret in {}: {e}", dir.display()))?;
    let now = unix_ms();
    // Tokens are bound to their device: one per (user, device), in client order. Fresh
    // users have generation 0 for themselves and every device.
    let devices = spec.args.devices.max(1);
    let key = &key;
    let tokens = ids
        .iter()
        .flat_map(|id| {
            (0..devices).map(move |device| {
                let claims = tern::auth::TokenClaims {
                    user: tern::ids::UserId(*id),
                    user_generation: 0,
                    device_generation: 0,
                };
                key.issue(claims, &format!("dev{device}"), now).0
            })
        })
        .collect();
    Ok(Some(Arc::new(tokens)))
}

/// Creates this process's groups on the node for a `group:K` run: its users split by
/// `group_blocks`, each group created by its first user (the owner) over a short blocking
/// login, in parallel on `spec.threads` threads. Other patterns get no groups.
fn create_groups(spec: &WorkerSpec, tokens: &Option<Arc<Vec<String>>>) -> Result<Groups, String> {
    let Pattern::Group(k) = Pattern::parse(&spec.args.pattern)? else {
        return Ok(Groups::default());
    };
    let blocks = group_blocks(spec.user_lo, spec.user_hi, k);
    let threads = (spec.threads.max(1) as usize).min(blocks.len().max(1));
    let name = |user: u32| format!("{}{}", spec.args.user_prefix, user);
    let setup_key = match &spec.token_dir {
        Some(dir) if tokens.is_some() => Some(
            tern::auth::TokenKey::load_or_create(dir)
                .map_err(|e| format!("read node secret in {}: {e}", dir.display()))?,
        ),
        _ => None,
    };
    let create = |block: usize| -> Result<u64, String> {
        let (first, end) = blocks[block];
        let mut config = ClientConfig::new(name(first), GROUP_SETUP_DEVICE);
        // Tokens are bound to their device: the setup device gets one of its own.
        config = match (tokens, &setup_key, &spec.user_ids) {
            (Some(_), Some(key), Some(ids)) => {
                let claims = tern::auth::TokenClaims {
                    user: tern::ids::UserId(ids[(first - spec.user_lo) as usize]),
                    user_generation: 0,
                    device_generation: 0,
                };
                config.with_token(key.issue(claims, GROUP_SETUP_DEVICE, unix_ms()).0)
            }
            _ => config.with_password(spec.args.password.clone()),
        };
        config.client_name = "tern-loadgen".into();
        let mut client =
            BlockingClient::new(spec.server, config).with_operation_timeout(GROUP_SETUP_TIMEOUT);
        let what = |e: tern::client::ClientError| format!("create group of {}: {e}", name(first));
        client.connect().map_err(what)?;
        let members: Vec<String> = (first + 1..end).map(name).collect();
        let info = client
            .group_create(&format!("load-group-{block}"), &members)
            .map_err(what)?;
        client.close();
        Ok(info.group_id)
    };
    let mut ids = vec![0u64; blocks.len()];
    std::thread::scope(|scope| -> Result<(), String> {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let create = &create;
                let count = blocks.len();
                scope.spawn(move || -> Result<Vec<(usize, u64)>, String> {
                    (t..count)
                        .step_by(threads)
                        .map(|block| create(block).map(|id| (block, id)))
                        .collect()
                })
            })
            .collect();
        for handle in handles {
            let made = handle
                .join()
                .map_err(|_| "a group setup thread panicked".to_owned())??;
            for (block, id) in made {
                ids[block] = id;
            }
        }
        Ok(())
    })?;
    let mut of_user = vec![0u32; (spec.user_hi - spec.user_lo) as usize];
    for (g, &(first, end)) in blocks.iter().enumerate() {
        for user in first..end {
            of_user[(user - spec.user_lo) as usize] = g as u32;
        }
    }
    Ok(Groups {
        ids,
        members: blocks.iter().map(|&(a, b)| (a..b).collect()).collect(),
        of_user,
    })
}

/// Time until every client has been asked to connect.
pub fn ramp_duration(args: &crate::spec::RunArgs) -> Duration {
    secs(f64::from(args.clients) / args.ramp)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// Where a device stands in the final sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FinalSync {
    /// Needs a sync run that starts after the drain.
    Pending,
    /// Such a run is in flight.
    Requested,
    Done,
}

struct Client {
    session: ClientSession<MemoryStore>,
    /// Global client and user index.
    global: u32,
    user: u32,
    /// Node id of this user, learnt at login.
    user_id: u64,
    stream: Option<mio::net::TcpStream>,
    /// The connection's TLS state (`--transport tls`); present exactly while `stream` is
    /// connected.
    tls: Option<Box<TlsLayer>>,
    /// This device's TLS settings with a ticket cache of its own, as a phone keeps one.
    tls_config: Option<Arc<tls::ClientConfig>>,
    /// Dropped by the reconnect storm and not logged in again yet.
    in_storm: bool,
    connecting: bool,
    conn_started: Option<Instant>,
    sync_started: Option<Instant>,
    wbuf: Vec<u8>,
    /// The session timer entry in the heap that is current.
    timer_at: Option<Instant>,
    /// The app timer (background cycle) entry that is current.
    app_at: Option<Instant>,
    cycles_background: bool,
    in_background: bool,
    /// The next `Disconnected` was caused here (a flap), not by the node.
    expect_disconnect: bool,
    logged_in_once: bool,
    /// client_msg_id → (intended µs since epoch, recipient user).
    in_flight: HashMap<u64, (u64, u32)>,
    /// Unacknowledged group sends, oldest first.
    group_out: Vec<GroupOut>,
    /// Group sends wait until this instant (the node said `busy`).
    group_paused_until: Option<Instant>,
    delivered: Vec<u64>,
    /// Arrival times of `delivered`, µs since the epoch; only with an outage.
    delivered_at_us: Vec<u64>,
    /// Connection attempts and logins from the outage on; only with an outage.
    outage: DeviceOutage,
    final_sync: FinalSync,
}

impl Client {
    /// Sends of this client not yet acknowledged, 1:1 and group.
    fn unacked(&self) -> usize {
        self.in_flight.len() + self.group_out.len()
    }

    /// Sends the node has not acknowledged yet: the session's outbox and the group sends.
    fn unacked_at_node(&self) -> usize {
        self.session.outbox_len() + self.group_out.len()
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: Instant,
    client: u32,
    kind: TimerKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    /// The session's `next_timeout`.
    Session,
    /// The background cycle.
    App,
    /// The end of a `busy` pause of group sends.
    GroupRetry,
}

struct ClientThread {
    spec: Arc<WorkerSpec>,
    shared: Arc<Shared>,
    groups: Arc<Groups>,
    /// `busy` answers to group sends (the sessions count those to 1:1 sends).
    group_busy: u64,
    index: u32,
    epoch: Instant,
    poll: Poll,
    clients: Vec<Client>,
    heap: BinaryHeap<std::cmp::Reverse<Timer>>,
    ramp: OpenLoop,
    ramp_next: usize,
    sends: OpenLoop,
    flaps: OpenLoop,
    rng: Rng,
    connector: Connector,
    read_buf: Vec<u8>,
    hists: Hists,
    interval: Hists,
    counts: Counts,
    counts_ticked: Counts,
    errors: BTreeMap<String, u64>,
    acked: Vec<AckedMsg>,
    tick_tx: mpsc::Sender<ThreadTick>,
    next_tick: u64,
    pattern: Pattern,
    size: (u32, u32),
    window: Option<u32>,
    /// The phase this thread last acted on.
    phase: u8,
    next_flag_check: Instant,
    /// With `--outage-at`: when the link is planned to go down (attempts and logins from
    /// then on are kept per device, and every delivery's arrival time).
    outage_down: Option<Instant>,
    /// The name TLS clients check the node's certificate against.
    tls_name: Option<ServerName<'static>>,
    /// When the reconnect storm hits (`--storm-at`); None once it has.
    storm_at: Option<Instant>,
    /// When it did.
    storm_started: Option<Instant>,
    /// Plaintext between a session and its TLS layer (reused allocation).
    plain_buf: Vec<u8>,
}

impl ClientThread {
    fn new(
        spec: Arc<WorkerSpec>,
        shared: Arc<Shared>,
        groups: Arc<Groups>,
        index: u32,
        epoch: Instant,
        tick_tx: mpsc::Sender<ThreadTick>,
        tokens: &Option<Arc<Vec<String>>>,
    ) -> Result<ClientThread, String> {
        let args = &spec.args;
        let devices = args.devices.max(1);
        let threads = spec.threads.max(1);
        let pattern = Pattern::parse(&args.pattern)?;
        let size = parse_size(&args.size)?;
        let mut rng = Rng::new(
            args.seed ^ (u64::from(spec.process) << 48) ^ (u64::from(index) << 32) ^ 0x5EED,
        );
        let (tls_base, tls_name) = match args.transport.as_str() {
            "tcp" => (None, None),
            "tls" => {
                let ca = args
                    .ca
                    .as_deref()
                    .ok_or("--transport tls needs --ca FILE")?;
                let config = tls::client_config(ca).map_err(|e| e.to_string())?;
                let name = tls::server_name(args.tls_name.as_deref(), spec.server)
                    .map_err(|e| e.to_string())?;
                (Some(config), Some(name))
            }
            other => return Err(format!("--transport {other}: tcp or tls")),
        };
        let mut clients = Vec::new();
        let first_client = spec.user_lo * devices;
        let last_client = spec.user_hi * devices;
        for global in (first_client..last_client).filter(|c| (c - first_client) % threads == index)
        {
            let user = global / devices;
            let device = global % devices;
            let name = format!("{}{}", args.user_prefix, user);
            let mut config =
                ClientConfig::new(name, format!("dev{device}")).with_seed(rng.next_u64() | 1);
            match tokens {
                Some(tokens) => {
                    config = config.with_token(tokens[(global - first_client) as usize].clone())
                }
                None => config = config.with_password(args.password.clone()),
            }
            config.client_name = "tern-loadgen".into();
            config.heartbeat_interval = Some(secs(args.heartbeat));
            config.reconnect_attempts_max = RECONNECT_ATTEMPTS_MAX;
            config.backoff_max = BACKOFF_MAX;
            let cycles_background = rng.unit() < args.background;
            clients.push(Client {
                session: ClientSession::new(config, MemoryStore::without_entries()),
                global,
                user,
                user_id: 0,
                stream: None,
                tls: None,
                tls_config: tls_base
                    .as_ref()
                    .map(|base| tls::with_own_session_cache(base, TLS_SESSIONS_PER_DEVICE)),
                in_storm: false,
                connecting: false,
                conn_started: None,
                sync_started: None,
                wbuf: Vec::new(),
                timer_at: None,
                app_at: None,
                cycles_background,
                in_background: false,
                expect_disconnect: false,
                logged_in_once: false,
                in_flight: HashMap::new(),
                group_out: Vec::new(),
                group_paused_until: None,
                delivered: Vec::new(),
                delivered_at_us: Vec::new(),
                outage: DeviceOutage::default(),
                final_sync: FinalSync::Pending,
            });
        }
        let slots = spec.processes * threads;
        let per_thread = |total: f64| total / f64::from(slots);
        let ramp = OpenLoop::new(epoch, per_thread(args.ramp)).with_limit(clients.len() as u64);
        let rate = if args.window.is_some() {
            0.0
        } else {
            args.rate
        };
        // Sending starts when the whole ramp is due, so every sender exists; the run's
        // message rate is measured from then on.
        let sends_start = epoch + ramp_duration(args);
        let connector = Connector::new(
            spec.server,
            spec.source_ips.clone(),
            spec.process * threads + index,
            slots,
        );
        Ok(ClientThread {
            poll: Poll::new().map_err(|e| format!("create poll: {e}"))?,
            shared,
            groups,
            group_busy: 0,
            index,
            epoch,
            clients,
            heap: BinaryHeap::new(),
            ramp,
            ramp_next: 0,
            sends: OpenLoop::new(sends_start, per_thread(rate)),
            flaps: OpenLoop::new(epoch, per_thread(args.flap / 60.0)),
            rng,
            connector,
            read_buf: vec![0; READ_BUFFER_SIZE],
            hists: Hists::new(),
            interval: Hists::new(),
            counts: Counts::default(),
            counts_ticked: Counts::default(),
            errors: BTreeMap::new(),
            acked: Vec::new(),
            tick_tx,
            next_tick: 1,
            pattern,
            size,
            window: args.window,
            phase: PHASE_RUN,
            next_flag_check: epoch,
            outage_down: args.outage_at.map(|at| epoch + secs(at)),
            tls_name,
            storm_at: args.storm_at.map(|s| epoch + secs(s)),
            storm_started: None,
            plain_buf: Vec::new(),
            spec,
        })
    }

    fn run(&mut self) -> Result<ThreadOutcome, String> {
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
        loop {
            let phase = self.shared.phase.load(Ordering::Acquire);
            if phase != self.phase {
                self.enter_phase(phase);
            }
            if self.phase == PHASE_STOP {
                break;
            }
            let now = Instant::now();
            let wait = self.next_wake().map_or(POLL_WAIT_MAX, |at| {
                at.saturating_duration_since(now).min(POLL_WAIT_MAX)
            });
            match self.poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("poll: {e}")),
            }
            let now = Instant::now();
            for event in events.iter() {
                let i = event.token().0;
                if i >= self.clients.len() {
                    continue;
                }
                if event.is_writable() || event.is_error() {
                    self.on_writable(i, now);
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.on_readable(i, now);
                }
                self.pump(i, now);
            }
            self.fire_timers(now);
            self.run_schedules(now);
            self.report_progress(now);
            if self.phase != PHASE_RUN && now >= self.next_flag_check {
                self.next_flag_check = now + FLAG_CHECK_INTERVAL;
                self.update_flags();
            }
        }
        Ok(self.outcome())
    }

    fn next_wake(&self) -> Option<Instant> {
        let mut at = self.heap.peek().map(|t| t.0.at);
        let mut consider = |other: Option<Instant>| {
            if let Some(o) = other {
                at = Some(at.map_or(o, |a| a.min(o)));
            }
        };
        if self.phase == PHASE_RUN {
            consider(self.ramp.next_at());
            consider(self.sends.next_at());
            consider(self.flaps.next_at());
            consider(self.storm_at);
        }
        consider(Some(self.epoch + Duration::from_secs(self.next_tick)));
        at
    }

    fn enter_phase(&mut self, phase: u8) {
        self.phase = phase;
        let now = Instant::now();
        match phase {
            PHASE_DRAIN => {
                // Everyone comes back: the rest of the ramp, background clients, clients
                // that gave up.
                for i in 0..self.clients.len() {
                    let client = &mut self.clients[i];
                    client.in_background = false;
                    client.app_at = None;
                    client.session.connect(now);
                    self.pump(i, now);
                }
                self.ramp_next = self.clients.len();
            }
            PHASE_FINAL_SYNC => {
                for i in 0..self.clients.len() {
                    let client = &mut self.clients[i];
                    if client.session.sync_now(now) {
                        client.final_sync = FinalSync::Requested;
                        client.sync_started = Some(now);
                    }
                    self.pump(i, now);
                }
            }
            _ => {}
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(top) = self.heap.peek() {
            if top.0.at > now {
                break;
            }
            let std::cmp::Reverse(timer) = self.heap.pop().expect("peeked");
            let i = timer.client as usize;
            match timer.kind {
                TimerKind::App => {
                    if self.clients[i].app_at != Some(timer.at) {
                        continue;
                    }
                    self.clients[i].app_at = None;
                    self.app_timer(i, now);
                }
                TimerKind::Session => {
                    if self.clients[i].timer_at != Some(timer.at) {
                        continue;
                    }
                    self.clients[i].timer_at = None;
                    self.clients[i].session.handle_timeout(now);
                }
                TimerKind::GroupRetry => {
                    if self.clients[i].group_paused_until != Some(timer.at) {
                        continue;
                    }
                    self.clients[i].group_paused_until = None;
                    self.issue_group_sends(i, now);
                }
            }
            self.pump(i, now);
        }
    }

    /// A background-cycling client changes state.
    fn app_timer(&mut self, i: usize, now: Instant) {
        if self.phase != PHASE_RUN {
            return;
        }
        let client = &mut self.clients[i];
        let (lo, hi) = if client.in_background {
            client.in_background = false;
            client.session.connect(now);
            FOREGROUND_MS
        } else {
            client.in_background = true;
            client.session.close(now);
            self.counts.background_cycles += 1;
            BACKGROUND_MS
        };
        let at = now + Duration::from_millis(self.rng.between(lo, hi));
        self.set_app_timer(i, at);
    }

    fn set_app_timer(&mut self, i: usize, at: Instant) {
        self.clients[i].app_at = Some(at);
        self.heap.push(std::cmp::Reverse(Timer {
            at,
            client: i as u32,
            kind: TimerKind::App,
        }));
    }

    fn run_schedules(&mut self, now: Instant) {
        if self.phase != PHASE_RUN {
            return;
        }
        let mut budget = OPS_PER_TURN_MAX;
        while budget > 0 && self.ramp.next_due(now).is_some() {
            budget -= 1;
            let i = self.ramp_next;
            self.ramp_next += 1;
            self.clients[i].session.connect(now);
            if self.clients[i].cycles_background {
                let at =
                    now + Duration::from_millis(self.rng.between(FOREGROUND_MS.0, FOREGROUND_MS.1));
                self.set_app_timer(i, at);
            }
            self.pump(i, now);
        }
        while budget > 0 {
            let Some(intended) = self.sends.next_due(now) else {
                break;
            };
            budget -= 1;
            if let Some(i) = self.pick_sender() {
                self.send_from(i, intended, now);
                self.pump(i, now);
            } else {
                *self.errors.entry("no_sender_online".into()).or_insert(0) += 1;
                self.counts.errors += 1;
            }
        }
        if self.storm_at.is_some_and(|at| at <= now) {
            self.storm_at = None;
            self.storm_started = Some(now);
            for i in 0..self.clients.len() {
                if self.clients[i].stream.is_some() {
                    self.clients[i].in_storm = true;
                    self.flap(i, now);
                }
            }
        }
        while budget > 0 && self.flaps.next_due(now).is_some() {
            budget -= 1;
            let i = self.rng.below(self.clients.len().max(1) as u64) as usize;
            if i < self.clients.len() && self.clients[i].session.is_established() {
                self.flap(i, now);
            }
        }
    }

    /// Drops client `i`'s connection with a reset and tells its session the network did it.
    fn flap(&mut self, i: usize, now: Instant) {
        let client = &mut self.clients[i];
        if let Some(mut stream) = client.stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
            net::abort(stream);
        }
        client.wbuf.clear();
        client.tls = None;
        client.connecting = false;
        client.expect_disconnect = true;
        client.session.closed(now);
        self.counts.flaps += 1;
        self.pump(i, now);
    }

    /// A client of this thread that is online and in the foreground; a few random tries,
    /// then any foreground client (its send waits in the outbox, as on a phone).
    fn pick_sender(&mut self) -> Option<usize> {
        let n = self.clients.len() as u64;
        if n == 0 {
            return None;
        }
        let mut fallback = None;
        for _ in 0..8 {
            let i = self.rng.below(n) as usize;
            let client = &self.clients[i];
            if client.in_background || self.ramp_next <= i {
                continue;
            }
            if client.session.is_established() {
                return Some(i);
            }
            fallback.get_or_insert(i);
        }
        fallback
    }

    fn recipients(&mut self, from: u32) -> Vec<u32> {
        let (lo, hi) = (self.spec.user_lo, self.spec.user_hi);
        let span = u64::from(hi - lo);
        match self.pattern {
            Pattern::Pairs => {
                let partner = if from ^ 1 < hi { from ^ 1 } else { lo };
                vec![partner]
            }
            // Group sends go to the sender's group (`group_send`), never through here.
            Pattern::Random | Pattern::Group(_) => {
                let mut tries = 0;
                loop {
                    tries += 1;
                    let to = lo + self.rng.below(span) as u32;
                    if to != from || span == 1 || tries > 8 {
                        break vec![to];
                    }
                }
            }
        }
    }

    fn send_from(&mut self, i: usize, intended: Instant, now: Instant) {
        let from = self.clients[i].user;
        let intended_us = intended.saturating_duration_since(self.epoch).as_micros() as u64;
        if let Pattern::Group(_) = self.pattern {
            return self.group_send(i, intended_us, now);
        }
        for to in self.recipients(from) {
            let len = self
                .rng
                .between(u64::from(self.size.0), u64::from(self.size.1))
                as usize;
            let text = stamp_text(self.spec.run_tag, intended_us, len);
            let to_name = format!("{}{}", self.spec.args.user_prefix, to);
            let client = &mut self.clients[i];
            match client.session.send(&to_name, &text, now) {
                Ok(client_msg_id) => {
                    client.in_flight.insert(client_msg_id, (intended_us, to));
                    self.counts.sent += 1;
                }
                Err(SendError::OutboxFull) => self.error("outbox_full"),
                Err(_) => self.error("send_refused"),
            }
        }
    }

    /// A new message to the sender's group; it goes out now unless the client is offline
    /// or in a `busy` pause.
    fn group_send(&mut self, i: usize, intended_us: u64, now: Instant) {
        let len = self
            .rng
            .between(u64::from(self.size.0), u64::from(self.size.1)) as usize;
        // Random ids, distinct per run: the node deduplicates by (user, id) for good.
        let client_msg_id = (self.rng.next_u64() ^ (u64::from(self.spec.run_tag) << 32)) | 1;
        self.clients[i].group_out.push(GroupOut {
            client_msg_id,
            text: stamp_text(self.spec.run_tag, intended_us, len),
            intended_us,
            request: None,
        });
        self.counts.sent += 1;
        self.issue_group_sends(i, now);
    }

    /// Puts every group send of client `i` that is not on the wire onto it, if the session
    /// is established and not pausing.
    fn issue_group_sends(&mut self, i: usize, now: Instant) {
        let client = &mut self.clients[i];
        if client.group_paused_until.is_some()
            || !client.session.is_established()
            || client.group_out.iter().all(|o| o.request.is_some())
        {
            return;
        }
        let group = self.groups.of_user[(client.user - self.spec.user_lo) as usize];
        let group_id = self.groups.ids[group as usize];
        for out in client.group_out.iter_mut().filter(|o| o.request.is_none()) {
            out.request = client
                .session
                .group_send(group_id, out.client_msg_id, &out.text, now);
        }
    }

    /// The node's answer to a group send of client `i`.
    fn on_group_answer(&mut self, i: usize, request_id: u32, answer: TeamAnswer, now: Instant) {
        let client = &mut self.clients[i];
        let Some(at) = client
            .group_out
            .iter()
            .position(|o| o.request == Some(request_id))
        else {
            return self.error("unexpected_team_answer");
        };
        match answer {
            TeamAnswer::Sent(ack) => {
                let out = client.group_out.remove(at);
                let now_us = now.saturating_duration_since(self.epoch).as_micros() as u64;
                let us = now_us.saturating_sub(out.intended_us);
                self.hists.record_us(Metric::Ack, us);
                self.interval.record_us(Metric::Ack, us);
                let group = self.groups.of_user[(client.user - self.spec.user_lo) as usize];
                self.acked.push(AckedMsg {
                    msg_id: ack.msg_id,
                    from_user: client.user,
                    to: To::Group(group),
                    intended_us: out.intended_us,
                });
                self.counts.acked += 1;
                if self.phase == PHASE_RUN {
                    self.top_up_window(i, now);
                }
            }
            TeamAnswer::Failed { code, .. }
                if ErrorCode::from_u16(code) == Some(ErrorCode::Busy) =>
            {
                self.group_busy += 1;
                client.group_out[at].request = None;
                if client.group_paused_until.is_none() {
                    let until = now + GROUP_BUSY_RETRY;
                    client.group_paused_until = Some(until);
                    self.heap.push(std::cmp::Reverse(Timer {
                        at: until,
                        client: i as u32,
                        kind: TimerKind::GroupRetry,
                    }));
                }
            }
            TeamAnswer::Failed { code, .. } => {
                client.group_out.remove(at);
                let name = ErrorCode::from_u16(code)
                    .map_or_else(|| format!("code_{code}"), |c| c.name().to_owned());
                self.error(&format!("group_send_failed_{name}"));
            }
            _ => {
                client.group_out[at].request = None;
                self.error("unexpected_team_answer");
            }
        }
    }

    /// µs since the epoch.
    fn us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn error(&mut self, what: &str) {
        *self.errors.entry(what.to_owned()).or_insert(0) += 1;
        self.counts.errors += 1;
    }

    fn on_writable(&mut self, i: usize, now: Instant) {
        let client = &mut self.clients[i];
        let Some(stream) = client.stream.as_mut() else {
            return;
        };
        if client.connecting {
            match stream.take_error() {
                Ok(None) => {}
                Ok(Some(_)) | Err(_) => return self.connect_failed(i, now),
            }
            match stream.peer_addr() {
                Ok(_) => {
                    client.connecting = false;
                    if let Some(started) = client.conn_started {
                        self.hists.record_us(
                            Metric::Connect,
                            now.duration_since(started).as_micros() as u64,
                        );
                    }
                    if let (Some(config), Some(name)) = (&client.tls_config, &self.tls_name) {
                        match TlsLayer::client(config, name.clone()) {
                            Ok(layer) => client.tls = Some(Box::new(layer)),
                            Err(_) => {
                                self.error("tls_setup");
                                return self.connect_failed(i, now);
                            }
                        }
                    }
                    // Under TLS the hello waits in the layer until the handshake is done.
                    client.session.connected(now);
                    self.pump(i, now);
                }
                Err(e) if e.kind() == ErrorKind::NotConnected => {}
                Err(_) => self.connect_failed(i, now),
            }
            return;
        }
        self.flush(i, now);
    }

    fn connect_failed(&mut self, i: usize, now: Instant) {
        let client = &mut self.clients[i];
        if let Some(mut stream) = client.stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        client.connecting = false;
        client.wbuf.clear();
        client.tls = None;
        client.session.connect_failed(now);
    }

    fn lost(&mut self, i: usize, now: Instant) {
        let client = &mut self.clients[i];
        if let Some(mut stream) = client.stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        client.connecting = false;
        client.wbuf.clear();
        client.tls = None;
        client.session.closed(now);
    }

    fn on_readable(&mut self, i: usize, now: Instant) {
        loop {
            let client = &mut self.clients[i];
            if client.connecting {
                if let Some(stream) = client.stream.as_ref()
                    && matches!(stream.take_error(), Ok(Some(_)) | Err(_))
                {
                    self.connect_failed(i, now);
                }
                return;
            }
            let Some(stream) = client.stream.as_mut() else {
                return;
            };
            match stream.read(&mut self.read_buf) {
                Ok(0) => return self.lost(i, now),
                Ok(n) => {
                    match client.tls.as_mut() {
                        None => client.session.received(&self.read_buf[..n], now),
                        Some(layer) => {
                            self.plain_buf.clear();
                            let inbound = layer.receive(&self.read_buf[..n], &mut self.plain_buf);
                            // Handshake flights go out now, before anything the session says.
                            layer.take_ciphertext(&mut client.wbuf);
                            match inbound {
                                Ok(Inbound::Open) => {
                                    client.session.received(&self.plain_buf, now);
                                }
                                Ok(Inbound::PeerClosed) => {
                                    client.session.received(&self.plain_buf, now);
                                    return self.lost(i, now);
                                }
                                Err(_) => {
                                    self.error("tls_failed");
                                    return self.lost(i, now);
                                }
                            }
                            self.flush(i, now);
                        }
                    }
                    // Handle what the bytes caused (it may close this socket) before
                    // reading on.
                    self.pump(i, now);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.lost(i, now),
            }
        }
    }

    fn flush(&mut self, i: usize, now: Instant) {
        let client = &mut self.clients[i];
        let Some(stream) = client.stream.as_mut() else {
            return;
        };
        if client.connecting {
            return;
        }
        while !client.wbuf.is_empty() {
            match stream.write(&client.wbuf) {
                Ok(0) => return self.lost(i, now),
                Ok(n) => {
                    client.wbuf.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.lost(i, now),
            }
        }
    }

    /// Carries out what the session asked for and handles its events, until it asks for
    /// nothing more; then re-arms its timer.
    fn pump(&mut self, i: usize, now: Instant) {
        loop {
            let mut progressed = false;
            while let Some(action) = self.clients[i].session.poll_action() {
                progressed = true;
                match action {
                    Action::Connect => self.open(i, now),
                    Action::Disconnect => {
                        let client = &mut self.clients[i];
                        if let Some(mut stream) = client.stream.take() {
                            let _ = self.poll.registry().deregister(&mut stream);
                        }
                        client.connecting = false;
                        client.wbuf.clear();
                        client.tls = None;
                    }
                }
            }
            if self.clients[i].session.transmit_len() > 0 {
                let client = &mut self.clients[i];
                match client.tls.as_mut() {
                    None => client.session.take_transmit(&mut client.wbuf),
                    Some(layer) => {
                        self.plain_buf.clear();
                        client.session.take_transmit(&mut self.plain_buf);
                        layer.send(&self.plain_buf);
                        layer.take_ciphertext(&mut client.wbuf);
                    }
                }
                if client.stream.is_some() {
                    self.flush(i, now);
                } else {
                    client.wbuf.clear();
                }
                progressed = true;
            }
            while let Some(event) = self.clients[i].session.poll_event() {
                progressed = true;
                self.on_event(i, event, now);
            }
            if !progressed {
                break;
            }
        }
        let client = &mut self.clients[i];
        if let Some(at) = client.session.next_timeout()
            && client.timer_at.is_none_or(|current| at < current)
        {
            client.timer_at = Some(at);
            self.heap.push(std::cmp::Reverse(Timer {
                at,
                client: i as u32,
                kind: TimerKind::Session,
            }));
        }
    }

    fn open(&mut self, i: usize, now: Instant) {
        self.counts.connects += 1;
        if self.outage_down.is_some_and(|down| now >= down) {
            let us = self.us(now);
            self.clients[i].outage.attempt(us);
        }
        let global = self.clients[i].global;
        match self.connector.connect(global) {
            Ok(mut stream) => {
                let registered = self.poll.registry().register(
                    &mut stream,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                );
                let client = &mut self.clients[i];
                if registered.is_err() {
                    client.session.connect_failed(now);
                    self.error("register_failed");
                    return;
                }
                client.stream = Some(stream);
                client.connecting = true;
                client.conn_started = Some(now);
                client.wbuf.clear();
            }
            Err(e) => {
                let what = match e.raw_os_error() {
                    Some(libc::EMFILE) | Some(libc::ENFILE) => "connect_out_of_fds",
                    Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => "connect_no_port",
                    _ => "connect_error",
                };
                self.error(what);
                self.clients[i].session.connect_failed(now);
            }
        }
    }

    fn on_event(&mut self, i: usize, event: Event, now: Instant) {
        match event {
            Event::Connected => {}
            Event::AuthOk { user_id, .. } => {
                self.counts.logins += 1;
                if self.outage_down.is_some_and(|down| now >= down) {
                    let us = self.us(now);
                    self.clients[i].outage.login(us);
                }
                let client = &mut self.clients[i];
                client.user_id = user_id;
                client.logged_in_once = true;
                match client.tls.as_ref().and_then(|layer| layer.handshake_kind()) {
                    Some(HandshakeKind::Resumed) => self.counts.tls_resumed += 1,
                    Some(_) => self.counts.tls_full += 1,
                    None => {}
                }
                if std::mem::take(&mut client.in_storm)
                    && let Some(storm) = self.storm_started
                {
                    let us = now.duration_since(storm).as_micros() as u64;
                    self.hists.record_us(Metric::Storm, us);
                }
                if let Some(started) = client.conn_started {
                    let us = now.duration_since(started).as_micros() as u64;
                    self.hists.record_us(Metric::Login, us);
                }
                // The login's own sync run started after this instant.
                client.sync_started = Some(now);
                if self.phase == PHASE_FINAL_SYNC && client.final_sync != FinalSync::Done {
                    client.final_sync = FinalSync::Requested;
                }
                // A new connection: every unacknowledged group send goes out again.
                for out in &mut self.clients[i].group_out {
                    out.request = None;
                }
                self.issue_group_sends(i, now);
                if self.phase == PHASE_RUN {
                    self.top_up_window(i, now);
                }
            }
            Event::ConnectFailed { .. } => self.error("connect_failed"),
            Event::Disconnected { .. } => {
                let client = &mut self.clients[i];
                for out in &mut client.group_out {
                    out.request = None;
                }
                if client.final_sync == FinalSync::Requested {
                    client.final_sync = FinalSync::Pending;
                }
                if std::mem::take(&mut client.expect_disconnect) {
                    return;
                }
                self.error("disconnected");
            }
            Event::AuthFailed { .. } => self.error("auth_failed"),
            Event::NodeError { code, .. } => {
                let name = tern::protocol::ErrorCode::from_u16(code)
                    .map_or_else(|| format!("code_{code}"), |c| c.name().to_owned());
                self.error(&format!("node_error_{name}"));
            }
            // Records other than group messages (delivery receipts for this user's sends,
            // membership changes) are the node's bookkeeping, not workload messages: they
            // are neither counted nor verified.
            Event::Message(message) if !message.is_message() => {}
            Event::Message(message) => {
                self.counts.delivered += 1;
                let at_us = self.us(now);
                let keep_times = self.outage_down.is_some();
                let client = &mut self.clients[i];
                client.delivered.push(message.msg_id);
                if keep_times {
                    client.delivered_at_us.push(at_us);
                }
                if message.from_id != client.user_id
                    && let Some(intended_us) = parse_stamp(&message.text, self.spec.run_tag)
                {
                    let now_us = now.saturating_duration_since(self.epoch).as_micros() as u64;
                    let us = now_us.saturating_sub(intended_us);
                    self.hists.record_us(Metric::E2e, us);
                    self.interval.record_us(Metric::E2e, us);
                }
            }
            Event::SendAcked {
                client_msg_id,
                msg_id,
                ..
            } => {
                let client = &mut self.clients[i];
                if let Some((intended_us, to)) = client.in_flight.remove(&client_msg_id) {
                    let now_us = now.saturating_duration_since(self.epoch).as_micros() as u64;
                    let us = now_us.saturating_sub(intended_us);
                    self.hists.record_us(Metric::Ack, us);
                    self.interval.record_us(Metric::Ack, us);
                    self.acked.push(AckedMsg {
                        msg_id,
                        from_user: client.user,
                        to: To::User(to),
                        intended_us,
                    });
                    self.counts.acked += 1;
                }
                if self.phase == PHASE_RUN {
                    self.top_up_window(i, now);
                }
            }
            Event::SendFailed { client_msg_id, .. } => {
                self.clients[i].in_flight.remove(&client_msg_id);
                self.error("send_failed");
            }
            Event::Kicked { .. } => self.error("kicked"),
            Event::Offline => {
                self.error("offline");
                // A load client never stays offline during drain: it must deliver its outbox.
                if self.phase != PHASE_RUN {
                    self.clients[i].session.connect(now);
                }
            }
            Event::SyncDone { .. } => {
                let client = &mut self.clients[i];
                if let Some(started) = client.sync_started.take() {
                    let us = now.duration_since(started).as_micros() as u64;
                    self.hists.record_us(Metric::Sync, us);
                }
                match client.final_sync {
                    FinalSync::Requested if self.phase == PHASE_FINAL_SYNC => {
                        client.final_sync = FinalSync::Done;
                    }
                    // That run started before the drain ended: one more.
                    FinalSync::Pending
                        if self.phase == PHASE_FINAL_SYNC && client.session.sync_now(now) =>
                    {
                        client.final_sync = FinalSync::Requested;
                        client.sync_started = Some(now);
                    }
                    _ => {}
                }
            }
            // Only while the run lasts: the drain and the final sync of every device at
            // once are the verifier's load, not the workload's.
            Event::Pong { rtt } if self.phase == PHASE_RUN => {
                let us = rtt.as_micros() as u64;
                self.hists.record_us(Metric::Heartbeat, us);
                self.interval.record_us(Metric::Heartbeat, us);
            }
            Event::Team { request_id, answer } => self.on_group_answer(i, request_id, answer, now),
            Event::Pong { .. }
            | Event::TimelinePage { .. }
            | Event::Presence { .. }
            | Event::Typing { .. } => {}
        }
    }

    /// Closed loop: keeps `window` sends of this client unacknowledged.
    fn top_up_window(&mut self, i: usize, now: Instant) {
        let Some(window) = self.window else {
            return;
        };
        let mut guard = 0;
        while self.clients[i].unacked() < window as usize && guard < window {
            guard += 1;
            self.send_from(i, now, now);
        }
    }

    fn report_progress(&mut self, now: Instant) {
        let tick_at = self.epoch + Duration::from_secs(self.next_tick);
        if now < tick_at {
            return;
        }
        let connected = self
            .clients
            .iter()
            .filter(|c| c.session.is_established())
            .count() as u64;
        self.count_busy();
        let delta = self.counts.minus(&self.counts_ticked);
        self.counts_ticked = self.counts;
        let hists = std::mem::take(&mut self.interval);
        let send_backlog = if self.phase == PHASE_RUN {
            self.sends.backlog(now)
        } else {
            0
        };
        let _ = self.tick_tx.send(ThreadTick {
            sec: self.next_tick,
            connected,
            send_backlog,
            counts: delta,
            hists,
        });
        self.next_tick += 1;
    }

    fn update_flags(&mut self) {
        let flag = &self.shared.threads[self.index as usize];
        match self.phase {
            PHASE_DRAIN => {
                let drained = self
                    .clients
                    .iter()
                    .all(|c| c.session.is_established() && c.unacked_at_node() == 0);
                if drained {
                    flag.store(THREAD_DRAINED, Ordering::Release);
                }
            }
            // Devices that lost their sync run to a disconnect retry after login.
            PHASE_FINAL_SYNC if self.clients.iter().all(|c| c.final_sync == FinalSync::Done) => {
                flag.store(THREAD_SYNCED, Ordering::Release);
            }
            _ => {}
        }
    }

    /// Brings `counts.busy` up to date: the sessions count `busy` answers to 1:1 sends.
    fn count_busy(&mut self) {
        let sessions: u64 = self.clients.iter().map(|c| c.session.busy_answers()).sum();
        self.counts.busy = sessions + self.group_busy;
    }

    fn outcome(&mut self) -> ThreadOutcome {
        // The last partial second.
        self.count_busy();
        let delta = self.counts.minus(&self.counts_ticked);
        let connected = self
            .clients
            .iter()
            .filter(|c| c.session.is_established())
            .count() as u64;
        let _ = self.tick_tx.send(ThreadTick {
            sec: self.next_tick,
            connected,
            send_backlog: 0,
            counts: delta,
            hists: std::mem::take(&mut self.interval),
        });
        let logs = self
            .clients
            .iter_mut()
            .map(|c| DeviceLog {
                client: c.global,
                delivered: std::mem::take(&mut c.delivered),
                delivered_at_us: std::mem::take(&mut c.delivered_at_us),
                synced: c.final_sync == FinalSync::Done,
            })
            .collect();
        let outages = if self.outage_down.is_some() {
            self.clients
                .iter_mut()
                .map(|c| std::mem::take(&mut c.outage))
                .collect()
        } else {
            Vec::new()
        };
        ThreadOutcome {
            logs,
            outages,
            acked: std::mem::take(&mut self.acked),
            hists: std::mem::take(&mut self.hists),
            counts: self.counts,
            errors: std::mem::take(&mut self.errors),
            unacked: self
                .clients
                .iter()
                .map(|c| c.unacked_at_node() as u64)
                .sum(),
            clients_connected: self.clients.iter().filter(|c| c.logged_in_once).count() as u64,
        }
    }
}

/// The text of a load message: `<run tag>.<intended µs>.` then filler up to `len` bytes.
pub fn stamp_text(run_tag: u32, intended_us: u64, len: usize) -> String {
    let mut text = format!("{run_tag:08x}.{intended_us}.");
    while text.len() < len {
        text.push('x');
    }
    text
}

/// The intended send time of a message of this run, None for anything else.
pub fn parse_stamp(text: &str, run_tag: u32) -> Option<u64> {
    let mut fields = text.splitn(3, '.');
    let tag = u32::from_str_radix(fields.next()?, 16).ok()?;
    if tag != run_tag {
        return None;
    }
    fields.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_foreign_texts_are_ignored() {
        let text = stamp_text(0xabc, 123_456, 100);
        assert_eq!(text.len(), 100);
        assert_eq!(parse_stamp(&text, 0xabc), Some(123_456));
        assert_eq!(parse_stamp(&text, 0xabd), None);
        assert_eq!(parse_stamp("hello", 0xabc), None);
        // A size below the stamp's own length gives just the stamp.
        assert_eq!(parse_stamp(&stamp_text(1, 2, 0), 1), Some(2));
    }
}
