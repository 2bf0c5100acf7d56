//! The coordinator of one run: node (spawned or given), provisioning, worker processes,
//! per-second progress, node sampling, and the report.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

use crate::hist::{Hists, Metric, Summary, summary};
use crate::meter::NodeMeter;
use crate::node::{SpawnedNode, find_tern};
use crate::outage::OutageResult;
use crate::spec::{Pattern, RunArgs, WorkerSpec, parse_size, parse_source_ips, partition};
use crate::sys::{ProcSample, Rng, dir_size_bytes, proc_sample, self_sample};
use crate::worker::{Counts, Tick, WorkerMsg, WorkerResult, run_process};

/// What a run produced.
pub struct RunOutcome {
    pub report: Value,
    pub passed: bool,
    pub summary: String,
}

/// One second of the whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Second {
    pub t: u64,
    pub connected: u64,
    /// Sends due but not yet started by the load generator (it fell behind).
    pub send_backlog: u64,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub errors: u64,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    pub heartbeat_p99_ms: f64,
    /// Sends answered `busy` by the node in this second.
    pub busy: u64,
    /// Connection attempts (sockets opened, first connects and reconnects) in this second.
    pub connects: u64,
    /// Logins completed in this second.
    pub logins: u64,
    pub node_rss_bytes: u64,
    pub node_cpu_pct: f64,
    /// Bytes the node had written to storage in this second (`/proc/PID/io`); 0 when
    /// unknown.
    pub node_disk_write_bytes: u64,
    /// Size of the node's data folder at the end of this second; 0 when unknown.
    pub store_bytes: u64,
    pub loadgen_cpu_pct: f64,
}

struct Partial {
    processes: u32,
    connected: u64,
    send_backlog: u64,
    counts: Counts,
    hists: Hists,
}

fn validate(args: &RunArgs) -> Result<(), String> {
    Pattern::parse(&args.pattern)?;
    parse_size(&args.size)?;
    if args.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    if args.devices == 0 || args.devices > 64 {
        return Err("--devices must be 1..=64".into());
    }
    if args.heartbeat.is_nan() || args.heartbeat < 0.01 {
        return Err("--heartbeat must be at least 0.01 s".into());
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        return Err("--rate must be a non-negative number".into());
    }
    if args.ramp.is_nan() || args.ramp <= 0.0 {
        return Err("--ramp must be positive".into());
    }
    if !(0.0..=1.0).contains(&args.background) {
        return Err("--background is a fraction in 0..=1".into());
    }
    if args.interval.is_nan() || args.interval < 1.0 {
        return Err("--interval must be at least 1 s".into());
    }
    if args.flap.is_nan() || args.flap < 0.0 || args.duration.is_nan() || args.duration <= 0.0 {
        return Err("--flap must be >= 0 and --duration > 0".into());
    }
    if args.window == Some(0) {
        return Err("--window must be at least 1".into());
    }
    if args.processes == 0 || args.processes > 256 {
        return Err("--processes must be 1..=256".into());
    }
    if args.chaos_restart_at.is_some() && !args.spawn {
        return Err("--chaos-restart-at needs --spawn".into());
    }
    if let Some(every) = args.chaos_every {
        if !args.spawn {
            return Err("--chaos-every needs --spawn".into());
        }
        if every.is_nan() || every < CHAOS_EVERY_MIN_SECONDS {
            return Err(format!(
                "--chaos-every must be at least {CHAOS_EVERY_MIN_SECONDS} s"
            ));
        }
    }
    if let Some(at) = args.outage_at {
        let seconds = args.outage_seconds;
        if !(at >= 0.0 && seconds > 0.0 && at + seconds < args.duration) {
            return Err(
                "--outage-at and --outage-seconds: the link must come back before --duration"
                    .into(),
            );
        }
    }
    if !args.spawn && args.server.is_none() {
        return Err("give --server ADDR or --spawn".into());
    }
    if !matches!(args.durability.as_str(), "fsync" | "none") {
        return Err("--durability is fsync or none".into());
    }
    Ok(())
}

/// Shortest mean wait of `--chaos-every`: a node needs a moment after its ready line to
/// take logins, or the loop would only ever kill it while clients are still reconnecting.
const CHAOS_EVERY_MIN_SECONDS: f64 = 0.5;
/// Mixed into --seed for the kill loop's waits, so they do not repeat the workers' draws.
const CHAOS_SEED_SALT: u64 = 0x6b69_6c6c_6c6f_6f70;

/// When to SIGKILL the spawned node, from the start of the run. `--chaos-every SECS`:
/// waits drawn from [SECS/2, 3·SECS/2) by --seed, as many as fit before sending stops, so
/// the number of kills follows from the arguments alone and the run ends on a node that
/// had time to settle. A kill whose moment passes while the node is still restarting
/// happens as soon as it is back.
fn chaos_plan(args: &RunArgs) -> Vec<Duration> {
    if let Some(at) = args.chaos_restart_at {
        return vec![Duration::from_secs_f64(at)];
    }
    let Some(every) = args.chaos_every else {
        return Vec::new();
    };
    let mut rng = Rng::new(args.seed ^ CHAOS_SEED_SALT);
    let mut plan = Vec::new();
    let mut at = 0.0;
    loop {
        at += every * (0.5 + rng.unit());
        if at >= args.duration {
            return plan;
        }
        plan.push(Duration::from_secs_f64(at));
    }
}

