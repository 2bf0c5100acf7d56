//! Latency histograms: recording in microseconds, percentiles in milliseconds, and the
//! compact form that carries them between worker threads and processes.
//!
//! Every histogram has the same range and precision, so any two merge exactly; a worker
//! process sends its histograms as hdrhistogram V2 bytes (base64 in JSON) and the
//! coordinator adds them up. Nothing here does I/O.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

/// Largest latency recorded exactly: one hour. Longer values are clamped to it (a run
/// never waits that long for one message; clamping keeps a wild value from being lost).
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Significant figures kept: values within 0.1 % of each other share a bucket.
pub const SIGNIFICANT_FIGURES: u8 = 3;

/// What is measured, one histogram each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// TCP connect: from the connect call to the socket being writable.
    Connect,
    /// From the connect call to `LoginOk` (hello and login included).
    Login,
    /// Intended send time to the durable `SendAck`.
    Ack,
    /// Intended send time to the message reaching a recipient device.
    E2e,
    /// Heartbeat round trip.
    Heartbeat,
    /// A sync run: `LoginOk` (or `sync_now`) to `SyncDone`.
    Sync,
    /// The reconnect storm (`--storm-at`) to the client's next `LoginOk`.
    Storm,
}

impl Metric {
    pub const ALL: [Metric; 7] = [
        Metric::Connect,
        Metric::Login,
        Metric::Ack,
        Metric::E2e,
        Metric::Heartbeat,
        Metric::Sync,
        Metric::Storm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Connect => "connect",
            Metric::Login => "login",
            Metric::Ack => "ack",
            Metric::E2e => "e2e",
            Metric::Heartbeat => "heartbeat",
            Metric::Sync => "sync",
            Metric::Storm => "storm",
        }
    }
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, SIGNIFICANT_FIGURES)
        .expect("constant histogram bounds are valid")
}

/// One histogram per `Metric`.
#[derive(Debug, Clone)]
pub struct Hists {
    hists: Vec<Histogram<u64>>,
}

impl Default for Hists {
    fn default() -> Hists {
        Hists::new()
    }
}

impl Hists {
    pub fn new() -> Hists {
        Hists {
            hists: Metric::ALL.iter().map(|_| new_histogram()).collect(),
        }
    }

    pub fn record_us(&mut self, metric: Metric, us: u64) {
        self.hists[metric as usize].saturating_record(us.clamp(1, LATENCY_US_MAX));
    }

    pub fn get(&self, metric: Metric) -> &Histogram<u64> {
        &self.hists[metric as usize]
    }

    /// Adds every histogram of `other` into this one.
    pub fn add(&mut self, other: &Hists) {
        for (mine, theirs) in self.hists.iter_mut().zip(&other.hists) {
            mine.add(theirs)
                .expect("histograms share bounds, so addition cannot fail");
        }
    }

    /// V2-serialised, base64-encoded, in `Metric::ALL` order.
    pub fn to_wire(&self) -> WireHists {
        let mut serializer = V2Serializer::new();
        let encoded = self
            .hists
            .iter()
            .map(|hist| {
                let mut bytes = Vec::new();
                serializer
                    .serialize(hist, &mut bytes)
                    .expect("serialising into a Vec cannot fail");
                BASE64.encode(&bytes)
            })
            .collect();
        WireHists(encoded)
    }

    pub fn from_wire(wire: &WireHists) -> Result<Hists, String> {
        if wire.0.len() != Metric::ALL.len() {
            return Err(format!(
                "expected {} histograms, got {}",
                Metric::ALL.len(),
                wire.0.len()
            ));
        }
        let mut deserializer = Deserializer::new();
        let mut hists = Hists::new();
        for (slot, text) in hists.hists.iter_mut().zip(&wire.0) {
            let bytes = BASE64
                .decode(text)
                .map_err(|e| format!("histogram base64: {e}"))?;
            let decoded: Histogram<u64> = deserializer
                .deserialize(&mut bytes.as_slice())
                .map_err(|e| format!("histogram V2: {e:?}"))?;
            slot.add(&decoded)
                .map_err(|e| format!("histogram range: {e:?}"))?;
        }
        Ok(hists)
    }
}

/// `Hists` as it travels in JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WireHists(pub Vec<String>);

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

pub fn summary(hist: &Histogram<u64>) -> Summary {
    if hist.is_empty() {
        return Summary::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Summary {
        count: hist.len(),
        p50: ms(hist.value_at_quantile(0.50)),
        p90: ms(hist.value_at_quantile(0.90)),
        p99: ms(hist.value_at_quantile(0.99)),
        p999: ms(hist.value_at_quantile(0.999)),
        max: ms(hist.max()),
        mean: hist.mean() / 1000.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_wire_histograms_equals_recording_everything_in_one() {
        // Two "processes" record disjoint halves of one sample set.
        let mut one = Hists::new();
        let mut two = Hists::new();
        let mut all = Hists::new();
        for i in 1..=10_000u64 {
            let us = i * 37 % 250_000 + 1;
            let part = if i % 3 == 0 { &mut one } else { &mut two };
            part.record_us(Metric::Ack, us);
            part.record_us(Metric::E2e, us * 2);
            all.record_us(Metric::Ack, us);
            all.record_us(Metric::E2e, us * 2);
        }
        let mut merged = Hists::from_wire(&one.to_wire()).expect("decode one");
        merged.add(&Hists::from_wire(&two.to_wire()).expect("decode two"));
        for metric in Metric::ALL {
            assert_eq!(merged.get(metric).len(), all.get(metric).len());
            assert_eq!(summary(merged.get(metric)), summary(all.get(metric)));
        }
        assert_eq!(merged.get(Metric::Ack).len(), 10_000);
        assert!(merged.get(Metric::Heartbeat).is_empty());
    }

    #[test]
    fn out_of_range_values_are_clamped_not_lost() {
        let mut hists = Hists::new();
        hists.record_us(Metric::Sync, 0);
        hists.record_us(Metric::Sync, u64::MAX);
        let sync = hists.get(Metric::Sync);
        assert_eq!(sync.len(), 2);
        assert!(sync.max() >= LATENCY_US_MAX);
    }

    #[test]
    fn corrupt_wire_data_is_an_error() {
        let mut wire = Hists::new().to_wire();
        wire.0[0] = "not base64!".to_owned();
        assert!(Hists::from_wire(&wire).is_err());
        assert!(Hists::from_wire(&WireHists(vec![])).is_err());
    }
}
