//! End-to-end tests of file transfer against a real `tern` node: a chunked upload that
//! resumes after a dropped connection, a download that resumes mid-file, and access
//! limited to the conversations the file was shared in.

#[macro_use]
mod common;

use common::{Io, TestNode};
use sha2::{Digest, Sha256};
use tern::client::{BlockingClient, ClientConfig, ClientError, FileMessage};
use tern::limits::FILE_CHUNK_SIZE_MAX;
use tern::protocol::{ErrorCode, media, record_kind};

const PASSWORD: &str = "pw-files";

fn device(node: &TestNode, user: &str, device: &str) -> BlockingClient {
    let config = ClientConfig::new(user, device).with_password(PASSWORD);
    let mut client = node.client(config);
    client.connect().expect("connect");
    client
}

/// Deterministic bytes that do not compress into a pattern a bug could hide behind.
fn content(len: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn refused<T: std::fmt::Debug>(result: Result<T, ClientError>) -> u16 {
    match result {
        Err(ClientError::RequestFailed { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn five_mib_upload_and_download_resume_after_dropped_connections(io: Io) {
    let node = TestNode::start(io, &["--shards", "2"]);
    for user in ["alice", "bob", "carol"] {
        node.add_user(user, PASSWORD);
    }
    let data = content(5 << 20);
    let sha256: [u8; 32] = Sha256::digest(&data).into();
    let size = data.len() as u64;

    // Half the chunks, then the connection drops.
    let mut alice = device(&node, "alice", "phone");
    let ready = alice
        .upload_start("big.bin", "application/octet-stream", size, sha256)
        .unwrap();
    assert_eq!(ready.offset, 0);
    let half_chunks = (data.len() / FILE_CHUNK_SIZE_MAX) / 2;
    let mut offset = 0u64;
    for _ in 0..half_chunks {
        let end = offset as usize + FILE_CHUNK_SIZE_MAX;
        offset = alice
            .upload_chunk(ready.upload_id, offset, &data[offset as usize..end])
            .unwrap()
            .offset;
    }
    // A chunk out of place is refused, not written.
    let bad = alice.upload_chunk(ready.upload_id, offset + 1, &data[..10]);
    assert_eq!(refused(bad), ErrorCode::FileMismatch as u16);
    alice.close();
    drop(alice);

    // A new connection resumes where the node's copy ends.
    let mut alice = device(&node, "alice", "laptop");
    let resumed = alice
        .upload_start("big.bin", "application/octet-stream", size, sha256)
        .unwrap();
    assert_eq!(resumed.offset, offset, "the node kept the first half");
    let info = alice
        .upload("big.bin", "application/octet-stream", &data)
        .unwrap();
    assert_eq!((info.size, info.sha256.as_slice()), (size, &sha256[..]));

    let message = FileMessage {
        media: media::FILE,
        caption: "the build".to_owned(),
        ..FileMessage::default()
    };
    alice
        .send_file(Some("bob"), None, info.file_id, &message)
        .unwrap();

    // Bob learns of the file from his timeline, downloads half, loses the connection,
    // and resumes from the bytes he has.
    let mut bob = device(&node, "bob", "phone");
    let entries = bob.sync_all(0).unwrap();
    let record = entries
        .iter()
        .find_map(|e| {
            e.record
                .as_ref()
                .filter(|r| r.kind == record_kind::FILE_MESSAGE)
        })
        .expect("file message in bob's timeline");
    let attachment = record.attachment.as_ref().unwrap();
    assert_eq!((attachment.file_id, attachment.size), (info.file_id, size));
    assert_eq!(
        attachment.sha256, sha256,
        "the file message carries the content hash"
    );
    assert_eq!(attachment.name, "big.bin");
    let mut got = Vec::new();
    while got.len() < data.len() / 2 {
        let chunk = bob.download_chunk(info.file_id, got.len() as u64).unwrap();
        got.extend_from_slice(&chunk.data);
    }
    bob.close();
    drop(bob);
    let mut bob = device(&node, "bob", "laptop");
    assert_eq!(bob.download(info.file_id, &mut got).unwrap(), size);
    assert!(got == data, "downloaded bytes differ");

    // Carol was in no conversation where the file was shared.
    let mut carol = device(&node, "carol", "phone");
    let mut nothing = Vec::new();
    let code = refused(carol.download(info.file_id, &mut nothing));
    assert_eq!(code, ErrorCode::NotMember as u16);
    assert_eq!(
        refused(carol.download(info.file_id + 100, &mut nothing)),
        ErrorCode::UnknownFile as u16
    );
    // Nor may she forward it.
    let code = refused(carol.send_file(Some("bob"), None, info.file_id, &message));
    assert_eq!(code, ErrorCode::NotMember as u16);
}

fn files_shared_in_a_group_follow_membership(io: Io) {
    let node = TestNode::start(io, &[]);
    for user in ["alice", "bob", "carol"] {
        node.add_user(user, PASSWORD);
    }
    let mut alice = device(&node, "alice", "phone");
    let group = alice
        .group_create("photos", &["bob".to_owned(), "carol".to_owned()])
        .unwrap()
        .group_id;
    let image = content(100_000);
    let thumb = content(2_000);
    let image_info = alice.upload("cat.jpg", "image/jpeg", &image).unwrap();
    let thumb_info = alice.upload("cat-small.jpg", "image/jpeg", &thumb).unwrap();
    let message = FileMessage {
        media: media::IMAGE,
        thumbnail_id: thumb_info.file_id,
        width: 640,
        height: 480,
        ..FileMessage::default()
    };
    alice
        .send_file(None, Some(group), image_info.file_id, &message)
        .unwrap();
    let mut carol = device(&node, "carol", "phone");
    let mut got = Vec::new();
    carol.download(thumb_info.file_id, &mut got).unwrap();
    assert!(got == thumb);
    // Removed from the group, carol loses access to what was shared there.
    alice.group_remove(group, &["carol".to_owned()]).unwrap();
    let mut again = Vec::new();
    let code = refused(carol.download(image_info.file_id, &mut again));
    assert_eq!(code, ErrorCode::NotMember as u16);
    let mut bob = device(&node, "bob", "phone");
    let mut got = Vec::new();
    bob.download(image_info.file_id, &mut got).unwrap();
    assert!(got == image);
}

fn upload_resumes_after_the_node_is_killed_and_restarted(io: Io) {
    let mut node = TestNode::start(io, &[]);
    node.add_user("alice", PASSWORD);
    let data = content(400_000);
    let sha256: [u8; 32] = Sha256::digest(&data).into();
    let size = data.len() as u64;
    let mut alice = device(&node, "alice", "phone");
    let ready = alice
        .upload_start("log.txt", "text/plain", size, sha256)
        .unwrap();
    let mut offset = 0u64;
    for _ in 0..4 {
        let end = offset as usize + FILE_CHUNK_SIZE_MAX;
        offset = alice
            .upload_chunk(ready.upload_id, offset, &data[offset as usize..end])
            .unwrap()
            .offset;
    }
    alice.close();
    node.kill();
    node.restart();
    // The acknowledged chunks survived a process kill (page cache); the upload goes on.
    let mut alice = device(&node, "alice", "phone");
    let resumed = alice
        .upload_start("log.txt", "text/plain", size, sha256)
        .unwrap();
    assert_eq!(resumed.offset, offset);
    let info = alice.upload("log.txt", "text/plain", &data).unwrap();
    let mut got = Vec::new();
    alice.download(info.file_id, &mut got).unwrap();
    assert!(got == data);
    // The same content again is sent again (a start never says whether the node holds
    // it), and stored once.
    let again = alice
        .upload_start("copy.txt", "text/plain", size, sha256)
        .unwrap();
    assert_eq!(again.offset, 0);
    let copy = alice.upload("copy.txt", "text/plain", &data).unwrap();
    assert_ne!(copy.file_id, info.file_id);
    let blobs = std::fs::read_dir(node.data.join("files"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_file())
        .count();
    assert_eq!(blobs, 1, "content-addressed: one blob for both files");
}

/// Regression: a user who knew only a file's SHA-256 got its content (the start answered
/// "complete", the finish granted a file id), and the answer told anyone whether content
/// was stored. Now a start counts only the caller's own bytes, a finish needs every byte
/// from the caller, and stored and unknown content get the same answers.
fn nobody_gets_stored_content_by_knowing_its_hash(io: Io) {
    let node = TestNode::start(io, &[]);
    for user in ["alice", "mallory"] {
        node.add_user(user, PASSWORD);
    }
    let mut alice = device(&node, "alice", "phone");
    let stored = b"A".to_vec();
    let stored_sha: [u8; 32] = Sha256::digest(&stored).into();
    let info = alice.upload("a.txt", "text/plain", &stored).unwrap();
    // alice also leaves half of a larger upload behind.
    let partial = content(2 * FILE_CHUNK_SIZE_MAX);
    let partial_sha: [u8; 32] = Sha256::digest(&partial).into();
    let ready = alice
        .upload_start(
            "p.bin",
            "application/octet-stream",
            partial.len() as u64,
            partial_sha,
        )
        .unwrap();
    alice
        .upload_chunk(ready.upload_id, 0, &partial[..FILE_CHUNK_SIZE_MAX])
        .unwrap();
    let unknown_sha: [u8; 32] = Sha256::digest(b"Z").into();

    let mut mallory = device(&node, "mallory", "laptop");
    let mut answers = Vec::new();
    for sha in [stored_sha, unknown_sha] {
        let ready = mallory.upload_start("x", "text/plain", 1, sha).unwrap();
        assert_eq!(
            ready.offset, 0,
            "a start reveals nothing about stored content"
        );
        // A finish without the bytes grants nothing.
        let empty = refused(mallory.upload_finish(ready.upload_id));
        // Nor does a finish after other bytes.
        let ready = mallory.upload_start("x", "text/plain", 1, sha).unwrap();
        mallory.upload_chunk(ready.upload_id, 0, b"B").unwrap();
        let wrong = refused(mallory.upload_finish(ready.upload_id));
        answers.push((empty, wrong));
    }
    assert_eq!(
        answers[0], answers[1],
        "stored and unknown content answer alike"
    );
    assert_eq!(answers[0].0, ErrorCode::FileMismatch as u16);
    assert_eq!(answers[0].1, ErrorCode::FileMismatch as u16);
    // alice's partial upload is hers: mallory starts from nothing.
    let other = mallory
        .upload_start(
            "p.bin",
            "application/octet-stream",
            partial.len() as u64,
            partial_sha,
        )
        .unwrap();
    assert_eq!(other.offset, 0);
    let mut nothing = Vec::new();
    let code = refused(mallory.download(info.file_id, &mut nothing));
    assert_eq!(code, ErrorCode::NotMember as u16);

    // Someone who has the content may upload it; it is stored once all the same.
    let own = mallory.upload("mine.txt", "text/plain", &stored).unwrap();
    assert_ne!(own.file_id, info.file_id);
    let mut got = Vec::new();
    mallory.download(own.file_id, &mut got).unwrap();
    assert_eq!(got, stored);
    let blobs = std::fs::read_dir(node.data.join("files"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_file())
        .count();
    assert_eq!(blobs, 1, "one blob for alice's and mallory's files");
}

fn tern_download(node: &TestNode, file_id: u64, out: &std::path::Path) -> std::process::Output {
    common::tern_command()
        .arg("download")
        .arg(file_id.to_string())
        .arg("--out")
        .arg(out)
        .args(node.cli_server_args())
        .args(["--user", "bob"])
        .args(["--password", PASSWORD])
        .output()
        .expect("run tern download")
}

/// Regression: `tern download` resumed into whatever `--out` held (`X` + file `AB` gave
/// `XB`, exit 0), and nothing carried the content hash to check against. Now a download
/// resumes only its own partial file, and verifies the SHA-256 the node states before the
/// file appears; a mismatch fails and leaves nothing that looks complete.
fn downloads_resume_only_their_own_bytes_and_are_verified(io: Io) {
    let node = TestNode::start(io, &[]);
    for user in ["alice", "bob"] {
        node.add_user(user, PASSWORD);
    }
    let data = b"AB".to_vec();
    let sha256: [u8; 32] = Sha256::digest(&data).into();
    let hex: String = sha256.iter().map(|b| format!("{b:02x}")).collect();
    let mut alice = device(&node, "alice", "phone");
    let info = alice.upload("ab.txt", "text/plain", &data).unwrap();
    alice
        .send_file(Some("bob"), None, info.file_id, &FileMessage::default())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Whatever the destination held is replaced, never resumed from.
    let out = dir.path().join("out.txt");
    std::fs::write(&out, b"X").unwrap();
    let run = tern_download(&node, info.file_id, &out);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert!(!dir.path().join("out.txt.part").exists());

    // A partial file left by another download is started over.
    let other = dir.path().join("other.txt");
    std::fs::write(dir.path().join("other.txt.part"), b"Q").unwrap();
    let marker = format!("{} {hex}\n", info.file_id + 1);
    std::fs::write(dir.path().join("other.txt.part.id"), marker).unwrap();
    let run = tern_download(&node, info.file_id, &other);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(std::fs::read(&other).unwrap(), data);

    // A partial file of this download whose bytes went bad: the hash check catches it,
    // and neither a complete-looking file nor the bad bytes stay.
    let bad = dir.path().join("bad.txt");
    std::fs::write(dir.path().join("bad.txt.part"), b"X").unwrap();
    let marker = format!("{} {hex}\n", info.file_id);
    std::fs::write(dir.path().join("bad.txt.part.id"), marker).unwrap();
    let run = tern_download(&node, info.file_id, &bad);
    assert!(!run.status.success(), "a corrupt download must fail");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("SHA-256"), "{stderr}");
    assert!(!bad.exists());
    assert!(!dir.path().join("bad.txt.part").exists());
    // Run again: it starts afresh and succeeds.
    let run = tern_download(&node, info.file_id, &bad);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(std::fs::read(&bad).unwrap(), data);

    // A refused download (no such file) leaves no file behind, partial or not.
    let refused = dir.path().join("refused.txt");
    let run = tern_download(&node, info.file_id + 100, &refused);
    assert!(!run.status.success(), "a missing file must fail");
    assert!(!refused.exists());
    assert!(!dir.path().join("refused.txt.part").exists());
    assert!(!dir.path().join("refused.txt.part.id").exists());

    // The SDK checks too: bytes that are not a prefix of the file fail and are dropped.
    let mut bob = device(&node, "bob", "phone");
    let mut held = b"X".to_vec();
    match bob.download(info.file_id, &mut held) {
        Err(ClientError::Corrupt(_)) => assert!(held.is_empty()),
        other => panic!("expected a verification failure, got {other:?}"),
    }
    assert_eq!(bob.download(info.file_id, &mut held).unwrap(), 2);
    assert_eq!(held, data);
}

io_tests!(
    downloads_resume_only_their_own_bytes_and_are_verified,
    nobody_gets_stored_content_by_knowing_its_hash,
    five_mib_upload_and_download_resume_after_dropped_connections,
    files_shared_in_a_group_follow_membership,
    upload_resumes_after_the_node_is_killed_and_restarted,
);