pub fn run(args: &RunArgs) -> Result<RunOutcome, String> {
    validate(args)?;
    let devices = args.devices;
    let users = args.clients.div_ceil(devices);
    let sending = args.rate > 0.0 || args.window.is_some();
    if sending && users < 2 {
        return Err("sending needs at least 2 users (--clients / --devices)".into());
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));

    let mut node = None;
    let (server, data_dir, node_pid) = if args.spawn {
        let bin = find_tern(args.tern_bin.as_deref())?;
        let mut extra = vec![
            "--durability".to_owned(),
            args.durability.clone(),
            "--heartbeat-ms".to_owned(),
            ((args.heartbeat * 1000.0).round() as u64)
                .max(10)
                .to_string(),
        ];
        if let Some(shards) = args.node_shards {
            extra.extend(["--shards".to_owned(), shards.to_string()]);
        }
        if let Some(mib) = args.node_map_size_mib {
            extra.extend(["--map-size-mib".to_owned(), mib.to_string()]);
        }
        if let (Some(cert), Some(key)) = (&args.node_tls_cert, &args.node_tls_key) {
            extra.extend([
                "--tls-cert".to_owned(),
                cert.display().to_string(),
                "--tls-key".to_owned(),
                key.display().to_string(),
            ]);
        }
        let spawned = SpawnedNode::start(&bin, extra)?;
        let out = (
            spawned.addr,
            Some(spawned.data.clone()),
            Some(spawned.pid()),
        );
        node = Some(spawned);
        out
    } else {
        (
            args.server.expect("validated"),
            args.data.clone(),
            args.node_pid,
        )
    };
    let result = run_with_node(
        args,
        server,
        data_dir.as_deref(),
        node_pid,
        &mut node,
        users,
        threads,
    );
    if let Some(node) = node {
        let status = node.stop();
        if !args.quiet {
            eprintln!("tern-loadgen: node stopped ({status})");
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn run_with_node(
    args: &RunArgs,
    server: SocketAddr,
    data_dir: Option<&Path>,
    node_pid: Option<u32>,
    node: &mut Option<SpawnedNode>,
    users: u32,
    threads: u32,
) -> Result<RunOutcome, String> {
    // CPU of this process before the run: a capacity search runs many in one process.
    let own_cpu_start = self_sample().map_or(0.0, |s| s.cpu_seconds);
    let provision_started = Instant::now();
    let user_ids = match data_dir {
        Some(dir) => Some(provision(dir, &args.user_prefix, users, &args.password)?),
        None => None,
    };
    let provision_seconds = provision_started.elapsed().as_secs_f64();
    if !args.quiet {
        eprintln!(
            "tern-loadgen: {} users ready in {:.2} s ({}), node {server}",
            users,
            provision_seconds,
            if user_ids.is_some() {
                "token logins"
            } else {
                "password logins"
            }
        );
    }
    let source_ips = match &args.source_ips {
        Some(text) => parse_source_ips(text)?,
        None if server.ip().is_loopback() && server.is_ipv4() => {
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
        }
        None => Vec::new(),
    };
    let run_tag =
        (args.seed as u32) ^ (std::process::id().rotate_left(16)) ^ crate::sys::unix_ms() as u32;
    let parts = partition(users, args.processes);
    let processes = parts.len() as u32;
    let specs: Vec<WorkerSpec> = parts
        .iter()
        .enumerate()
        .map(|(p, &(lo, hi))| WorkerSpec {
            args: args.clone(),
            server,
            process: p as u32,
            processes,
            threads,
            user_lo: lo,
            user_hi: hi,
            user_ids: user_ids
                .as_ref()
                .map(|ids| ids[lo as usize..hi as usize].to_vec()),
            token_dir: user_ids.as_ref().and(data_dir.map(Path::to_path_buf)),
            run_tag,
            source_ips: source_ips.clone(),
        })
        .collect();

    let (tx, rx) = mpsc::channel::<(u32, WorkerMsg)>();
    let mut worker_pids = Vec::new();
    let mut spec_files = Vec::new();
    let started = Instant::now();
    if processes == 1 {
        let spec = specs.into_iter().next().expect("one partition");
        let tx = tx.clone();
        std::thread::spawn(move || {
            run_process(spec, &mut |msg| {
                let _ = tx.send((0, msg));
            })
        });
    } else {
        let exe = std::env::current_exe().map_err(|e| format!("locate this executable: {e}"))?;
        for spec in specs {
            let p = spec.process;
            let file = std::env::temp_dir()
                .join(format!("tern-loadgen-spec-{}-{p}.json", std::process::id()));
            let text = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
            std::fs::write(&file, text).map_err(|e| format!("write {}: {e}", file.display()))?;
            let mut child = Command::new(&exe)
                .arg("worker")
                .arg("--spec")
                .arg(&file)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("start worker {p}: {e}"))?;
            spec_files.push(file);
            worker_pids.push(child.id());
            let stdout = child.stdout.take().expect("stdout was piped");
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut finished = false;
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<WorkerMsg>(&line) {
                        Ok(msg) => {
                            finished |= !matches!(msg, WorkerMsg::Tick(_));
                            let _ = tx.send((p, msg));
                        }
                        Err(e) => {
                            let _ =
                                tx.send((p, WorkerMsg::Failed(format!("bad worker line: {e}"))));
                            finished = true;
                        }
                    }
                }
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                if !finished {
                    let _ = tx.send((
                        p,
                        WorkerMsg::Failed(format!("worker exited early ({status})")),
                    ));
                }
            });
        }
    }
    drop(tx);

    let mut partial: BTreeMap<u64, Partial> = BTreeMap::new();
    let mut seconds: Vec<Second> = Vec::new();
    let mut results: Vec<Option<Result<WorkerResult, String>>> = vec![None; processes as usize];
    let mut samples: Vec<Option<ProcSample>> = Vec::new();
    let mut loadgen_samples: Vec<f64> = Vec::new();
    // All loadgen processes together: what the simulated devices cost this machine.
    let mut loadgen_rss_peak = 0u64;
    let mut node_cpu_base = 0.0;
    let mut node_pid = node_pid;
    let node_start = node_pid.and_then(proc_sample);
    let mut meter = NodeMeter::start(node_pid);
    // Bytes written over the run at each sample (None: unknown), and the store's size.
    let mut disk_samples: Vec<Option<u64>> = Vec::new();
    let mut store_samples: Vec<Option<u64>> = Vec::new();
    let store_bytes_start = data_dir.and_then(dir_size_bytes);
    let mut next_sample = started + Duration::from_secs(1);
    let chaos_plan: Vec<Instant> = chaos_plan(args)
        .into_iter()
        .map(|at| started + at)
        .collect();
    let mut chaos_next = 0;
    let mut chaos_error = None;
    // The kill loop also keeps an upload in progress, as its own device of the first user.
    let chaos = args.chaos_every.is_some() || args.chaos_restart_at.is_some();
    let uploader = chaos.then(|| {
        crate::uploader::Uploader::start(
            server,
            format!("{}0", args.user_prefix),
            args.password.clone(),
        )
    });
    let mut totals = Counts::default();
    let mut last_node: Option<ProcSample> = node_start;
    while results.iter().any(Option::is_none) {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok((p, WorkerMsg::Tick(tick))) => {
                merge_second(&mut partial, tick, processes, &mut |sec, part| {
                    totals.add(&part.counts);
                    let second = to_second(sec, &part);
                    if !args.quiet {
                        progress_line(&second, &totals, samples.get(sec as usize - 1));
                    }
                    seconds.push(second);
                });
                let _ = p;
            }
            Ok((p, WorkerMsg::Done(result))) => results[p as usize] = Some(Ok(*result)),
            Ok((p, WorkerMsg::Failed(message))) => results[p as usize] = Some(Err(message)),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        if now >= next_sample {
            next_sample += Duration::from_secs(1);
            let sample = node_pid.and_then(proc_sample).map(|mut s| {
                s.cpu_seconds += node_cpu_base;
                s
            });
            if sample.is_some() {
                last_node = sample;
            }
            samples.push(sample);
            disk_samples.push(meter.sample());
            store_samples.push(data_dir.and_then(dir_size_bytes));
            let workers: Vec<ProcSample> = worker_pids
                .iter()
                .filter_map(|pid| proc_sample(*pid))
                .collect();
            let me = self_sample().unwrap_or_default();
            let own =
                me.cpu_seconds - own_cpu_start + workers.iter().map(|s| s.cpu_seconds).sum::<f64>();
            loadgen_samples.push(own);
            let rss = me.rss_bytes + workers.iter().map(|s| s.rss_bytes).sum::<u64>();
            loadgen_rss_peak = loadgen_rss_peak.max(rss);
        }
        if let Some(at) = chaos_plan.get(chaos_next)
            && now >= *at
        {
            chaos_next += 1;
            if let Some(spawned) = node.as_mut() {
                node_cpu_base = last_node.map_or(0.0, |s| s.cpu_seconds);
                if !args.quiet {
                    eprintln!(
                        "tern-loadgen: chaos: SIGKILL node {} and restart",
                        spawned.pid()
                    );
                }
                // The killed process's counters end at its last reading.
                match spawned.kill_and_restart() {
                    Ok(()) => {
                        node_pid = Some(spawned.pid());
                        meter.restarted(spawned.pid());
                    }
                    Err(e) => chaos_error = Some(e),
                }
            }
        }
    }
    for (sec, part) in std::mem::take(&mut partial) {
        totals.add(&part.counts);
        seconds.push(to_second(sec, &part));
    }
    seconds.sort_by_key(|s| s.t);
    for file in spec_files {
        let _ = std::fs::remove_file(file);
    }
    let node_end = node_pid.and_then(proc_sample).map(|mut s| {
        s.cpu_seconds += node_cpu_base;
        s
    });
    meter.sample();
    let usage = meter.usage();
    let store_bytes_end = data_dir.and_then(dir_size_bytes);
    // Node columns of the time series, second k from the sample taken k seconds in.
    for (i, second) in seconds.iter_mut().enumerate() {
        let k = second.t as usize;
        let _ = i;
        if let Some(Some(sample)) = samples.get(k.wrapping_sub(1)) {
            second.node_rss_bytes = sample.rss_bytes;
            let prev = if k >= 2 {
                samples[k - 2].map_or(sample.cpu_seconds, |s| s.cpu_seconds)
            } else {
                node_start.map_or(sample.cpu_seconds, |s| s.cpu_seconds)
            };
            second.node_cpu_pct = ((sample.cpu_seconds - prev) * 100.0).max(0.0);
        }
        if k >= 1
            && let Some(Some(bytes)) = disk_samples.get(k - 1)
        {
            let prev = if k >= 2 {
                disk_samples[k - 2].unwrap_or(*bytes)
            } else {
                0
            };
            second.node_disk_write_bytes = bytes.saturating_sub(prev);
        }
        if k >= 1
            && let Some(Some(bytes)) = store_samples.get(k - 1)
        {
            second.store_bytes = *bytes;
        }
        if k >= 1 && k <= loadgen_samples.len() {
            let prev = if k >= 2 { loadgen_samples[k - 2] } else { 0.0 };
            second.loadgen_cpu_pct = ((loadgen_samples[k - 1] - prev) * 100.0).max(0.0);
        }
    }

    let mut failures = Vec::new();
    let mut merged = Hists::new();
    let mut verdict = crate::verify::Verdict::default();
    let mut counts = Counts::default();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let (mut clients_total, mut clients_connected, mut unacked) = (0, 0, 0);
    let mut groups = 0;
    let mut group_setup_seconds = 0.0f64;
    let mut worker_cpu = 0.0;
    let (mut drain_seconds, mut final_sync_seconds) = (0.0f64, 0.0f64);
    let mut outage: Option<OutageResult> = None;
    for (p, result) in results.into_iter().enumerate() {
        match result {
            Some(Ok(r)) => {
                merged.add(&Hists::from_wire(&r.hists)?);
                verdict.add(&r.verdict);
                counts.add(&r.counts);
                for (k, v) in r.errors {
                    *errors.entry(k).or_insert(0) += v;
                }
                clients_total += r.clients;
                groups += r.groups;
                group_setup_seconds = group_setup_seconds.max(r.group_setup_seconds);
                clients_connected += r.clients_connected;
                unacked += r.unacked;
                worker_cpu += r.cpu_seconds;
                drain_seconds = drain_seconds.max(r.drain_seconds);
                final_sync_seconds = final_sync_seconds.max(r.final_sync_seconds);
                match (&mut outage, r.outage) {
                    (Some(merged), Some(o)) => merged.add(&o),
                    (merged, o) => *merged = merged.take().or(o),
                }
            }
            Some(Err(e)) => failures.push(format!("worker {p}: {e}")),
            None => failures.push(format!("worker {p}: no result")),
        }
    }
    if let Some(e) = chaos_error {
        failures.push(e);
    }
    if let Some(e) = outage.as_ref().and_then(|o| o.command_error.clone()) {
        failures.push(e);
    }
    if args.outage_at.is_some() && outage.is_none() {
        // An outage that did not happen proves nothing.
        failures.push("outage: planned, but no worker saw it happen".into());
    }
    let restarts = node.as_ref().map_or(0, |n| n.restarts);
    if restarts as usize != chaos_plan.len() {
        // A kill that did not happen proves nothing: fail rather than pass on fewer.
        failures.push(format!(
            "chaos: {restarts} of {} planned kills happened",
            chaos_plan.len()
        ));
    }
    let uploads = uploader.map(|uploader| {
        let log = uploader.finish();
        let user = format!("{}0", args.user_prefix);
        let verified = crate::uploader::verify(server, &user, &args.password, &log);
        (log, verified)
    });
    if let Some((_, Err(e))) = &uploads {
        failures.push(format!("uploads: {e}"));
    }
    let audit_wanted = args.audit || chaos;
    let audit = match data_dir {
        Some(dir) if audit_wanted => Some(audit_store(dir)),
        _ => None,
    };
    match &audit {
        Some(Err(e)) => failures.push(format!("store audit: {e}")),
        Some(Ok(found)) if !found.is_clean() => failures.push(format!(
            "store audit: {} timeline gaps, {} missing messages, {} unread mismatches, \
             {} bad files; first: {:?}",
            found.timeline_gaps,
            found.missing_messages,
            found.unread_mismatches,
            found.bad_files,
            found.details.first()
        )),
        _ => {}
    }
    let own_cpu = self_sample().map_or(0.0, |s| s.cpu_seconds) - own_cpu_start;
    // One process: the workers' threads are this process's. Several: their own totals.
    let loadgen_cpu = if processes == 1 {
        own_cpu
    } else {
        worker_cpu + own_cpu
    };
    let wall = started.elapsed().as_secs_f64();

    let rss_peak = samples
        .iter()
        .flatten()
        .map(|s| s.rss_bytes)
        .chain(node_end.map(|s| s.rss_bytes))
        .max();
    let node_cpu = match (node_start, node_end) {
        (Some(a), Some(b)) => Some(b.cpu_seconds - a.cpu_seconds),
        _ => None,
    };
    // The sending window: from the end of the ramp to the end of the run, in whole
    // seconds of the time series (second t covers t-1..t).
    let ramp_seconds = crate::worker::ramp_duration(args).as_secs_f64();
    let window: Vec<&Second> = seconds
        .iter()
        .filter(|s| (s.t as f64) > ramp_seconds.ceil() && (s.t as f64) <= args.duration)
        .collect();
    let acked_per_second = if window.is_empty() {
        0.0
    } else {
        window.iter().map(|s| s.acked).sum::<u64>() as f64 / window.len() as f64
    };
    let passed = failures.is_empty() && verdict.passed() && unacked == 0;
    let per_acked = |bytes: Option<f64>| {
        bytes
            .filter(|_| counts.acked > 0)
            .map(|b| b / counts.acked as f64)
    };
    let store_growth = match (store_bytes_start, store_bytes_end) {
        (Some(a), Some(b)) => Some(b as f64 - a as f64),
        _ => None,
    };
    let throughput = throughput_intervals(&window, args.interval, usage.disk_write_bytes.is_some());
    let lat = |m: Metric| summary(merged.get(m));
    let report = json!({
        "config": {
            "args": args,
            "users": users,
            "clients": users * args.devices,
            "processes": processes,
            "groups": groups,
            "threads_per_process": threads,
            "server": server.to_string(),
            "node": if node.is_some() { "spawned" } else { "given" },
            "logins": if user_ids.is_some() { "token" } else { "password" },
            "source_ips": source_ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
        },
        "passed": passed,
        "failures": failures,
        "clients": {
            "total": clients_total,
            "connected": clients_connected,
            "failed": clients_total - clients_connected,
            "peak_connected": seconds.iter().map(|s| s.connected).max().unwrap_or(0),
        },
        "messages": {
            "sent": counts.sent,
            "acked": counts.acked,
            "delivered": verdict.delivered,
            "deliveries_expected": verdict.expected,
            "lost": verdict.lost,
            "duplicated": verdict.duplicated,
            "out_of_order": verdict.out_of_order,
            "unacked_at_end": unacked,
            "foreign": verdict.foreign,
            "offered_per_second": if args.window.is_some() { Value::Null } else { json!(args.rate) },
            "acked_per_second": acked_per_second,
            "busy_rejections": counts.busy,
        },
        "verification": {
            "passed": verdict.passed() && unacked == 0,
            "devices_verified": verdict.devices_verified,
            "devices_unverified": verdict.devices_unverified,
        },
        "latency_ms": Metric::ALL
            .iter()
            .map(|m| (m.name().to_owned(), json!(lat(*m))))
            .collect::<serde_json::Map<String, Value>>(),
        "server": {
            "pid": node_pid,
            "restarts": restarts,
            "kills_planned": chaos_plan.len(),
            "rss_bytes": {
                "start": node_start.map(|s| s.rss_bytes),
                "peak": rss_peak,
                "end": node_end.map(|s| s.rss_bytes),
            },
            "cpu_seconds": node_cpu,
            "disk_write_bytes": usage.disk_write_bytes,
            "disk_write_bytes_per_acked_message": per_acked(usage.disk_write_bytes.map(|b| b as f64)),
            "store_bytes": store_bytes_end,
            "store_bytes_start": store_bytes_start,
            "store_growth_bytes_per_acked_message": per_acked(store_growth),
            "threads": usage.threads_cpu_seconds,
            "uploads": uploads.as_ref().map(|(log, verified)| json!({
                "completed": log.completed.len(),
                "resumed": log.resumed,
                "interrupted": log.interrupted,
                "verified": verified.as_ref().ok(),
            })),
            "store_audit": audit.as_ref().and_then(|a| a.as_ref().ok()).map(|a| json!({
                "clean": a.is_clean(),
                "users": a.users,
                "timeline_entries": a.timeline_entries,
                "timeline_gaps": a.timeline_gaps,
                "missing_messages": a.missing_messages,
                "conversations": a.conversations,
                "unread_mismatches": a.unread_mismatches,
                "files": a.files,
                "bad_files": a.bad_files,
                "journal_entries": a.journal_entries,
            })),
        },
        "throughput": throughput,
        "loadgen": {
            "cpu_seconds": loadgen_cpu,
            "rss_bytes_peak": loadgen_rss_peak,
            "send_backlog_max": seconds.iter().map(|s| s.send_backlog).max().unwrap_or(0),
        },
        "events": {
            "connects": counts.connects,
            "logins": counts.logins,
            "flaps": counts.flaps,
            "background_cycles": counts.background_cycles,
            "tls_full_handshakes": counts.tls_full,
            "tls_resumed_handshakes": counts.tls_resumed,
        },
        "errors": errors,
        "phases": {
            "provision_seconds": provision_seconds,
            "group_setup_seconds": group_setup_seconds,
            "ramp_seconds": ramp_seconds,
            "run_seconds": args.duration,
            "drain_seconds": drain_seconds,
            "final_sync_seconds": final_sync_seconds,
            "wall_seconds": wall,
        },
        "outage": outage.as_ref().map(|o| outage_section(o, &seconds)),
        "timeseries": seconds,
    });
    let summary = human_summary(&report);
    if let Some(path) = &args.report {
        write_file(path, &serde_json::to_string_pretty(&report).expect("json"))?;
    }
    if let Some(path) = &args.html {
        write_file(path, &crate::html::run_page(&report))?;
    }
    Ok(RunOutcome {
        report,
        passed,
        summary,
    })
}

