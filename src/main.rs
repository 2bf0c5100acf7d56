//! The `tern` command line: run a node, manage users, send and sync from a shell.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use tern::io::probe::{IoRequest, probe_uring, select};
use tern::limits::{HEARTBEAT_INTERVAL_MS_DEFAULT, JOURNAL_APPLY_INTERVAL_MS};
use tern::node::{Node, NodeConfig, TlsMode, TlsSettings, prepare_fd_table};
use tern::storage::{Durability, Store, StoreConfig, StoreError};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Instant-messaging node for small hardware"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long, default_value = "./tern-data")]
    data: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7420")]
    listen: SocketAddr,
    /// Shard threads; default one per core.
    #[arg(long)]
    shards: Option<usize>,
    #[arg(long, value_enum, default_value_t = DurabilityArg::Fsync)]
    durability: DurabilityArg,
    /// Heartbeat interval announced to clients; idle connections close after 2.5 of them.
    #[arg(long, default_value_t = HEARTBEAT_INTERVAL_MS_DEFAULT)]
    heartbeat_ms: u32,
    /// LMDB map size in MiB (default: 8192 on 64-bit, 768 on 32-bit).
    #[arg(long)]
    map_size_mib: Option<usize>,
    /// Event loop: auto takes io_uring when the kernel allows it, else epoll.
    #[arg(long, value_enum, default_value_t = IoArg::Auto)]
    io: IoArg,
    /// Let io_uring shards (Linux 6.12+) answer the pings of a quiet spell (no messages
    /// for 100 ms) together, one wake-up per 2 ms; the first message after the spell can
    /// wait those 2 ms. Off by default: at ~1000 pings/s per shard it saved few wake-ups
    /// and cost more CPU than it saved (docs/architecture.md, "Measured cost").
    #[arg(long, value_enum, default_value_t = Switch::Off)]
    heartbeat_coalescing: Switch,
    /// Most ms a stored message waits before the per-user timelines, conversation indexes
    /// and unread counts are brought up to date from the store's journal (reads never wait
    /// for it). Longer writes fewer disk bytes per message; 0 updates them with every
    /// commit.
    #[arg(long, default_value_t = JOURNAL_APPLY_INTERVAL_MS)]
    journal_interval_ms: u64,
    /// PEM certificate chain (server first). With --tls-key, the --listen port speaks only
    /// TLS, unless --tls-listen names a TLS port of its own.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, SEC1 or PKCS#1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A TLS port beside the plain --listen port.
    #[arg(long, value_name = "ADDR", requires = "tls_cert")]
    tls_listen: Option<SocketAddr>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Serve(ServeArgs),
    /// Manage users (works while the node runs).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Send one message and wait for its durable ack; prints one JSON object.
    Send {
        #[command(flatten)]
        account: cli_client::Account,
        #[arg(long)]
        to: String,
        text: String,
    },
    /// Print the timeline after a seq, one JSON object per entry and line.
    Sync {
        #[command(flatten)]
        account: cli_client::Account,
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// A user's devices on a running node: list, revoke (JSON lines).
    Device {
        #[command(subcommand)]
        command: cli_account::DeviceCommand,
    },
    /// Log --device out of a running node (its tokens stop working), or every device of
    /// --user with --everywhere.
    Logout {
        #[command(flatten)]
        account: cli_client::Account,
        #[arg(long)]
        everywhere: bool,
    },
    /// Check a store's consistency (works while the node runs): timelines contiguous,
    /// unread counts equal to a recount, every recorded file complete. Prints one JSON
    /// object; exits 1 when a problem was found.
    Check {
        #[arg(long, default_value = "./tern-data")]
        data: PathBuf,
    },
    /// Groups: create, add, remove, leave, rename, info, list, send (JSON lines).
    Group {
        #[command(subcommand)]
        command: cli_team::GroupCommand,
    },
    /// Page backwards through one conversation, newest first (JSON lines).
    History {
        #[command(flatten)]
        account: cli_client::Account,
        /// A group conversation.
        #[arg(long, conflicts_with = "with")]
        group: Option<u64>,
        /// A 1:1 conversation with this user.
        #[arg(long)]
        with: Option<String>,
        /// Entries with timeline seq below this one (0: from the newest).
        #[arg(long, default_value_t = 0)]
        before: u64,
        /// Entries per page (0: the node's maximum).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Keep paging until the first entry.
        #[arg(long)]
        all: bool,
    },
    /// The user's conversations by last activity, with unread counts (JSON lines).
    Conversations {
        #[command(flatten)]
        account: cli_client::Account,
        #[arg(long, default_value_t = 0)]
        offset: u32,
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Print users' presence (JSON lines); with --watch, also their changes for that long.
    Presence {
        #[command(flatten)]
        account: cli_client::Account,
        #[arg(required = true)]
        users: Vec<String>,
        /// Seconds to watch for changes (0: just print the presence now).
        #[arg(long, default_value_t = 0)]
        watch: u64,
    },
    /// Upload a file and send it to a user or a group (prints the file id).
    Upload {
        #[command(flatten)]
        account: cli_client::Account,
        file: PathBuf,
        #[arg(long, conflicts_with = "group", required_unless_present = "group")]
        to: Option<String>,
        #[arg(long)]
        group: Option<u64>,
        /// How the message shows the file: file, image or voice.
        #[arg(long, default_value = "file")]
        media: String,
        #[arg(long, default_value = "application/octet-stream")]
        mime: String,
    },
    /// Download a file by id to --out, through --out.part (resumed by a later run for the
    /// same file); verifies the SHA-256 before the file appears at --out.
    Download {
        #[command(flatten)]
        account: cli_client::Account,
        file_id: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// TLS certificates for a node without a public name.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Mark a conversation read up to a timeline seq.
    Read {
        #[command(flatten)]
        account: cli_client::Account,
        /// Conversation id (as printed by `tern conversations`).
        conv: u64,
        up_to_seq: u64,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Write a private CA (ca.pem, ca.key) and a server certificate signed by it
    /// (server.pem, server.key) into --out; clients pin ca.pem (`--tls --ca`).
    Generate {
        #[arg(long)]
        out: PathBuf,
        /// A host name or IP address clients use to reach the node (repeat for more).
        #[arg(long = "name", value_name = "HOST", required = true)]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user.
    Add {
        name: String,
        #[arg(long)]
        password: String,
        #[arg(long, default_value = "./tern-data")]
        data: PathBuf,
    },
    /// Create users PREFIX0 … PREFIX(COUNT-1) sharing one password, in one transaction
    /// (the password is hashed once). Existing users are kept. Prints one JSON object.
    AddBulk {
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        count: u64,
        /// Number of the first user.
        #[arg(long, default_value_t = 0)]
        first: u64,
        #[arg(long)]
        password: String,
        #[arg(long, default_value = "./tern-data")]
        data: PathBuf,
        /// LMDB map size in MiB. Without it an existing store keeps the size recorded in
        /// it (a running node's); with it the map may grow, and a running node adopts it.
        #[arg(long)]
        map_size_mib: Option<usize>,
    },
    /// Change --user's password (--password is the current one) on a running node: every
    /// token of the user stops working and its connections are closed.
    Passwd {
        #[command(flatten)]
        account: cli_client::Account,
        #[arg(long)]
        new_password: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum IoArg {
    Auto,
    Epoll,
    Uring,
}

#[derive(Clone, Copy, ValueEnum)]
enum DurabilityArg {
    /// fsync every group commit: an acknowledged message survives power loss.
    Fsync,
    /// No fsync: survives a process crash, may lose the last commits on power loss.
    None,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::User {
            command:
                UserCommand::Add {
                    name,
                    password,
                    data,
                },
        } => user_add(&data, &name, &password),
        Command::User {
            command:
                UserCommand::AddBulk {
                    prefix,
                    count,
                    first,
                    password,
                    data,
                    map_size_mib,
                },
        } => user_add_bulk(&data, &prefix, first, count, &password, map_size_mib),
        Command::User {
            command:
                UserCommand::Passwd {
                    account,
                    new_password,
                },
        } => cli_account::passwd(&account, &new_password),
        Command::Device { command } => cli_account::device(command),
        Command::Logout {
            account,
            everywhere,
        } => cli_account::logout(&account, everywhere),
        Command::Send { account, to, text } => cli_client::send(&account, &to, &text),
        Command::Sync { account, after } => cli_client::sync(&account, after),
        Command::Check { data } => check(&data),
        Command::Group { command } => cli_team::group(command),
        Command::History {
            account,
            group,
            with,
            before,
            limit,
            all,
        } => cli_team::history(&account, group, with.as_deref(), before, limit, all),
        Command::Conversations {
            account,
            offset,
            limit,
        } => cli_team::conversations(&account, offset, limit),
        Command::Read {
            account,
            conv,
            up_to_seq,
        } => cli_team::read(&account, conv, up_to_seq),
        Command::Cert {
            command: CertCommand::Generate { out, names },
        } => cert_generate(&out, &names),
        Command::Presence {
            account,
            users,
            watch,
        } => cli_team::presence(&account, &users, watch),
        Command::Upload {
            account,
            file,
            to,
            group,
            media,
            mime,
        } => cli_team::upload(&account, &file, to.as_deref(), group, &media, &mime),
        Command::Download {
            account,
            file_id,
            out,
        } => cli_team::download(&account, file_id, &out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tern: {message}");
            ExitCode::FAILURE
        }
    }
}

fn check(data: &std::path::Path) -> Result<(), String> {
    if !data.join("data.mdb").exists() {
        return Err(format!("no store in {}", data.display()));
    }
    let store =
        Store::open_beside_node(data, &StoreConfig::default()).map_err(|e| e.to_string())?;
    let audit = store.audit().map_err(|e| e.to_string())?;
    let line = serde_json::json!({
        "clean": audit.is_clean(),
        "users": audit.users,
        "timeline_entries": audit.timeline_entries,
        "timeline_gaps": audit.timeline_gaps,
        "missing_messages": audit.missing_messages,
        "conversations": audit.conversations,
        "unread_mismatches": audit.unread_mismatches,
        "files": audit.files,
        "bad_files": audit.bad_files,
        "journal_entries": audit.journal_entries,
        "problems": audit.details,
        "tables": audit.tables.iter().map(|t| (t.name.to_owned(), serde_json::json!({
            "entries": t.entries,
            "leaf_pages": t.leaf_pages,
            "branch_pages": t.branch_pages,
            "overflow_pages": t.overflow_pages,
        }))).collect::<serde_json::Map<String, serde_json::Value>>(),
    });
    println!("{line}");
    if audit.is_clean() {
        Ok(())
    } else {
        Err("the store has problems (listed above)".into())
    }
}

fn cert_generate(out: &std::path::Path, names: &[String]) -> Result<(), String> {
    let files = tern::transport::cert::generate(out, names).map_err(|e| e.to_string())?;
    println!(
        "{}",
        serde_json::json!({
            "ca_cert": files.ca_cert.display().to_string(),
            "ca_key": files.ca_key.display().to_string(),
            "server_cert": files.server_cert.display().to_string(),
            "server_key": files.server_key.display().to_string(),
        })
    );
    Ok(())
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let ServeArgs {
        data,
        listen,
        shards,
        durability,
        heartbeat_ms,
        map_size_mib,
        io,
        heartbeat_coalescing,
        journal_interval_ms,
        tls_cert,
        tls_key,
        tls_listen,
    } = args;
    if heartbeat_ms < 10 {
        return Err("--heartbeat-ms must be at least 10".into());
    }
    let request = match io {
        IoArg::Auto => IoRequest::Auto,
        IoArg::Epoll => IoRequest::Epoll,
        IoArg::Uring => IoRequest::Uring,
    };
    let tls = match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => Some(TlsSettings {
            config: tern::transport::tls::server_config(&cert, &key).map_err(|e| e.to_string())?,
            mode: match tls_listen {
                Some(addr) => TlsMode::Beside(addr),
                None => TlsMode::Only,
            },
        }),
        _ => None,
    };
    let io = select(request, probe_uring)?;
    eprintln!("{}", io.log_line);
    // Block the shutdown signals before any thread exists, so every thread inherits the
    // mask and only this thread's sigwait receives them.
    let signals = block_shutdown_signals();
    let fd_limit = prepare_fd_table().map_err(|e| format!("raise open-file limit: {e}"))?;
    let shards =
        shards.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let config = NodeConfig {
        data_dir: data.clone(),
        listen,
        tls: tls.clone(),
        shards,
        durability: match durability {
            DurabilityArg::Fsync => Durability::Fsync,
            DurabilityArg::None => Durability::None,
        },
        heartbeat_interval_ms: heartbeat_ms,
        heartbeat_coalescing: heartbeat_coalescing == Switch::On,
        io: io.kind,
        map_size: map_size_mib.map(|mib| mib << 20),
        journal_interval_ms,
    };
    let node = Node::start(&config).map_err(|e| e.to_string())?;
    println!(
        "tern listening on {} (shards {}, io {}, durability {}, data {}, open files {})",
        node.local_addr(),
        shards,
        node.io().name(),
        match durability {
            DurabilityArg::Fsync => "fsync",
            DurabilityArg::None => "none",
        },
        data.display(),
        fd_limit
    );
    // After the ready line, whose format scripts and tests rely on.
    match (&tls, node.tls_addr()) {
        (Some(_), Some(addr)) => println!("tern tls listening on {addr}"),
        (Some(_), None) => println!("tern tls only on {}", node.local_addr()),
        (None, _) => {}
    }
    let _ = std::io::stdout().flush();
    let signal = loop {
        let signal = wait_for_signal(&signals);
        if signal != libc::SIGUSR1 {
            break signal;
        }
        print_stats(&node);
    };
    eprintln!("tern: signal {signal}, shutting down");
    node.shutdown().map_err(|e| e.to_string())?;
    eprintln!("tern: stopped cleanly");
    Ok(())
}

/// SIGUSR1: one line of the io backends' counters on stdout, for operators and the churn
/// test (which checks that every gauge returns to zero).
fn print_stats(node: &Node) {
    let writer = node.store().writer_counters();
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    match node.backend_stats(STATS_TIMEOUT) {
        Some(s) => println!(
            "tern stats: io={} connections_open={} connections_closing={} accepted_total={} \
             closed_total={} backlog_bytes={} write_buffers={} read_buffers_held={} \
             store_commits={} store_ops={} store_applies={} store_placements_applied={} \
             store_log_write_bytes={} store_apply_write_bytes={}",
            node.io().name(),
            s.connections_open,
            s.connections_closing,
            s.accepted_total,
            s.closed_total,
            s.backlog_bytes,
            s.write_buffers,
            s.read_buffers_held,
            count(&writer.commits),
            count(&writer.ops),
            count(&writer.applies),
            count(&writer.placements_applied),
            count(&writer.log_write_bytes),
            count(&writer.apply_write_bytes),
        ),
        None => println!("tern stats: unavailable (a shard did not answer)"),
    }
    let _ = std::io::stdout().flush();
}

/// How long SIGUSR1 waits for every shard to publish its counters.
const STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

fn block_shutdown_signals() -> libc::sigset_t {
    // SAFETY: sigset operations on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut signal = 0;
    // SAFETY: sigwait reads the set and writes one int.
    unsafe { while libc::sigwait(set, &mut signal) != 0 {} }
    signal
}

fn user_add(data: &std::path::Path, name: &str, password: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > tern::limits::USER_NAME_SIZE_MAX {
        return Err(format!(
            "user name must be 1..={} bytes",
            tern::limits::USER_NAME_SIZE_MAX
        ));
    }
    if password.is_empty() || password.len() > tern::limits::PASSWORD_SIZE_MAX {
        return Err(format!(
            "password must be 1..={} bytes",
            tern::limits::PASSWORD_SIZE_MAX
        ));
    }
    let store =
        Store::open_beside_node(data, &StoreConfig::default()).map_err(|e| e.to_string())?;
    let hash = tern::auth::hash_password(password).map_err(|e| e.to_string())?;
    match store.add_user(name, &hash) {
        Ok(id) => {
            println!("{}", serde_json::json!({ "user": name, "user_id": id.0 }));
            Ok(())
        }
        Err(StoreError::AlreadyExists) => Err(format!("user {name} already exists")),
        Err(e) => Err(e.to_string()),
    }
}

fn user_add_bulk(
    data: &std::path::Path,
    prefix: &str,
    first: u64,
    count: u64,
    password: &str,
    map_size_mib: Option<usize>,
) -> Result<(), String> {
    if password.is_empty() || password.len() > tern::limits::PASSWORD_SIZE_MAX {
        return Err(format!(
            "password must be 1..={} bytes",
            tern::limits::PASSWORD_SIZE_MAX
        ));
    }
    let mut config = StoreConfig::default();
    let store = match map_size_mib {
        // Asked for: this tool may grow the map; a running node adopts the new size.
        Some(mib) => {
            config.map_size = mib << 20;
            Store::open(data, &config)
        }
        // An existing store keeps the size recorded in it (the running node's): the tool
        // never grows the map under the node, and fails with "store full" if it cannot fit.
        None => Store::open_beside_node(data, &config),
    }
    .map_err(|e| e.to_string())?;
    let hash = tern::auth::hash_password(password).map_err(|e| e.to_string())?;
    let started = std::time::Instant::now();
    let bulk = store
        .add_users_bulk(prefix, first, count, &hash)
        .map_err(|e| e.to_string())?;
    println!(
        "{}",
        serde_json::json!({
            "prefix": prefix,
            "first": first,
            "count": count,
            "created": bulk.created,
            "first_user_id": bulk.ids.first().map(|id| id.0),
            "seconds": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}

mod cli_account;
mod cli_client;
mod cli_team;

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every subcommand's arguments are consistent (unique names, valid defaults): clap
    /// checks this only when a command is built, so a clash would otherwise surface as a
    /// panic or a usage error the first time someone runs that subcommand.
    #[test]
    fn command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn device_revoke_takes_the_device_to_revoke_beside_the_login_device() {
        use clap::Parser;
        let cli = super::Cli::try_parse_from([
            "tern",
            "device",
            "revoke",
            "--user",
            "alice",
            "--password",
            "pw",
            "phone",
        ]);
        assert!(cli.is_ok(), "{:?}", cli.err());
        let cli = super::Cli::try_parse_from([
            "tern",
            "device",
            "revoke",
            "--user",
            "alice",
            "--password",
            "pw",
            "--device",
            "laptop",
            "phone",
        ]);
        assert!(cli.is_ok(), "{:?}", cli.err());
    }
}
