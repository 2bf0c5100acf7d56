//! Files in the store: metadata and sharing in LMDB, contents as content-addressed blobs in
//! `<data>/files/<sha256 hex>`, and the writer's side of finishing an upload and of
//! messages that carry a file.
//!
//! An upload is written by its shard into `files/tmp/` (plain writes, no fsync); the
//! writer's `apply_file_commit` hashes the whole temp file, checks size and SHA-256,
//! fsyncs it, renames it to its content address, fsyncs the folder and only then records
//! the file, so a recorded file always has its complete blob. The hash pass and fsync run
//! on the writer thread, the node's one place for blocking disk work.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use heed::{PutFlags, RoTxn, RwTxn};
use sha2::{Digest, Sha256};

use super::StoreError;
use super::apply::{
    ack_first_send, ack_resend, archive_record, next_msg_id, put_message, put_new, refuse,
};
use super::conversations::NoteKind;
use super::journal::{Journal, LoggedEntry};
use super::read::ReadView;
use super::schema::{self, Dbs, META_FILES_BYTES, META_NEXT_FILE_ID};
use super::writer::{Delivery, OpResult, Origin, Reply};
use crate::ids::UserId;
use crate::limits::{NODE_FILES_BYTES_MAX, USER_FILES_BYTES_MAX};
use crate::protocol::{
    Attachment, ErrorCode, FileInfo, Record, conv_group, group_conv, record_kind,
};

/// A `files` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    pub owner: UserId,
    pub size: u64,
    pub created_at_ms: u64,
    pub sha256: [u8; 32],
    pub name: String,
    pub mime: String,
}

