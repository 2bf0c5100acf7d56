//! Every bound the node enforces, named, with what it costs.
//!
//! Nothing in tern grows without a limit from this file. A limit that needs a value at run
//! time (`--shards`, heartbeat interval) lives in `shard::Config`, with its default here.

/// Largest frame on the wire, header included. Bounds the reassembly buffer of one
/// connection (allocated only while a frame is partially received).
pub const FRAME_SIZE_MAX: usize = 64 * 1024;

/// Fixed frame header: u32 length, u16 kind, u16 flags, u32 request id.
pub const FRAME_HEADER_SIZE: usize = 12;

/// Largest message text in bytes. Leaves room in `FRAME_SIZE_MAX` for the envelope.
pub const MESSAGE_TEXT_SIZE_MAX: usize = 16 * 1024;

/// Longest user name, device name, client name and token, in bytes.
pub const USER_NAME_SIZE_MAX: usize = 64;
pub const DEVICE_NAME_SIZE_MAX: usize = 64;
pub const CLIENT_NAME_SIZE_MAX: usize = 64;
pub const PASSWORD_SIZE_MAX: usize = 256;
pub const TOKEN_SIZE_MAX: usize = 256;
/// Error and kick messages sent by the node are cut to this length.
pub const ERROR_MESSAGE_SIZE_MAX: usize = 256;

/// Most timeline entries in one sync page (also what `limit = 0` asks for). Entries of the
/// largest text would not fit 256 to a frame, so a page also stops at `SYNC_PAGE_BYTES_MAX`.
pub const SYNC_PAGE_ENTRIES_MAX: u32 = 256;
/// Archive bytes of one timeline entry besides its message: seq (u64) plus the message's
/// relative pointer and length (2 × u32), unaligned.
pub const ENTRY_ENVELOPE_SIZE: usize = 16;
/// Byte budget of the messages in one sync page or one push frame. Leaves room for the
/// envelopes of `SYNC_PAGE_ENTRIES_MAX` entries and 1 KiB of header and page fields, so a
/// full page of small messages still fits in `FRAME_SIZE_MAX`.
pub const SYNC_PAGE_BYTES_MAX: usize =
    FRAME_SIZE_MAX - 1024 - SYNC_PAGE_ENTRIES_MAX as usize * ENTRY_ENVELOPE_SIZE;

/// Longest JSON text (one WebSocket text frame) a client may send for one frame
/// (`protocol::json`). Twice `FRAME_SIZE_MAX`: room for the largest frames a client sends in
/// JSON, a full `UploadChunk` (base64 makes its data 4/3 as long) and a `Send` whose text
/// is all escaped control characters (6 bytes each). Longer texts are refused before they
/// are parsed. Parsing holds a tree of at most ~16 B per input byte (2 MiB) while one text
/// is translated.
pub const JSON_TEXT_SIZE_MAX: usize = 2 * FRAME_SIZE_MAX;
/// Deepest nesting of arrays and objects in a client's JSON text. The deepest form is 6
/// (a push: object, entries, entry, record, attachments, attachment); the bound keeps the
/// parser's recursion short.
pub const JSON_DEPTH_MAX: usize = 8;
/// Most keys in one JSON object: the widest form (`FileSend` with `kind` and
/// `request_id`) has 12. Keeps the duplicate-key check linear per object cheap.
pub const JSON_OBJECT_KEYS_MAX: usize = 16;

/// Per-connection write backlog (bytes queued but not yet taken by the kernel). A connection
/// over it is closed; its device resyncs from the timeline on reconnect. 256 KiB × 10k
/// stalled readers would be 2.5 GiB, but only stalled readers hold any of it. Output the
/// shard encodes during a turn counts too, checked as it is produced, so pipelined
/// requests with large answers hold at most this plus one frame before the close.
pub const CONNECTION_BACKLOG_MAX: usize = 256 * 1024;

/// Requests of one connection waiting on the store writer. Past it the connection gets a
/// `busy` error for each further send until completions come back.
pub const CONNECTION_INFLIGHT_MAX: u32 = 1024;

/// Connections one shard holds. Each slot costs `size_of::<session::Conn>()` (~200 B) plus
/// the kernel's socket; the process fd limit is usually the tighter bound.
pub const SHARD_CONNECTIONS_MAX: usize = 1 << 20;

