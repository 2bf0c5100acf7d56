//! End-to-end runs of `tern-loadgen --spawn` against real `tern` nodes on loopback. Each run
//! is seconds long and bounded by a deadline after which the process is killed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const LOADGEN: &str = env!("CARGO_BIN_EXE_tern-loadgen");
/// Longest any run here may take before it counts as hung.
const RUN_DEADLINE: Duration = Duration::from_secs(120);

/// The `tern` binary in this build's target folder, built on demand (a plain
/// `cargo test -p tern-loadgen` does not build the other package's binaries).
fn tern_bin() -> PathBuf {
    let dir = Path::new(LOADGEN)
        .parent()
        .expect("target dir")
        .to_path_buf();
    let bin = dir.join("tern");
    if !bin.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "tern", "--bin", "tern", "--manifest-path"]);
        build.arg(&manifest);
        if dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build --bin tern failed");
    }
    assert!(bin.is_file(), "no tern binary at {}", bin.display());
    bin
}

fn run_loadgen(args: &[&str]) -> (Output, Value, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("report.json");
    let html = dir.path().join("report.html");
    let mut child = Command::new(LOADGEN)
        .args(args)
        .arg("--spawn")
        .arg("--tern-bin")
        .arg(tern_bin())
        .arg("--report")
        .arg(&report)
        .arg("--html")
        .arg(&html)
        .arg("--quiet")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tern-loadgen");
    let deadline = Instant::now() + RUN_DEADLINE;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tern-loadgen ran past {RUN_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().expect("output");
    let text = std::fs::read_to_string(&report).unwrap_or_else(|e| {
        panic!(
            "no report ({e}); stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let report: Value = serde_json::from_str(&text).expect("report is JSON");
    let page = std::fs::read_to_string(&html).expect("html page written");
    (output, report, page)
}

fn at<'a>(report: &'a Value, path: &str) -> &'a Value {
    let mut value = report;
    for key in path.split('.') {
        value = &value[key];
    }
    assert!(!value.is_null(), "report lacks {path}");
    value
}

fn int(report: &Value, path: &str) -> u64 {
    at(report, path)
        .as_u64()
        .unwrap_or_else(|| panic!("{path} is not a count"))
}

fn explain(output: &Output, report: &Value) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}\nerrors: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        report["errors"]
    )
}

#[test]
fn a_few_hundred_clients_verify_and_the_report_has_every_field() {
    let (output, report, page) = run_loadgen(&[
        "--clients",
        "300",
        "--devices",
        "2",
        "--rate",
        "300",
        "--duration",
        "4",
        "--ramp",
        "1000",
        "--heartbeat",
        "0.5",
        "--pattern",
        "random",
        "--size",
        "32..300",
        "--background",
        "0.1",
        "--flap",
        "120",
        "--durability",
        "none",
    ]);
    assert!(output.status.success(), "{}", explain(&output, &report));
    for path in [
        "config",
        "clients.connected",
        "clients.failed",
        "messages.sent",
        "messages.acked",
        "messages.delivered",
        "messages.lost",
        "messages.duplicated",
        "messages.out_of_order",
        "latency_ms.ack.p50",
        "latency_ms.ack.p99",
        "latency_ms.ack.p999",
        "latency_ms.ack.max",
        "latency_ms.e2e.p50",
        "latency_ms.e2e.p99",
        "latency_ms.e2e.p999",
        "latency_ms.e2e.max",
        "latency_ms.heartbeat.p50",
        "latency_ms.heartbeat.p99",
        "server.rss_bytes.start",
        "server.rss_bytes.peak",
        "server.rss_bytes.end",
        "server.cpu_seconds",
        "server.disk_write_bytes",
        "server.disk_write_bytes_per_acked_message",
        "server.store_bytes",
        "server.store_growth_bytes_per_acked_message",
        "server.threads",
        "messages.busy_rejections",
        "throughput.interval_seconds",
        "throughput.intervals",
        "timeseries",
    ] {
        at(&report, path);
    }
    // A spawned node's data folder holds at least the users and their messages.
    assert!(int(&report, "server.store_bytes") > 0);
    let threads = at(&report, "server.threads").as_object().expect("a map");
    let node_thread_seconds: f64 = threads.values().filter_map(Value::as_f64).sum();
    assert!(
        node_thread_seconds > 0.0,
        "the node's threads did work: {threads:?}"
    );
    assert_eq!(int(&report, "clients.connected"), 300);
    assert_eq!(int(&report, "clients.failed"), 0);
    let sent = int(&report, "messages.sent");
    assert!(sent > 0);
    assert_eq!(int(&report, "messages.acked"), sent);
    assert_eq!(int(&report, "messages.lost"), 0);
    assert_eq!(int(&report, "messages.duplicated"), 0);
    assert_eq!(int(&report, "messages.out_of_order"), 0);
    // Every message reaches both devices of its recipient and of its sender.
    assert_eq!(int(&report, "messages.delivered"), sent * 4);
    assert!(int(&report, "latency_ms.heartbeat.count") > 0);
    assert!(
        int(&report, "events.flaps") > 0,
        "the flap knob did nothing"
    );
    assert!(int(&report, "events.background_cycles") + int(&report, "events.flaps") > 0);
    assert!(!at(&report, "timeseries").as_array().unwrap().is_empty());
    assert!(page.contains("<svg") && page.contains("Throughput"));
    assert!(
        !page.contains("<script src"),
        "the page must not fetch anything"
    );
}