impl FileMeta {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(58 + self.name.len() + self.mime.len());
        v.extend_from_slice(&self.owner.0.to_be_bytes());
        v.extend_from_slice(&self.size.to_be_bytes());
        v.extend_from_slice(&self.created_at_ms.to_be_bytes());
        v.extend_from_slice(&self.sha256);
        v.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        v.extend_from_slice(self.name.as_bytes());
        v.extend_from_slice(self.mime.as_bytes());
        v
    }

    fn decode(bytes: &[u8]) -> Result<FileMeta, StoreError> {
        const WHAT: &str = "file value";
        if bytes.len() < 58 {
            return Err(StoreError::Corrupt(WHAT));
        }
        let name_len = u16::from_be_bytes([bytes[56], bytes[57]]) as usize;
        if bytes.len() < 58 + name_len {
            return Err(StoreError::Corrupt(WHAT));
        }
        let text = |b: &[u8]| {
            std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(|_| StoreError::Corrupt(WHAT))
        };
        Ok(FileMeta {
            owner: UserId(schema::decode_u64(&bytes[..8], WHAT)?),
            size: schema::decode_u64(&bytes[8..16], WHAT)?,
            created_at_ms: schema::decode_u64(&bytes[16..24], WHAT)?,
            sha256: bytes[24..56].try_into().expect("32 bytes"),
            name: text(&bytes[58..58 + name_len])?,
            mime: text(&bytes[58 + name_len..])?,
        })
    }

    pub fn info(&self, file_id: u64) -> FileInfo {
        FileInfo {
            file_id,
            name: self.name.clone(),
            mime: self.mime.clone(),
            size: self.size,
            sha256: self.sha256.to_vec(),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the blob with this SHA-256 lives.
pub fn blob_path(files_dir: &Path, sha256: &[u8; 32]) -> PathBuf {
    files_dir.join(hex(sha256))
}

/// Where `user`'s upload of this content lives while in progress. Named by owner, hash
/// and size, so a start after a lost connection finds the bytes already received.
pub fn upload_path(files_dir: &Path, user: UserId, sha256: &[u8; 32], size: u64) -> PathBuf {
    files_dir
        .join("tmp")
        .join(format!("{}-{}-{size}", user.0, hex(sha256)))
}

fn file_meta(txn: &RoTxn, dbs: &Dbs, file_id: u64) -> Result<Option<FileMeta>, StoreError> {
    match dbs
        .files
        .get(txn, &file_id.to_be_bytes())
        .map_err(StoreError::lmdb("read file"))?
    {
        Some(bytes) => Ok(Some(FileMeta::decode(bytes)?)),
        None => Ok(None),
    }
}

fn read_u64(
    txn: &RoTxn,
    db: schema::Db,
    key: &[u8],
    what: &'static str,
) -> Result<u64, StoreError> {
    match db.get(txn, key).map_err(StoreError::lmdb(what))? {
        Some(bytes) => schema::decode_u64(bytes, what),
        None => Ok(0),
    }
}

/// Bytes of files `user` stores, and the node in all.
fn usage(txn: &RoTxn, dbs: &Dbs, user: UserId) -> Result<(u64, u64), StoreError> {
    Ok((
        read_u64(
            txn,
            dbs.file_usage,
            &schema::user_key(user),
            "read file usage",
        )?,
        read_u64(txn, dbs.meta, META_FILES_BYTES, "read files bytes")?,
    ))
}

/// Whether `user` may download `file_id`: its owner, a user it was sent to or who sent
/// it, or a current member of a group it was sent to.
fn may_download(
    txn: &RoTxn,
    dbs: &Dbs,
    file_id: u64,
    owner: UserId,
    user: UserId,
) -> Result<bool, StoreError> {
    if owner == user {
        return Ok(true);
    }
    for item in dbs
        .file_shares
        .prefix_iter(txn, &file_id.to_be_bytes())
        .map_err(StoreError::lmdb("open file shares"))?
    {
        let (key, _) = item.map_err(StoreError::lmdb("read file share"))?;
        let (_, to) = schema::decode_pair(key, "file share key")?;
        let allowed = match conv_group(to) {
            Some(group_id) => dbs
                .members
                .get(txn, &schema::pair_key(group_id, user.0))
                .map_err(StoreError::lmdb("read member"))?
                .is_some(),
            None => to == user.0,
        };
        if allowed {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Hashes the file at `path`; returns (size, SHA-256).
fn hash_file(path: &Path) -> std::io::Result<(u64, [u8; 32])> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hasher.finalize().into()))
}

/// Makes the blob durable at its content address: fsync the temp file, rename, fsync the
/// folder. A blob already there (the same content uploaded before) is kept.
fn publish(temp: &Path, blob: &Path) -> std::io::Result<()> {
    std::fs::File::open(temp)?.sync_all()?;
    std::fs::rename(temp, blob)?;
    let dir = blob.parent().expect("blob paths have a folder");
    std::fs::File::open(dir)?.sync_all()
}

/// Removes an upload whose content is stored already, with the fsyncs `publish` does.
fn discard_like_publish(temp: &Path) -> std::io::Result<()> {
    std::fs::File::open(temp)?.sync_all()?;
    std::fs::remove_file(temp)?;
    let dir = temp.parent().expect("upload paths have a folder");
    std::fs::File::open(dir)?.sync_all()
}

/// A `WriteOp::FileCommit`.
pub(super) struct FileCommitFields<'a> {
    pub origin: Origin,
    pub owner: UserId,
    pub name: &'a str,
    pub mime: &'a str,
    pub size: u64,
    pub sha256: [u8; 32],
    pub files_dir: &'a Path,
    pub at_ms: u64,
}

/// Finishes an upload: checks quota, size and hash, publishes the blob and records the
/// file. Answers `Reply::File`.
pub(super) fn apply_file_commit(
    txn: &mut RwTxn,
    dbs: &Dbs,
    op: FileCommitFields<'_>,
    results: &mut Vec<OpResult>,
) -> Result<(), StoreError> {
    let (user_bytes, node_bytes) = usage(txn, dbs, op.owner)?;
    if user_bytes + op.size > USER_FILES_BYTES_MAX {
        refuse(
            results,
            op.origin,
            ErrorCode::QuotaExceeded,
            "the user's file quota is full",
        );
        return Ok(());
    }
    if node_bytes + op.size > NODE_FILES_BYTES_MAX {
        refuse(
            results,
            op.origin,
            ErrorCode::QuotaExceeded,
            "the node's file space is full",
        );
        return Ok(());
    }
    let temp = upload_path(op.files_dir, op.owner, &op.sha256, op.size);
    let blob = blob_path(op.files_dir, &op.sha256);
    let io = |op: &'static str| move |error| StoreError::from_io(op, error);
    // The uploader's own bytes are checked even when the content is stored already: a
    // file id is granted only for content its owner sent in full. The shared blob is
    // an internal saving, never a shortcut.
    let (size, sha256) = match hash_file(&temp) {
        Ok(found) => found,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            refuse(
                results,
                op.origin,
                ErrorCode::UnknownFile,
                "no upload in progress",
            );
            return Ok(());
        }
        Err(e) => return Err(io("hash upload")(e)),
    };
    if size != op.size || sha256 != op.sha256 {
        // The bytes are wrong: start over rather than resume from them.
        let _ = std::fs::remove_file(&temp);
        refuse(
            results,
            op.origin,
            ErrorCode::FileMismatch,
            "size or SHA-256 differs from the start",
        );
        return Ok(());
    }
    if blob.exists() {
        // The same disk work as publishing (fsync the bytes, change the folder, fsync it),
        // so how long a finish takes does not tell whether the content was stored before.
        discard_like_publish(&temp).map_err(io("discard duplicate upload"))?;
    } else {
        publish(&temp, &blob).map_err(io("publish file"))?;
    }
    let file_id = schema::counter_next(txn, dbs, META_NEXT_FILE_ID)?;
    schema::counter_set(txn, dbs, META_NEXT_FILE_ID, file_id + 1)?;
    let meta = FileMeta {
        owner: op.owner,
        size: op.size,
        created_at_ms: op.at_ms,
        sha256: op.sha256,
        name: op.name.to_owned(),
        mime: op.mime.to_owned(),
    };
    put_new(
        dbs.files,
        txn,
        PutFlags::APPEND,
        &file_id.to_be_bytes(),
        &meta.encode(),
        "write file",
        "file id reused",
    )?;
    dbs.file_usage
        .put(
            txn,
            &schema::user_key(op.owner),
            &(user_bytes + op.size).to_be_bytes(),
        )
        .map_err(StoreError::lmdb("write file usage"))?;
    dbs.meta
        .put(txn, META_FILES_BYTES, &(node_bytes + op.size).to_be_bytes())
        .map_err(StoreError::lmdb("write files bytes"))?;
    results.push(OpResult::Answered {
        origin: op.origin,
        reply: Reply::File(meta.info(file_id)),
    });
    Ok(())
}

