//! A `tern serve` child process for --spawn: start on a temporary data folder and a free
//! loopback port, SIGKILL and restart on the same folder and port (chaos), stop with
//! SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a node may take to print its ready line.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Start attempts on a fixed port after a kill (the port may still be held briefly).
const RESTART_ATTEMPTS_MAX: u32 = 20;

/// The `tern` binary: the one given, else next to this executable (cargo puts both in
/// `target/<profile>/`), else the parent folder of that (a test executable lives in
/// `target/<profile>/deps/`), else `tern` on $PATH.
pub fn find_tern(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(format!("--tern-bin {}: no such file", path.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("locate this executable: {e}"))?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("tern");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Ok(PathBuf::from("tern"))
}

pub struct SpawnedNode {
    child: Child,
    pub addr: SocketAddr,
    pub data: PathBuf,
    /// The temporary folder holding `data` and the node's log; removed on stop.
    pub dir: PathBuf,
    bin: PathBuf,
    extra: Vec<String>,
    pub restarts: u32,
}

impl SpawnedNode {
    pub fn start(bin: &Path, extra: Vec<String>) -> Result<SpawnedNode, String> {
        let dir = temp_dir()?;
        let data = dir.join("data");
        let log = dir.join("node.log");
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        let (child, addr) = spawn(bin, &data, listen, &extra, &log)?;
        Ok(SpawnedNode {
            child,
            addr,
            data,
            dir,
            bin: bin.to_path_buf(),
            extra,
            restarts: 0,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then start again on the same data folder and port.
    pub fn kill_and_restart(&mut self) -> Result<(), String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = self.dir.join("node.log");
        let mut last = String::new();
        for _ in 0..RESTART_ATTEMPTS_MAX {
            match spawn(&self.bin, &self.data, self.addr, &self.extra, &log) {
                Ok((child, _)) => {
                    self.child = child;
                    self.restarts += 1;
                    return Ok(());
                }
                Err(e) => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
        Err(format!("restart node: {last}"))
    }

    /// SIGTERM and wait; returns the exit status text. The temporary folder is removed.
    pub fn stop(mut self) -> String {
        // SAFETY: kill with a pid we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break "killed after SIGTERM timeout".to_owned();
                }
            }
        };
        let _ = std::fs::remove_dir_all(&self.dir);
        status
    }
}

fn spawn(
    bin: &Path,
    data: &Path,
    listen: SocketAddr,
    extra: &[String],
    log: &Path,
) -> Result<(Child, SocketAddr), String> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("open {}: {e}", log.display()))?;
    let mut child = Command::new(bin)
        .arg("serve")
        .arg("--data")
        .arg(data)
        .arg("--listen")
        .arg(listen.to_string())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("start {} serve: {e}", bin.display()))?;
    let stdout = child.stdout.take().expect("stdout was piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining so the node never blocks on a full pipe.
        let mut sink = String::new();
        while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    let line = match rx.recv_timeout(START_TIMEOUT) {
        Ok(line) if !line.is_empty() => line,
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: String = tail.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
            return Err(format!("node did not start (log: {tail})"));
        }
    };
    // "tern listening on ADDR (...)"
    let addr = line
        .split_whitespace()
        .nth(3)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("unexpected ready line {line:?}"))?;
    Ok((child, addr))
}

fn temp_dir() -> Result<PathBuf, String> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("tern-loadgen-{}-{nanos:09}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    Ok(dir)
}
