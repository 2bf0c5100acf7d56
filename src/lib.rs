//! tern: an instant-messaging node for small hardware. See docs/architecture.md.

pub mod auth;
pub mod client;
pub mod ids;
pub mod limits;
pub mod protocol;
pub mod storage;
