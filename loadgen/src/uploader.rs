//! A device that keeps uploading files while a run lasts: the kill loop's "upload in
//! progress". Each file goes up in chunks through the SDK's blocking driver and resumes
//! from the node's offset after a lost connection or a killed node; at the end every file
//! the node acknowledged is downloaded again and compared byte for byte (the SDK also
//! checks its SHA-256). Partial files must never be visible: the store audit checks that
//! every recorded file is complete.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tern::client::{BlockingClient, ClientConfig, ClientError};
use tern::limits::FILE_CHUNK_SIZE_MAX;

/// Bytes of each uploaded file: several chunks, so kills land mid-upload.
const UPLOAD_FILE_BYTES: usize = 7 * FILE_CHUNK_SIZE_MAX + 1000;
/// Pause between two chunks: an upload then lasts long enough (~0.2 s) that kills land in
/// its middle, and it stays a small share of the run's traffic.
const CHUNK_PAUSE: Duration = Duration::from_millis(25);
/// Pause between two uploads.
const UPLOAD_PAUSE: Duration = Duration::from_millis(200);
/// Pause before connecting again after the node went away.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);
/// Longest the final check waits for one download.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(30);
/// Device name of the uploading connection (beside the simulated devices of its user).
const UPLOADER_DEVICE: &str = "uploader";

/// What the uploader did.
#[derive(Debug, Clone, Default)]
pub struct UploadLog {
    /// Files the node acknowledged: (file id, content number).
    pub completed: Vec<(u64, u32)>,
    /// Starts that found part of the file on the node already (resumed uploads).
    pub resumed: u64,
    /// Attempts that ended in an error (a killed node, a lost connection) and were retried.
    pub interrupted: u64,
}

pub struct Uploader {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<UploadLog>,
}

/// The content of file `n`: deterministic, so the check can rebuild it.
fn content(n: u32) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(n).wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..UPLOAD_FILE_BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn client(server: SocketAddr, user: &str, password: &str) -> Result<BlockingClient, ClientError> {
    let config = ClientConfig::new(user, UPLOADER_DEVICE).with_password(password);
    let mut client =
        BlockingClient::new(server, config).with_operation_timeout(Duration::from_secs(10));
    client.connect()?;
    Ok(client)
}

impl Uploader {
    /// Starts uploading as `user` until `finish`.
    pub fn start(server: SocketAddr, user: String, password: String) -> Uploader {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut log = UploadLog::default();
            let mut n = 0u32;
            let mut connection: Option<BlockingClient> = None;
            while !stopping.load(Ordering::Relaxed) {
                let conn = match connection.as_mut() {
                    Some(conn) => conn,
                    None => match client(server, &user, &password) {
                        Ok(conn) => connection.insert(conn),
                        Err(_) => {
                            std::thread::sleep(RECONNECT_PAUSE);
                            continue;
                        }
                    },
                };
                match upload_once(conn, n, &mut log) {
                    Ok(file_id) => {
                        log.completed.push((file_id, n));
                        n += 1;
                        std::thread::sleep(UPLOAD_PAUSE);
                    }
                    Err(_) => {
                        // The same content again: the node resumes from what it holds.
                        log.interrupted += 1;
                        connection = None;
                        std::thread::sleep(RECONNECT_PAUSE);
                    }
                }
            }
            log
        });
        Uploader { stop, thread }
    }

    /// Stops after the upload in progress and returns the log.
    pub fn finish(self) -> UploadLog {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

fn upload_once(conn: &mut BlockingClient, n: u32, log: &mut UploadLog) -> Result<u64, ClientError> {
    let data = content(n);
    let sha256: [u8; 32] = Sha256::digest(&data).into();
    let ready = conn.upload_start(
        &format!("chaos-{n}.bin"),
        "application/octet-stream",
        data.len() as u64,
        sha256,
    )?;
    if ready.offset > 0 {
        log.resumed += 1;
    }
    let mut offset = ready.offset;
    while offset < data.len() as u64 {
        std::thread::sleep(CHUNK_PAUSE);
        let end = (offset as usize + FILE_CHUNK_SIZE_MAX).min(data.len());
        offset = conn
            .upload_chunk(ready.upload_id, offset, &data[offset as usize..end])?
            .offset;
    }
    Ok(conn.upload_finish(ready.upload_id)?.file_id)
}

/// Downloads every acknowledged file and compares it with its content; returns how many
/// matched, or the first that did not.
pub fn verify(
    server: SocketAddr,
    user: &str,
    password: &str,
    log: &UploadLog,
) -> Result<u64, String> {
    let deadline = Instant::now() + VERIFY_TIMEOUT;
    let mut conn = loop {
        match client(server, user, password) {
            Ok(conn) => break conn,
            Err(e) if Instant::now() >= deadline => return Err(format!("connect: {e}")),
            Err(_) => std::thread::sleep(RECONNECT_PAUSE),
        }
    };
    let mut verified = 0;
    for &(file_id, n) in &log.completed {
        let mut out = Vec::new();
        conn.download(file_id, &mut out)
            .map_err(|e| format!("download file {file_id}: {e}"))?;
        if out != content(n) {
            return Err(format!("file {file_id} differs from what was uploaded"));
        }
        verified += 1;
    }
    Ok(verified)
}
