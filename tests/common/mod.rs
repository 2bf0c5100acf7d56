//! Helpers for end-to-end tests: real `tern` processes on loopback.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

pub const TERN: &str = env!("CARGO_BIN_EXE_tern");

/// A command running the `tern` binary under test. Set `TERN_TEST_RUNNER` (for example
/// `qemu-aarch64 -L /usr/aarch64-linux-gnu`, as `tools/cross test` does) to start it through
/// an emulator: a cross-built `tern` cannot be executed directly on the build host.
pub fn tern_command() -> Command {
    let runner = std::env::var("TERN_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        None => Command::new(TERN),
        Some(program) => {
            let mut command = Command::new(program);
            command.args(words).arg(TERN);
            command
        }
    }
}

/// How long a node may take to print its ready line.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The event loop a test node runs (`tern serve --io`), and whether its port speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    Epoll,
    Uring,
    /// The epoll loop with the native port TLS-only, certificates from `tern cert
    /// generate`; every client of the test (`TestNode::client`, `raw`, `cli_server_args`)
    /// pins that node's CA. One loop is enough here: TLS sits in the shard, above the
    /// backends, which see the same bytes either way.
    EpollTls,
}

impl Io {
    pub fn arg(self) -> &'static str {
        match self {
            Io::Epoll | Io::EpollTls => "epoll",
            Io::Uring => "uring",
        }
    }

    pub fn tls(self) -> bool {
        self == Io::EpollTls
    }

    /// `Some(Io::Uring)` where this machine runs io_uring (the node's probe, run in the
    /// test process: same kernel, same sandbox); otherwise says so on stderr, past the
    /// test harness's capture, and returns None.
    pub fn uring_or_skip() -> Option<Io> {
        static PROBE: OnceLock<tern::io::probe::ProbeResult> = OnceLock::new();
        match PROBE.get_or_init(tern::io::probe::probe_uring) {
            Ok(_) => Some(Io::Uring),
            Err(reason) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "skipping: io_uring unavailable ({reason})"
                );
                None
            }
        }
    }
}

/// Expands each named test body `fn name(io: Io)` into `epoll::name`, `uring::name` and
/// `tls::name` (epoll, TLS) tests; the uring one skips, visibly, where io_uring is
/// unavailable.
#[allow(unused_macros)]
macro_rules! io_tests {
    ($($name:ident),* $(,)?) => {
        plain_io_tests!($($name),*);
        mod tls {
            $(
                #[test]
                fn $name() {
                    super::$name(crate::common::Io::EpollTls)
                }
            )*
        }
    };
}

/// `io_tests!` without the TLS variant, for tests whose subject is the plain loops' own
/// bounds (output backlog, pipelining, a full disk); they run on epoll and io_uring.
#[allow(unused_macros)]
macro_rules! plain_io_tests {
    ($($name:ident),* $(,)?) => {
        mod epoll {
            $(
                #[test]
                fn $name() {
                    super::$name(crate::common::Io::Epoll)
                }
            )*
        }
        mod uring {
            $(
                #[test]
                fn $name() {
                    if let Some(io) = crate::common::Io::uring_or_skip() {
                        super::$name(io)
                    }
                }
            )*
        }
    };
}

/// Resident memory of a node process, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct NodeMemory {
    /// `VmRSS`: resident now.
    pub rss_bytes: u64,
    /// `VmHWM`: the most that was ever resident.
    pub hwm_bytes: u64,
}

pub struct TestNode {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub data: PathBuf,
    pub io: Io,
    extra: Vec<String>,
    /// `tern stats:` lines the node printed (on SIGUSR1).
    stats_lines: Option<Receiver<String>>,
    /// The CA a TLS node's clients pin (`Io::EpollTls`).
    pub ca: Option<PathBuf>,
    /// The TLS port beside the plain one (`--tls-listen`).
    pub tls_addr: Option<SocketAddr>,
    _dir: Option<tempfile::TempDir>,
}

