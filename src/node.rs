//! Starting and stopping a node: data folder, store, writer, shard threads.
//!
//! This is the only code that spawns the node's threads. It binds one SO_REUSEPORT
//! listener per shard and per listening address (the native port, and a TLS port beside
//! it when asked), so the kernel spreads connections over shards.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::auth::TokenKey;
use crate::ids::ShardId;
use crate::io::epoll::EpollBackend;
use crate::io::{Backend, BackendStats, IoKind, ListenerIndex, StatsCell};
use crate::limits::{SHARD_MAILBOX_MAX, SHARDS_MAX};
use crate::routing::Directory;
use crate::session::SessionConfig;
use crate::shard::login::HashPool;
use crate::shard::mailbox::{Mailbox, Router};
use crate::shard::{Shard, ShardContext, ShardStats};
use crate::storage::{Durability, Store, StoreConfig, WriterStats, spawn_writer};
use crate::transport::ListenerKind;

/// Pending connections per listener.
const LISTEN_BACKLOG: i32 = 4096;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// The native port: plain, or TLS-only when `tls` says `TlsMode::Only`.
    pub listen: SocketAddr,
    /// TLS settings, if the node speaks TLS at all.
    pub tls: Option<TlsSettings>,
    pub shards: usize,
    pub durability: Durability,
    pub heartbeat_interval_ms: u32,
    /// io_uring shards answer the pings of a quiet spell in one wake-up per
    /// `limits::HEARTBEAT_COALESCE_US` (see `io::Handler::heartbeats_only`).
    pub heartbeat_coalescing: bool,
    pub io: IoKind,
    pub map_size: Option<usize>,
    /// See `StoreConfig::journal_interval_ms`.
    pub journal_interval_ms: u64,
}

/// How a node serves TLS.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Certificate, key and tickets (`transport::tls::server_config`).
    pub config: Arc<rustls::ServerConfig>,
    pub mode: TlsMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// The native port speaks only TLS (`serve --tls-cert --tls-key`).
    Only,
    /// The native port stays plain and a TLS port listens here too (`--tls-listen`).
    Beside(SocketAddr),
}

#[derive(Debug)]
pub enum NodeError {
    /// Another node holds the data folder.
    DataDirInUse(PathBuf),
    Io {
        op: &'static str,
        error: io::Error,
    },
    Store(crate::storage::StoreError),
    Config(String),
}

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeError::DataDirInUse(dir) => {
                write!(
                    f,
                    "another tern node is using the data folder {}",
                    dir.display()
                )
            }
            NodeError::Io { op, error } => write!(f, "{op}: {error}"),
            NodeError::Store(e) => write!(f, "store: {e}"),
            NodeError::Config(message) => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for NodeError {}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> NodeError {
    move |error| NodeError::Io { op, error }
}

pub struct Node {
    addr: SocketAddr,
    /// The TLS port beside the native one (`TlsMode::Beside`).
    tls_addr: Option<SocketAddr>,
    stop: Arc<AtomicBool>,
    mailboxes: Arc<[Mailbox]>,
    shards: Vec<JoinHandle<io::Result<ShardStats>>>,
    stats_cells: Vec<Arc<StatsCell>>,
    writer: Option<JoinHandle<WriterStats>>,
    /// The password-checking threads (`shard::login::HashPool`).
    hash_threads: Vec<JoinHandle<()>>,
    store: Store,
    io: IoKind,
    /// Held for the node's life: the data folder lock.
    _lock: File,
}

