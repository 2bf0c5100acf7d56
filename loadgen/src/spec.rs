//! What a run is asked to do: the command-line knobs (also the `config` section of the
//! report), their parsed forms, and the slice of the run one worker process carries out.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Args;
use serde::{Deserialize, Serialize};
use tern::limits::GROUP_MEMBERS_MAX;

/// Knobs of one run, as given on the command line.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct RunArgs {
    /// A running node to load.
    #[arg(long, conflicts_with = "spawn")]
    pub server: Option<SocketAddr>,
    /// The node's data folder: users are provisioned there and clients log in with tokens
    /// signed by its secret. Without it (and without --spawn) every client logs in once
    /// with --password, and the users must exist.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Start `tern serve` on a temporary data folder and a free loopback port, stop it
    /// with SIGTERM at the end.
    #[arg(long)]
    pub spawn: bool,
    /// The `tern` binary for --spawn (default: next to this executable, then $PATH).
    #[arg(long)]
    pub tern_bin: Option<PathBuf>,
    /// --durability of the spawned node: fsync or none.
    #[arg(long, default_value = "fsync")]
    pub durability: String,
    /// --shards of the spawned node (default: its own, one per core).
    #[arg(long)]
    pub node_shards: Option<u32>,
    /// --map-size-mib of the spawned node (LMDB map size; default: the node's own). A long
    /// closed-loop run can outgrow the default.
    #[arg(long)]
    pub node_map_size_mib: Option<u64>,
    /// Pid of the --server node, to sample its RSS and CPU.
    #[arg(long)]
    pub node_pid: Option<u32>,
    /// With --spawn: SIGKILL the node this many seconds into the run and restart it on the
    /// same data folder and port. The run must still lose no acknowledged message.
    #[arg(long, conflicts_with = "chaos_every")]
    pub chaos_restart_at: Option<f64>,
    /// With --spawn: the kill loop. SIGKILL the node again and again while sending lasts,
    /// each wait drawn from [SECS/2, 3·SECS/2) by --seed so kills land at every point of
    /// the node's work, and restart it on the same data folder and port each time. The run
    /// must still lose and duplicate nothing.
    #[arg(long)]
    pub chaos_every: Option<f64>,
    /// At the end, check the node's store (`tern check`): every timeline contiguous, every
    /// unread count equal to a recount, every recorded file complete; a problem fails the
    /// run. Needs the data folder (--spawn or --data); on by default with the chaos options.
    #[arg(long)]
    pub audit: bool,
    /// A network outage this many seconds into the run: `--outage-cmd` is run with the
    /// argument `down` then and with `up` --outage-seconds later (tools/netem/run.sh
    /// passes a script that takes the link down and up). The report's `outage` section
    /// says how long the devices took to converge after it and how many reconnect attempts
    /// their backoff made. With several --processes only the first runs the command.
    #[arg(long, requires = "outage_cmd")]
    pub outage_at: Option<f64>,
    /// How long the outage of --outage-at lasts.
    #[arg(long, default_value_t = 20.0)]
    pub outage_seconds: f64,
    /// The command that takes the link down and up (run by `sh -c`, with `down` or `up`
    /// appended). Needs --outage-at.
    #[arg(long, requires = "outage_at")]
    pub outage_cmd: Option<String>,

    /// Simulated devices (connections). Rounded up to whole users of --devices each.
    #[arg(long, default_value_t = 100)]
    pub clients: u32,
    /// Devices per user.
    #[arg(long, default_value_t = 1)]
    pub devices: u32,
    /// Connections opened per second while ramping up.
    #[arg(long, default_value_t = 2000.0)]
    pub ramp: f64,
    /// Client heartbeat (ping) interval in seconds; a spawned node is told the same.
    #[arg(long, default_value_t = 30.0)]
    pub heartbeat: f64,
    /// Seconds from the first connect until sending stops (ramp included); then the run
    /// drains, syncs every device and verifies.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Messages per second over all clients, open loop (latency counted from each send's
    /// intended time). 0: heartbeats only.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Closed loop instead of --rate: every client keeps this many unacknowledged sends.
    #[arg(long)]
    pub window: Option<u32>,
    /// Who sends to whom: pairs, random, or group:K (the users are split into groups of K
    /// members, created on the node before the run; each send goes to the sender's group
    /// and must reach every device of every member once, in order).
    #[arg(long, default_value = "pairs")]
    pub pattern: String,
    /// Message text size in bytes, MIN..MAX (a ~24-byte stamp is always included).
    #[arg(long, default_value = "64..256")]
    pub size: String,
    /// Fraction of clients that go to the background now and then: disconnect for a while,
    /// then reconnect and sync.
    #[arg(long, default_value_t = 0.0)]
    pub background: f64,
    /// Abrupt disconnects per minute over all clients (RST, then reconnect with backoff).
    #[arg(long, default_value_t = 0.0)]
    pub flap: f64,
    /// The reconnect storm: this many seconds into the run every connected client drops
    /// its connection at once (a reset, as when a cell or Wi-Fi network goes away) and
    /// reconnects; `latency_ms.storm` is each client's time from then to its next login
    /// (its max: how long the storm took). The node stays up, so TLS clients resume.
    #[arg(long)]
    pub storm_at: Option<f64>,
    /// What clients speak: tcp (the binary protocol) or tls (the same inside TLS; needs
    /// --ca). `ws` comes with the node's WebSocket port.
    #[arg(long, default_value = "tcp")]
    pub transport: String,
    /// PEM CA certificate TLS clients pin (`ca.pem` from `tern cert generate`).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Name the node's certificate must carry (default: the server's IP address).
    #[arg(long)]
    pub tls_name: Option<String>,
    /// With --spawn: serve TLS only on the node's port with this PEM certificate chain and
    /// --node-tls-key.
    #[arg(long, requires = "node_tls_key")]
    pub node_tls_cert: Option<PathBuf>,
    #[arg(long, requires = "node_tls_cert")]
    pub node_tls_key: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Worker processes the clients are split over.
    #[arg(long, default_value_t = 1)]
    pub processes: u32,
    /// Event-loop threads per worker process (default: one per core).
    #[arg(long)]
    pub threads: Option<u32>,
    /// Source addresses to spread connections over, e.g. 127.0.0.2-127.0.0.9 or a comma
    /// list. Default for a loopback node: 127.0.0.1 with ports chosen here.
    #[arg(long)]
    pub source_ips: Option<String>,
    #[arg(long, default_value = "load-")]
    pub user_prefix: String,
    /// Password of the load users (provisioned with it; used when no token can be minted).
    #[arg(long, default_value = "load-password")]
    pub password: String,
    /// Seconds per interval of the report's `throughput.intervals` (acked msg/s and store
    /// size per interval of the sending window), to see whether throughput holds as the
    /// store grows in a long run.
    #[arg(long, default_value_t = 60.0)]
    pub interval: f64,
    /// Longest wait for the outboxes to drain and for the final sync, each, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub drain_timeout: f64,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write the HTML page here.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// Who a send goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pattern {
    /// Users 2n and 2n+1 talk to each other.
    Pairs,
    /// A uniformly chosen other user of the same worker process.
    Random,
    /// The sender's group: the users of a process are split into groups of this many
    /// members (2..=`GROUP_MEMBERS_MAX`).
    Group(u32),
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, String> {
        match text {
            "pairs" => Ok(Pattern::Pairs),
            "random" => Ok(Pattern::Random),
            _ => {
                let k = text
                    .strip_prefix("group:")
                    .and_then(|k| k.parse::<u32>().ok())
                    .filter(|k| (2..=GROUP_MEMBERS_MAX as u32).contains(k))
                    .ok_or_else(|| {
                        format!(
                            "--pattern {text:?}: expected pairs, random or group:K \
                             (2 <= K <= {GROUP_MEMBERS_MAX})"
                        )
                    })?;
                Ok(Pattern::Group(k))
            }
        }
    }
}

