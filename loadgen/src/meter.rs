//! The node's own counters over a run: bytes it had written to storage (`/proc/PID/io`) and
//! CPU per thread (`/proc/PID/task/*/stat`), as deltas from the start of the run, added up
//! over every process the node ran as (a chaos restart starts a new one whose counters
//! begin at zero). Only for a node on this machine whose pid is known; otherwise every
//! figure is None, never a guess.

use std::collections::BTreeMap;

use crate::sys::{proc_write_bytes, thread_cpu_seconds};

/// One reading of the counters of one process. A field is None when it could not be read.
#[derive(Debug, Clone, Default)]
struct Reading {
    write_bytes: Option<u64>,
    /// CPU seconds by thread name.
    threads: Option<BTreeMap<String, f64>>,
}

impl Reading {
    fn take(pid: u32) -> Reading {
        Reading {
            write_bytes: proc_write_bytes(pid),
            threads: thread_cpu_seconds(pid),
        }
    }

    /// What a freshly started process has used: nothing.
    fn zero() -> Reading {
        Reading {
            write_bytes: Some(0),
            threads: Some(BTreeMap::new()),
        }
    }
}

/// What the node did over the run, summed over its processes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeUsage {
    /// Bytes the node caused to be written to storage (`write_bytes`).
    pub disk_write_bytes: Option<u64>,
    /// CPU seconds by thread name (threads of one name summed). Threads that exited
    /// during the run are missing (their time is in `server.cpu_seconds` only).
    pub threads_cpu_seconds: Option<BTreeMap<String, f64>>,
}

/// Samples the node's counters; see the module comment.
#[derive(Debug)]
pub struct NodeMeter {
    pid: Option<u32>,
    /// Reading of the current process when its share of the run began.
    base: Reading,
    /// Latest reading of the current process.
    last: Reading,
    /// Usage of the processes before the current one (each up to its last reading, so a
    /// killed process's final second before the kill may be missing).
    earlier: NodeUsage,
}

impl NodeMeter {
    /// Starts measuring process `pid` now (None: a remote node, nothing is measured).
    pub fn start(pid: Option<u32>) -> NodeMeter {
        let base = pid.map_or_else(Reading::default, Reading::take);
        NodeMeter {
            pid,
            last: base.clone(),
            base,
            earlier: NodeUsage {
                disk_write_bytes: Some(0),
                threads_cpu_seconds: Some(BTreeMap::new()),
            },
        }
    }

    /// Takes a reading; returns the bytes written so far over the run, when known.
    pub fn sample(&mut self) -> Option<u64> {
        let pid = self.pid?;
        let reading = Reading::take(pid);
        // A process that is gone (killed, not yet restarted) keeps its last reading.
        if reading.write_bytes.is_some() {
            self.last.write_bytes = reading.write_bytes;
        }
        if reading.threads.is_some() {
            self.last.threads = reading.threads;
        }
        self.usage().disk_write_bytes
    }

    /// The node now runs as `pid`, a new process: the current one's share is closed.
    pub fn restarted(&mut self, pid: u32) {
        self.earlier = self.usage();
        self.pid = Some(pid);
        self.base = Reading::zero();
        self.last = Reading::zero();
    }

    /// Usage over the run up to the latest reading.
    pub fn usage(&self) -> NodeUsage {
        if self.pid.is_none() {
            return NodeUsage::default();
        }
        let write_bytes = match (self.base.write_bytes, self.last.write_bytes) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let threads = match (&self.base.threads, &self.last.threads) {
            (Some(a), Some(b)) => Some(
                b.iter()
                    .map(|(name, s)| {
                        let before = a.get(name).copied().unwrap_or(0.0);
                        // Fewer threads of a name than at the start: not negative.
                        (name.clone(), (s - before).max(0.0))
                    })
                    .collect::<BTreeMap<_, _>>(),
            ),
            _ => None,
        };
        NodeUsage {
            disk_write_bytes: match (self.earlier.disk_write_bytes, write_bytes) {
                (Some(a), Some(b)) => Some(a + b),
                _ => None,
            },
            threads_cpu_seconds: match (&self.earlier.threads_cpu_seconds, threads) {
                (Some(a), Some(mut b)) => {
                    for (name, s) in a {
                        *b.entry(name.clone()).or_insert(0.0) += s;
                    }
                    Some(b)
                }
                _ => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_node_has_no_figures() {
        let mut meter = NodeMeter::start(None);
        assert_eq!(meter.sample(), None);
        assert_eq!(meter.usage(), NodeUsage::default());
    }

    #[test]
    fn own_process_is_measured_by_thread_from_the_start() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let mut meter = NodeMeter::start(Some(std::process::id()));
        let stop = Arc::new(AtomicBool::new(false));
        let spin_stop = Arc::clone(&stop);
        // Burns CPU until told to stop, so the samples below see it alive whatever the
        // scheduler does on a loaded box.
        let spin = std::thread::Builder::new()
            .name("meter-spin".into())
            .spawn(move || {
                let mut x = 0u64;
                while !spin_stop.load(Ordering::Relaxed) {
                    for i in 0..100_000u64 {
                        x = x.wrapping_mul(31).wrapping_add(i);
                    }
                }
                std::hint::black_box(x);
            })
            .expect("spawn");
        // Sample until a reading shows the thread by name with CPU time of its own; bounded
        // so a meter that never sees it fails instead of hanging.
        let spun = |meter: &NodeMeter| {
            meter
                .usage()
                .threads_cpu_seconds
                .and_then(|t| t.get("meter-spin").copied())
                .unwrap_or(0.0)
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while spun(&meter) <= 0.0 && std::time::Instant::now() < deadline {
            meter.sample();
        }
        stop.store(true, Ordering::Relaxed);
        spin.join().expect("join");
        assert!(spun(&meter) > 0.0, "{:?}", meter.usage());
    }

    #[test]
    fn a_restart_adds_the_new_process_to_the_old_one() {
        let mut meter = NodeMeter {
            pid: Some(1),
            base: Reading {
                write_bytes: Some(100),
                threads: Some(BTreeMap::from([("w".to_owned(), 1.0)])),
            },
            last: Reading {
                write_bytes: Some(1100),
                threads: Some(BTreeMap::from([
                    ("w".to_owned(), 3.0),
                    ("s".to_owned(), 0.5),
                ])),
            },
            earlier: NodeUsage {
                disk_write_bytes: Some(0),
                threads_cpu_seconds: Some(BTreeMap::new()),
            },
        };
        meter.restarted(2);
        meter.last = Reading {
            write_bytes: Some(50),
            threads: Some(BTreeMap::from([("w".to_owned(), 0.25)])),
        };
        let usage = meter.usage();
        assert_eq!(usage.disk_write_bytes, Some(1050));
        let threads = usage.threads_cpu_seconds.expect("known");
        assert_eq!(threads.get("w"), Some(&2.25));
        assert_eq!(threads.get("s"), Some(&0.5));
    }
}