/// Seconds of the time series shown around an outage, at most: enough for the longest
/// backoff to play out several times.
const OUTAGE_SECONDS_SHOWN_MAX: u64 = 300;

/// The report's `outage` section: the merged result, and connection attempts, logins and
/// connected devices per second from the second the link went down until a second after
/// the devices converged (or came back, whichever is later), to show how the reconnect
/// backoff spread the attempts.
fn outage_section(o: &OutageResult, seconds: &[Second]) -> Value {
    let down_s = o.down_us as f64 / 1e6;
    let up_s = o.up_us as f64 / 1e6;
    let settled_s = up_s
        + o.converged_seconds
            .unwrap_or(0.0)
            .max(o.reconnected_seconds.unwrap_or(0.0));
    // Second t covers (t-1, t].
    let first = down_s.floor() as u64 + 1;
    let last = (settled_s.ceil() as u64 + 1).min(first + OUTAGE_SECONDS_SHOWN_MAX);
    let shown: Vec<&Second> = seconds
        .iter()
        .filter(|s| s.t >= first && s.t <= last)
        .collect();
    let peak = shown.iter().max_by_key(|s| s.connects);
    json!({
        "down_at_s": down_s,
        "up_at_s": up_s,
        "converged_seconds": o.converged_seconds,
        "deliveries_pending_at_up": o.deliveries_pending_at_up,
        "reconnected_seconds": o.reconnected_seconds,
        "devices_reconnected": o.devices_reconnected,
        "devices_not_back": o.devices_not_back,
        "connect_attempts": o.connect_attempts,
        "connect_attempts_per_device_max": o.connect_attempts_per_device_max,
        "connect_attempts_peak": peak.map_or(0, |s| s.connects),
        "connect_attempts_peak_second": peak.map(|s| s.t),
        "first_second": first,
        "connect_attempts_per_second": shown.iter().map(|s| s.connects).collect::<Vec<_>>(),
        "logins_per_second": shown.iter().map(|s| s.logins).collect::<Vec<_>>(),
        "connected_per_second": shown.iter().map(|s| s.connected).collect::<Vec<_>>(),
    })
}

