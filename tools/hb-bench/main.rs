//! hb-bench: what idle heartbeating connections and a message load cost a running node.
//!
//! Opens `--conns` connections (logged in with a token as a few users with distinct device
//! names), pings each every `--interval-ms` with evenly spread phases, and reads the node's
//! /proc/PID/stat (utime+stime) and /proc/PID/status (VmRSS) around each phase. Then runs
//! closed-loop sends from `--senders` users to one recipient and reports acked messages/s
//! with p50/p99 latency. One JSON object on stdout. Users must exist: `hb0..hb{users-1}`,
//! `hbs0..hbs{senders-1}` and `hbr`, all with `--password` (tools/hb-bench/run.sh makes
//! them). Single-threaded mio client; nothing here is used by the node.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use tern::protocol::*;

struct Args {
    server: SocketAddr,
    pid: u32,
    conns: usize,
    users: usize,
    password: String,
    interval_ms: u64,
    beat_s: u64,
    senders: usize,
    inflight: usize,
    msg_s: u64,
    idle_s: u64,
    lone: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        server: "127.0.0.1:7420".parse().unwrap(),
        pid: 0,
        conns: 15_000,
        users: 4,
        password: "pw".into(),
        interval_ms: 10_000,
        beat_s: 30,
        senders: 8,
        inflight: 8,
        msg_s: 10,
        idle_s: 5,
        lone: 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--server" => args.server = value.parse().expect("--server"),
            "--pid" => args.pid = value.parse().expect("--pid"),
            "--conns" => args.conns = value.parse().expect("--conns"),
            "--users" => args.users = value.parse().expect("--users"),
            "--password" => args.password = value,
            "--interval-ms" => args.interval_ms = value.parse().expect("--interval-ms"),
            "--beat-s" => args.beat_s = value.parse().expect("--beat-s"),
            "--senders" => args.senders = value.parse().expect("--senders"),
            "--inflight" => args.inflight = value.parse().expect("--inflight"),
            "--msg-s" => args.msg_s = value.parse().expect("--msg-s"),
            "--idle-s" => args.idle_s = value.parse().expect("--idle-s"),
            "--lone" => args.lone = value.parse().expect("--lone"),
            _ => panic!("unknown flag {flag}"),
        }
    }
    assert!(args.pid != 0, "--pid of the node is required");
    args
}

/// RssAnon of `pid` in KiB: the heap and other private memory, without the LMDB map's
/// file-backed pages (page cache the kernel can reclaim).
fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("RssAnon")
}

/// utime and stime of `pid` in clock ticks.
fn user_sys_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    (fields[11].parse().unwrap(), fields[12].parse().unwrap())
}

/// utime+stime of `pid` in clock ticks, and its VmRSS in KiB.
fn proc_sample(pid: u32) -> (u64, u64) {
    let (user, sys) = user_sys_ticks(pid);
    let ticks = user + sys;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    (ticks, rss_kib)
}

/// Context switches of every thread of `pid` (voluntary + involuntary): each voluntary one
/// is a sleep the thread later wakes from, the cost heartbeat coalescing cuts.
fn context_switches(pid: u32) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("read tasks") {
        let status = std::fs::read_to_string(task.expect("task entry").path().join("status"))
            .unwrap_or_default();
        total += status
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches:")
                    || l.starts_with("nonvoluntary_ctxt_switches:")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    total
}

