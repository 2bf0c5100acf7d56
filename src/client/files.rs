//! Files on the client: chunked upload with resume, file messages, chunked download with
//! resume. Uploads are keyed on the node by (user, SHA-256, size), so starting the same
//! content again after a lost connection resumes where the node's copy ends.

use std::time::Instant;

use sha2::{Digest, Sha256};

use super::blocking::{BlockingClient, ClientError};
use super::session::ClientSession;
use super::store::ClientStore;
use super::team::{OnLost, TeamAnswer};
use crate::limits::{FILE_CHUNK_SIZE_MAX, MESSAGE_TEXT_SIZE_MAX};
use crate::protocol::{
    self, Download, FileChunk, FileInfo, FileSend, Kind, SendAck, UploadAck, UploadChunk,
    UploadFinish, UploadReady, UploadStart,
};

/// How a file message is shown (`protocol::media`) and its optional details.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileMessage {
    pub media: u8,
    pub thumbnail_id: u64,
    pub duration_ms: u32,
    pub width: u32,
    pub height: u32,
    pub caption: String,
}

impl<S: ClientStore> ClientSession<S> {
    pub fn upload_start(
        &mut self,
        name: &str,
        mime: &str,
        size: u64,
        sha256: [u8; 32],
        now: Instant,
    ) -> Option<u32> {
        let frame = UploadStart {
            name: name.to_owned(),
            mime: mime.to_owned(),
            size,
            sha256: sha256.to_vec(),
        };
        self.team_request(now, |tx, id| {
            protocol::encode(tx, Kind::UploadStart, id, &frame);
        })
    }

    pub fn upload_chunk(
        &mut self,
        upload_id: u64,
        offset: u64,
        data: &[u8],
        now: Instant,
    ) -> Option<u32> {
        let frame = UploadChunk {
            upload_id,
            offset,
            data: data.to_vec(),
        };
        self.team_request(now, |tx, id| {
            protocol::encode(tx, Kind::UploadChunk, id, &frame);
        })
    }

    pub fn upload_finish(&mut self, upload_id: u64, now: Instant) -> Option<u32> {
        self.team_request(now, |tx, id| {
            protocol::encode(tx, Kind::UploadFinish, id, &UploadFinish { upload_id });
        })
    }

    /// A file message to user `to` (when `group_id` is 0) or to a group.
    pub fn file_send(
        &mut self,
        to: &str,
        group_id: u64,
        client_msg_id: u64,
        file_id: u64,
        message: &FileMessage,
        now: Instant,
    ) -> Option<u32> {
        let frame = FileSend {
            to: to.to_owned(),
            group_id,
            client_msg_id,
            file_id,
            thumbnail_id: message.thumbnail_id,
            media: message.media,
            duration_ms: message.duration_ms,
            width: message.width,
            height: message.height,
            text: message.caption.clone(),
        };
        self.team_request(now, |tx, id| {
            protocol::encode(tx, Kind::FileSend, id, &frame);
        })
    }

    pub fn download(
        &mut self,
        file_id: u64,
        offset: u64,
        length: u32,
        now: Instant,
    ) -> Option<u32> {
        self.team_request(now, |tx, id| {
            let frame = Download {
                file_id,
                offset,
                length,
            };
            protocol::encode(tx, Kind::Download, id, &frame);
        })
    }
}

