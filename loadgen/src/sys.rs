//! Small OS helpers: a seeded PRNG, process CPU and memory from /proc, the bytes a process
//! had written to storage, CPU per thread, the size of a folder.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// SplitMix64: seedable and fast; for choosing recipients, sizes and periods, not secrets.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        self.next_u64() % n
    }

    /// Uniform in [lo, hi].
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below(hi - lo + 1)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// CPU time (user + system) and resident memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

pub fn proc_sample(pid: u32) -> Option<ProcSample> {
    proc_sample_at(&format!("/proc/{pid}"))
}

pub fn self_sample() -> Option<ProcSample> {
    proc_sample_at("/proc/self")
}

fn proc_sample_at(dir: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    let (cpu_seconds, rss_pages) = parse_stat(&stat)?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    Some(ProcSample {
        cpu_seconds,
        rss_bytes: rss_pages * page,
    })
}

/// (user + system CPU seconds, resident pages) from the text of a `stat` file of a process
/// or a thread.
fn parse_stat(stat: &str) -> Option<(f64, u64)> {
    // The command name may hold spaces and parentheses; fields resume after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the man page, utime 14 and stime 15, rss 24.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let rss_pages: u64 = fields.get(21)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(((utime + stime) as f64 / ticks, rss_pages))
}

/// Bytes process `pid` caused to be sent to the storage layer so far (`write_bytes` of
/// `/proc/PID/io`: pages it dirtied, counted again each time a commit dirties a page that
/// writeback had cleaned). None when the file cannot be read (another user's process, a
/// kernel without task I/O accounting, a process that is gone).
pub fn proc_write_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    parse_io_write_bytes(&io)
}

fn parse_io_write_bytes(io: &str) -> Option<u64> {
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// CPU seconds (user + system) of each live thread of process `pid`, by thread name
/// (`comm`); threads with the same name are summed. None when the process is gone.
/// Threads that already exited are not listed: their time is in the process total only.
pub fn thread_cpu_seconds(pid: u32) -> Option<BTreeMap<String, f64>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut out = BTreeMap::new();
    for task in tasks.flatten() {
        let dir = task.path();
        // A thread may exit between listing and reading: skip it.
        let (Ok(stat), Ok(comm)) = (
            std::fs::read_to_string(dir.join("stat")),
            std::fs::read_to_string(dir.join("comm")),
        ) else {
            continue;
        };
        let Some((cpu_seconds, _)) = parse_stat(&stat) else {
            continue;
        };
        *out.entry(comm.trim_end().to_owned()).or_insert(0.0) += cpu_seconds;
    }
    Some(out)
}

/// Disk space taken by the files under `dir`, recursively, as `du` counts it (allocated
/// blocks, so a sparse file counts what it holds). None when `dir` cannot be read.
pub fn dir_size_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if meta.is_dir() {
            total += dir_size_bytes(&entry.path()).unwrap_or(0);
        } else {
            // st_blocks is in 512-byte units whatever the file system's block size.
            total += meta.blocks() * 512;
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_sample_is_plausible() {
        let sample = self_sample().expect("/proc/self readable");
        assert!(sample.rss_bytes > 0);
        assert!(sample.cpu_seconds >= 0.0);
    }

    #[test]
    fn own_threads_are_listed_by_name_and_io_is_parsed() {
        let me = std::process::id();
        let named = std::thread::Builder::new()
            .name("sys-test-x".into())
            .spawn(move || thread_cpu_seconds(me))
            .expect("spawn")
            .join()
            .expect("join")
            .expect("own task folder readable");
        assert!(named.contains_key("sys-test-x"), "{named:?}");
        assert!(named.values().all(|s| *s >= 0.0));
        let io =
            "rchar: 10\nwchar: 20\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(parse_io_write_bytes(io), Some(8192));
        assert_eq!(parse_io_write_bytes("rchar: 1\n"), None);
        // A name with spaces and parentheses does not shift the fields.
        let stat = "12 (a (b) c) S 1 1 1 0 -1 0 0 0 0 0 300 100 0 0 20 0 1 0 5 1000 7 0";
        let (cpu, rss) = parse_stat(stat).expect("parses");
        assert_eq!(rss, 7);
        assert!(cpu > 0.0);
    }

    #[test]
    fn folder_size_counts_what_its_files_hold() {
        let dir = std::env::temp_dir().join(format!("tern-loadgen-sys-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        std::fs::write(dir.join("sub/a"), vec![7u8; 64 * 1024]).expect("write");
        let size = dir_size_bytes(&dir).expect("readable");
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert!(size >= 64 * 1024, "{size}");
        assert_eq!(dir_size_bytes(&dir), None);
    }

    #[test]
    fn rng_ranges_hold() {
        let mut rng = Rng::new(7);
        for _ in 0..1000 {
            let v = rng.between(5, 9);
            assert!((5..=9).contains(&v));
            let u = rng.unit();
            assert!((0.0..1.0).contains(&u));
        }
        assert_eq!(rng.between(3, 3), 3);
    }
}
