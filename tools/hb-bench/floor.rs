//! hb-floor: the least CPU a process can spend answering one heartbeat on this machine's
//! loopback: writing one pong-sized frame (24 bytes) on an established TCP connection.
//!
//! One thread writes the frame on each of `--conns` connections in turn, `--rounds` times,
//! back to back (no waits, so no wake-ups are counted and caches stay warm); another thread
//! drains the peers. Prints the writing thread's CPU time (user+system, from
//! getrusage(RUSAGE_THREAD)) per write, as one JSON line. On loopback the receiver's TCP
//! input runs inside the sender's write, as the node's pongs do, so this is the floor under
//! hb-bench's `server_cpu_us_per_heartbeat` before reading the ping and waking up are added.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

const FRAME_BYTES: usize = 24;

fn thread_cpu_us() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut usage), 0);
        usage
    };
    let us = |tv: libc::timeval| tv.tv_sec as f64 * 1e6 + tv.tv_usec as f64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

fn main() {
    let mut conns = 1_000usize;
    let mut rounds = 20usize;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value: usize = it
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a number"));
        match flag.as_str() {
            "--conns" => conns = value,
            "--rounds" => rounds = value,
            _ => panic!("unknown flag {flag}"),
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let mut writers = Vec::with_capacity(conns);
    let mut peers = Vec::with_capacity(conns);
    for _ in 0..conns {
        let peer = TcpStream::connect(addr).expect("connect");
        let (writer, _) = listener.accept().expect("accept");
        writer.set_nodelay(true).expect("nodelay");
        peer.set_nonblocking(true).expect("nonblocking");
        writers.push(writer);
        peers.push(peer);
    }
    let total_bytes = conns * rounds * FRAME_BYTES;
    let drain = std::thread::spawn(move || {
        let mut got = 0;
        let mut buf = [0u8; 4096];
        while got < total_bytes {
            for mut peer in &peers {
                match peer.read(&mut buf) {
                    Ok(n) => got += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("read: {e}"),
                }
            }
        }
    });
    let frame = [7u8; FRAME_BYTES];
    let cpu_start = thread_cpu_us();
    let start = Instant::now();
    for _ in 0..rounds {
        for writer in &mut writers {
            writer.write_all(&frame).expect("write");
        }
    }
    let cpu_us = thread_cpu_us() - cpu_start;
    let wall_us = start.elapsed().as_secs_f64() * 1e6;
    drain.join().expect("drain thread");
    let writes = (conns * rounds) as f64;
    println!(
        "{{\"writes\":{writes},\"cpu_us_per_write\":{:.2},\"wall_us_per_write\":{:.2}}}",
        cpu_us / writes,
        wall_us / writes
    );
}