/// Throughput per `interval_s` seconds of the sending window (whole seconds of the time
/// series), and the last full interval's acked rate over the first's.
fn throughput_intervals(window: &[&Second], interval_s: f64, disk_known: bool) -> Value {
    let len = (interval_s.round() as usize).max(1);
    let intervals: Vec<Value> = window
        .chunks(len)
        .map(|chunk| {
            let seconds = chunk.len() as u64;
            let acked: u64 = chunk.iter().map(|s| s.acked).sum();
            let last = chunk.last().expect("chunks are not empty");
            json!({
                "from_s": chunk[0].t - 1,
                "to_s": last.t,
                "full": chunk.len() == len,
                "acked": acked,
                "acked_per_second": acked as f64 / seconds as f64,
                "busy": chunk.iter().map(|s| s.busy).sum::<u64>(),
                "e2e_p99_ms_max": chunk.iter().map(|s| s.e2e_p99_ms).fold(0.0, f64::max),
                "disk_write_bytes": disk_known
                    .then(|| chunk.iter().map(|s| s.node_disk_write_bytes).sum::<u64>()),
                "store_bytes_end": (last.store_bytes > 0).then_some(last.store_bytes),
            })
        })
        .collect();
    let full: Vec<f64> = intervals
        .iter()
        .filter(|i| i["full"].as_bool() == Some(true))
        .filter_map(|i| i["acked_per_second"].as_f64())
        .collect();
    let last_over_first = match (full.first(), full.last()) {
        (Some(first), Some(last)) if full.len() >= 2 && *first > 0.0 => Some(last / first),
        _ => None,
    };
    json!({
        "interval_seconds": len,
        "intervals": intervals,
        "last_over_first": last_over_first,
    })
}

