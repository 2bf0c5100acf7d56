//! The open-loop clock: when each operation (a send, a connect) was meant to happen.
//!
//! Operation k is due at `start + k / rate`, whether or not the system under test kept up.
//! A driver that fell behind (a stalled node, a stalled loadgen thread) gets every missed
//! operation back with its original intended time, and latency is counted from that time,
//! so a stall shows up as latency instead of silently lowering the offered load
//! (coordinated omission). Pure: time comes in as an argument.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct OpenLoop {
    start: Instant,
    /// Nanoseconds between operations; None for rate 0 (nothing is ever due).
    interval_ns: Option<f64>,
    /// Index of the next operation not yet handed out.
    next: u64,
    /// Operations after this many are never due (None: unbounded).
    limit: Option<u64>,
}

impl OpenLoop {
    /// `rate_per_s` operations per second from `start`; 0 or a non-finite rate gives a
    /// schedule that is never due.
    pub fn new(start: Instant, rate_per_s: f64) -> OpenLoop {
        let interval_ns = (rate_per_s.is_finite() && rate_per_s > 0.0).then(|| 1e9 / rate_per_s);
        OpenLoop {
            start,
            interval_ns,
            next: 0,
            limit: None,
        }
    }

    /// Stops after `count` operations in total.
    pub fn with_limit(mut self, count: u64) -> OpenLoop {
        self.limit = Some(count);
        self
    }

    /// Intended time of operation `k`.
    pub fn intended(&self, k: u64) -> Option<Instant> {
        let interval = self.interval_ns?;
        Some(self.start + Duration::from_nanos((k as f64 * interval) as u64))
    }

    /// The next operation due at or before `now`, with its intended time; each is handed
    /// out once. Callers loop on it, bounded by their own per-turn budget.
    pub fn next_due(&mut self, now: Instant) -> Option<Instant> {
        if self.limit.is_some_and(|limit| self.next >= limit) {
            return None;
        }
        let at = self.intended(self.next)?;
        if at > now {
            return None;
        }
        self.next += 1;
        Some(at)
    }

    /// When the next operation is due (for the event loop's wait), None if never.
    pub fn next_at(&self) -> Option<Instant> {
        if self.limit.is_some_and(|limit| self.next >= limit) {
            return None;
        }
        self.intended(self.next)
    }

    /// Operations handed out so far.
    #[cfg(test)]
    pub fn issued(&self) -> u64 {
        self.next
    }

    /// Operations due by `now` but not yet handed out: how far the driver is behind.
    pub fn backlog(&self, now: Instant) -> u64 {
        let Some(interval) = self.interval_ns else {
            return 0;
        };
        let elapsed = now.saturating_duration_since(self.start).as_nanos() as f64;
        let due = (elapsed / interval).floor() as u64 + 1;
        let due = self.limit.map_or(due, |limit| due.min(limit));
        due.saturating_sub(self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(schedule: &mut OpenLoop, now: Instant) -> Vec<Instant> {
        std::iter::from_fn(|| schedule.next_due(now)).collect()
    }

    #[test]
    fn operations_are_due_at_evenly_spaced_intended_times() {
        let start = Instant::now();
        let mut schedule = OpenLoop::new(start, 1000.0);
        // At start only operation 0 is due; 10 ms later operations 1..=10.
        assert_eq!(drain(&mut schedule, start), vec![start]);
        let later = start + Duration::from_millis(10);
        let due = drain(&mut schedule, later);
        assert_eq!(due.len(), 10);
        for (i, at) in due.iter().enumerate() {
            assert_eq!(*at, start + Duration::from_millis(i as u64 + 1));
        }
        assert_eq!(schedule.next_at(), Some(start + Duration::from_millis(11)));
    }

    #[test]
    fn a_stalled_driver_gets_the_backlog_with_original_intended_times() {
        let start = Instant::now();
        let mut schedule = OpenLoop::new(start, 100.0);
        drain(&mut schedule, start);
        // The driver sleeps for a second: 100 operations were due meanwhile.
        let after_stall = start + Duration::from_secs(1);
        assert_eq!(schedule.backlog(after_stall), 100);
        let due = drain(&mut schedule, after_stall);
        assert_eq!(due.len(), 100);
        assert_eq!(due[0], start + Duration::from_millis(10));
        // Latency counted from these times includes the stall: the first was due 990 ms
        // before the driver got to it.
        assert_eq!(
            after_stall.duration_since(due[0]),
            Duration::from_millis(990)
        );
        assert_eq!(schedule.backlog(after_stall), 0);
        assert_eq!(schedule.issued(), 101);
    }

    #[test]
    fn zero_rate_is_never_due_and_a_limit_stops_the_schedule() {
        let start = Instant::now();
        let mut idle = OpenLoop::new(start, 0.0);
        assert_eq!(idle.next_due(start + Duration::from_secs(3600)), None);
        assert_eq!(idle.next_at(), None);
        assert_eq!(idle.backlog(start + Duration::from_secs(5)), 0);

        let mut limited = OpenLoop::new(start, 1000.0).with_limit(5);
        assert_eq!(drain(&mut limited, start + Duration::from_secs(1)).len(), 5);
        assert_eq!(limited.next_at(), None);
        assert_eq!(limited.backlog(start + Duration::from_secs(1)), 0);
    }

    #[test]
    fn fractional_rates_keep_their_long_run_average() {
        let start = Instant::now();
        let mut schedule = OpenLoop::new(start, 333.3);
        let due = drain(&mut schedule, start + Duration::from_secs(10));
        // 10 s × 333.3/s, plus operation 0 at the start.
        assert_eq!(due.len(), 3334);
    }
}
