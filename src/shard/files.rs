//! The shard's side of files: uploads in progress on this shard's connections (their temp
//! files), downloads, and handing finished uploads and file messages to the store writer.
//!
//! Chunk writes and download reads are single `write`/`pread` calls of at most
//! `FILE_CHUNK_SIZE_MAX` bytes on the shard thread, without fsync: bounded work that the
//! page cache usually absorbs. Everything that waits for the disk (hashing the whole file,
//! fsync, rename) runs on the writer thread at finish.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

use super::{Shard, wall_clock_ms};
use crate::ids::{ConnId, UserId};
use crate::limits::{
    FILE_CHUNK_SIZE_MAX, NODE_FILES_BYTES_MAX, UPLOADS_PER_CONNECTION_MAX, USER_FILES_BYTES_MAX,
};
use crate::protocol::{ErrorCode, FileChunk, Kind, UploadAck, UploadReady};
use crate::session::Request;
use crate::storage::{FileSendOp, Origin, WriteOp, blob_path, upload_path};

/// An upload in progress on one connection. The bytes so far are in its temp file, which
/// outlives the connection so a later start (any connection of the same user) resumes it.
#[derive(Debug)]
pub(super) struct Upload {
    pub id: u64,
    pub name: String,
    pub mime: String,
    pub size: u64,
    pub sha256: [u8; 32],
    /// Bytes in the temp file; the next chunk must start here.
    pub offset: u64,
    pub file: File,
}

impl Shard {
    /// File requests. Returns the request back if it is not one of them.
    pub(super) fn handle_file_request(
        &mut self,
        conn_id: ConnId,
        request: Request,
    ) -> Option<Request> {
        let identity = self.conn_mut(conn_id)?.identity().cloned()?;
        match request {
            Request::UploadStart {
                request_id,
                name,
                mime,
                size,
                sha256,
            } => self.upload_start(conn_id, identity.user, request_id, name, mime, size, sha256),
            Request::UploadChunk {
                request_id,
                upload_id,
                offset,
                data,
            } => self.upload_chunk(conn_id, request_id, upload_id, offset, &data),
            Request::UploadFinish {
                request_id,
                upload_id,
            } => self.upload_finish(conn_id, identity.user, request_id, upload_id),
            Request::FileSend {
                request_id,
                to,
                group_id,
                client_msg_id,
                file_id,
                thumbnail_id,
                media,
                duration_ms,
                width,
                height,
                text,
            } => {
                let to = if group_id == 0 {
                    match self.ctx.store.read().and_then(|v| v.user_by_name(&to)) {
                        Ok(Some(record)) => Some(record.id),
                        Ok(None) => {
                            self.answer_error(
                                conn_id,
                                request_id,
                                ErrorCode::UnknownUser,
                                "no such user",
                            );
                            return None;
                        }
                        Err(e) => {
                            self.answer_error(
                                conn_id,
                                request_id,
                                ErrorCode::StorageFailed,
                                &e.to_string(),
                            );
                            return None;
                        }
                    }
                } else {
                    None
                };
                let op = WriteOp::FileSend(Box::new(FileSendOp {
                    origin: Origin {
                        shard: self.id,
                        conn: conn_id,
                        request_id,
                    },
                    from: identity.user,
                    from_name: identity.name,
                    to,
                    group_id,
                    client_msg_id,
                    file_id,
                    thumbnail_id,
                    media,
                    duration_ms,
                    width,
                    height,
                    text,
                    sent_at_ms: wall_clock_ms(),
                }));
                self.submit(conn_id, request_id, op);
            }
            Request::Download {
                request_id,
                file_id,
                offset,
                length,
            } => self.download(conn_id, identity.user, request_id, file_id, offset, length),
            other => return Some(other),
        }
        None
    }

