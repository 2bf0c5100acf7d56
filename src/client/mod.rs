//! The client SDK: what a device (the CLI, the load generator, an app) runs to talk to a
//! node.
//!
//! - `session`: the protocol logic of one device as a sans-IO state machine: handshake,
//!   login with password or token, heartbeats, request timeouts, reconnect with backoff,
//!   the outbox of unacknowledged sends, timeline sync with gap detection, device acks.
//! - `store`: the `ClientStore` interface behind which a device keeps its state (last seq,
//!   received entries, the outbox) and `MemoryStore`, the in-memory implementation.
//! - `team`: groups, group sends, history, the conversation list and read marks, as
//!   requests on the session and blocking calls on the driver.
//! - `blocking`: a small driver over `std::net::TcpStream` for the CLI and tests.
//!
//! Architecture invariant: `session` and `store` never touch a socket, a file or the clock;
//! time comes in as an argument and randomness from a seed. Only `blocking` does I/O.
//! Nothing here panics on bytes from the node: a node is a peer, and a malicious or broken
//! one costs the client a reconnect, never a crash.
//!
//! The client's own bounds live here rather than in `crate::limits`, which holds what the
//! node enforces; they are related to the node's limits by const assertions below.

mod account;
mod blocking;
mod files;
mod session;
mod store;
mod team;

#[cfg(test)]
mod tests;

pub use blocking::{Acked, BlockingClient, ClientError};
pub use files::FileMessage;
pub use session::{
    Action, ClientConfig, ClientSession, EntryRecord, Event, Listener, ReceivedMessage, SendError,
};
pub use store::{ClientStore, MemoryStore, OutboxItem};
pub use team::TeamAnswer;

use crate::limits::CONNECTION_INFLIGHT_MAX;

/// Sends one connection has on the wire awaiting their `SendAck`. The rest of the outbox
/// waits its turn. Kept below the node's per-connection bound so a well-behaved client
/// never provokes `busy` by itself.
pub const SENDS_IN_FLIGHT_MAX: usize = 256;

/// Unacknowledged sends one session holds. Each costs its text (at most
/// `MESSAGE_TEXT_SIZE_MAX`, 16 KiB) plus the recipient name, so a full outbox of the
/// largest texts is 16 MiB; a send past it is refused with `SendError::OutboxFull`.
pub const OUTBOX_MAX: usize = 1024;

/// Shortest heartbeat interval the client honours. A node announcing less (or zero) would
/// otherwise make the client ping in a busy loop.
pub const HEARTBEAT_INTERVAL_MS_MIN: u64 = 10;

/// Defaults of `ClientConfig`.
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 15_000;
/// Longer than a connect over a slow, lossy link needs with a lost SYN or two (the kernel
/// resends after 1 s, 2 s, ...), short enough that a network back from an outage is
/// noticed within one backoff rather than at the kernel's next, minutes-apart SYN.
pub const CONNECT_TIMEOUT_MS_DEFAULT: u64 = 10_000;
pub const RECONNECT_ATTEMPTS_MAX_DEFAULT: u32 = 6;
pub const BACKOFF_BASE_MS_DEFAULT: u64 = 500;
pub const BACKOFF_MAX_MS_DEFAULT: u64 = 30_000;
/// Pause of the outbox after the node answered a send with `busy`.
pub const BUSY_RETRY_MS_DEFAULT: u64 = 200;
/// 0 asks the node for its maximum page (`limits::SYNC_PAGE_ENTRIES_MAX`).
pub const SYNC_PAGE_LIMIT_DEFAULT: u32 = 0;

/// Messages `BlockingClient` buffers for `received`/`take_received` between drains. Past
/// it, messages still reach the store and the listener but are counted instead of
/// buffered (`BlockingClient::received_overflow`). Costs up to 4096 × (text + names).
pub const RECEIVED_BUFFER_MAX: usize = 4096;

/// Bytes `BlockingClient` reads from its socket per read call (one buffer per client).
pub const READ_BUFFER_SIZE: usize = 64 * 1024;

const _: () = assert!(SENDS_IN_FLIGHT_MAX as u32 <= CONNECTION_INFLIGHT_MAX);
const _: () = assert!(SENDS_IN_FLIGHT_MAX <= OUTBOX_MAX);
const _: () = assert!(HEARTBEAT_INTERVAL_MS_MIN > 0);