impl<S: ClientStore> BlockingClient<S> {
    /// Starts (or resumes) an upload of content with this size and hash; returns the
    /// upload id and the offset to send from.
    pub fn upload_start(
        &mut self,
        name: &str,
        mime: &str,
        size: u64,
        sha256: [u8; 32],
    ) -> Result<UploadReady, ClientError> {
        match self.team_call(OnLost::Retry, |s, now| {
            s.upload_start(name, mime, size, sha256, now)
        })? {
            TeamAnswer::UploadReady(ready) => Ok(ready),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Sends one chunk; returns the node's new offset. A lost connection fails with
    /// `ClientError::Lost`: start again to resume.
    pub fn upload_chunk(
        &mut self,
        upload_id: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<UploadAck, ClientError> {
        match self.team_call(OnLost::Fail, |s, now| {
            s.upload_chunk(upload_id, offset, data, now)
        })? {
            TeamAnswer::UploadAck(ack) => Ok(ack),
            _ => Err(ClientError::Unexpected),
        }
    }

    pub fn upload_finish(&mut self, upload_id: u64) -> Result<FileInfo, ClientError> {
        match self.team_call(OnLost::Fail, |s, now| s.upload_finish(upload_id, now))? {
            TeamAnswer::File(info) => Ok(info),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Uploads `data` in chunks, resuming from what the node holds (after a lost
    /// connection, or from an earlier process), and returns the stored file.
    pub fn upload(&mut self, name: &str, mime: &str, data: &[u8]) -> Result<FileInfo, ClientError> {
        let sha256: [u8; 32] = Sha256::digest(data).into();
        let size = data.len() as u64;
        // Each lost connection restarts from the node's offset; progress is kept, so this
        // ends unless the connection keeps dropping, which the session turns into Offline.
        loop {
            let ready = self.upload_start(name, mime, size, sha256)?;
            let mut offset = ready.offset;
            let outcome = (|| {
                while offset < size {
                    let end = (offset as usize + FILE_CHUNK_SIZE_MAX).min(data.len());
                    let ack =
                        self.upload_chunk(ready.upload_id, offset, &data[offset as usize..end])?;
                    offset = ack.offset;
                }
                self.upload_finish(ready.upload_id)
            })();
            match outcome {
                Err(ClientError::Lost) => continue,
                other => return other,
            }
        }
    }

    /// One chunk of a file from `offset`.
    pub fn download_chunk(&mut self, file_id: u64, offset: u64) -> Result<FileChunk, ClientError> {
        let length = FILE_CHUNK_SIZE_MAX as u32;
        match self.team_call(OnLost::Retry, |s, now| {
            s.download(file_id, offset, length, now)
        })? {
            TeamAnswer::Chunk(chunk) if chunk.offset == offset => Ok(chunk),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Downloads a whole file, appending to `out` from `out.len()` (so a partial download
    /// of this same file resumes), checks the SHA-256 of all of `out` against the one the
    /// node states for the file, and returns its size.
    ///
    /// Errors: `ClientError::Corrupt` when the assembled bytes are not the file (the
    /// partial bytes in `out` were not a prefix of it, or the transfer went wrong); `out`
    /// is then cleared, so a retry starts over. Requests failing as in `download_chunk`.
    pub fn download(&mut self, file_id: u64, out: &mut Vec<u8>) -> Result<u64, ClientError> {
        let mut expected: Option<Vec<u8>> = None;
        loop {
            let chunk = self.download_chunk(file_id, out.len() as u64)?;
            if chunk.sha256.len() != 32 || expected.as_ref().is_some_and(|e| *e != chunk.sha256) {
                out.clear();
                return Err(ClientError::Corrupt(
                    "the file's SHA-256 changed between chunks",
                ));
            }
            expected = Some(chunk.sha256);
            out.extend_from_slice(&chunk.data);
            if out.len() as u64 >= chunk.size || chunk.data.is_empty() {
                let sha256: [u8; 32] = Sha256::digest(&out[..]).into();
                if out.len() as u64 != chunk.size || expected.as_deref() != Some(&sha256[..]) {
                    out.clear();
                    return Err(ClientError::Corrupt(
                        "the downloaded bytes do not match the file's size and SHA-256",
                    ));
                }
                return Ok(chunk.size);
            }
        }
    }

    /// Sends a message carrying file `file_id` to user `to` or to group `group_id` (give
    /// exactly one), and waits until it is stored.
    pub fn send_file(
        &mut self,
        to: Option<&str>,
        group_id: Option<u64>,
        file_id: u64,
        message: &FileMessage,
    ) -> Result<SendAck, ClientError> {
        if message.caption.len() > MESSAGE_TEXT_SIZE_MAX {
            return Err(ClientError::Invalid("caption too long"));
        }
        let (to, group_id) = match (to, group_id) {
            (Some(to), None) => (to, 0),
            (None, Some(group_id)) => ("", group_id),
            _ => {
                return Err(ClientError::Invalid(
                    "name exactly one of a user and a group",
                ));
            }
        };
        let client_msg_id = self.session_mut().fresh_client_msg_id();
        match self.team_call(OnLost::Retry, |s, now| {
            s.file_send(to, group_id, client_msg_id, file_id, message, now)
        })? {
            TeamAnswer::Sent(ack) => Ok(ack),
            _ => Err(ClientError::Unexpected),
        }
    }
}