#[test]
fn tls_clients_verify_and_the_reconnect_storm_resumes_their_sessions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let status = Command::new(tern_bin())
        .args(["cert", "generate", "--name", "127.0.0.1", "--out"])
        .arg(&certs)
        .stdout(Stdio::null())
        .status()
        .expect("run tern cert generate");
    assert!(status.success());
    let path = |name: &str| certs.join(name).display().to_string();
    let (output, report, _) = run_loadgen(&[
        "--clients",
        "100",
        "--rate",
        "100",
        "--duration",
        "4",
        "--storm-at",
        "2",
        "--durability",
        "none",
        "--transport",
        "tls",
        "--ca",
        &path("ca.pem"),
        "--node-tls-cert",
        &path("server.pem"),
        "--node-tls-key",
        &path("server.key"),
    ]);
    assert!(output.status.success(), "{}", explain(&output, &report));
    assert_eq!(int(&report, "clients.failed"), 0);
    assert!(int(&report, "messages.acked") > 0);
    assert_eq!(int(&report, "messages.lost"), 0);
    assert_eq!(int(&report, "messages.duplicated"), 0);
    // Every device logged in again after the storm, and those logins resumed.
    assert_eq!(int(&report, "latency_ms.storm.count"), 100);
    assert!(int(&report, "events.tls_full_handshakes") >= 100);
    assert!(
        int(&report, "events.tls_resumed_handshakes") >= 100,
        "{}",
        report["events"]
    );
}

#[test]
fn a_node_killed_and_restarted_mid_run_loses_no_acknowledged_message() {
    let (output, report, _) = run_loadgen(&[
        "--clients",
        "100",
        "--rate",
        "200",
        "--duration",
        "6",
        "--heartbeat",
        "1",
        "--chaos-restart-at",
        "3",
    ]);
    assert!(output.status.success(), "{}", explain(&output, &report));
    assert_eq!(
        int(&report, "server.restarts"),
        1,
        "the restart must have happened"
    );
    let acked = int(&report, "messages.acked");
    assert!(acked > 200, "too few messages to prove anything: {acked}");
    assert_eq!(int(&report, "messages.lost"), 0);
    assert_eq!(int(&report, "messages.duplicated"), 0);
    assert_eq!(int(&report, "messages.out_of_order"), 0);
    assert_eq!(int(&report, "verification.devices_unverified"), 0);
    // The kill cut every connection; the clients noticed and came back.
    let logins = int(&report, "events.logins");
    assert!(logins >= 200, "clients did not log in again: {logins}");
}

/// `--outage-at` runs the outage command with `down`, then `up`, at the planned times, and
/// the report carries the outage section (tools/netem/run.sh passes a command that really
/// takes the link down; here it only logs, so the devices keep their connections).
#[test]
fn an_outage_command_runs_down_then_up_and_the_report_measures_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("link.log");
    let cmd = format!("echo >>{} ", log.display());
    let (output, report, page) = run_loadgen(&[
        "--clients",
        "20",
        "--window",
        "1",
        "--duration",
        "4",
        "--outage-at",
        "1",
        "--outage-seconds",
        "1.5",
        "--outage-cmd",
        &cmd,
    ]);
    assert!(output.status.success(), "{}", explain(&output, &report));
    assert_eq!(std::fs::read_to_string(&log).expect("log"), "down\nup\n");
    let down = at(&report, "outage.down_at_s").as_f64().expect("seconds");
    let up = at(&report, "outage.up_at_s").as_f64().expect("seconds");
    // Not before the planned times (1 s, and 1.5 s later).
    assert!(down >= 1.0 && up >= 2.5 && up > down, "down {down} up {up}");
    assert!(at(&report, "outage.converged_seconds").is_f64());
    assert_eq!(int(&report, "outage.devices_reconnected"), 0);
    assert_eq!(int(&report, "outage.connect_attempts"), 0);
    assert!(at(&report, "outage.connect_attempts_per_second").is_array());
    assert!(page.contains("network outage"));
}