impl TestNode {
    /// Starts a node running `io` on a fresh data folder and a free loopback port.
    pub fn start(io: Io, extra: &[&str]) -> TestNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut ca = None;
        if io.tls() {
            let certs = generate_certs(&dir.path().join("certs"), &["127.0.0.1"]);
            extra.push("--tls-cert".into());
            extra.push(certs.join("server.pem").display().to_string());
            extra.push("--tls-key".into());
            extra.push(certs.join("server.key").display().to_string());
            ca = Some(certs.join("ca.pem"));
        }
        let mut node = TestNode {
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            data,
            io,
            extra,
            stats_lines: None,
            ca,
            tls_addr: None,
            _dir: Some(dir),
        };
        node.spawn("127.0.0.1:0".parse().unwrap());
        node
    }

    /// Starts a node running `io` (plain, not TLS) on the data folder `data` (created if
    /// missing), which the caller owns, on a free loopback port.
    pub fn start_at(io: Io, data: PathBuf, extra: &[&str]) -> TestNode {
        assert!(!io.tls(), "start_at makes no certificates");
        let mut node = TestNode {
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            data,
            io,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            stats_lines: None,
            ca: None,
            tls_addr: None,
            _dir: None,
        };
        node.spawn("127.0.0.1:0".parse().unwrap());
        node
    }

    fn spawn(&mut self, listen: SocketAddr) {
        let mut child = tern_command()
            .arg("serve")
            .arg("--data")
            .arg(&self.data)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--io")
            .arg(self.io.arg())
            .args(&self.extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tern serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (stats_tx, stats_rx) = std::sync::mpsc::channel();
        self.stats_lines = Some(stats_rx);
        let tls_beside = self.extra.iter().any(|a| a == "--tls-listen");
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut reader = BufReader::new(stdout);
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            if tls_beside {
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                let _ = tx.send(line);
            }
            // Keep draining so the node never blocks on a full pipe.
            let mut sink = String::new();
            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                if sink.starts_with("tern stats:") {
                    let _ = stats_tx.send(sink.trim_end().to_owned());
                }
                sink.clear();
            }
        });
        let line = rx
            .recv_timeout(START_TIMEOUT)
            .expect("node printed no ready line");
        let addr = line
            .split_whitespace()
            .nth(3)
            .unwrap_or_else(|| panic!("unexpected ready line {line:?}"));
        self.addr = addr
            .parse()
            .unwrap_or_else(|_| panic!("bad address in {line:?}"));
        if tls_beside {
            let line = rx
                .recv_timeout(START_TIMEOUT)
                .expect("node printed no tls line");
            let addr = line
                .strip_prefix("tern tls listening on ")
                .unwrap_or_else(|| panic!("unexpected tls line {line:?}"));
            self.tls_addr = Some(addr.trim().parse().expect("tls address"));
        }
        self.child = Some(child);
    }

    /// The io backends' counters (SIGUSR1 → one `tern stats:` line of key=value pairs).
    pub fn stats(&self) -> HashMap<String, u64> {
        let child = self.child.as_ref().expect("node not running");
        let lines = self.stats_lines.as_ref().expect("node not running");
        while lines.try_recv().is_ok() {}
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
        let line = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("node printed no stats line");
        line.split_whitespace()
            .skip(2)
            .filter_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                Some((key.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    pub fn add_user(&self, name: &str, password: &str) {
        add_user(&self.data, name, password);
    }

    /// The node's resident memory now and at its peak, from `/proc/PID/status`.
    pub fn memory(&self) -> NodeMemory {
        let child = self.child.as_ref().expect("node not running");
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .expect("read /proc/PID/status of the node");
        let kib = |field: &str| -> u64 {
            let line = status
                .lines()
                .find(|l| l.starts_with(field))
                .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"));
            let value: u64 = line[field.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("bad line {line:?}"));
            value * 1024
        };
        NodeMemory {
            rss_bytes: kib("VmRSS:"),
            hwm_bytes: kib("VmHWM:"),
        }
    }

    /// The client settings that trust this node (TLS nodes only).
    pub fn tls_config(&self) -> Option<std::sync::Arc<rustls::ClientConfig>> {
        let ca = self.ca.as_ref()?;
        Some(tern::transport::tls::client_config(ca).expect("client TLS settings"))
    }

    /// A blocking client of this node, over TLS on a TLS node.
    pub fn client(&self, config: tern::client::ClientConfig) -> tern::client::BlockingClient {
        let client = tern::client::BlockingClient::new(self.addr, config);
        match self.tls_config() {
            Some(tls) => client.with_tls(tls, tls_name()),
            None => client,
        }
    }

    /// A hand-driven connection, with its TLS handshake done on a TLS node.
    pub fn raw(&self) -> RawConn {
        let conn = RawConn::connect(self.addr);
        match self.tls_config() {
            Some(tls) => conn.into_tls(&tls),
            None => conn,
        }
    }

    /// `raw` from the loopback address `source`.
    pub fn raw_from(&self, source: std::net::IpAddr) -> RawConn {
        let conn = RawConn::connect_from(self.addr, source);
        match self.tls_config() {
            Some(tls) => conn.into_tls(&tls),
            None => conn,
        }
    }

    /// `--server ADDR` and, on a TLS node, `--tls --ca FILE` for a `tern` client command.
    pub fn cli_server_args(&self) -> Vec<String> {
        let mut args = vec!["--server".to_owned(), self.addr.to_string()];
        if let Some(ca) = &self.ca {
            args.extend([
                "--tls".to_owned(),
                "--ca".to_owned(),
                ca.display().to_string(),
            ]);
        }
        args
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM and wait; returns whether the node exited with status 0.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the node again on the same data folder and port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the node first");
        let addr = self.addr;
        self.spawn(addr);
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The name test certificates are issued for (`generate_certs`).
pub fn tls_name() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
}

/// Runs `tern cert generate --out DIR --name ...`; returns DIR.
pub fn generate_certs(dir: &Path, names: &[&str]) -> PathBuf {
    let mut command = tern_command();
    command.args(["cert", "generate", "--out"]).arg(dir);
    for name in names {
        command.args(["--name", name]);
    }
    let out = command.output().expect("run tern cert generate");
    assert!(
        out.status.success(),
        "cert generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.to_path_buf()
}

pub fn add_user(data: &Path, name: &str, password: &str) {
    let out = tern_command()
        .args(["user", "add", name, "--password", password, "--data"])
        .arg(data)
        .output()
        .expect("run tern user add");
    assert!(
        out.status.success(),
        "user add failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `cond` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// A hand-driven connection for tests that need exact control over the bytes.
pub struct RawConn {
    pub stream: std::net::TcpStream,
    /// Present on a TLS connection: frames go through it both ways.
    tls: Option<tern::transport::tls::TlsLayer>,
    reader: tern::protocol::FrameReader,
    frames: std::collections::VecDeque<(tern::protocol::FrameHeader, Vec<u8>)>,
    closed: bool,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> RawConn {
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).unwrap();
        RawConn {
            stream,
            tls: None,
            reader: tern::protocol::FrameReader::new(),
            frames: Default::default(),
            closed: false,
        }
    }

    /// Connects from the loopback address `source` (e.g. 127.0.0.2), so the node sees
    /// another source address.
    pub fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> RawConn {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .expect("socket");
        socket
            .bind(&SocketAddr::new(source, 0).into())
            .expect("bind source address");
        socket.connect(&addr.into()).expect("connect");
        let stream: std::net::TcpStream = socket.into();
        stream.set_nodelay(true).unwrap();
        RawConn {
            stream,
            tls: None,
            reader: tern::protocol::FrameReader::new(),
            frames: Default::default(),
            closed: false,
        }
    }

    /// Completes a TLS handshake on this connection (trusting `config`'s CA); every later
    /// frame goes through it.
    pub fn into_tls(mut self, config: &std::sync::Arc<rustls::ClientConfig>) -> RawConn {
        use std::io::{Read, Write};
        let mut layer =
            tern::transport::tls::TlsLayer::client(config, tls_name()).expect("tls client");
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut plaintext = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        while layer.is_handshaking() {
            let mut out = Vec::new();
            layer.take_ciphertext(&mut out);
            if self.stream.write_all(&out).is_err() {
                self.closed = true;
                return self;
            }
            if !layer.is_handshaking() {
                break;
            }
            let n = loop {
                match self.stream.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    other => break other,
                }
            };
            // A node that refused the connection at accept closes it: the test sees a
            // closed connection, as it would over plain TCP.
            let Ok(n @ 1..) = n else {
                self.closed = true;
                return self;
            };
            layer
                .receive(&buf[..n], &mut plaintext)
                .expect("tls handshake");
        }
        let mut out = Vec::new();
        layer.take_ciphertext(&mut out);
        self.stream.write_all(&out).expect("tls handshake write");
        assert!(plaintext.is_empty(), "the node spoke before the hello");
        self.tls = Some(layer);
        self
    }

    /// Hello, then a login; returns `LoginOk` or the refusal's (code, message).
    pub fn try_login(
        &mut self,
        user: &str,
        device: &str,
        credential: tern::protocol::Credential,
    ) -> Result<tern::protocol::LoginOk, (u16, String)> {
        use tern::protocol::*;
        self.hello();
        let login = Login {
            user: user.into(),
            device: device.into(),
            credential,
        };
        self.send(Kind::Login, 2, &login);
        let (h, p) = self
            .read_frame(Duration::from_secs(20))
            .expect("login answer");
        match h.kind {
            Kind::LoginOk => {
                let ok = access::<ArchivedLoginOk>(Kind::LoginOk, &p).unwrap();
                Ok(rkyv::deserialize::<LoginOk, rkyv::rancor::Error>(ok).unwrap())
            }
            Kind::Error => {
                let e = access::<ArchivedErrorBody>(Kind::Error, &p).unwrap();
                Err((e.code.to_native(), e.message.as_str().to_owned()))
            }
            other => panic!("unexpected answer to a login: {other:?}"),
        }
    }

    pub fn write_bytes(&mut self, bytes: &[u8]) {
        use std::io::Write;
        // The node may have closed already; the test looks at what it read back.
        match &mut self.tls {
            None => {
                let _ = self.stream.write_all(bytes);
            }
            Some(layer) => {
                layer.send(bytes);
                let mut out = Vec::new();
                layer.take_ciphertext(&mut out);
                let _ = self.stream.write_all(&out);
            }
        }
    }

    pub fn send<T>(&mut self, kind: tern::protocol::Kind, request_id: u32, value: &T)
    where
        T: for<'a> rkyv::Serialize<
                rkyv::api::high::HighSerializer<
                    Vec<u8>,
                    rkyv::ser::allocator::ArenaHandle<'a>,
                    rkyv::rancor::Failure,
                >,
            >,
    {
        let mut buf = Vec::new();
        tern::protocol::encode(&mut buf, kind, request_id, value);
        self.write_bytes(&buf);
    }

    /// Next frame, or None if the connection closed or nothing came within `timeout`.
    pub fn read_frame(
        &mut self,
        timeout: Duration,
    ) -> Option<(tern::protocol::FrameHeader, Vec<u8>)> {
        use std::io::Read;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return Some(frame);
            }
            if self.closed {
                return None;
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut buf = [0u8; 65536];
            match self.stream.read(&mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => {
                    let mut plaintext = Vec::new();
                    let bytes = match &mut self.tls {
                        None => &buf[..n],
                        Some(layer) => {
                            match layer.receive(&buf[..n], &mut plaintext) {
                                Ok(tern::transport::tls::Inbound::Open) => {}
                                Ok(tern::transport::tls::Inbound::PeerClosed) | Err(_) => {
                                    self.closed = true
                                }
                            }
                            &plaintext[..]
                        }
                    };
                    let frames = &mut self.frames;
                    self.reader
                        .feed(bytes, |h, p| {
                            frames.push_back((h, p.to_vec()));
                            true
                        })
                        .expect("node sent a malformed frame");
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return None;
                }
                // A read with a timeout returns EINTR rather than restarting when the thread
                // is interrupted (io_uring task work of this process's probe rings does it).
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.closed = true,
            }
        }
    }

    /// Reads until the node closes the connection; returns the frames seen on the way, or
    /// None if it stayed open for `timeout` (the frames read so far stay queued).
    pub fn read_until_closed(
        &mut self,
        timeout: Duration,
    ) -> Option<Vec<(tern::protocol::FrameHeader, Vec<u8>)>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            match self.read_frame(deadline.saturating_duration_since(Instant::now())) {
                Some(frame) => seen.push(frame),
                None if self.closed => return Some(seen),
                None => {
                    // Still open: keep what arrived for the next read, so a frame that
                    // came just before the deadline is not lost.
                    for frame in seen.into_iter().rev() {
                        self.frames.push_front(frame);
                    }
                    return None;
                }
            }
        }
    }

    pub fn hello(&mut self) {
        use tern::protocol::*;
        self.send(
            Kind::Hello,
            1,
            &Hello {
                protocol_version: PROTOCOL_VERSION,
                client: "raw".into(),
            },
        );
        let (h, _) = self
            .read_frame(Duration::from_secs(10))
            .expect("hello answer");
        assert_eq!(h.kind, Kind::HelloOk);
    }

    pub fn login(&mut self, user: &str, password: &str, device: &str) -> tern::protocol::LoginOk {
        use tern::protocol::*;
        self.hello();
        let login = Login {
            user: user.into(),
            device: device.into(),
            credential: Credential::Password(password.into()),
        };
        self.send(Kind::Login, 2, &login);
        let (h, p) = self
            .read_frame(Duration::from_secs(10))
            .expect("login answer");
        assert_eq!(h.kind, Kind::LoginOk, "login refused");
        let ok = access::<ArchivedLoginOk>(Kind::LoginOk, &p).unwrap();
        rkyv::deserialize::<LoginOk, rkyv::rancor::Error>(ok).unwrap()
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }
}

/// The error code carried by an Error frame's payload.
pub fn error_code(payload: &[u8]) -> u16 {
    use tern::protocol::*;
    access::<ArchivedErrorBody>(Kind::Error, payload)
        .expect("error body")
        .code
        .to_native()
}
