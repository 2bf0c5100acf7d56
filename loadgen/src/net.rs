//! Opening client sockets: non-blocking connect from a chosen source address and port.
//!
//! With a few thousand connections to one node port from one source address, the kernel's
//! ephemeral-port search makes connect() stall for seconds (it scans for a free 4-tuple
//! under a lock). Binding each socket to (source ip, port) ourselves, cycling through a
//! port range that no other loadgen thread uses, avoids the search entirely; SO_REUSEADDR
//! lets a port in TIME_WAIT be bound again.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Source ports handed out here: above the usual service ports, below the kernel's
/// ephemeral range (32768–60999 by default, which our range overlaps only where the
/// kernel is not asked to choose).
pub const SOURCE_PORT_FIRST: u16 = 10_000;
pub const SOURCE_PORT_END: u16 = 60_000;
/// Ports tried for one connect before giving up (each failure is a 4-tuple still in use).
const BIND_ATTEMPTS_MAX: u32 = 64;

#[derive(Debug)]
pub struct Connector {
    server: SocketAddr,
    sources: Vec<IpAddr>,
    port_lo: u16,
    port_hi: u16,
    /// Next port per source address.
    cursors: Vec<u16>,
}

impl Connector {
    /// `slot` of `slots` picks this thread's share of the port range.
    pub fn new(server: SocketAddr, sources: Vec<IpAddr>, slot: u32, slots: u32) -> Connector {
        let span = u32::from(SOURCE_PORT_END - SOURCE_PORT_FIRST) / slots.max(1);
        let port_lo = SOURCE_PORT_FIRST + (slot * span) as u16;
        let port_hi = port_lo + span.max(1) as u16;
        Connector {
            server,
            cursors: vec![port_lo; sources.len()],
            sources,
            port_lo,
            port_hi,
        }
    }

    /// Starts a non-blocking connect for client `client` (which picks the source address).
    pub fn connect(&mut self, client: u32) -> io::Result<mio::net::TcpStream> {
        let domain = Domain::for_address(self.server);
        if self.sources.is_empty() {
            let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
            return self.finish(socket);
        }
        let which = client as usize % self.sources.len();
        let ip = self.sources[which];
        let mut last_error = None;
        for _ in 0..BIND_ATTEMPTS_MAX {
            let port = self.cursors[which];
            self.cursors[which] = if port + 1 >= self.port_hi {
                self.port_lo
            } else {
                port + 1
            };
            let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            match socket.bind(&SocketAddr::new(ip, port).into()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    last_error = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            }
            match self.finish(socket) {
                // The 4-tuple is still taken by an older connection: next port.
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => last_error = Some(e),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => last_error = Some(e),
                other => return other,
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("no source port free")))
    }

    fn finish(&self, socket: Socket) -> io::Result<mio::net::TcpStream> {
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        match socket.connect(&self.server.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(mio::net::TcpStream::from_std(socket.into()))
    }
}

/// Closes with a reset instead of a FIN, as a phone losing its network looks to the node
/// once its retransmissions give up (only faster).
pub fn abort(stream: mio::net::TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
