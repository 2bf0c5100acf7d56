//! The store: LMDB through heed. Users, messages, per-user timelines, device ack cursors,
//! groups and conversation indexes.
//!
//! `Store` opens the environment and hands out short read transactions (`ReadView`) that
//! shard threads use without ever blocking. All message writes go through the one writer
//! thread in `writer` (group commit); the only other write is `Store::add_user`, which takes
//! its own transaction so the `tern add-user` command can run beside a live node.
//!
//! This module must not: open a write transaction on a shard thread (a write transaction
//! waits on LMDB's process-wide writer lock, and a commit waits for an fsync); keep a read
//! transaction beyond one request (it pins old pages and fills the map); or cache a counter
//! outside a transaction (another process may have written since).

mod account;
mod apply;
mod audit;
mod ballast;
mod bulk;
mod conversations;
mod error;
mod files;
mod groups;
mod journal;
mod read;
mod receipts;
mod schema;
pub mod writer;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;

use heed::{EnvFlags, EnvOpenOptions, WithoutTls};

pub use account::{AccountChange, AccountOp, Revoked};
pub use audit::{Audit, TableStat};
pub use bulk::{BULK_USERS_MAX, BulkUsers};
pub use error::StoreError;
pub use files::{FileMeta, blob_path, upload_path};
pub use read::ReadView;
pub use writer::{
    CommitSink, Delivery, FileSendOp, OpResult, Origin, Reply, WriteOp, WriterCounters,
    WriterHandle, WriterStats, apply_batch, log_batch, spawn_writer,
};

use crate::ids::UserId;
use crate::limits::{MAP_READERS_MAX, MAP_RESIZE_WAIT_MS, USER_NAME_SIZE_MAX};
use schema::{Dbs, META_NEXT_USER_ID};

/// Whether a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every group commit fsyncs before its sends are acknowledged.
    Fsync,
    /// LMDB `NO_SYNC`: commits reach the page cache only; the OS writes them back later, and
    /// `Store::sync` forces them out at shutdown. A power cut loses the last commits (and
    /// on file systems that reorder writes may damage the store). For SD cards whose fsync
    /// latency would otherwise bound throughput.
    None,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Bytes of address space reserved for the map, and the most the store file can grow
    /// to. Rounded up to the page size at open.
    pub map_size: usize,
    pub durability: Durability,
    /// Most milliseconds a logged entry waits before the writer applies the journal to the
    /// derived tables (`JOURNAL_APPLY_INTERVAL_MS` by default). 0 applies it with every
    /// commit: each message then rewrites its users' pages at once, as a store without a
    /// journal would (for comparison and for tests that read derived state directly).
    pub journal_interval_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            map_size: MAP_SIZE_DEFAULT,
            durability: Durability::Fsync,
            journal_interval_ms: crate::limits::JOURNAL_APPLY_INTERVAL_MS,
        }
    }
}

/// A 32-bit process must fit the whole map in its 3 GiB address space.
#[cfg(target_pointer_width = "64")]
const MAP_SIZE_DEFAULT: usize = crate::limits::MAP_SIZE_DEFAULT_64;
#[cfg(not(target_pointer_width = "64"))]
const MAP_SIZE_DEFAULT: usize = crate::limits::MAP_SIZE_DEFAULT_32;

/// A user account as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: UserId,
    pub name: String,
    /// Argon2 PHC string (see `auth::hash_password`).
    pub password_hash: String,
}

/// The open store. Cheap to clone; every clone shares one LMDB environment.
#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    /// `<data>/files`: content-addressed file blobs, and `tmp/` for uploads in progress.
    files_dir: std::path::PathBuf,
    /// Read transactions without thread-local reader slots: a thread may hold two views at
    /// once without `BadRslot`, and a view could move between threads.
    env: heed::Env<WithoutTls>,
    dbs: Dbs,
    durability: Durability,
    journal_interval_ms: u64,
    /// Users with journal entries the derived tables do not show yet (`journal.rs`).
    pending: Arc<journal::PendingUsers>,
    counters: WriterCounters,
    /// Every transaction of this process holds it shared; adopting a map size grown by
    /// another process takes it exclusively (LMDB may resize the map only while this
    /// process has no transaction). Never waited on as a writer: `adopt_map_size` only
    /// tries, so a thread holding a view may open another one without deadlock.
    gate: std::sync::RwLock<()>,
}