/// Connections that have not logged in yet, per shard. Bounds the work a flood of
/// half-open clients can cause. When the table is full, a new connection closes the one
/// that has waited longest (a legitimate client logs in within ms), so a flood cannot
/// lock others out. The table's arrival queue costs ≤ 2 × 4096 × 8 B = 64 KiB.
pub const SHARD_UNAUTHENTICATED_MAX: usize = 4096;
/// Connections one source address may have in a shard's table of connections that have
/// not logged in; past it, its new connections are refused at accept. Sixteen addresses
/// are needed to fill a table. Each address with a connection waiting costs a ~40 B map
/// entry (≤ 4096 per shard).
pub const SHARD_UNAUTHENTICATED_PER_ADDRESS_MAX: usize = 256;

/// io_uring provided-buffer ring, one per shard: how many receive buffers and how large.
/// Every connection's multishot recv draws from this pool and gives the buffer back as
/// soon as the shard has consumed the bytes, so an idle connection holds none. Cost:
/// 256 × 4 KiB = 1 MiB per shard, resident from start-up. When the
/// pool runs dry a recv ends with ENOBUFS and is re-armed next turn (backpressure).
pub const URING_RECV_BUFFERS: u16 = 256;
pub const URING_RECV_BUFFER_SIZE: usize = 4096;

/// How long an io_uring connection that the node closed may wait for its last output to
/// drain and for the peer's FIN before its remaining operations are cancelled. Bounds the
/// slots a vanished peer can hold after the node gave up on it.
pub const CLOSE_LINGER_MS: u64 = 2_000;

/// With `serve --heartbeat-coalescing on`, in a quiet spell of heartbeats the io_uring loop
/// lets pings gather this long before it wakes (a minimum wait, Linux 6.12+), so one
/// wake-up answers all of them; a pong can be this late. While messages flow no wait is
/// stretched; the first message after a quiet spell can wait this long.
pub const HEARTBEAT_COALESCE_US: u32 = 2_000;
/// Coalescing starts only after this long without message traffic on the shard, so a
/// conversation in progress never meets a stretched wait.
pub const HEARTBEAT_COALESCE_QUIET_MS: u64 = 100;

/// Time a new connection has to say hello and log in.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// TLS 1.3 resumption tickets the node sends after each handshake (full or resumed). One
/// is enough for a phone's next reconnect (each handshake brings a fresh one); a second
/// covers a reconnect racing the first. Each costs ~200 B on the wire and one ticket
/// encryption; the node keeps no state per ticket (stateless tickets).
pub const TLS_TICKETS_PER_HANDSHAKE: usize = 2;
/// Sessions (tickets) a client process keeps for resumption, over every node it talks to.
/// Each costs ~1 KiB (ticket, secret, the server's certificate chain shared by `Arc`).
pub const TLS_CLIENT_SESSIONS_MAX: usize = 256;

/// Default heartbeat interval the node announces in HelloOk.
pub const HEARTBEAT_INTERVAL_MS_DEFAULT: u32 = 30_000;
/// A connection silent for this many heartbeat intervals (in tenths) is closed.
pub const IDLE_TIMEOUT_INTERVAL_TENTHS: u64 = 25;

/// Timer wheel: slot width and slot count. One revolution covers 51.2 s; longer
/// deadlines stay in their slot for more revolutions.
pub const TIMER_TICK_MS: u64 = 100;
pub const TIMER_SLOTS: usize = 512;

/// Ops one shard holds for the writer while the writer's queue is full, in arrival order
/// (each ~100–300 B with its text: ≲ 16 MiB per shard when full). Past it a send is
/// answered `busy`. Each connection is bounded too (`CONNECTION_INFLIGHT_MAX`), so one
/// fast sender cannot fill it alone.
pub const SHARD_WRITER_WAITING_MAX: usize = 64 * 1024;

/// Store writer queue (shards → writer). A full queue makes shards hold further ops in
/// their own line (`SHARD_WRITER_WAITING_MAX`).
pub const WRITER_QUEUE_MAX: usize = 16 * 1024;
/// Most operations applied in one write transaction (one fsync).
pub const WRITER_BATCH_MAX: usize = 1024;

