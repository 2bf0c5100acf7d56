//! TLS as a sans-IO layer (rustls with the ring provider), for both ends of a connection.
//!
//! `TlsLayer` wraps one `rustls::Connection`. Ciphertext from the socket goes in through
//! `receive`, which appends the plaintext for the session; plaintext the session queued
//! goes in through `send`; `take_ciphertext` hands back everything bound for the socket
//! (handshake flights, records, alerts). It never touches a socket or the clock, so the
//! node's shard, the blocking client driver and the load generator drive it alike, each
//! from its own loop.
//!
//! Resumption: the node's `ServerConfig` carries a ticketer (stateless TLS 1.3 tickets,
//! `TLS_TICKETS_PER_HANDSHAKE` per handshake, keys rotated by rustls), and a client's
//! `ClientConfig` keeps the tickets it got in an in-memory cache shared by every
//! connection built from that config, so a reconnect costs one resumed handshake.
//!
//! Idle cost: after the handshake a connection keeps the rustls state (keys, record
//! sequence numbers) and rustls' 4 KiB receive buffer, which the buffered API keeps
//! allocated between reads; the measured figure is in docs/architecture.md (TLS).

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConnection, Connection, RootCertStore, ServerConfig};

pub use rustls::pki_types::ServerName;
pub use rustls::{ClientConfig, HandshakeKind};

use crate::limits::{TLS_CLIENT_SESSIONS_MAX, TLS_TICKETS_PER_HANDSHAKE};

/// What went wrong, by source.
#[derive(Debug)]
pub enum TlsError {
    /// The peer's bytes broke TLS (garbage, a refused certificate, a bad record). The layer
    /// has queued an alert; take the ciphertext, send it, and close.
    Protocol(rustls::Error),
    /// A PEM file could not be read.
    File { path: String, error: io::Error },
    /// The certificates or key are unusable (none in the file, key does not match).
    Config(String),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Protocol(e) => write!(f, "tls: {e}"),
            TlsError::File { path, error } => write!(f, "read {path}: {error}"),
            TlsError::Config(message) => write!(f, "tls: {message}"),
        }
    }
}

impl std::error::Error for TlsError {}

/// Whether the peer is still there after `receive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    Open,
    /// The peer sent close_notify: no more plaintext will come.
    PeerClosed,
}

/// One connection's TLS state, server or client side.
pub struct TlsLayer {
    conn: Connection,
}

impl TlsLayer {
    /// The node's side of a new connection.
    pub fn server(config: &Arc<ServerConfig>) -> Result<TlsLayer, TlsError> {
        let conn = rustls::ServerConnection::new(config.clone()).map_err(TlsError::Protocol)?;
        Ok(TlsLayer::wrap(Connection::Server(conn)))
    }

    /// A client's side of a new connection to `name` (checked against the certificate).
    pub fn client(
        config: &Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<TlsLayer, TlsError> {
        let conn = ClientConnection::new(config.clone(), name).map_err(TlsError::Protocol)?;
        Ok(TlsLayer::wrap(Connection::Client(conn)))
    }

    fn wrap(mut conn: Connection) -> TlsLayer {
        // The session bounds its own output (the shard closes a connection whose backlog
        // passes `CONNECTION_BACKLOG_MAX`), so rustls need not refuse plaintext: with a
        // limit, plaintext written during the handshake could be refused and lost.
        conn.set_buffer_limit(None);
        TlsLayer { conn }
    }

    /// Feeds `ciphertext` (all of it) and appends the plaintext it carried to `plaintext`.
    /// On an error the layer has queued an alert for `take_ciphertext`; the connection is
    /// over.
    pub fn receive(
        &mut self,
        mut ciphertext: &[u8],
        plaintext: &mut Vec<u8>,
    ) -> Result<Inbound, TlsError> {
        while !ciphertext.is_empty() {
            match self.conn.read_tls(&mut ciphertext) {
                // Nothing taken: close_notify came already, the rest is ignored.
                Ok(0) => return Ok(Inbound::PeerClosed),
                Ok(_) => {}
                // rustls' own receive buffer is full (a handshake message over 64 KiB).
                Err(e) => {
                    return Err(TlsError::Protocol(rustls::Error::General(e.to_string())));
                }
            }
            let state = self
                .conn
                .process_new_packets()
                .map_err(TlsError::Protocol)?;
            let available = state.plaintext_bytes_to_read();
            let peer_closed = state.peer_has_closed();
            if available > 0 {
                let start = plaintext.len();
                plaintext.resize(start + available, 0);
                self.conn
                    .reader()
                    .read_exact(&mut plaintext[start..])
                    .expect("rustls reported these bytes readable");
            }
            if peer_closed {
                return Ok(Inbound::PeerClosed);
            }
        }
        Ok(Inbound::Open)
    }

    /// Encrypts `plaintext` (all of it; held until the handshake completes if it has not).
    pub fn send(&mut self, plaintext: &[u8]) {
        if plaintext.is_empty() {
            return;
        }
        // With no buffer limit (`wrap`) rustls takes every byte.
        self.conn
            .writer()
            .write_all(plaintext)
            .expect("rustls takes all plaintext without a buffer limit");
    }

    /// Queues close_notify: the peer learns the close was ours, not a truncation.
    pub fn close(&mut self) {
        self.conn.send_close_notify();
    }

    /// Appends every byte bound for the socket to `out`.
    pub fn take_ciphertext(&mut self, out: &mut Vec<u8>) {
        while self.conn.wants_write() {
            self.conn
                .write_tls(out)
                .expect("writing into a Vec cannot fail");
        }
    }

    /// Whether bytes wait for `take_ciphertext`.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// True until the handshake completes.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Full or resumed, once the handshake completed (None before).
    pub fn handshake_kind(&self) -> Option<HandshakeKind> {
        if self.conn.is_handshaking() {
            None
        } else {
            self.conn.handshake_kind()
        }
    }
}

/// ring, with ChaCha20-Poly1305 preferred over AES-GCM: the Raspberry Pi SoCs (Cortex-A53,
/// A72) lack the ARMv8 AES instructions, so ChaCha20 is the faster cipher there. (Memory
/// is the same either way: ring sizes every AEAD key for the largest algorithm.)
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    let chacha = rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256.suite();
    // Stable: the other suites keep ring's order.
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != chacha);
    Arc::new(provider)
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::File {
        path: path.display().to_string(),
        error,
    })
}