// Shards and the writer share the store across threads.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Store>();
};

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    ///
    /// heed allows one environment per path per process: opening a directory this process
    /// already has open fails with `StoreError::Lmdb` (`EnvAlreadyOpened`). Clone the
    /// `Store` instead. Other processes may open it at the same time.
    pub fn open(dir: &Path, config: &StoreConfig) -> Result<Store, StoreError> {
        Store::open_with(dir, config, false)
    }

    /// Opens the store the way an admin tool beside a running node must: an existing store
    /// is opened with the map size recorded in it (the running node's), whatever
    /// `config.map_size` says, so the tool never grows the map under the node; when it does
    /// not fit, the tool fails with `StoreError::Full`. A new store gets `config.map_size`.
    pub fn open_beside_node(dir: &Path, config: &StoreConfig) -> Result<Store, StoreError> {
        Store::open_with(dir, config, dir.join("data.mdb").exists())
    }

    fn open_with(dir: &Path, config: &StoreConfig, adopt: bool) -> Result<Store, StoreError> {
        if config.map_size == 0 {
            return Err(StoreError::InvalidArgument("map size is zero"));
        }
        let map_size = round_up_to_page(config.map_size)?;
        std::fs::create_dir_all(dir).map_err(|error| StoreError::Io {
            op: "create store dir",
            error,
        })?;
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options
            .max_dbs(schema::DATABASES_MAX)
            .max_readers(MAP_READERS_MAX);
        if !adopt {
            // Without it LMDB takes the size recorded in the environment.
            options.map_size(map_size);
        }
        if config.durability == Durability::None {
            // SAFETY: NO_SYNC only drops the fsync at commit. Without WRITE_MAP (never set
            // here) LMDB keeps atomicity and consistency; a system crash loses the most
            // recent commits, which is the documented contract of `Durability::None`.
            unsafe {
                options.flags(EnvFlags::NO_SYNC);
            }
        }
        // SAFETY: the map is only modified through LMDB; this process never writes the data
        // or lock file by other means, never truncates them, and the store directory is not
        // on a network file system (a documented requirement of the node's data folder).
        let env = unsafe { options.open(dir) }.map_err(StoreError::lmdb("open env"))?;
        let dbs = schema::create(&env)?;
        let files_dir = dir.join("files");
        std::fs::create_dir_all(files_dir.join("tmp")).map_err(|error| StoreError::Io {
            op: "create files dir",
            error,
        })?;
        Ok(Store {
            inner: Arc::new(StoreInner {
                files_dir,
                env,
                dbs,
                durability: config.durability,
                journal_interval_ms: config.journal_interval_ms,
                pending: Arc::new(journal::PendingUsers::new()),
                counters: WriterCounters::default(),
                gate: std::sync::RwLock::new(()),
            }),
        })
    }

    /// Creates a user in its own write transaction. Ids start at 1 and are never reused.
    ///
    /// The name is stored in NFC (`names::normalize`) and must be unique ignoring case
    /// (`names::user_key`): `AlreadyExists` for `BOB` beside `bob`.
    pub fn add_user(&self, name: &str, password_hash: &str) -> Result<UserId, StoreError> {
        let name = &user_name_checked(name)?;
        if password_hash.is_empty() {
            return Err(StoreError::InvalidArgument("password hash is empty"));
        }
        let dbs = &self.inner.dbs;
        let mut txn = self
            .inner
            .env
            .write_txn()
            .map_err(StoreError::lmdb("begin add_user txn"))?;
        let key = crate::names::user_key(name);
        let taken = dbs
            .users
            .get(&txn, key.as_bytes())
            .map_err(StoreError::lmdb("read user"))?;
        if taken.is_some() {
            return Err(StoreError::AlreadyExists);
        }
        // Read inside the transaction: the node's writer never touches this counter, but a
        // second `add-user` process might have bumped it since we last looked.
        let id = schema::counter_next(&txn, dbs, META_NEXT_USER_ID)?;
        debug_assert!((1..u64::MAX).contains(&id));
        let mut value = Vec::with_capacity(8 + password_hash.len());
        value.extend_from_slice(&id.to_be_bytes());
        value.extend_from_slice(password_hash.as_bytes());
        dbs.users
            .put(&mut txn, key.as_bytes(), &value)
            .map_err(StoreError::lmdb("write user"))?;
        let user = UserId(id);
        dbs.user_names
            .put(&mut txn, &schema::user_key(user), name.as_bytes())
            .map_err(StoreError::lmdb("write user name"))?;
        schema::counter_set(&mut txn, dbs, META_NEXT_USER_ID, id + 1)?;
        txn.commit().map_err(StoreError::lmdb("commit add_user"))?;
        Ok(user)
    }

    /// A short read transaction. Drop it before the request it serves is answered.
    ///
    /// If another process grew the map (LMDB's `MDB_MAP_RESIZED`, e.g. an admin tool run
    /// with a larger `--map-size-mib`), adopts the new size and retries once.
    pub fn read(&self) -> Result<ReadView<'_>, StoreError> {
        let mut adopted = false;
        loop {
            let gate = self.gate_shared();
            match self.inner.env.read_txn() {
                Ok(txn) => return Ok(ReadView::new(txn, &self.inner.dbs, gate)),
                Err(heed::Error::Mdb(heed::MdbError::MapResized)) if !adopted => {
                    drop(gate);
                    self.adopt_map_size()?;
                    adopted = true;
                }
                Err(e) => return Err(StoreError::lmdb("begin read txn")(e)),
            }
        }
    }

    /// A write transaction for the node's writer thread, with the gate that keeps the map
    /// from being resized under it; like `read`, adopts a map grown by another process and
    /// retries once. Keep the returned guard alive until the transaction is committed or
    /// dropped: `let (_gate, mut txn) = store.write_txn()?;` (the tuple drops the
    /// transaction first).
    pub fn write_txn(
        &self,
    ) -> Result<(std::sync::RwLockReadGuard<'_, ()>, heed::RwTxn<'_>), StoreError> {
        let mut adopted = false;
        loop {
            let gate = self.gate_shared();
            match self.inner.env.write_txn() {
                Ok(txn) => return Ok((gate, txn)),
                Err(heed::Error::Mdb(heed::MdbError::MapResized)) if !adopted => {
                    drop(gate);
                    self.adopt_map_size()?;
                    adopted = true;
                }
                Err(e) => return Err(StoreError::lmdb("begin write txn")(e)),
            }
        }
    }

    fn gate_shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        // The gate guards no data: a panic while it was held leaves nothing inconsistent.
        self.inner.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Adopts the map size another process recorded (`mdb_env_set_mapsize(0)`), once no
    /// transaction of this process is open. Tries for at most `MAP_RESIZE_WAIT_MS`
    /// (transactions are short: the writer's lasts one commit); `StoreError::Busy` if
    /// transactions never all ended in that time (the caller's request fails, the next one
    /// tries again). Called by `read` and `write_txn` when LMDB reports `MDB_MAP_RESIZED`.
    pub fn adopt_map_size(&self) -> Result<(), StoreError> {
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_millis(MAP_RESIZE_WAIT_MS);
        loop {
            match self.inner.gate.try_write() {
                Ok(_exclusive) => {
                    // SAFETY: the exclusive gate means no transaction of this process is
                    // open (every one holds the gate shared while it lives), which is
                    // LMDB's condition for mdb_env_set_mapsize on an open environment.
                    return unsafe { self.inner.env.resize(0) }
                        .map_err(StoreError::lmdb("adopt map size"));
                }
                Err(std::sync::TryLockError::Poisoned(e)) => {
                    drop(e);
                    self.inner.gate.clear_poison();
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(StoreError::Busy("another process resized the map"));
                    }
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
            }
        }
    }

    /// Bytes the map spans now (grows when another process's larger size is adopted).
    pub fn map_size(&self) -> usize {
        self.inner.env.info().map_size
    }

    pub fn durability(&self) -> Durability {
        self.inner.durability
    }

    /// Flushes every commit to disk. With `Durability::None` this is what makes the last
    /// commits durable; call it at shutdown.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.inner
            .env
            .force_sync()
            .map_err(StoreError::lmdb("force sync"))
    }

    /// Where file blobs live (`<data>/files`); uploads in progress are in its `tmp/`.
    pub fn files_dir(&self) -> &Path {
        &self.inner.files_dir
    }

    /// Whether `user` may have entries that the derived tables (timeline, history,
    /// conversations) do not show yet. While true, read those through a `WriteOp::Flush`
    /// first; false means a read begun now sees every entry of `user` acknowledged or pushed
    /// so far.
    pub fn derived_pending(&self, user: UserId) -> bool {
        self.inner.pending.contains(user)
    }

    /// What the writer thread has done so far.
    pub fn writer_counters(&self) -> &WriterCounters {
        &self.inner.counters
    }

    /// See `StoreConfig::journal_interval_ms`.
    pub fn journal_interval_ms(&self) -> u64 {
        self.inner.journal_interval_ms
    }

    pub(crate) fn pending_users(&self) -> Arc<journal::PendingUsers> {
        Arc::clone(&self.inner.pending)
    }

    pub(crate) fn env(&self) -> &heed::Env<WithoutTls> {
        &self.inner.env
    }

    pub(crate) fn dbs(&self) -> &Dbs {
        &self.inner.dbs
    }
}

/// LMDB refuses a map size that is not a multiple of the OS page size (4 KiB on x86, up to
/// 64 KiB on some ARM kernels), so round up instead of failing on one board and not another.
fn round_up_to_page(size: usize) -> Result<usize, StoreError> {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = usize::try_from(page)
        .ok()
        .filter(|p| p.is_power_of_two())
        .ok_or_else(|| StoreError::Io {
            op: "read page size",
            error: std::io::Error::last_os_error(),
        })?;
    size.checked_next_multiple_of(page)
        .ok_or(StoreError::InvalidArgument("map size overflows"))
}

/// `name` in NFC if it is a valid user name (`names`), or why not.
pub(crate) fn user_name_checked(name: &str) -> Result<String, StoreError> {
    use crate::names::NameError;
    crate::names::normalize(name, USER_NAME_SIZE_MAX).map_err(|e| {
        StoreError::InvalidArgument(match e {
            NameError::Empty => "user name is empty",
            NameError::TooLong => "user name is too long",
            NameError::OuterWhitespace => "user name starts or ends with whitespace",
            NameError::Control => "user name holds a control character",
        })
    })
}