/// How long a logged entry may wait before the writer applies the journal to the derived
/// tables (timelines, conversation indexes, dedup, device cursors). Longer waits rewrite
/// each user's pages for more entries at once (fewer disk bytes per message) and hold the
/// writer longer when the apply comes; delivery receipts go out when the acks behind them
/// are applied, so this is also their delay. A read of derived state for a user with
/// unapplied entries asks for an apply first and never waits this long.
pub const JOURNAL_APPLY_INTERVAL_MS: u64 = 1_000;
/// Placements (entry × timeline) logged but not applied past which the writer applies at
/// the end of the batch, whatever their age. Bounds the writer's memory of unapplied
/// entries (a head per user, a dedup entry per send: ≲ 64 B per placement, 8 MiB), the
/// length of one apply (~0.5 s here for 128k placements over 2000 users) and how far one
/// apply grows the store file (78 MiB then, `DISK_BALLAST_BYTES`). At 32k a window-16 load
/// applied every ~0.4 s and the device wrote 1.8 KB per message; at 128k the interval
/// decides, and it wrote 1.2 KB with 40 % more throughput (docs/architecture.md).
pub const JOURNAL_PLACEMENTS_PENDING_MAX: usize = 128 * 1024;
/// Placements of one logged entry: a group message goes to every member.
pub const JOURNAL_PLACEMENTS_MAX: usize = GROUP_MEMBERS_MAX;
/// Bits of the map of users with unapplied entries, shared by the writer and the shards
/// (8 KiB). Users hash onto it; a collision only costs a read an unneeded apply.
pub const PENDING_USERS_BITS: usize = 64 * 1024;

/// Per-shard mailbox (writer → shard): completions and pushes. The writer waits for room,
/// so a full mailbox slows commits rather than dropping an acknowledgement.
pub const SHARD_MAILBOX_MAX: usize = 64 * 1024;

/// LMDB map size on 64-bit targets and on 32-bit ones, where the map must fit in a 3 GiB
/// address space beside heap and stacks.
pub const MAP_SIZE_DEFAULT_64: usize = 8 << 30;
pub const MAP_SIZE_DEFAULT_32: usize = 768 << 20;
/// Longest a thread waits for every transaction of the node to end before adopting a map
/// size another process grew (`Store::adopt_map_size`, on `MDB_MAP_RESIZED`).
/// Transactions last one request or one commit, so this is rarely more than a few ms, and
/// it happens once per resize; past it the request fails (`storage_failed`) and the next
/// one tries again.
pub const MAP_RESIZE_WAIT_MS: u64 = 200;
/// Disk space the store writer sets aside at start (`<data>/ballast`) and gives back when
/// the disk fills, so the journal's apply, device acks and account changes still fit while
/// new content is refused (`storage::ballast`). Disk only, never memory. An apply of
/// `JOURNAL_PLACEMENTS_PENDING_MAX` placements grew the store file by 78 MiB at most
/// (`commit-bytes 2000 512 256 128` and with 20000 users alike); a larger one that does
/// not fit fails alone and the read that needed it answers `storage_full`.
pub const DISK_BALLAST_BYTES: u64 = 96 << 20;
/// Free space beyond the ballast the file system must show before a full node accepts new
/// content again, so it does not flap at the edge.
pub const DISK_FREE_RESUME_BYTES: u64 = 16 << 20;
/// How often a node with a full disk looks for freed space: one statvfs per interval.
pub const DISK_FULL_CHECK_MS: u64 = 1_000;
/// LMDB reader slots: one per shard thread plus CLI processes reading concurrently.
pub const MAP_READERS_MAX: u32 = 256;

/// Token lifetime.
pub const TOKEN_LIFETIME_MS: u64 = 30 * 24 * 3600 * 1000;

/// Threads that check passwords (argon2id), for the whole node. A check takes tens of ms
/// and 19 MiB while it runs, so 2 threads cost at most 38 MiB and leave the shards their
/// cores; the threads run at a lower priority (nice 10) than the shards.
pub const LOGIN_HASH_THREADS: usize = 2;
/// Password checks waiting for a hashing thread. A login that finds the queue full is
/// answered `busy` at once. Each waiting check holds its password and stored hash
/// (≤ ~400 B), so the queue costs ≤ 26 KiB.
pub const LOGIN_HASH_QUEUE_MAX: usize = 64;
/// Failed password logins an account, or a source address, may have before each further
/// attempt must wait. An address gets more: several users can share one (NAT).
pub const LOGIN_FAILURES_FREE_ACCOUNT: u32 = 3;
pub const LOGIN_FAILURES_FREE_ADDRESS: u32 = 10;
/// Wait after the first failure past the free ones; it doubles with each further failure
/// up to `LOGIN_THROTTLE_DELAY_MS_MAX`.
pub const LOGIN_THROTTLE_DELAY_MS_BASE: u64 = 500;
pub const LOGIN_THROTTLE_DELAY_MS_MAX: u64 = 60_000;
/// A `throttled` answer is held this long (or until the wait ends, if sooner) before it
/// is sent, so a guesser's connections each take a while: a guessing loop that would
/// otherwise spin at hundreds of refusals per second costs the node (and the box) little.
/// Each held answer is one entry per waiting connection, bounded by
/// `SHARD_UNAUTHENTICATED_MAX`.
pub const LOGIN_THROTTLE_ANSWER_HOLD_MS_MAX: u64 = 1_000;
/// A failure record is forgotten this long after its last failure.
pub const LOGIN_THROTTLE_FORGET_MS: u64 = 15 * 60 * 1000;
/// Accounts and addresses with a failure record, each. One record is ~64 B with its map
/// slot, so both maps cost ≤ 1 MiB; when one is full the stalest record is dropped.
pub const LOGIN_THROTTLE_ENTRIES_MAX: usize = 8192;