/// CPU time of every thread of `pid` in ns from the scheduler (/proc/PID/task/*/schedstat):
/// exact, where utime+stime are sampled at clock ticks.
fn sched_ns(pid: u32) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("read tasks") {
        let path = task.unwrap().path().join("schedstat");
        if let Ok(text) = std::fs::read_to_string(path) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

fn ticks_per_s() -> u64 {
    // SAFETY: sysconf reads a constant.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as u64
}

fn frame<T>(kind: Kind, request_id: u32, value: &T) -> Vec<u8>
where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                Vec<u8>,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rkyv::rancor::Failure,
            >,
        >,
{
    let mut out = Vec::new();
    encode(&mut out, kind, request_id, value);
    out
}

/// A blocking password login that returns the token, once per user.
fn token_for(server: SocketAddr, user: &str, password: &str) -> String {
    let mut s = std::net::TcpStream::connect(server).expect("connect");
    s.write_all(&frame(
        Kind::Hello,
        1,
        &Hello {
            protocol_version: PROTOCOL_VERSION,
            client: "hb-bench".into(),
        },
    ))
    .unwrap();
    s.write_all(&frame(
        Kind::Login,
        2,
        &Login {
            user: user.into(),
            device: "hb-seed".into(),
            credential: Credential::Password(password.into()),
        },
    ))
    .unwrap();
    let mut reader = FrameReader::new();
    let mut token = None;
    let mut buf = [0u8; 4096];
    while token.is_none() {
        let n = s.read(&mut buf).expect("read login answer");
        assert!(n > 0, "node closed the seed login of {user}");
        reader
            .feed(&buf[..n], |h, p| {
                if h.kind == Kind::LoginOk {
                    let ok = access::<ArchivedLoginOk>(h.kind, p).unwrap();
                    token = Some(ok.token.as_str().to_owned());
                }
                assert_ne!(h.kind, Kind::Error, "login of {user} refused");
                true
            })
            .unwrap();
    }
    token.unwrap()
}

struct Client {
    stream: TcpStream,
    reader: FrameReader,
    pending: Vec<u8>,
    logged_in: bool,
    closed: bool,
    /// Send start times of this connection's messages in flight, in request order.
    sent_at: VecDeque<Instant>,
}

struct Bench {
    poll: Poll,
    clients: Vec<Client>,
    logged_in: usize,
    pongs: u64,
    acks: u64,
    closed: usize,
    latencies_us: Vec<u64>,
    next_msg_id: u64,
}

impl Bench {
    fn connect(&mut self, server: SocketAddr, index: usize, login: Vec<u8>) -> io::Result<()> {
        // Spread source addresses over 127.0.0.2..=127.0.0.9 so no address runs out of
        // ephemeral ports and connect() never waits for one.
        let source = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (index % 8) as u8)),
            0,
        );
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&source.into())?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        match socket.connect(&server.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut stream = TcpStream::from_std(socket.into());
        self.poll.registry().register(
            &mut stream,
            Token(index),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.clients.push(Client {
            stream,
            reader: FrameReader::new(),
            pending: login,
            logged_in: false,
            closed: false,
            sent_at: VecDeque::new(),
        });
        Ok(())
    }

    fn send(&mut self, index: usize, bytes: &[u8]) {
        let c = &mut self.clients[index];
        if c.closed {
            return;
        }
        c.pending.extend_from_slice(bytes);
        Self::flush(c);
    }

    fn flush(c: &mut Client) {
        while !c.pending.is_empty() {
            match c.stream.write(&c.pending) {
                Ok(n) => {
                    c.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(_) => {
                    c.closed = true;
                    return;
                }
            }
        }
    }

    /// Handles readiness for up to `timeout`.
    fn turn(&mut self, events: &mut Events, timeout: Duration) {
        self.poll.poll(events, Some(timeout)).expect("poll");
        let mut buf = [0u8; 16 * 1024];
        for event in events.iter() {
            let index = event.token().0;
            let c = &mut self.clients[index];
            if c.closed {
                continue;
            }
            if event.is_writable() {
                Self::flush(c);
            }
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        c.closed = true;
                        self.closed += 1;
                        break;
                    }
                    Ok(n) => {
                        let (mut logged_in, mut pongs, mut acks) = (false, 0, 0);
                        let mut latencies = Vec::new();
                        let sent_at = &mut c.sent_at;
                        c.reader
                            .feed(&buf[..n], |h, _| {
                                match h.kind {
                                    Kind::LoginOk => logged_in = true,
                                    Kind::Pong => pongs += 1,
                                    Kind::SendAck => {
                                        acks += 1;
                                        if let Some(at) = sent_at.pop_front() {
                                            latencies.push(at.elapsed().as_micros() as u64);
                                        }
                                    }
                                    Kind::Error => eprintln!("hb-bench: error frame on {index}"),
                                    _ => {}
                                }
                                true
                            })
                            .expect("node sent a malformed frame");
                        if logged_in && !c.logged_in {
                            c.logged_in = true;
                            self.logged_in += 1;
                        }
                        self.pongs += pongs;
                        self.acks += acks;
                        self.latencies_us.extend(latencies);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        c.closed = true;
                        self.closed += 1;
                        break;
                    }
                }
            }
        }
    }

    fn send_message(&mut self, index: usize) {
        self.next_msg_id += 1;
        let id = self.next_msg_id;
        let bytes = frame(
            Kind::Send,
            id as u32,
            &Send {
                to: "hbr".into(),
                client_msg_id: id,
                text: "hb-bench message of a typical chat length, about eighty bytes".into(),
            },
        );
        self.clients[index].sent_at.push_back(Instant::now());
        self.send(index, &bytes);
    }
}

