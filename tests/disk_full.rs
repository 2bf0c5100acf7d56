//! A node whose disk fills up: sends and uploads are refused with `storage_full` (not
//! `storage_failed`), the node stays up and keeps answering logins, heartbeats and reads
//! (including reads that need the journal applied first), nothing acknowledged is lost,
//! and once space is freed it accepts sends again by itself.
//!
//! The data folder lives on a small tmpfs the test mounts, so this needs root (CI runs as
//! root); elsewhere it says that it skipped.

#[macro_use]
mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Io, TestNode};
use tern::client::{BlockingClient, ClientConfig, ClientError};
use tern::protocol::ErrorCode;

const PASSWORD: &str = "pw-disk-full";
/// The file system the node gets: room for the store, the ballast
/// (`DISK_BALLAST_BYTES`) and a little more, so the test fills it quickly.
const DISK_MIB: u64 = 160;
/// Sends tried on the full disk before the test gives up on seeing `storage_full`.
const SENDS_UNTIL_FULL_MAX: usize = 20_000;
/// How long the node may take to notice freed space (it looks every `DISK_FULL_CHECK_MS`).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(20);

/// A tmpfs of `DISK_MIB` mounted on a fresh folder; unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount() -> Option<SmallDisk> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={DISK_MIB}m"),
                "tern-disk-full",
            ])
            .arg(dir.path())
            .output();
        match out {
            Ok(out) if out.status.success() => Some(SmallDisk { dir }),
            Ok(out) => {
                eprintln!(
                    "skipping: cannot mount a small tmpfs (needs root): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipping: cannot run mount: {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes `path` until the file system has no room left; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).expect("create filler");
    let chunk = vec![0x5au8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
        assert!(written <= DISK_MIB << 20, "the disk never filled");
    }
    written
}

fn device(node: &TestNode, user: &str, device: &str) -> BlockingClient {
    let config = ClientConfig::new(user, device).with_password(PASSWORD);
    let mut client =
        BlockingClient::new(node.addr, config).with_operation_timeout(Duration::from_secs(20));
    client.connect().expect("connect");
    client
}

fn storage_full() -> u16 {
    ErrorCode::StorageFull as u16
}

/// bob's timeline holds each of `acked` exactly once, in seq order with no gap.
fn assert_delivered_once(bob: &mut BlockingClient, acked: &[String]) {
    let timeline = bob.sync_all(0).expect("bob syncs");
    for (index, entry) in timeline.iter().enumerate() {
        assert_eq!(entry.seq, index as u64 + 1, "bob's timeline has a hole");
    }
    let texts: Vec<&str> = timeline.iter().map(|m| m.text.as_str()).collect();
    let unique: HashSet<&str> = texts.iter().copied().collect();
    assert_eq!(unique.len(), texts.len(), "an entry appears twice");
    let expected: Vec<&str> = acked.iter().map(String::as_str).collect();
    assert_eq!(
        texts, expected,
        "bob's timeline is not what alice had acknowledged"
    );
}

fn a_full_disk_refuses_new_content_keeps_serving_and_recovers(io: Io) {
    let Some(disk) = SmallDisk::mount() else {
        return;
    };
    let data: PathBuf = disk.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    common::add_user(&data, "alice", PASSWORD);
    common::add_user(&data, "bob", PASSWORD);
    // A journal never due by age: only reads and restarts apply it, so bob's reads on the
    // full disk need an apply first.
    let mut node = TestNode::start_at(io, data.clone(), &["--journal-interval-ms", "600000"]);
    let mut alice = device(&node, "alice", "phone");
    let mut acked = Vec::new();
    for n in 0..20 {
        let text = format!("before {n}");
        alice
            .send("bob", &text)
            .expect("send before the disk fills");
        acked.push(text);
    }

    let filler = disk.path().join("filler");
    fill(&filler);
    // The store may still have free pages inside its file: send until the disk refuses.
    let mut refused = None;
    for n in 0..SENDS_UNTIL_FULL_MAX {
        let text = format!("filling {n} {}", "x".repeat(200));
        match alice.send("bob", &text) {
            Ok(_) => acked.push(text),
            Err(ClientError::SendFailed { code, message, .. }) => {
                refused = Some((code, message));
                break;
            }
            Err(e) => panic!("send on a filling disk: {e}"),
        }
    }
    let (code, message) = refused.expect("no send was refused on a full disk");
    assert_eq!(code, storage_full(), "refused with {code}: {message}");
    // Every further send is refused the same way, at once.
    for _ in 0..3 {
        match alice.send("bob", "while full") {
            Err(ClientError::SendFailed { code, .. }) => assert_eq!(code, storage_full()),
            other => panic!("send on a full disk: {other:?}"),
        }
    }
    // An upload is refused with storage_full too (its chunks cannot be written), and leaves
    // no file the node would serve.
    let blob = vec![7u8; 256 * 1024];
    match alice.upload("big.bin", "application/octet-stream", &blob) {
        Err(ClientError::RequestFailed { code, .. }) => assert_eq!(code, storage_full()),
        other => panic!("upload on a full disk: {other:?}"),
    }

    // The node is up: a new device logs in, its heartbeats keep it connected, and its read
    // needs the journal applied (bob's entries were only logged): the ballast's room.
    let mut bob = device(&node, "bob", "laptop");
    bob.pump(Instant::now() + Duration::from_millis(300));
    assert!(
        bob.session().is_established(),
        "bob lost the node while the disk was full"
    );
    assert_delivered_once(&mut bob, &acked);

    // Space comes back: the node notices by itself and takes sends again.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    let mut n = 0;
    loop {
        let text = format!("after {n}");
        match alice.send("bob", &text) {
            Ok(_) => {
                acked.push(text);
                break;
            }
            Err(ClientError::SendFailed { code, .. }) if code == storage_full() => {}
            Err(e) => panic!("send after space was freed: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "sends stayed refused after space was freed"
        );
        std::thread::sleep(Duration::from_millis(100));
        n += 1;
    }
    alice
        .upload("big.bin", "application/octet-stream", &blob)
        .expect("upload after recovery");

    // Nothing acknowledged was lost, also across a SIGKILL and a restart.
    alice.close();
    bob.close();
    node.kill();
    node.restart();
    let mut bob = device(&node, "bob", "laptop");
    assert_delivered_once(&mut bob, &acked);
    drop(node);
}

plain_io_tests!(a_full_disk_refuses_new_content_keeps_serving_and_recovers);