impl Node {
    pub fn start(config: &NodeConfig) -> Result<Node, NodeError> {
        if config.shards == 0 || config.shards > SHARDS_MAX {
            return Err(NodeError::Config(format!(
                "--shards must be 1..={SHARDS_MAX}"
            )));
        }
        std::fs::create_dir_all(&config.data_dir).map_err(io_err("create data folder"))?;
        let lock = lock_data_dir(&config.data_dir)?;
        let mut store_config = StoreConfig {
            durability: config.durability,
            journal_interval_ms: config.journal_interval_ms,
            ..StoreConfig::default()
        };
        if let Some(map_size) = config.map_size {
            store_config.map_size = map_size;
        }
        let store = Store::open(&config.data_dir, &store_config).map_err(NodeError::Store)?;
        let token_key = Arc::new(
            TokenKey::load_or_create(&config.data_dir).map_err(io_err("load node secret"))?,
        );

        // Every shard listens on the same addresses, in this order (`ListenerIndex`).
        let mut listen: Vec<(SocketAddr, ListenerKind)> = match &config.tls {
            None => vec![(config.listen, ListenerKind::Plain)],
            Some(TlsSettings {
                mode: TlsMode::Only,
                ..
            }) => vec![(config.listen, ListenerKind::Tls)],
            Some(TlsSettings {
                mode: TlsMode::Beside(tls_addr),
                ..
            }) => vec![
                (config.listen, ListenerKind::Plain),
                (*tls_addr, ListenerKind::Tls),
            ],
        };
        let listener_kinds: Arc<[ListenerKind]> = listen.iter().map(|&(_, kind)| kind).collect();
        let mut backends: Vec<Box<dyn Backend + Send>> = Vec::with_capacity(config.shards);
        let mut stats_cells = Vec::with_capacity(config.shards);
        for _ in 0..config.shards {
            let mut listeners = Vec::with_capacity(listen.len());
            for (addr, _) in listen.iter_mut() {
                let listener = bind_reuseport(*addr).map_err(io_err("bind listener"))?;
                // Port 0 resolves on the first bind; the other shards join that port.
                *addr = listener
                    .local_addr()
                    .map_err(io_err("read listener address"))?;
                listeners.push(listener);
            }
            let cell = Arc::new(StatsCell::default());
            stats_cells.push(cell.clone());
            backends.push(new_backend(config.io, listeners, cell)?);
        }
        debug_assert!(
            backends[0].local_addr(ListenerIndex(0)).ok() == Some(listen[0].0),
            "listener order is the ListenerIndex order"
        );
        let addr = listen[0].0;
        let tls_addr = listen.get(1).map(|&(addr, _)| addr);
        let mailboxes: Arc<[Mailbox]> = backends
            .iter()
            .map(|b| Mailbox::new(SHARD_MAILBOX_MAX, b.waker()))
            .collect();
        let directory = Arc::new(Directory::new());
        let router = Router::new(directory.clone(), mailboxes.clone());
        let (writer, writer_thread) =
            spawn_writer(store.clone(), router).map_err(io_err("spawn store writer"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (hash_pool, hash_threads) =
            HashPool::spawn(mailboxes.clone()).map_err(io_err("spawn login threads"))?;
        let ctx = ShardContext {
            store: store.clone(),
            writer,
            directory,
            mailboxes: mailboxes.clone(),
            token_key,
            hash_pool,
            throttle: Arc::default(),
            session: Arc::new(SessionConfig {
                heartbeat_interval_ms: config.heartbeat_interval_ms,
                node_name: format!("tern {}", env!("CARGO_PKG_VERSION")),
            }),
            heartbeat_coalescing: config.heartbeat_coalescing,
            listeners: listener_kinds,
            tls: config.tls.as_ref().map(|t| t.config.clone()),
            stop: stop.clone(),
        };
        let mut shards = Vec::with_capacity(config.shards);
        for (i, mut backend) in backends.into_iter().enumerate() {
            let mut shard = Shard::new(ShardId(i as u16), ctx.clone());
            let thread = std::thread::Builder::new()
                .name(format!("tern-shard-{i}"))
                .spawn(move || -> io::Result<ShardStats> {
                    backend.run(&mut shard)?;
                    Ok(shard.stats())
                })
                .map_err(io_err("spawn shard thread"))?;
            shards.push(thread);
        }
        // The shards own the only writer handles now: the writer ends after they do.
        drop(ctx);
        Ok(Node {
            addr,
            tls_addr,
            stop,
            mailboxes,
            shards,
            stats_cells,
            writer: Some(writer_thread),
            hash_threads,
            store,
            io: config.io,
            _lock: lock,
        })
    }

    /// The native port's address (TLS-only under `TlsMode::Only`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The TLS port beside the native one, under `TlsMode::Beside`.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    pub fn io(&self) -> IoKind {
        self.io
    }

    /// The node's store (for its counters; writes go through the writer thread).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The io backends' counters summed over shards, or None if a shard did not answer
    /// within `timeout` (each shard publishes them on its next loop turn).
    pub fn backend_stats(&self, timeout: Duration) -> Option<BackendStats> {
        let seen: Vec<u64> = self.stats_cells.iter().map(|c| c.request()).collect();
        for mailbox in self.mailboxes.iter() {
            mailbox.wake();
        }
        let deadline = Instant::now() + timeout;
        let mut total = BackendStats::default();
        for (cell, seen) in self.stats_cells.iter().zip(seen) {
            loop {
                if let Some(stats) = cell.published_after(seen) {
                    total.add(&stats);
                    break;
                }
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Some(total)
    }

    /// Stops accepting, closes connections, lets the writer commit what is queued, syncs.
    pub fn shutdown(mut self) -> Result<(), NodeError> {
        self.stop.store(true, Ordering::SeqCst);
        for mailbox in self.mailboxes.iter() {
            mailbox.wake();
        }
        let mut first_error = None;
        for shard in self.shards.drain(..) {
            match shard.join() {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    first_error = first_error.or(Some(NodeError::Io {
                        op: "shard loop",
                        error,
                    }))
                }
                Err(_) => panic!("a shard thread panicked"),
            }
        }
        // The shards held the only senders of the login queue: its threads end now.
        for thread in self.hash_threads.drain(..) {
            thread.join().expect("a login thread panicked");
        }
        if let Some(writer) = self.writer.take() {
            writer.join().expect("the store writer panicked");
        }
        self.store.sync().map_err(NodeError::Store)?;
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn new_backend(
    io: IoKind,
    listeners: Vec<TcpListener>,
    cell: Arc<StatsCell>,
) -> Result<Box<dyn Backend + Send>, NodeError> {
    match io {
        IoKind::Epoll => Ok(Box::new(
            EpollBackend::new(listeners, cell).map_err(io_err("create epoll loop"))?,
        )),
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        IoKind::Uring => Ok(Box::new(
            crate::io::uring::UringBackend::new(listeners, cell)
                .map_err(io_err("create io_uring loop"))?,
        )),
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        IoKind::Uring => Err(NodeError::Config(
            "io_uring is not built for this target".to_owned(),
        )),
    }
}

fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

fn lock_data_dir(dir: &Path) -> Result<File, NodeError> {
    let path = dir.join("node.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("open data folder lock"))?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(NodeError::DataDirInUse(dir.to_path_buf()));
    }
    Ok(file)
}

/// Raises the open-file soft limit to the hard limit and grows the kernel's fd table to
/// its full size now: in a threaded process each doubling of the table waits for an RCU
/// grace period, which stalls accept for milliseconds at a time under a connect storm.
pub fn prepare_fd_table() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to and read from a valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    let top = limit.rlim_cur.min(1 << 20) as i32 - 1;
    if top > 2 {
        // SAFETY: dup2 onto an unused high descriptor, closed right away.
        unsafe {
            if libc::dup2(2, top) == top {
                libc::close(top);
            }
        }
    }
    // rlim_t is 32 bits on armv7.
    #[allow(clippy::unnecessary_cast)]
    Ok(limit.rlim_cur as u64)
}