/// Parses every certificate in a PEM file (the server's certificate first, then its chain;
/// or the CA a client pins).
pub fn certificates_from_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Config(format!(
            "{}: no CERTIFICATE in the file",
            path.display()
        )));
    }
    Ok(certs)
}

/// The node's TLS settings from a PEM certificate chain and a PEM private key (PKCS#8,
/// SEC1 or PKCS#1): TLS 1.3 and 1.2, ChaCha20-Poly1305 preferred, no client certificates,
/// stateless resumption tickets.
pub fn server_config(cert_pem: &Path, key_pem: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = certificates_from_pem(cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(&read_file(key_pem)?)
        .map_err(|e| TlsError::Config(format!("{}: {e}", key_pem.display())))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocol)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
    // The node's preference wins (ChaCha20 first, `provider`): the node is the box with
    // the small CPU, and a phone with AES instructions handles either.
    config.ignore_client_order = true;
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(TlsError::Protocol)?;
    config.send_tls13_tickets = TLS_TICKETS_PER_HANDSHAKE;
    Ok(Arc::new(config))
}

/// A client's TLS settings that trust only the CA certificates in `ca_pem` (a private CA
/// from `tern cert generate`, or a public one the operator names), with an in-memory
/// ticket cache of `TLS_CLIENT_SESSIONS_MAX` shared by every connection made from it.
pub fn client_config(ca_pem: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates_from_pem(ca_pem)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Config(format!("{}: {e}", ca_pem.display())))?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocol)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = Resumption::in_memory_sessions(TLS_CLIENT_SESSIONS_MAX);
    Ok(Arc::new(config))
}

/// `config` with a ticket cache of its own holding `sessions` entries: for a program that
/// simulates many devices, each of which would keep its own tickets.
pub fn with_own_session_cache(config: &ClientConfig, sessions: usize) -> Arc<ClientConfig> {
    let mut config = config.clone();
    config.resumption = Resumption::in_memory_sessions(sessions);
    Arc::new(config)
}