/// Closed loop at 16 sends in flight per client, the node SIGKILLed mid-run: every send
/// acknowledged before or after the kill is delivered exactly once, in order.
#[test]
fn a_node_killed_at_window_16_loses_and_duplicates_nothing() {
    let (output, report, page) = run_loadgen(&[
        "--clients",
        "60",
        "--window",
        "16",
        "--size",
        "100..100",
        "--duration",
        "4",
        "--heartbeat",
        "1",
        "--chaos-restart-at",
        "2",
    ]);
    assert!(output.status.success(), "{}", explain(&output, &report));
    assert_eq!(
        int(&report, "server.restarts"),
        1,
        "the restart must have happened"
    );
    let acked = int(&report, "messages.acked");
    assert!(
        acked >= 60 * 16,
        "fewer acks than one window of every client: {acked}"
    );
    assert_eq!(int(&report, "messages.sent"), acked);
    assert_eq!(int(&report, "messages.unacked_at_end"), 0);
    assert_eq!(int(&report, "messages.lost"), 0);
    assert_eq!(int(&report, "messages.duplicated"), 0);
    assert_eq!(int(&report, "messages.out_of_order"), 0);
    assert_eq!(int(&report, "verification.devices_unverified"), 0);
    // Each acked message reaches the recipient's and the sender's device exactly once.
    assert_eq!(int(&report, "messages.delivered"), 2 * acked);
    assert_eq!(
        int(&report, "messages.deliveries_expected"),
        int(&report, "messages.delivered")
    );
    // The node's counters span both of its processes; busy answers are counted.
    at(&report, "server.disk_write_bytes");
    at(&report, "messages.busy_rejections");
    assert!(page.contains("node storage"));
}

/// Real groups: 60 users in 12 groups of 5, two devices each, with flaps so group sends
/// are resent on new connections. Every group message reaches every device of every
/// member of its group (the sender's included) exactly once, in order.
#[test]
fn group_messages_reach_every_member_device_exactly_once() {
    let (output, report, _) = run_loadgen(&[
        "--clients",
        "120",
        "--devices",
        "2",
        "--pattern",
        "group:5",
        "--window",
        "4",
        "--duration",
        "3",
        "--heartbeat",
        "0.5",
        "--flap",
        "300",
        "--durability",
        "none",
    ]);
    assert!(output.status.success(), "{}", explain(&output, &report));
    assert_eq!(int(&report, "config.groups"), 12);
    let acked = int(&report, "messages.acked");
    assert!(acked > 0);
    assert_eq!(int(&report, "messages.sent"), acked);
    assert_eq!(int(&report, "messages.lost"), 0);
    assert_eq!(int(&report, "messages.duplicated"), 0);
    assert_eq!(int(&report, "messages.out_of_order"), 0);
    assert_eq!(int(&report, "verification.devices_unverified"), 0);
    assert_eq!(int(&report, "messages.delivered"), acked * 5 * 2);
    assert!(
        int(&report, "events.flaps") > 0,
        "the flap knob did nothing"
    );
}

/// Group sends in flight when the node is SIGKILLed are resent on the next connection
/// with their client message ids: each is stored once and fanned out to every member once.
#[test]
fn a_node_killed_during_group_sends_loses_and_duplicates_nothing() {
    let (output, report, _) = run_loadgen(&[
        "--clients",
        "60",
        "--pattern",
        "group:4",
        "--window",
        "8",
        "--duration",
        "4",
        "--heartbeat",
        "1",
        "--chaos-restart-at",
        "2",
    ]);
    assert!(output.status.success(), "{}", explain(&output, &report));
    assert_eq!(int(&report, "server.restarts"), 1);
    assert_eq!(int(&report, "config.groups"), 15);
    let acked = int(&report, "messages.acked");
    assert!(
        acked >= 60 * 8,
        "fewer acks than one window per client: {acked}"
    );
    assert_eq!(int(&report, "messages.sent"), acked);
    assert_eq!(int(&report, "messages.unacked_at_end"), 0);
    assert_eq!(int(&report, "messages.lost"), 0);
    assert_eq!(int(&report, "messages.duplicated"), 0);
    assert_eq!(int(&report, "messages.out_of_order"), 0);
    assert_eq!(int(&report, "verification.devices_unverified"), 0);
    assert_eq!(int(&report, "messages.delivered"), acked * 4);
}

