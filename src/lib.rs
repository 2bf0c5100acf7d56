//! tern: an instant-messaging node for small hardware. See docs/architecture.md.

pub mod auth;
pub mod client;
pub mod ids;
pub mod io;
pub mod limits;
pub mod names;
pub mod node;
pub mod protocol;
pub mod routing;
pub mod session;
pub mod shard;
pub mod storage;
pub mod transport;
