//! Wire protocol v1: frame header, message types, codec and error codes.
//!
//! A frame is `u32 length | u16 kind | u16 flags | u32 request_id | rkyv archive`, all
//! little-endian; `length` counts the bytes after itself. The archive is validated in place
//! with rkyv's checked access before any field is read. This module does no I/O and keeps
//! no state beyond the frame it is given.

mod account;
mod codec;
mod error;
mod files;
pub mod json;
mod messages;
mod presence;
mod team;

pub use account::*;
pub use codec::{
    DecodeError, FrameHeader, FrameReader, Kind, access, encode, encode_with, frame_len,
    read_header,
};
pub use error::ErrorCode;
pub use files::*;
pub use messages::*;
pub use presence::*;
pub use team::*;

/// Protocol version spoken by this build. A hello with another version is refused with
/// `ErrorCode::UnsupportedVersion`.
pub const PROTOCOL_VERSION: u32 = 1;
