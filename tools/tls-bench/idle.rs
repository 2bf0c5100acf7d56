//! tls-idle: heap bytes one idle TLS connection keeps on the node, and where they sit.
//!
//! Builds N server-side `TlsLayer`s (with clients in the same process, over memory),
//! completes each handshake, exchanges one ping-sized record each way (as a heartbeat
//! does), then counts the heap bytes still allocated per connection by the server side
//! alone (the clients are dropped first). A counting global allocator measures it.
//!
//!     cargo run --release --example tls-idle -- [N]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use tern::transport::tls::{self, TlsLayer};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout, passed through.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: ptr came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as for `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn pump(client: &mut TlsLayer, server: &mut TlsLayer) {
    let mut sink = Vec::new();
    loop {
        let mut wire = Vec::new();
        client.take_ciphertext(&mut wire);
        let a = !wire.is_empty();
        server.receive(&wire, &mut sink).expect("server receive");
        let mut wire = Vec::new();
        server.take_ciphertext(&mut wire);
        let b = !wire.is_empty();
        client.receive(&wire, &mut sink).expect("client receive");
        if !a && !b {
            return;
        }
    }
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(1000, |a| a.parse().expect("N"));
    let dir = std::env::temp_dir().join(format!("tls-idle-{}", std::process::id()));
    let files = tern::transport::cert::generate(&dir, &["localhost".to_owned()]).expect("certs");
    let server_config = tls::server_config(&files.server_cert, &files.server_key).unwrap();
    let client_config = tls::client_config(&files.ca_cert).unwrap();
    let name = tls::ServerName::try_from("localhost").unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    let before = LIVE.load(Ordering::Relaxed);
    let mut servers = Vec::with_capacity(n);
    let mut fresh = 0isize;
    for i in 0..n {
        let live = LIVE.load(Ordering::Relaxed);
        let mut server = Box::new(TlsLayer::server(&server_config).unwrap());
        if i == 0 {
            fresh = LIVE.load(Ordering::Relaxed) - live;
        }
        let mut client = TlsLayer::client(&client_config, name.clone()).unwrap();
        pump(&mut client, &mut server);
        // One heartbeat each way: a ping (24 B frame) in, a pong out.
        client.send(&[0u8; 24]);
        pump(&mut client, &mut server);
        server.send(&[0u8; 24]);
        pump(&mut client, &mut server);
        drop(client);
        servers.push(server);
    }
    let per = (LIVE.load(Ordering::Relaxed) - before - (n * 8) as isize) / n as isize;
    println!(
        "{{\"connections\": {n}, \"server_heap_bytes_per_idle_connection\": {per}, \
         \"server_heap_bytes_before_handshake\": {fresh}, \"size_of_tls_layer\": {}}}",
        std::mem::size_of::<TlsLayer>()
    );
}
