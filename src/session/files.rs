//! Parsing the file frames of an established connection: upload start, chunk and finish,
//! file messages and downloads. Validated in place; a bad field is answered with an error
//! code and the connection stays open.

use super::{FrameError, Request, write_error};
use crate::limits::{
    FILE_CHUNK_SIZE_MAX, FILE_MIME_SIZE_MAX, FILE_NAME_SIZE_MAX, FILE_SIZE_MAX,
    MESSAGE_TEXT_SIZE_MAX, USER_NAME_SIZE_MAX,
};
use crate::protocol::{
    self, ArchivedDownload, ArchivedFileSend, ArchivedUploadChunk, ArchivedUploadFinish,
    ArchivedUploadStart, ErrorCode, FrameHeader, Kind, media,
};

pub(super) fn is_file_request(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::UploadStart
            | Kind::UploadChunk
            | Kind::UploadFinish
            | Kind::FileSend
            | Kind::Download
    )
}

pub(super) fn handle_frame(
    out: &mut Vec<u8>,
    header: FrameHeader,
    payload: &[u8],
    requests: &mut Vec<Request>,
) -> Result<(), FrameError> {
    let id = header.request_id;
    let malformed = |e: protocol::DecodeError| (id, ErrorCode::MalformedFrame, e.to_string());
    match header.kind {
        Kind::UploadStart => {
            let start =
                protocol::access::<ArchivedUploadStart>(header.kind, payload).map_err(malformed)?;
            if start.name.is_empty() || start.name.len() > FILE_NAME_SIZE_MAX {
                write_error(
                    out,
                    id,
                    ErrorCode::InvalidArgument,
                    "file name must be 1..=255 bytes",
                );
                return Ok(());
            }
            if start.mime.len() > FILE_MIME_SIZE_MAX {
                write_error(
                    out,
                    id,
                    ErrorCode::InvalidArgument,
                    "MIME type over 127 bytes",
                );
                return Ok(());
            }
            let Ok(sha256) = <[u8; 32]>::try_from(start.sha256.as_slice()) else {
                write_error(
                    out,
                    id,
                    ErrorCode::InvalidArgument,
                    "sha256 must be 32 bytes",
                );
                return Ok(());
            };
            if start.size.to_native() > FILE_SIZE_MAX {
                write_error(out, id, ErrorCode::TooLarge, "file over 64 MiB");
                return Ok(());
            }
            requests.push(Request::UploadStart {
                request_id: id,
                name: start.name.as_str().to_owned(),
                mime: start.mime.as_str().to_owned(),
                size: start.size.to_native(),
                sha256,
            });
        }
        Kind::UploadChunk => {
            let chunk =
                protocol::access::<ArchivedUploadChunk>(header.kind, payload).map_err(malformed)?;
            if chunk.data.len() > FILE_CHUNK_SIZE_MAX {
                write_error(out, id, ErrorCode::TooLarge, "chunk over 48 KiB");
                return Ok(());
            }
            requests.push(Request::UploadChunk {
                request_id: id,
                upload_id: chunk.upload_id.to_native(),
                offset: chunk.offset.to_native(),
                data: chunk.data.as_slice().to_vec(),
            });
        }
        Kind::UploadFinish => {
            let finish = protocol::access::<ArchivedUploadFinish>(header.kind, payload)
                .map_err(malformed)?;
            requests.push(Request::UploadFinish {
                request_id: id,
                upload_id: finish.upload_id.to_native(),
            });
        }
        Kind::FileSend => {
            let send =
                protocol::access::<ArchivedFileSend>(header.kind, payload).map_err(malformed)?;
            let group_id = send.group_id.to_native();
            if send.text.len() > MESSAGE_TEXT_SIZE_MAX {
                write_error(out, id, ErrorCode::TooLarge, "caption too long");
                return Ok(());
            }
            if send.client_msg_id.to_native() == 0 {
                write_error(
                    out,
                    id,
                    ErrorCode::InvalidArgument,
                    "client_msg_id must be nonzero",
                );
                return Ok(());
            }
            if (group_id == 0) == send.to.is_empty() {
                write_error(
                    out,
                    id,
                    ErrorCode::InvalidArgument,
                    "name exactly one of to and group_id",
                );
                return Ok(());
            }
            if send.to.len() > USER_NAME_SIZE_MAX {
                write_error(out, id, ErrorCode::UnknownUser, "no such user");
                return Ok(());
            }
            if send.media > media::VOICE {
                write_error(out, id, ErrorCode::InvalidArgument, "unknown media kind");
                return Ok(());
            }
            requests.push(Request::FileSend {
                request_id: id,
                to: send.to.as_str().to_owned(),
                group_id,
                client_msg_id: send.client_msg_id.to_native(),
                file_id: send.file_id.to_native(),
                thumbnail_id: send.thumbnail_id.to_native(),
                media: send.media,
                duration_ms: send.duration_ms.to_native(),
                width: send.width.to_native(),
                height: send.height.to_native(),
                text: send.text.as_str().to_owned(),
            });
        }
        Kind::Download => {
            let d =
                protocol::access::<ArchivedDownload>(header.kind, payload).map_err(malformed)?;
            requests.push(Request::Download {
                request_id: id,
                file_id: d.file_id.to_native(),
                offset: d.offset.to_native(),
                length: d.length.to_native(),
            });
        }
        kind => unreachable!("{kind:?} is not a file request"),
    }
    Ok(())
}