pub fn parse_size(text: &str) -> Result<(u32, u32), String> {
    let bad = || format!("--size {text:?}: expected MIN..MAX bytes, e.g. 64..256");
    let (lo, hi) = match text.split_once("..") {
        Some((lo, hi)) => (lo.trim(), hi.trim()),
        None => (text.trim(), text.trim()),
    };
    let lo: u32 = lo.parse().map_err(|_| bad())?;
    let hi: u32 = hi.parse().map_err(|_| bad())?;
    if lo > hi || hi as usize > tern::limits::MESSAGE_TEXT_SIZE_MAX {
        return Err(format!(
            "--size {text:?}: need MIN <= MAX <= {}",
            tern::limits::MESSAGE_TEXT_SIZE_MAX
        ));
    }
    Ok((lo, hi))
}

/// `a.b.c.d-a.b.c.e` (last octet range, IPv4) or a comma list.
pub fn parse_source_ips(text: &str) -> Result<Vec<IpAddr>, String> {
    let bad = |part: &str| format!("--source-ips: bad address or range {part:?}");
    let mut ips = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((lo, hi)) = part.split_once('-') {
            let lo: std::net::Ipv4Addr = lo.parse().map_err(|_| bad(part))?;
            let hi: std::net::Ipv4Addr = hi.parse().map_err(|_| bad(part))?;
            let (lo, hi) = (u32::from(lo), u32::from(hi));
            if hi < lo || hi - lo > 1024 {
                return Err(bad(part));
            }
            ips.extend((lo..=hi).map(|ip| IpAddr::V4(ip.into())));
        } else {
            ips.push(part.parse().map_err(|_| bad(part))?);
        }
    }
    if ips.is_empty() {
        return Err("--source-ips: empty".into());
    }
    Ok(ips)
}