pub fn write_file(path: &Path, text: &str) -> Result<(), String> {
    let mut file =
        std::fs::File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    file.write_all(text.as_bytes())
        .map_err(|e| format!("write {}: {e}", path.display()))
}

/// `Store::audit` of the node's data folder, opened beside the running node.
fn audit_store(dir: &Path) -> Result<tern::storage::Audit, String> {
    let store = tern::storage::Store::open_beside_node(dir, &tern::storage::StoreConfig::default())
        .map_err(|e| format!("open store in {}: {e}", dir.display()))?;
    store.audit().map_err(|e| e.to_string())
}

/// Creates (or finds) the load users in the node's data folder; returns their ids.
fn provision(dir: &Path, prefix: &str, users: u32, password: &str) -> Result<Vec<u64>, String> {
    let store = tern::storage::Store::open(dir, &tern::storage::StoreConfig::default())
        .map_err(|e| format!("open store in {}: {e}", dir.display()))?;
    let hash = tern::auth::hash_password(password).map_err(|e| e.to_string())?;
    let bulk = store
        .add_users_bulk(prefix, 0, u64::from(users), &hash)
        .map_err(|e| format!("provision users: {e}"))?;
    Ok(bulk.ids.into_iter().map(|id| id.0).collect())
}

fn merge_second(
    partial: &mut BTreeMap<u64, Partial>,
    tick: Tick,
    processes: u32,
    done: &mut dyn FnMut(u64, Partial),
) {
    let hists = Hists::from_wire(&tick.hists).unwrap_or_default();
    let entry = partial.entry(tick.sec).or_insert_with(|| Partial {
        processes: 0,
        connected: 0,
        send_backlog: 0,
        counts: Counts::default(),
        hists: Hists::new(),
    });
    entry.processes += 1;
    entry.connected += tick.connected;
    entry.send_backlog += tick.send_backlog;
    entry.counts.add(&tick.counts);
    entry.hists.add(&hists);
    if entry.processes == processes {
        let part = partial.remove(&tick.sec).expect("present");
        done(tick.sec, part);
    }
}