/// Most shards one node runs.
pub const SHARDS_MAX: usize = 256;

/// Members of one group, the owner included. A group message is one stored message plus,
/// per member, a timeline entry, a conversation-index entry and a conversation update,
/// all in the writer's transaction: about 1,000 B-tree puts for 256 members, a few ms on
/// a Pi-class board, which the writer can afford per message without stalling other
/// sends. 256 also keeps `GroupInfo` (≤ 256 × ~81 B) well inside one frame.
pub const GROUP_MEMBERS_MAX: usize = 256;
/// Groups one user belongs to. Bounds `GroupListPage` (≤ 256 × ~92 B) to one frame and the
/// per-user group index.
pub const USER_GROUPS_MAX: usize = 256;
/// Longest group name in bytes.
pub const GROUP_NAME_SIZE_MAX: usize = 64;
/// Most groups per `GroupListPage`.
pub const GROUP_LIST_PAGE_MAX: u32 = USER_GROUPS_MAX as u32;
/// Most entries per `HistoryPage`; the page also stops at `SYNC_PAGE_BYTES_MAX`.
pub const HISTORY_PAGE_ENTRIES_MAX: u32 = 100;
/// Most conversations per `ConversationsPage`. Each item is at most ~330 B (title, sender,
/// preview), so 64 stay far inside one frame.
pub const CONVERSATIONS_PAGE_MAX: u32 = 64;
/// Timeline entries one device ack examines for delivery receipts. Bounds the writer's
/// work per ack (one message read each); a device catching up on more is covered by its
/// next acks.
pub const DELIVERY_SCAN_MAX: usize = 1024;
/// Users one connection watches (`PresenceSubscribe`) or asks about (`PresenceQuery`).
/// Each watch costs 8 B in the connection's set and 8 B in the presence board, and a
/// `PresenceState` of 256 items (~89 B each) fits one frame.
pub const PRESENCE_WATCH_MAX: usize = 256;
/// Shortest interval between two typing indicators one connection relays; faster ones are
/// dropped without an answer. A group indicator costs a push to every online member.
pub const TYPING_INTERVAL_MS_MIN: u64 = 1_000;
/// Largest file data in one `UploadChunk` or `FileChunk`: leaves room in a frame for the
/// envelope. A 5 MiB file is ~107 chunks.
pub const FILE_CHUNK_SIZE_MAX: usize = 48 * 1024;
/// Largest file. Bounds one upload's temp file and the writer's hash pass at finish
/// (~0.3 s for 64 MiB on a Cortex-A72).
pub const FILE_SIZE_MAX: u64 = 64 << 20;
/// Bytes of files one user may store; an upload past it is refused at start and at finish.
pub const USER_FILES_BYTES_MAX: u64 = 1 << 30;
/// Bytes of files the node stores in all: 16 GiB leaves room for the store and the system
/// on a 32 GB SD card.
pub const NODE_FILES_BYTES_MAX: u64 = 16 << 30;
/// Longest file name and MIME type, in bytes.
pub const FILE_NAME_SIZE_MAX: usize = 255;
pub const FILE_MIME_SIZE_MAX: usize = 127;
/// Uploads one connection has open at once; each holds an open temp file.
pub const UPLOADS_PER_CONNECTION_MAX: usize = 4;
/// Most devices in one `DevicesPage` (the first by name). Each item is at most ~90 B, so a
/// page stays far inside one frame.
pub const DEVICES_PAGE_MAX: usize = 256;
/// Bytes of the last message shown in a conversation-list preview.
pub const CONVERSATION_PREVIEW_SIZE_MAX: usize = 120;