/// A `WriteOp::FileSend`.
pub(super) struct FileSendFields<'a> {
    pub origin: Origin,
    pub from: UserId,
    pub from_name: &'a str,
    /// The recipient of a 1:1 file message; None for a group one.
    pub to: Option<UserId>,
    pub group_id: u64,
    pub client_msg_id: u64,
    pub file_id: u64,
    pub thumbnail_id: u64,
    pub media: u8,
    pub duration_ms: u32,
    pub width: u32,
    pub height: u32,
    pub text: &'a str,
    pub sent_at_ms: u64,
}

/// A message carrying a file: the sender must be allowed to download the file (and the
/// thumbnail); the message is stored once, referenced from every recipient's timeline, and
/// shares the file with the conversation.
pub(super) fn apply_file_send(
    txn: &mut RwTxn,
    dbs: &Dbs,
    journal: &mut Journal,
    send: FileSendFields<'_>,
    results: &mut Vec<OpResult>,
    deliveries: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    if ack_resend(
        txn,
        dbs,
        journal,
        send.from,
        send.client_msg_id,
        send.origin,
        results,
    )? {
        return Ok(());
    }
    let Some(meta) = file_meta(txn, dbs, send.file_id)? else {
        refuse(results, send.origin, ErrorCode::UnknownFile, "no such file");
        return Ok(());
    };
    if !may_download(txn, dbs, send.file_id, meta.owner, send.from)? {
        refuse(
            results,
            send.origin,
            ErrorCode::NotMember,
            "the file was not shared with you",
        );
        return Ok(());
    }
    if send.thumbnail_id != 0 {
        match file_meta(txn, dbs, send.thumbnail_id)? {
            None => {
                refuse(
                    results,
                    send.origin,
                    ErrorCode::UnknownFile,
                    "no such thumbnail file",
                );
                return Ok(());
            }
            Some(thumb) if !may_download(txn, dbs, send.thumbnail_id, thumb.owner, send.from)? => {
                refuse(
                    results,
                    send.origin,
                    ErrorCode::NotMember,
                    "the thumbnail was not shared with you",
                );
                return Ok(());
            }
            Some(_) => {}
        }
    }
    // (audience, conversation of each member as stored in the record, share key)
    let (audience, record_conv, share_keys): (Vec<UserId>, u64, Vec<u64>) = match send.to {
        Some(to) => {
            let mut audience = vec![to];
            if to != send.from {
                audience.push(send.from);
            }
            (audience, to.0, vec![to.0, send.from.0])
        }
        None => {
            let conv = group_conv(send.group_id);
            if dbs
                .groups
                .get(txn, &send.group_id.to_be_bytes())
                .map_err(StoreError::lmdb("read group"))?
                .is_none()
            {
                refuse(
                    results,
                    send.origin,
                    ErrorCode::UnknownGroup,
                    "no such group",
                );
                return Ok(());
            }
            let mut members = Vec::new();
            for item in dbs
                .members
                .prefix_iter(txn, &send.group_id.to_be_bytes())
                .map_err(StoreError::lmdb("open members"))?
            {
                let (key, _) = item.map_err(StoreError::lmdb("read member"))?;
                members.push(UserId(schema::decode_pair(key, "member key length")?.1));
            }
            if !members.contains(&send.from) {
                refuse(
                    results,
                    send.origin,
                    ErrorCode::NotMember,
                    "not a member of this group",
                );
                return Ok(());
            }
            (members, conv, vec![conv])
        }
    };
    let msg_id = next_msg_id(txn, dbs)?;
    let record = Record {
        kind: record_kind::FILE_MESSAGE,
        msg_id,
        conv: record_conv,
        from_id: send.from.0,
        from: send.from_name.to_owned(),
        users: Vec::new(),
        client_msg_id: send.client_msg_id,
        sent_at_ms: send.sent_at_ms,
        up_to: 0,
        text: send.text.to_owned(),
        attachments: vec![Attachment {
            file_id: send.file_id,
            thumbnail_id: send.thumbnail_id,
            media: send.media,
            size: meta.size,
            duration_ms: send.duration_ms,
            width: send.width,
            height: send.height,
            mime: meta.mime.clone(),
            name: meta.name.clone(),
            sha256: meta.sha256.to_vec(),
        }],
    };
    let bytes: Arc<[u8]> = archive_record(&record)?.into();
    put_message(txn, dbs, msg_id, &bytes)?;
    let mut entry = LoggedEntry::new(msg_id, send.from, send.sent_at_ms);
    let mut from_seq = 0;
    for user in &audience {
        // Each side of a 1:1 conversation names it by the other user.
        let conv = match send.to {
            Some(to) if *user == to => send.from.0,
            Some(to) => to.0,
            None => record_conv,
        };
        let seq = journal.place(txn, dbs, &mut entry, *user, Some((conv, NoteKind::Message)))?;
        if *user == send.from {
            from_seq = seq;
        }
        deliveries.push(Delivery {
            user: *user,
            seq,
            message: Arc::clone(&bytes),
        });
    }
    for file in [send.file_id, send.thumbnail_id] {
        if file == 0 {
            continue;
        }
        for key in &share_keys {
            dbs.file_shares
                .put(txn, &schema::pair_key(file, *key), &[])
                .map_err(StoreError::lmdb("write file share"))?;
        }
    }
    entry.set_dedup(send.client_msg_id, from_seq);
    journal.log(txn, dbs, entry)?;
    ack_first_send(send.origin, msg_id, from_seq, send.sent_at_ms, results);
    Ok(())
}

