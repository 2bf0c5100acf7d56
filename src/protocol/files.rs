//! File transfer frames (kinds 33–41): chunked upload with resume, file messages, and
//! chunked download by id. Blobs live outside the store; these frames carry their bytes in
//! chunks of at most `FILE_CHUNK_SIZE_MAX`.

use rkyv::{Archive, Deserialize, Serialize};

/// `Attachment.media` values.
pub mod media {
    pub const FILE: u8 = 0;
    pub const IMAGE: u8 = 1;
    pub const VOICE: u8 = 2;
}

/// Client → node: begin (or resume) uploading a file of `size` bytes whose SHA-256 is
/// `sha256` (32 bytes). Answered by `UploadReady`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct UploadStart {
    pub name: String,
    pub mime: String,
    pub size: u64,
    pub sha256: Vec<u8>,
}

/// Node → client: send chunks from `offset` (bytes of this upload the node holds already:
/// 0 for a new upload, more when resuming one that a lost connection interrupted).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadReady {
    pub upload_id: u64,
    pub offset: u64,
}

/// Client → node: the bytes of the upload at `offset` (which must equal what the node
/// holds). Answered by `UploadAck`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct UploadChunk {
    pub upload_id: u64,
    pub offset: u64,
    pub data: Vec<u8>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadAck {
    pub upload_id: u64,
    /// Bytes the node now holds.
    pub offset: u64,
}

/// Client → node: every byte was sent; verify size and hash and store the file. Answered
/// by `FileInfo` once the file is durable.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadFinish {
    pub upload_id: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub file_id: u64,
    pub name: String,
    pub mime: String,
    pub size: u64,
    pub sha256: Vec<u8>,
}

/// A file referenced from a message.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub file_id: u64,
    /// 0: none.
    pub thumbnail_id: u64,
    /// `media::*`.
    pub media: u8,
    pub size: u64,
    /// Voice: length; 0 otherwise.
    pub duration_ms: u32,
    /// Image: dimensions; 0 otherwise.
    pub width: u32,
    pub height: u32,
    pub mime: String,
    pub name: String,
    /// SHA-256 of the file's content (32 bytes): what a downloader checks before it
    /// reports the file complete.
    pub sha256: Vec<u8>,
}

/// Client → node: a message carrying a file, to a user (`to`, with `group_id` 0) or to a
/// group (`group_id`, with `to` empty). Answered by `SendAck`; deduplicated like `Send`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FileSend {
    pub to: String,
    pub group_id: u64,
    pub client_msg_id: u64,
    pub file_id: u64,
    pub thumbnail_id: u64,
    pub media: u8,
    pub duration_ms: u32,
    pub width: u32,
    pub height: u32,
    /// Caption, ≤ `MESSAGE_TEXT_SIZE_MAX`.
    pub text: String,
}

/// Client → node: `length` bytes (0: the most a chunk holds) of file `file_id` from
/// `offset`. Answered by `FileChunk`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Download {
    pub file_id: u64,
    pub offset: u64,
    pub length: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FileChunk {
    pub file_id: u64,
    pub offset: u64,
    /// The file's size: the download is complete when `offset + data.len() == size`.
    pub size: u64,
    pub data: Vec<u8>,
    /// SHA-256 of the whole file (32 bytes), the same in every chunk: a downloader checks
    /// the bytes it assembled against it before it reports success.
    pub sha256: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archived_sizes_match_the_documentation() {
        use std::mem::size_of;
        assert_eq!(size_of::<ArchivedUploadStart>(), 32);
        assert_eq!(size_of::<ArchivedUploadReady>(), 16);
        assert_eq!(size_of::<ArchivedUploadChunk>(), 24);
        assert_eq!(size_of::<ArchivedUploadAck>(), 16);
        assert_eq!(size_of::<ArchivedUploadFinish>(), 8);
        assert_eq!(size_of::<ArchivedFileInfo>(), 40);
        assert_eq!(size_of::<ArchivedAttachment>(), 61);
        assert_eq!(size_of::<ArchivedFileSend>(), 61);
        assert_eq!(size_of::<ArchivedDownload>(), 20);
        assert_eq!(size_of::<ArchivedFileChunk>(), 40);
    }
}