#[test]
fn worker_processes_merge_into_one_report() {
    let (output, report, _) = run_loadgen(&[
        "--clients",
        "120",
        "--processes",
        "2",
        "--threads",
        "1",
        "--rate",
        "100",
        "--duration",
        "3",
        "--heartbeat",
        "0.5",
        "--pattern",
        "group:3",
        "--source-ips",
        "127.0.0.2-127.0.0.3",
        "--durability",
        "none",
    ]);
    assert!(output.status.success(), "{}", explain(&output, &report));
    assert_eq!(int(&report, "config.processes"), 2);
    assert_eq!(int(&report, "clients.connected"), 120);
    let sent = int(&report, "messages.sent");
    assert!(sent > 0);
    assert_eq!(int(&report, "messages.acked"), sent);
    assert_eq!(int(&report, "latency_ms.ack.count"), sent);
    assert_eq!(int(&report, "messages.lost"), 0);
}

#[test]
fn capacity_search_steps_the_client_count_and_reports_every_step() {
    let (output, report, page) = run_loadgen(&[
        "capacity",
        "--dimension",
        "clients",
        "--factor",
        "2",
        "--max-steps",
        "2",
        "--slo-p99-ms",
        "60000",
        "--clients",
        "40",
        "--rate",
        "40",
        "--duration",
        "2",
        "--heartbeat",
        "0.5",
        "--durability",
        "none",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let steps = report["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "{stderr}");
    assert_eq!(steps[0]["load"].as_f64(), Some(40.0));
    assert_eq!(steps[1]["load"].as_f64(), Some(80.0));
    assert_eq!(
        steps[1]["report"]["clients"]["connected"].as_u64(),
        Some(80),
        "each step carries its full run report"
    );
    assert_eq!(report["best"].as_f64(), Some(80.0));
    assert!(page.contains("capacity search") && page.contains("<svg"));
}

/// The kill loop's short form: the node SIGKILLed and restarted again and again under
/// group sends, flapping clients and clients going to the background. The kills follow
/// from --seed, so their number is known before the run and each one must have happened;
/// every acknowledged message still reaches every device once, in order.
#[test]
fn a_node_killed_ten_times_loses_and_duplicates_nothing() {
    let (output, report, _) = run_loadgen(&[
        "--clients",
        "40",
        "--devices",
        "2",
        "--pattern",
        "group:4",
        "--rate",
        "200",
        "--flap",
        "60",
        "--background",
        "0.2",
        "--duration",
        "8",
        "--heartbeat",
        "1",
        "--chaos-every",
        "0.7",
        "--seed",
        "1",
    ]);
    assert!(output.status.success(), "{}", explain(&output, &report));
    let planned = int(&report, "server.kills_planned");
    assert!(planned >= 10, "the seed plans {planned} kills");
    assert_eq!(int(&report, "server.restarts"), planned);
    let acked = int(&report, "messages.acked");
    assert!(acked > 0);
    assert_eq!(int(&report, "messages.sent"), acked);
    assert_eq!(int(&report, "messages.lost"), 0);
    assert_eq!(int(&report, "messages.duplicated"), 0);
    assert_eq!(int(&report, "messages.out_of_order"), 0);
    assert_eq!(int(&report, "verification.devices_unverified"), 0);
    assert_eq!(
        int(&report, "messages.delivered"),
        int(&report, "messages.deliveries_expected")
    );
    // An upload was in progress through the kills; what the node acknowledged downloads
    // intact, and the store holds no partial file, no timeline hole, no miscounted unread.
    let uploads = int(&report, "server.uploads.completed");
    assert!(uploads > 0, "no upload finished during the kill loop");
    assert_eq!(int(&report, "server.uploads.verified"), uploads);
    assert_eq!(
        report.pointer("/server/store_audit/clean"),
        Some(&serde_json::json!(true))
    );
    // A finish whose answer a kill cut off is recorded and then uploaded again.
    assert!(int(&report, "server.store_audit.files") >= uploads);
    assert!(int(&report, "server.store_audit.conversations") > 0);
    assert_eq!(int(&report, "server.store_audit.unread_mismatches"), 0);
}