impl<'s> ReadView<'s> {
    pub fn file_meta(&self, file_id: u64) -> Result<Option<FileMeta>, StoreError> {
        file_meta(self.txn(), self.dbs(), file_id)
    }

    /// Whether `user` may download `file_id` (which must exist).
    pub fn may_download(
        &self,
        file_id: u64,
        owner: UserId,
        user: UserId,
    ) -> Result<bool, StoreError> {
        may_download(self.txn(), self.dbs(), file_id, owner, user)
    }

    /// Bytes of files `user` stores, and the node in all.
    pub fn file_usage(&self, user: UserId) -> Result<(u64, u64), StoreError> {
        usage(self.txn(), self.dbs(), user)
    }
}

/// `Store::audit`'s check of every recorded file: its blob exists with the recorded size
/// and SHA-256 (a recorded file must never be partial).
pub(super) fn audit_blobs(
    txn: &RoTxn<'_, heed::WithoutTls>,
    dbs: &Dbs,
    files_dir: &Path,
    audit: &mut super::Audit,
) -> Result<(), StoreError> {
    for item in dbs
        .files
        .iter(txn)
        .map_err(StoreError::lmdb("open files"))?
    {
        let (key, value) = item.map_err(StoreError::lmdb("read file"))?;
        let file_id = schema::decode_u64(key, "file key")?;
        let meta = FileMeta::decode(value)?;
        audit.files += 1;
        let found = hash_file(&blob_path(files_dir, &meta.sha256));
        let why = match found {
            Ok((size, sha256)) if size == meta.size && sha256 == meta.sha256 => continue,
            Ok((size, _)) if size != meta.size => format!("{size} bytes, {} recorded", meta.size),
            Ok(_) => "another SHA-256 than recorded".to_owned(),
            Err(e) => format!("blob unreadable: {e}"),
        };
        audit.bad_files += 1;
        audit.problem(|| format!("file {file_id}: {why}"));
    }
    Ok(())
}