fn to_second(sec: u64, part: &Partial) -> Second {
    let ack: Summary = summary(part.hists.get(Metric::Ack));
    let e2e = summary(part.hists.get(Metric::E2e));
    let hb = summary(part.hists.get(Metric::Heartbeat));
    Second {
        t: sec,
        connected: part.connected,
        send_backlog: part.send_backlog,
        sent: part.counts.sent,
        acked: part.counts.acked,
        delivered: part.counts.delivered,
        errors: part.counts.errors,
        busy: part.counts.busy,
        connects: part.counts.connects,
        logins: part.counts.logins,
        ack_p50_ms: ack.p50,
        ack_p99_ms: ack.p99,
        e2e_p50_ms: e2e.p50,
        e2e_p99_ms: e2e.p99,
        heartbeat_p99_ms: hb.p99,
        ..Second::default()
    }
}

fn progress_line(second: &Second, totals: &Counts, node: Option<&Option<ProcSample>>) {
    let node = match node {
        Some(Some(sample)) => format!("  node rss {} MiB", sample.rss_bytes >> 20),
        _ => String::new(),
    };
    eprintln!(
        "[{:>4}s] connected {:>6}  sent {:>6}/s  acked {:>6}/s  delivered {:>7}/s  ack p99 {:>8.2} ms  e2e p99 {:>8.2} ms  hb p99 {:>7.2} ms  errors {}{}",
        second.t,
        second.connected,
        second.sent,
        second.acked,
        second.delivered,
        second.ack_p99_ms,
        second.e2e_p99_ms,
        second.heartbeat_p99_ms,
        totals.errors,
        node
    );
}