/// The name a client checks the node's certificate against: `name` if given, else the
/// address's IP (a certificate from `tern cert generate --name 192.0.2.7` covers it).
pub fn server_name(
    name: Option<&str>,
    addr: std::net::SocketAddr,
) -> Result<ServerName<'static>, TlsError> {
    match name {
        Some(name) => ServerName::try_from(name.to_owned())
            .map_err(|e| TlsError::Config(format!("server name {name:?}: {e}"))),
        None => Ok(ServerName::IpAddress(addr.ip().into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and a server certificate for `localhost` in a temporary folder.
    fn certs() -> (tempfile::TempDir, Arc<ServerConfig>, Arc<ClientConfig>) {
        let dir = tempfile::tempdir().unwrap();
        let files =
            crate::transport::cert::generate(dir.path(), &["localhost".to_owned()]).unwrap();
        let server = server_config(&files.server_cert, &files.server_key).unwrap();
        let client = client_config(&files.ca_cert).unwrap();
        (dir, server, client)
    }

    /// Moves bytes both ways until neither side has any to send.
    fn pump(a: &mut TlsLayer, b: &mut TlsLayer, to_a: &mut Vec<u8>, to_b: &mut Vec<u8>) {
        loop {
            let mut wire = Vec::new();
            a.take_ciphertext(&mut wire);
            let a_sent = !wire.is_empty();
            b.receive(&wire, to_b).unwrap();
            let mut wire = Vec::new();
            b.take_ciphertext(&mut wire);
            let b_sent = !wire.is_empty();
            a.receive(&wire, to_a).unwrap();
            if !a_sent && !b_sent {
                return;
            }
        }
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from("localhost").unwrap()
    }

    #[test]
    fn plaintext_crosses_both_ways_and_the_second_handshake_resumes() {
        let (_dir, server_config, client_config) = certs();
        for round in 0..2 {
            let mut server = TlsLayer::server(&server_config).unwrap();
            let mut client = TlsLayer::client(&client_config, name()).unwrap();
            // Written before the handshake: held, then sent.
            client.send(b"hello");
            let (mut at_client, mut at_server) = (Vec::new(), Vec::new());
            pump(&mut client, &mut server, &mut at_client, &mut at_server);
            assert_eq!(at_server, b"hello");
            server.send(b"world");
            pump(&mut client, &mut server, &mut at_client, &mut at_server);
            assert_eq!(at_client, b"world");
            let expected = if round == 0 {
                HandshakeKind::Full
            } else {
                HandshakeKind::Resumed
            };
            assert_eq!(client.handshake_kind(), Some(expected));
            assert_eq!(server.handshake_kind(), Some(expected));
            client.close();
            let mut wire = Vec::new();
            client.take_ciphertext(&mut wire);
            assert_eq!(
                server.receive(&wire, &mut at_server).unwrap(),
                Inbound::PeerClosed
            );
        }
    }

    #[test]
    fn the_node_picks_chacha20_even_for_a_client_that_prefers_aes() {
        let (dir, server_config, _) = certs();
        let provider = rustls::crypto::ring::default_provider();
        assert_ne!(
            provider.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        );
        let mut roots = RootCertStore::empty();
        for cert in certificates_from_pem(&dir.path().join("ca.pem")).unwrap() {
            roots.add(cert).unwrap();
        }
        let aes_first = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut server = TlsLayer::server(&server_config).unwrap();
        let mut client = TlsLayer::client(&Arc::new(aes_first), name()).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        pump(&mut client, &mut server, &mut a, &mut b);
        assert_eq!(
            server.conn.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256)
        );
    }

    #[test]
    fn garbage_is_a_protocol_error_with_an_alert() {
        let (_dir, server_config, _) = certs();
        let mut server = TlsLayer::server(&server_config).unwrap();
        let mut plaintext = Vec::new();
        let result = server.receive(b"GET / HTTP/1.1\r\n\r\n", &mut plaintext);
        assert!(matches!(result, Err(TlsError::Protocol(_))), "{result:?}");
        assert!(plaintext.is_empty());
        let mut alert = Vec::new();
        server.take_ciphertext(&mut alert);
        assert_eq!(alert.first(), Some(&21), "an alert record goes out");
    }

    #[test]
    fn a_client_pinning_another_ca_refuses_the_node() {
        let (_dir, server_config, _) = certs();
        let (_other_dir, _, other_client) = certs();
        let mut server = TlsLayer::server(&server_config).unwrap();
        let mut client = TlsLayer::client(&other_client, name()).unwrap();
        let mut sink = Vec::new();
        let mut wire = Vec::new();
        client.take_ciphertext(&mut wire);
        server.receive(&wire, &mut sink).unwrap();
        let mut wire = Vec::new();
        server.take_ciphertext(&mut wire);
        let result = client.receive(&wire, &mut sink);
        assert!(
            matches!(
                result,
                Err(TlsError::Protocol(rustls::Error::InvalidCertificate(_)))
            ),
            "{result:?}"
        );
    }

    #[test]
    fn missing_or_empty_pem_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.pem");
        assert!(matches!(
            client_config(&missing),
            Err(TlsError::File { .. })
        ));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, b"not pem").unwrap();
        let error = client_config(&empty).err().unwrap().to_string();
        assert!(error.contains("no CERTIFICATE"), "{error}");
    }
}
