//! `tern serve --io`: auto takes io_uring where the probe passes and falls back to epoll
//! otherwise, saying why on stderr; `--io uring` where it cannot run is a clean start-up
//! error. `TERN_IO_URING_DISABLE` makes the probe fail the way qemu-user or a seccomp
//! filter would.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::TERN;
use tern::io::probe::URING_DISABLE_ENV;

/// Starts `tern serve --io <io>`; returns the child, its first stderr line, its ready line
/// and its data folder.
fn serve(io: &str, disable_uring: bool) -> (Child, String, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(TERN);
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--io",
            io,
        ])
        .arg("--data")
        .arg(dir.path().join("data"))
        .env_remove(URING_DISABLE_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if disable_uring {
        command.env(URING_DISABLE_ENV, "1");
    }
    let mut child = command.spawn().unwrap();
    let mut log = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut log)
        .unwrap();
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    (child, log.trim_end().to_owned(), ready, dir)
}

fn ready_io(ready: &str) -> (SocketAddr, String) {
    let tokens: Vec<&str> = ready.split_whitespace().collect();
    let addr = tokens[3].parse().expect("address is the 4th token");
    let io = ready
        .split(", ")
        .find_map(|part| part.strip_prefix("io "))
        .expect("ready line names the loop");
    (addr, io.to_owned())
}

#[test]
fn auto_falls_back_to_epoll_when_io_uring_is_refused() {
    let (mut child, log, ready, _dir) = serve("auto", true);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        log,
        format!("io: epoll (io_uring unavailable: disabled by {URING_DISABLE_ENV})")
    );
    assert_eq!(ready_io(&ready).1, "epoll");
}

#[test]
fn auto_reports_the_loop_the_probe_chose() {
    let (mut child, log, ready, _dir) = serve("auto", false);
    child.kill().unwrap();
    child.wait().unwrap();
    match tern::io::probe::probe_uring() {
        Ok(None) => {
            assert_eq!(log, "io: uring");
            assert_eq!(ready_io(&ready).1, "uring");
        }
        Ok(Some(missing)) => {
            assert_eq!(log, format!("io: uring ({missing})"));
            assert_eq!(ready_io(&ready).1, "uring");
        }
        Err(reason) => {
            assert_eq!(log, format!("io: epoll (io_uring unavailable: {reason})"));
            assert_eq!(ready_io(&ready).1, "epoll");
        }
    }
}

#[test]
fn requested_uring_that_cannot_run_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(TERN)
        .args(["serve", "--listen", "127.0.0.1:0", "--io", "uring"])
        .arg("--data")
        .arg(dir.path().join("data"))
        .env(URING_DISABLE_ENV, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "printed a ready line");
    assert!(
        stderr.contains("--io uring: io_uring unavailable: disabled by"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