const _: () = assert!(FRAME_HEADER_SIZE < FRAME_SIZE_MAX);
const _: () = assert!(SHARD_UNAUTHENTICATED_PER_ADDRESS_MAX <= SHARD_UNAUTHENTICATED_MAX);
const _: () = assert!(MESSAGE_TEXT_SIZE_MAX + 1024 < SYNC_PAGE_BYTES_MAX);
const _: () = assert!(SYNC_PAGE_BYTES_MAX < FRAME_SIZE_MAX);
const _: () = assert!(TIMER_SLOTS.is_power_of_two());
const _: () = assert!(URING_RECV_BUFFERS.is_power_of_two() && URING_RECV_BUFFERS <= 1 << 15);
const _: () = assert!(SHARDS_MAX <= u16::MAX as usize);
const _: () =
    assert!(GROUP_MEMBERS_MAX * (8 + 8 + USER_NAME_SIZE_MAX + 1 + 8) < SYNC_PAGE_BYTES_MAX);
const _: () = assert!(JOURNAL_PLACEMENTS_MAX <= u16::MAX as usize);
const _: () = assert!(PENDING_USERS_BITS.is_multiple_of(64));
const _: () =
    assert!(USER_GROUPS_MAX * (8 + 8 + GROUP_NAME_SIZE_MAX + 8 + 4 + 8) < SYNC_PAGE_BYTES_MAX);
const _: () = assert!(
    CONVERSATIONS_PAGE_MAX as usize
        * (8 + 3 * 8 + 8 + 4 + 8 + 8 + 2 * USER_NAME_SIZE_MAX + CONVERSATION_PREVIEW_SIZE_MAX)
        < SYNC_PAGE_BYTES_MAX
);
const _: () =
    assert!(PRESENCE_WATCH_MAX * (8 + 8 + USER_NAME_SIZE_MAX + 1 + 8) < SYNC_PAGE_BYTES_MAX);
const _: () =
    assert!(FILE_CHUNK_SIZE_MAX + FILE_NAME_SIZE_MAX + FILE_MIME_SIZE_MAX + 256 < FRAME_SIZE_MAX);
const _: () = assert!(FILE_SIZE_MAX <= USER_FILES_BYTES_MAX);
const _: () = assert!(DEVICES_PAGE_MAX * (8 + DEVICE_NAME_SIZE_MAX + 8 + 2) < SYNC_PAGE_BYTES_MAX);
const _: () = assert!(LOGIN_HASH_THREADS >= 1 && LOGIN_HASH_QUEUE_MAX >= LOGIN_HASH_THREADS);
const _: () = assert!(LOGIN_THROTTLE_DELAY_MS_BASE <= LOGIN_THROTTLE_DELAY_MS_MAX);
const _: () = assert!(LOGIN_THROTTLE_DELAY_MS_MAX < LOGIN_THROTTLE_FORGET_MS);
const _: () = assert!(USER_FILES_BYTES_MAX <= NODE_FILES_BYTES_MAX);
const _: () = assert!(FILE_CHUNK_SIZE_MAX.div_ceil(3) * 4 + 4096 <= JSON_TEXT_SIZE_MAX);
const _: () = assert!(6 * MESSAGE_TEXT_SIZE_MAX + 4096 <= JSON_TEXT_SIZE_MAX);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{EntryRef, Kind, PushRef, SyncPageRef, encode};

    /// Regression: a burst of small messages to one user made a push frame larger than
    /// `FRAME_SIZE_MAX`, and the encoder's assertion took the node down.
    #[test]
    fn a_full_page_of_small_messages_fits_in_one_frame() {
        let per_entry = SYNC_PAGE_BYTES_MAX / SYNC_PAGE_ENTRIES_MAX as usize;
        let message = vec![7u8; per_entry];
        let entries = || {
            (0..u64::from(SYNC_PAGE_ENTRIES_MAX))
                .map(|seq| EntryRef {
                    seq,
                    message: &message,
                })
                .collect::<Vec<_>>()
        };
        let mut out = Vec::new();
        let size = encode(&mut out, Kind::Push, 0, &PushRef { entries: entries() });
        assert!(size <= FRAME_SIZE_MAX);
        let page = SyncPageRef {
            entries: entries(),
            head_seq: u64::MAX,
            has_more: true,
        };
        out.clear();
        assert!(encode(&mut out, Kind::SyncPage, 1, &page) <= FRAME_SIZE_MAX);
    }
}