/// Connection i pings at i/N of each interval, from `start` on.
struct PingSchedule {
    start: Instant,
    interval: Duration,
    conns: usize,
    /// Pings sent so far, over all connections.
    sent: u64,
    frame: Vec<u8>,
}

impl PingSchedule {
    /// Sends every ping due by now.
    fn send_due(&mut self, bench: &mut Bench) {
        let elapsed = self.start.elapsed().as_secs_f64();
        let due = (elapsed / self.interval.as_secs_f64() * self.conns as f64) as u64;
        while self.sent < due {
            let index = (self.sent % self.conns as u64) as usize;
            bench.send(index, &self.frame);
            self.sent += 1;
        }
    }
}

/// Quiet time before each lone message: longer than the node's quiet spell (100 ms).
const LONE_GAP_MS: u64 = 400;

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args = parse_args();
    tern::node::prepare_fd_table().expect("raise open-file limit");
    let hello = frame(
        Kind::Hello,
        1,
        &Hello {
            protocol_version: PROTOCOL_VERSION,
            client: "hb-bench".into(),
        },
    );
    let tokens: Vec<String> = (0..args.users)
        .map(|u| token_for(args.server, &format!("hb{u}"), &args.password))
        .collect();
    let mut bench = Bench {
        poll: Poll::new().unwrap(),
        clients: Vec::with_capacity(args.conns + args.senders + 1),
        logged_in: 0,
        pongs: 0,
        acks: 0,
        closed: 0,
        latencies_us: Vec::new(),
        next_msg_id: 0,
    };
    let mut events = Events::with_capacity(4096);
    let (_, rss_before_kib) = proc_sample(args.pid);
    let anon_before_kib = rss_anon_kib(args.pid);

    // Ramp up with a bounded number of logins in flight.
    let ramp_start = Instant::now();
    const LOGINS_IN_FLIGHT_MAX: usize = 512;
    while bench.logged_in < args.conns {
        while bench.clients.len() < args.conns
            && bench.clients.len() - bench.logged_in < LOGINS_IN_FLIGHT_MAX
        {
            let i = bench.clients.len();
            let mut login = hello.clone();
            login.extend(frame(
                Kind::Login,
                2,
                &Login {
                    user: format!("hb{}", i % args.users),
                    device: format!("hb-dev-{i}"),
                    credential: Credential::Token(tokens[i % args.users].clone()),
                },
            ));
            bench.connect(args.server, i, login).expect("connect");
        }
        bench.turn(&mut events, Duration::from_millis(10));
        assert!(
            bench.closed == 0,
            "the node closed connections during ramp-up"
        );
        assert!(
            ramp_start.elapsed() < Duration::from_secs(300),
            "ramp-up took over 5 minutes"
        );
    }
    let ramp_s = ramp_start.elapsed().as_secs_f64();
    // Let the node settle (login work, allocator) before sampling.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(2) {
        bench.turn(&mut events, Duration::from_millis(50));
    }
    let (_, rss_idle_kib) = proc_sample(args.pid);
    let anon_idle_kib = rss_anon_kib(args.pid);
    // Baseline: what the node spends with every connection silent (timers, wake-ups).
    let (idle_ticks_start, _) = proc_sample(args.pid);
    let idle = Instant::now();
    while idle.elapsed() < Duration::from_secs(args.idle_s) {
        bench.turn(&mut events, Duration::from_millis(50));
    }
    let idle_s = idle.elapsed().as_secs_f64();
    let (idle_ticks_end, _) = proc_sample(args.pid);
    let idle_cpu_us_per_s =
        ((idle_ticks_end - idle_ticks_start) * 1_000_000 / ticks_per_s()) as f64 / idle_s;

    // Heartbeats with evenly spread phases: connection i pings at i/N of each interval.
    let interval = Duration::from_millis(args.interval_ms);
    let beat_start = Instant::now();
    let beat_end = beat_start + Duration::from_secs(args.beat_s);
    let (ticks_start, _) = proc_sample(args.pid);
    let (user_start, sys_start) = user_sys_ticks(args.pid);
    let sched_start = sched_ns(args.pid);
    let switches_start = context_switches(args.pid);
    let pongs_start = bench.pongs;
    let mut pings = PingSchedule {
        start: beat_start,
        interval,
        conns: args.conns,
        sent: 0,
        frame: frame(Kind::Ping, 3, &Ping { nonce: 1 }),
    };
    while Instant::now() < beat_end {
        pings.send_due(&mut bench);
        bench.turn(&mut events, Duration::from_millis(2));
    }
    // Collect the last pongs.
    let drain = Instant::now();
    while bench.pongs - pongs_start < pings.sent && drain.elapsed() < Duration::from_secs(5) {
        bench.turn(&mut events, Duration::from_millis(10));
    }
    let (ticks_end, rss_end_kib) = proc_sample(args.pid);
    let (user_end, sys_end) = user_sys_ticks(args.pid);
    let sched_us = (sched_ns(args.pid) - sched_start) / 1000;
    let switches = context_switches(args.pid) - switches_start;
    let beat_elapsed_s = beat_start.elapsed().as_secs_f64();
    let pongs = bench.pongs - pongs_start;
    let beat_pings = pings.sent;
    let cpu_us = (ticks_end - ticks_start) * 1_000_000 / ticks_per_s();

    // Messages: closed loop, `inflight` per sender, to one recipient device.
    let mut msg_report = serde_json::Value::Null;
    if args.senders > 0 && args.msg_s > 0 {
        let first = bench.clients.len();
        let mut logins = Vec::new();
        for s in 0..=args.senders {
            let user = if s == args.senders {
                "hbr".to_owned()
            } else {
                format!("hbs{s}")
            };
            let token = token_for(args.server, &user, &args.password);
            let mut login = hello.clone();
            login.extend(frame(
                Kind::Login,
                2,
                &Login {
                    user,
                    device: "hb-msg".into(),
                    credential: Credential::Token(token),
                },
            ));
            logins.push(login);
        }
        for (k, login) in logins.into_iter().enumerate() {
            bench.connect(args.server, first + k, login).unwrap();
        }
        let wait = Instant::now();
        while bench.logged_in < args.conns + args.senders + 1 {
            bench.turn(&mut events, Duration::from_millis(10));
            assert!(wait.elapsed() < Duration::from_secs(30), "message logins");
        }
        // Idle connections keep pinging on schedule meanwhile, so they do not time out.
        let senders: Vec<usize> = (first..first + args.senders).collect();
        for &s in &senders {
            for _ in 0..args.inflight {
                bench.send_message(s);
            }
        }
        bench.latencies_us.clear();
        let acks_start = bench.acks;
        let msg_start = Instant::now();
        let (msg_ticks_start, _) = proc_sample(args.pid);
        let msg_sched_start = sched_ns(args.pid);
        while msg_start.elapsed() < Duration::from_secs(args.msg_s) {
            pings.send_due(&mut bench);
            bench.turn(&mut events, Duration::from_millis(1));
            for &s in &senders {
                while bench.clients[s].sent_at.len() < args.inflight && !bench.clients[s].closed {
                    bench.send_message(s);
                }
            }
        }
        let msg_elapsed = msg_start.elapsed().as_secs_f64();
        let (msg_ticks_end, _) = proc_sample(args.pid);
        let msg_sched_us = (sched_ns(args.pid) - msg_sched_start) / 1000;
        let acked = bench.acks - acks_start;
        let mut lat = std::mem::take(&mut bench.latencies_us);
        lat.sort_unstable();
        // Lone messages: one at a time, each after a quiet spell of heartbeats longer than
        // the node's (HEARTBEAT_COALESCE_QUIET_MS), so each meets a stretched wait where
        // the loop coalesces; their send → ack latency is what that costs a chat user.
        let mut lone = Vec::new();
        let mut keep_pinging = |bench: &mut Bench, events: &mut Events, until: Instant| {
            while Instant::now() < until {
                pings.send_due(bench);
                bench.turn(events, Duration::from_millis(1));
            }
        };
        let sender = senders[0];
        for _ in 0..args.lone {
            let quiet_until = Instant::now() + Duration::from_millis(LONE_GAP_MS);
            keep_pinging(&mut bench, &mut events, quiet_until);
            if !bench.clients[sender].sent_at.is_empty() || bench.clients[sender].closed {
                continue;
            }
            bench.latencies_us.clear();
            bench.send_message(sender);
            let deadline = Instant::now() + Duration::from_secs(5);
            while bench.latencies_us.is_empty() && Instant::now() < deadline {
                keep_pinging(
                    &mut bench,
                    &mut events,
                    Instant::now() + Duration::from_millis(1),
                );
            }
            lone.append(&mut bench.latencies_us);
        }
        lone.sort_unstable();
        msg_report = serde_json::json!({
            "lone_messages": lone.len(),
            "lone_latency_us_p50": percentile(&lone, 0.50),
            "lone_latency_us_max": lone.last().copied().unwrap_or(0),
            "senders": args.senders,
            "inflight_per_sender": args.inflight,
            "seconds": msg_elapsed,
            "acked": acked,
            "acked_per_s": (acked as f64 / msg_elapsed).round(),
            "latency_us_p50": percentile(&lat, 0.50),
            "latency_us_p99": percentile(&lat, 0.99),
            "server_sched_us_per_msg": msg_sched_us as f64 / acked.max(1) as f64,
            "server_cpu_us_per_msg": ((msg_ticks_end - msg_ticks_start) * 1_000_000 / ticks_per_s()) as f64 / acked.max(1) as f64,
        });
    }

    let report = serde_json::json!({
        "conns": args.conns,
        "ramp_s": ramp_s,
        "rss_before_kib": rss_before_kib,
        "rss_idle_kib": rss_idle_kib,
        "rss_end_kib": rss_end_kib,
        "rss_bytes_per_conn": ((rss_idle_kib.saturating_sub(rss_before_kib)) * 1024) as f64 / args.conns as f64,
        "rss_bytes_per_conn_after_beats": ((rss_end_kib.saturating_sub(rss_before_kib)) * 1024) as f64 / args.conns as f64,
        "rss_anon_bytes_per_conn": ((anon_idle_kib.saturating_sub(anon_before_kib)) * 1024) as f64 / args.conns as f64,
        "heartbeat_s": args.beat_s,
        "idle_s": idle_s,
        "idle_server_cpu_us_per_s": idle_cpu_us_per_s,
        "pings": beat_pings,
        "pongs": pongs,
        "server_cpu_ms": cpu_us as f64 / 1000.0,
        "server_cpu_us_per_heartbeat": cpu_us as f64 / pongs.max(1) as f64,
        "server_sched_us_per_heartbeat": sched_us as f64 / pongs.max(1) as f64,
        "server_user_us_per_heartbeat": ((user_end - user_start) * 1_000_000 / ticks_per_s()) as f64 / pongs.max(1) as f64,
        "server_sys_us_per_heartbeat": ((sys_end - sys_start) * 1_000_000 / ticks_per_s()) as f64 / pongs.max(1) as f64,
        "server_context_switches_per_heartbeat": switches as f64 / pongs.max(1) as f64,
        "server_cpu_us_per_heartbeat_net_of_idle": (cpu_us as f64 - idle_cpu_us_per_s * beat_elapsed_s) / pongs.max(1) as f64,
        "closed_by_node": bench.closed,
        "messages": msg_report,
    });
    println!("{report}");
}