/// The part of a run one worker process carries out: users `user_lo..user_hi` (global
/// indexes) and all their devices. Recipients are always chosen within the same range, so
/// a process verifies its own deliveries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub args: RunArgs,
    pub server: SocketAddr,
    pub process: u32,
    pub processes: u32,
    pub threads: u32,
    pub user_lo: u32,
    pub user_hi: u32,
    /// Node user ids of `user_lo..user_hi`, when tokens can be minted.
    pub user_ids: Option<Vec<u64>>,
    /// Folder holding the node's secret, when tokens can be minted.
    pub token_dir: Option<PathBuf>,
    /// Marks this run's messages, so an earlier run's left in the timelines are told apart.
    pub run_tag: u32,
    /// Source addresses to bind (empty: let the kernel choose).
    pub source_ips: Vec<IpAddr>,
}

/// Splits users `lo..hi` into groups of `k` contiguous users, as (first, end) ranges. A
/// group needs two members to talk, so a lone last user takes one from the group before
/// it (which keeps `k - 1`), or joins it when `k` is 2. Every group then holds 2 to
/// `max(k, 3)` members, or the whole range when that is shorter.
pub fn group_blocks(lo: u32, hi: u32, k: u32) -> Vec<(u32, u32)> {
    assert!(k >= 2, "a group needs two members");
    let mut blocks: Vec<(u32, u32)> = (lo..hi)
        .step_by(k as usize)
        .map(|first| (first, (first + k).min(hi)))
        .collect();
    if blocks.len() >= 2 && blocks.last().is_some_and(|(a, b)| b - a == 1) {
        let (first, end) = blocks.pop().expect("two blocks");
        let before = blocks.last_mut().expect("one block left");
        if k >= 3 {
            before.1 -= 1;
            blocks.push((first - 1, end));
        } else {
            before.1 = end;
        }
    }
    blocks
}

/// Splits `users` into `processes` contiguous ranges of even length (pairs stay together).
pub fn partition(users: u32, processes: u32) -> Vec<(u32, u32)> {
    let processes = processes.max(1);
    let per = users.div_ceil(processes).next_multiple_of(2).max(2);
    (0..processes)
        .map(|p| ((p * per).min(users), ((p + 1) * per).min(users)))
        .filter(|(lo, hi)| lo < hi)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cover_every_user_once_in_even_ranges() {
        for (users, processes) in [(10, 3), (2, 4), (101, 4), (100_000, 8)] {
            let parts = partition(users, processes);
            assert_eq!(parts.first().map(|p| p.0), Some(0));
            assert_eq!(parts.last().map(|p| p.1), Some(users));
            for w in parts.windows(2) {
                assert_eq!(w[0].1, w[1].0);
                assert_eq!((w[0].1 - w[0].0) % 2, 0);
            }
        }
    }

    #[test]
    fn group_blocks_cover_the_range_with_groups_of_two_or_more() {
        assert_eq!(group_blocks(10, 20, 4), vec![(10, 14), (14, 18), (18, 20)]);
        // A lone last user joins the group before it.
        assert_eq!(group_blocks(0, 9, 4), vec![(0, 4), (4, 7), (7, 9)]);
        assert_eq!(group_blocks(0, 5, 2), vec![(0, 2), (2, 5)]);
        assert_eq!(group_blocks(0, 3, 8), vec![(0, 3)]);
        for (lo, hi, k) in [
            (0, 1000, 7),
            (6, 7, 2),
            (4, 60, 3),
            (0, 2, 256),
            (0, 513, 256),
        ] {
            let blocks = group_blocks(lo, hi, k);
            assert_eq!(blocks.first().map(|b| b.0), Some(lo));
            assert_eq!(blocks.last().map(|b| b.1), Some(hi));
            for w in blocks.windows(2) {
                assert_eq!(w[0].1, w[1].0);
            }
            if hi - lo >= 2 {
                assert!(blocks.iter().all(|(a, b)| b - a >= 2 && b - a <= k.max(3)));
            }
        }
    }

    #[test]
    fn knobs_parse_and_refuse_nonsense() {
        assert_eq!(Pattern::parse("group:5"), Ok(Pattern::Group(5)));
        assert!(Pattern::parse("group:0").is_err());
        assert!(Pattern::parse("group:1").is_err());
        assert!(Pattern::parse("group:257").is_err());
        assert!(Pattern::parse("star").is_err());
        assert_eq!(parse_size("10..20"), Ok((10, 20)));
        assert_eq!(parse_size("100"), Ok((100, 100)));
        assert!(parse_size("20..10").is_err());
        assert!(parse_size("1..1000000").is_err());
        let ips = parse_source_ips("127.0.0.2-127.0.0.4").expect("range");
        assert_eq!(ips.len(), 3);
        assert!(parse_source_ips("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_source_ips("x").is_err());
    }
}
