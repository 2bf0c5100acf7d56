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
    let mut client = BlockingClient::new(node.addr, config);
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
    // The same content again is stored once: the start finds it complete.
    let again = alice
        .upload_start("copy.txt", "text/plain", size, sha256)
        .unwrap();
    assert_eq!(again.offset, size);
    let copy = alice.upload_finish(again.upload_id).unwrap();
    assert_ne!(copy.file_id, info.file_id);
    let blobs = std::fs::read_dir(node.data.join("files"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_file())
        .count();
    assert_eq!(blobs, 1, "content-addressed: one blob for both files");
}

io_tests!(
    five_mib_upload_and_download_resume_after_dropped_connections,
    files_shared_in_a_group_follow_membership,
    upload_resumes_after_the_node_is_killed_and_restarted,
);