fn human_summary(r: &Value) -> String {
    let g = |path: &str| -> Value {
        let mut v = r;
        for key in path.split('.') {
            v = &v[key];
        }
        v.clone()
    };
    let num = |path: &str| g(path).as_f64().unwrap_or(0.0);
    let int = |path: &str| g(path).as_u64().unwrap_or(0);
    let mib = |path: &str| {
        g(path).as_u64().map_or("-".to_owned(), |b| {
            format!("{:.1} MiB", b as f64 / 1048576.0)
        })
    };
    let lat = |name: &str| {
        format!(
            "{:<10} p50 {:>8.2}  p99 {:>8.2}  p99.9 {:>8.2}  max {:>8.2} ms  (n={})",
            name,
            num(&format!("latency_ms.{name}.p50")),
            num(&format!("latency_ms.{name}.p99")),
            num(&format!("latency_ms.{name}.p999")),
            num(&format!("latency_ms.{name}.max")),
            int(&format!("latency_ms.{name}.count")),
        )
    };
    let mut out = String::new();
    let verdict = if r["passed"].as_bool() == Some(true) {
        "PASSED"
    } else {
        "FAILED"
    };
    out.push_str(&format!("tern-loadgen run {verdict}\n"));
    for failure in r["failures"].as_array().into_iter().flatten() {
        out.push_str(&format!("  failure: {}\n", failure.as_str().unwrap_or("?")));
    }
    out.push_str(&format!(
        "clients     {} total, {} connected, {} never connected, peak {} at once\n",
        int("clients.total"),
        int("clients.connected"),
        int("clients.failed"),
        int("clients.peak_connected"),
    ));
    out.push_str(&format!(
        "messages    {} sent, {} acked ({:.1}/s over the run), {} unacked at end\n",
        int("messages.sent"),
        int("messages.acked"),
        num("messages.acked_per_second"),
        int("messages.unacked_at_end"),
    ));
    out.push_str(&format!(
        "delivery    {} of {} device deliveries; lost {}, duplicated {}, out of order {}; {} devices verified, {} not\n",
        int("messages.delivered"),
        int("messages.deliveries_expected"),
        int("messages.lost"),
        int("messages.duplicated"),
        int("messages.out_of_order"),
        int("verification.devices_verified"),
        int("verification.devices_unverified"),
    ));
    for name in ["ack", "e2e", "heartbeat", "connect", "login", "sync"] {
        out.push_str(&format!("latency     {}\n", lat(name)));
    }
    out.push_str(&format!(
        "node        rss start {}, peak {}, end {}; cpu {:.2} s; restarts {} ({} kills planned)\n",
        mib("server.rss_bytes.start"),
        mib("server.rss_bytes.peak"),
        mib("server.rss_bytes.end"),
        num("server.cpu_seconds"),
        int("server.restarts"),
        int("server.kills_planned"),
    ));
    if g("server.uploads").is_object() {
        out.push_str(&format!(
            "uploads     {} completed and verified {} (of them {} resumed after {} interruptions)\n",
            int("server.uploads.completed"),
            int("server.uploads.verified"),
            int("server.uploads.resumed"),
            int("server.uploads.interrupted"),
        ));
    }
    if g("server.store_audit").is_object() {
        out.push_str(&format!(
            "store       audit {}: {} users, {} timeline entries, {} gaps; {} conversations, {} unread mismatches; {} files, {} bad; {} journal entries pending\n",
            if g("server.store_audit.clean").as_bool() == Some(true) { "clean" } else { "FAILED" },
            int("server.store_audit.users"),
            int("server.store_audit.timeline_entries"),
            int("server.store_audit.timeline_gaps"),
            int("server.store_audit.conversations"),
            int("server.store_audit.unread_mismatches"),
            int("server.store_audit.files"),
            int("server.store_audit.bad_files"),
            int("server.store_audit.journal_entries"),
        ));
    }
    let bytes = |path: &str| {
        g(path)
            .as_f64()
            .map_or("-".to_owned(), |b| format!("{b:.0} B"))
    };
    out.push_str(&format!(
        "disk        {} written per acked message ({} in all); store {} ({} growth per acked message); busy answers {}\n",
        bytes("server.disk_write_bytes_per_acked_message"),
        bytes("server.disk_write_bytes"),
        mib("server.store_bytes"),
        bytes("server.store_growth_bytes_per_acked_message"),
        int("messages.busy_rejections"),
    ));
    if let Some(threads) = r["server"]["threads"].as_object() {
        let mut list: Vec<(&String, f64)> = threads
            .iter()
            .map(|(name, s)| (name, s.as_f64().unwrap_or(0.0)))
            .collect();
        list.sort_by(|a, b| b.1.total_cmp(&a.1));
        let list: Vec<String> = list
            .iter()
            .map(|(name, s)| format!("{name} {s:.2}"))
            .collect();
        out.push_str(&format!("threads     cpu s: {}\n", list.join(", ")));
    }
    out.push_str(&format!(
        "loadgen     cpu {:.2} s, rss peak {}; wall {:.1} s (drain {:.1} s, final sync {:.1} s)\n",
        num("loadgen.cpu_seconds"),
        mib("loadgen.rss_bytes_peak"),
        num("phases.wall_seconds"),
        num("phases.drain_seconds"),
        num("phases.final_sync_seconds"),
    ));
    if r["outage"].is_object() {
        let secs = |path: &str| {
            g(path)
                .as_f64()
                .map_or("never".to_owned(), |s| format!("{s:.1} s"))
        };
        out.push_str(&format!(
            "outage      {:.1}..{:.1} s; converged {} after link-up ({} deliveries pending then); {} devices reconnected, last after {} ({} not back); {} attempts, at most {} per device, peak {} in one second\n",
            num("outage.down_at_s"),
            num("outage.up_at_s"),
            secs("outage.converged_seconds"),
            int("outage.deliveries_pending_at_up"),
            int("outage.devices_reconnected"),
            secs("outage.reconnected_seconds"),
            int("outage.devices_not_back"),
            int("outage.connect_attempts"),
            int("outage.connect_attempts_per_device_max"),
            int("outage.connect_attempts_peak"),
        ));
    }
    if let Some(errors) = r["errors"].as_object()
        && !errors.is_empty()
    {
        let list: Vec<String> = errors
            .iter()
            .map(|(k, v)| format!("{k} {}", v.as_u64().unwrap_or(0)))
            .collect();
        out.push_str(&format!("errors      {}\n", list.join(", ")));
    }
    out
}

/// Used by the hidden `worker` subcommand: runs one partition, JSON lines on stdout.
pub fn worker_main(spec_file: &PathBuf) -> Result<(), String> {
    let text = std::fs::read_to_string(spec_file)
        .map_err(|e| format!("read {}: {e}", spec_file.display()))?;
    let spec: WorkerSpec = serde_json::from_str(&text).map_err(|e| format!("spec: {e}"))?;
    let stdout = std::io::stdout();
    run_process(spec, &mut |msg| {
        let mut lock = stdout.lock();
        let line = serde_json::to_string(&msg).expect("worker messages serialise");
        let _ = writeln!(lock, "{line}");
        let _ = lock.flush();
    });
    Ok(())
}