    #[allow(clippy::too_many_arguments)]
    fn upload_start(
        &mut self,
        conn_id: ConnId,
        user: UserId,
        request_id: u32,
        name: String,
        mime: String,
        size: u64,
        sha256: [u8; 32],
    ) {
        if self.uploads.get(&conn_id).map_or(0, Vec::len) >= UPLOADS_PER_CONNECTION_MAX {
            return self.answer_error(
                conn_id,
                request_id,
                ErrorCode::Busy,
                "4 uploads open on this connection",
            );
        }
        let usage = self.ctx.store.read().and_then(|view| view.file_usage(user));
        match usage {
            Ok((user_bytes, _)) if user_bytes + size > USER_FILES_BYTES_MAX => {
                return self.answer_error(
                    conn_id,
                    request_id,
                    ErrorCode::QuotaExceeded,
                    "the user's file quota is full",
                );
            }
            Ok((_, node_bytes)) if node_bytes + size > NODE_FILES_BYTES_MAX => {
                return self.answer_error(
                    conn_id,
                    request_id,
                    ErrorCode::QuotaExceeded,
                    "the node's file space is full",
                );
            }
            Ok(_) => {}
            Err(e) => {
                return self.answer_error(
                    conn_id,
                    request_id,
                    ErrorCode::StorageFailed,
                    &e.to_string(),
                );
            }
        }
        // The offset counts only bytes this user sent for this upload: never whether the
        // node holds the content already (that would hand the content to anyone who knows
        // its hash, and tell them it is stored). Dedup happens at finish, out of sight.
        let path = upload_path(self.ctx.store.files_dir(), user, &sha256, size);
        let opened = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|file| {
                let held = file.metadata()?.len();
                if held > size {
                    // Longer than announced: not this content; start over.
                    file.set_len(0)?;
                    return Ok((file, 0));
                }
                Ok((file, held))
            });
        let (file, held) = match opened {
            Ok(found) => found,
            Err(e) => {
                return self.answer_error(
                    conn_id,
                    request_id,
                    io_error_code(&e),
                    &format!("open upload: {e}"),
                );
            }
        };
        let offset = held;
        self.next_upload_id += 1;
        let id = self.next_upload_id;
        self.uploads.entry(conn_id).or_default().push(Upload {
            id,
            name,
            mime,
            size,
            sha256,
            offset,
            file,
        });
        if let Some(conn) = self.conn_mut(conn_id) {
            conn.reply(
                Kind::UploadReady,
                request_id,
                &UploadReady {
                    upload_id: id,
                    offset,
                },
            );
        }
        self.mark_dirty(conn_id);
    }

    fn upload_chunk(
        &mut self,
        conn_id: ConnId,
        request_id: u32,
        upload_id: u64,
        offset: u64,
        data: &[u8],
    ) {
        let Some(upload) = self
            .uploads
            .get_mut(&conn_id)
            .and_then(|list| list.iter_mut().find(|u| u.id == upload_id))
        else {
            return self.answer_error(
                conn_id,
                request_id,
                ErrorCode::UnknownFile,
                "no such upload on this connection",
            );
        };
        if offset != upload.offset {
            let message = format!(
                "chunk at {offset}, but the upload stands at {}",
                upload.offset
            );
            return self.answer_error(conn_id, request_id, ErrorCode::FileMismatch, &message);
        }
        if offset + data.len() as u64 > upload.size {
            return self.answer_error(
                conn_id,
                request_id,
                ErrorCode::FileMismatch,
                "chunk past the announced size",
            );
        }
        if let Err(e) = upload.file.write_all(data) {
            // A short write leaves part of the chunk behind; cut it off so that the upload
            // resumes at the offset the client was told.
            let _ = upload.file.set_len(upload.offset);
            return self.answer_error(
                conn_id,
                request_id,
                io_error_code(&e),
                &format!("write upload: {e}"),
            );
        }
        upload.offset += data.len() as u64;
        let ack = UploadAck {
            upload_id,
            offset: upload.offset,
        };
        if let Some(conn) = self.conn_mut(conn_id) {
            conn.reply(Kind::UploadAck, request_id, &ack);
        }
        self.mark_dirty(conn_id);
    }

    fn upload_finish(&mut self, conn_id: ConnId, user: UserId, request_id: u32, upload_id: u64) {
        let Some(list) = self.uploads.get_mut(&conn_id) else {
            return self.answer_error(
                conn_id,
                request_id,
                ErrorCode::UnknownFile,
                "no such upload on this connection",
            );
        };
        let Some(index) = list.iter().position(|u| u.id == upload_id) else {
            return self.answer_error(
                conn_id,
                request_id,
                ErrorCode::UnknownFile,
                "no such upload on this connection",
            );
        };
        if list[index].offset != list[index].size {
            let message = format!("{} of {} bytes sent", list[index].offset, list[index].size);
            return self.answer_error(conn_id, request_id, ErrorCode::FileMismatch, &message);
        }
        let upload = list.swap_remove(index);
        if list.is_empty() {
            self.uploads.remove(&conn_id);
        }
        drop(upload.file);
        let op = WriteOp::FileCommit {
            origin: Origin {
                shard: self.id,
                conn: conn_id,
                request_id,
            },
            owner: user,
            name: upload.name,
            mime: upload.mime,
            size: upload.size,
            sha256: upload.sha256,
            at_ms: wall_clock_ms(),
        };
        self.submit(conn_id, request_id, op);
    }

    fn download(
        &mut self,
        conn_id: ConnId,
        user: UserId,
        request_id: u32,
        file_id: u64,
        offset: u64,
        length: u32,
    ) {
        let checked = self.ctx.store.read().and_then(|view| {
            let Some(meta) = view.file_meta(file_id)? else {
                return Ok(Err((ErrorCode::UnknownFile, "no such file")));
            };
            if !view.may_download(file_id, meta.owner, user)? {
                return Ok(Err((
                    ErrorCode::NotMember,
                    "not a member of a conversation where this file was shared",
                )));
            }
            Ok(Ok(meta))
        });
        let meta = match checked {
            Ok(Ok(meta)) => meta,
            Ok(Err((code, message))) => {
                return self.answer_error(conn_id, request_id, code, message);
            }
            Err(e) => {
                return self.answer_error(
                    conn_id,
                    request_id,
                    ErrorCode::StorageFailed,
                    &e.to_string(),
                );
            }
        };
        if offset > meta.size {
            return self.answer_error(
                conn_id,
                request_id,
                ErrorCode::InvalidArgument,
                "offset past the end of the file",
            );
        }
        // 0 asks for the most a chunk holds.
        let want = match length as usize {
            0 => FILE_CHUNK_SIZE_MAX,
            n => n.min(FILE_CHUNK_SIZE_MAX),
        } as u64;
        let take = want.min(meta.size - offset) as usize;
        let mut data = vec![0u8; take];
        let path = blob_path(self.ctx.store.files_dir(), &meta.sha256);
        let read = File::open(&path).and_then(|file| file.read_exact_at(&mut data, offset));
        if let Err(e) = read {
            return self.answer_error(
                conn_id,
                request_id,
                ErrorCode::StorageFailed,
                &format!("read file: {e}"),
            );
        }
        let chunk = FileChunk {
            file_id,
            offset,
            size: meta.size,
            data,
            sha256: meta.sha256.to_vec(),
        };
        if let Some(conn) = self.conn_mut(conn_id) {
            conn.reply(Kind::FileChunk, request_id, &chunk);
        }
        self.mark_dirty(conn_id);
    }
}

/// `storage_full` for a file system without room (`ENOSPC`, `EDQUOT`): the client may retry
/// once the operator made room; `storage_failed` for any other error.
fn io_error_code(error: &std::io::Error) -> ErrorCode {
    match error.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => ErrorCode::StorageFull,
        _ => ErrorCode::StorageFailed,
    }
}
