//! Counting and latency recording on the hot path, and what a run's report keeps of them.
//!
//! Every producer, acknowledgement collector and consumer task keeps its own counters and
//! histograms, so recording a message never touches memory another task writes:
//! - a [`Tally`] has exactly one writer, which stores its running count (no atomic
//!   read-modify-write); the once-a-second reporter sums the tallies it registered;
//! - a [`LatencyRecorder`] records into a private histogram and moves it into the
//!   [`SharedHistogram`] at most every [`FLUSH_INTERVAL_NS`], where the reporter picks
//!   it up for the per-second p99 and the run's totals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency a histogram holds: one hour, in nanoseconds. Larger values are
/// recorded as this.
const LATENCY_NS_MAX: u64 = 3_600 * 1_000_000_000;
/// Significant decimal digits the histograms keep (0.1 % relative precision).
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;
/// How often a [`LatencyRecorder`] hands its histogram to the reporter.
pub const FLUSH_INTERVAL_NS: u64 = 100_000_000;

/// A new, empty latency histogram (nanoseconds).
pub fn latency_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (low 1, high ≥ 2, 3 digits).
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, LATENCY_SIGNIFICANT_DIGITS)
        .unwrap_or_else(|e| unreachable!("constant histogram bounds rejected: {e}"))
}

/// A count with one writer, read by the reporter. Aligned to a cache line so two
/// writers never share one.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct Tally(AtomicU64);

impl Tally {
    /// Publishes the writer's running count.
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// The last published count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A set of [`Tally`]s that are summed together (all producers' sent counts, say).
#[derive(Debug, Default)]
pub struct Tallies(Mutex<Vec<Arc<Tally>>>);

impl Tallies {
    /// A new tally that counts towards this set.
    pub fn register(&self) -> Arc<Tally> {
        let tally = Arc::new(Tally::default());
        lock(&self.0).push(Arc::clone(&tally));
        tally
    }

    /// The sum of every registered tally.
    pub fn sum(&self) -> u64 {
        lock(&self.0).iter().map(|t| t.get()).sum()
    }
}

/// Where the recorders of one kind of latency (publish → ack, or end to end) put what
/// they recorded; the reporter takes it out once a second.
#[derive(Debug, Clone)]
pub struct SharedHistogram(Arc<Mutex<Histogram<u64>>>);

impl Default for SharedHistogram {
    fn default() -> Self {
        SharedHistogram(Arc::new(Mutex::new(latency_histogram())))
    }
}

impl SharedHistogram {
    /// Moves everything recorded since the last call into `into`, leaving this empty.
    pub fn drain_into(&self, into: &mut Histogram<u64>) {
        let mut shared = lock(&self.0);
        add(into, &shared);
        shared.reset();
    }

    fn absorb(&self, from: &Histogram<u64>) {
        add(&mut lock(&self.0), from);
    }
}

/// Records latencies into a private histogram and hands them to a [`SharedHistogram`]
/// every [`FLUSH_INTERVAL_NS`] and on [`LatencyRecorder::flush`].
#[derive(Debug)]
pub struct LatencyRecorder {
    local: Histogram<u64>,
    shared: SharedHistogram,
    flushed_ns: u64,
}

impl LatencyRecorder {
    /// A recorder that reports to `shared`.
    pub fn new(shared: SharedHistogram) -> LatencyRecorder {
        LatencyRecorder {
            local: latency_histogram(),
            shared,
            flushed_ns: 0,
        }
    }

    /// Records the latency from `from_ns` to `now_ns` (both on the run's clock).
    #[inline]
    pub fn record(&mut self, from_ns: u64, now_ns: u64) {
        self.local
            .saturating_record(now_ns.saturating_sub(from_ns).max(1));
        if now_ns.wrapping_sub(self.flushed_ns) >= FLUSH_INTERVAL_NS {
            self.flushed_ns = now_ns;
            self.flush();
        }
    }

    /// Hands everything recorded so far to the shared histogram.
    pub fn flush(&mut self) {
        if !self.local.is_empty() {
            self.shared.absorb(&self.local);
            self.local.reset();
        }
    }
}

impl Drop for LatencyRecorder {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Adds `from` into `into`. Every histogram here has the same bounds, so this cannot
/// fail; a failure would only lose samples, never corrupt the report, so it is ignored.
fn add(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    let _ = into.add(from);
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A recorder that panicked leaves a histogram that is still a valid histogram.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Percentiles of one latency distribution, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// How many latencies were recorded.
    pub samples: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl Percentiles {
    /// The percentiles of `h` (nanoseconds), or `None` when it is empty.
    pub fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1_000.0;
        Some(Percentiles {
            samples: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        })
    }
}

/// Which message ids a consumer (or a consumer set) has seen: one bit per id, one bitmap
/// per producer. Tells duplicates from first receipts so a report can say whether every
/// acknowledged message arrived exactly once.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    by_producer: Vec<Vec<u64>>,
    unique: u64,
    duplicates: u64,
}

/// Largest per-producer sequence number a consumer accepts; anything beyond is counted
/// as malformed rather than growing a bitmap without bound.
const SEQUENCE_MAX: u64 = 1 << 34;

impl Seen {
    /// Marks `(producer, sequence)` as seen; false when the id is out of range (the
    /// payload was not one of ours).
    #[inline]
    pub fn mark(&mut self, producer: u32, sequence: u64, producers: u32) -> bool {
        if producer >= producers || sequence >= SEQUENCE_MAX {
            return false;
        }
        if self.by_producer.len() < producers as usize {
            self.by_producer.resize_with(producers as usize, Vec::new);
        }
        let words = &mut self.by_producer[producer as usize];
        let word = (sequence / 64) as usize;
        if word >= words.len() {
            words.resize((word + 1).next_power_of_two(), 0);
        }
        let bit = 1u64 << (sequence % 64);
        if words[word] & bit == 0 {
            words[word] |= bit;
            self.unique += 1;
        } else {
            self.duplicates += 1;
        }
        true
    }

    /// Distinct ids seen.
    pub fn unique(&self) -> u64 {
        self.unique
    }

    /// Ids seen more than once, counted once per extra receipt.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Adds what `other` saw; an id both saw counts as a duplicate.
    pub fn merge(&mut self, other: &Seen) {
        if self.by_producer.len() < other.by_producer.len() {
            self.by_producer
                .resize_with(other.by_producer.len(), Vec::new);
        }
        for (mine, theirs) in self.by_producer.iter_mut().zip(&other.by_producer) {
            if mine.len() < theirs.len() {
                mine.resize(theirs.len(), 0);
            }
            for (a, b) in mine.iter_mut().zip(theirs) {
                let both = u64::from((*a & b).count_ones());
                self.duplicates += both;
                self.unique += u64::from(b.count_ones()) - both;
                *a |= b;
            }
        }
        self.duplicates += other.duplicates;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_counts_first_receipts_and_duplicates_also_across_merges() {
        let mut a = Seen::default();
        assert!(a.mark(0, 0, 2));
        assert!(a.mark(0, 1000, 2));
        assert!(a.mark(0, 0, 2));
        assert!(!a.mark(2, 0, 2), "producer out of range");
        assert!(!a.mark(0, SEQUENCE_MAX, 2), "sequence out of range");
        let mut b = Seen::default();
        assert!(b.mark(1, 5, 2));
        assert!(b.mark(0, 1000, 2));
        a.merge(&b);
        assert_eq!(a.unique(), 3);
        assert_eq!(a.duplicates(), 2);
    }

    #[test]
    fn recorder_hands_samples_to_the_shared_histogram() {
        let shared = SharedHistogram::default();
        let mut recorder = LatencyRecorder::new(shared.clone());
        recorder.record(1_000, 2_000);
        recorder.record(0, 5_000_000);
        drop(recorder);
        let mut total = latency_histogram();
        shared.drain_into(&mut total);
        let p = Percentiles::of(&total).expect("two samples");
        assert_eq!(p.samples, 2);
        assert!((p.p50_us - 1.0).abs() < 0.01, "{p:?}");
        assert!((p.max_us - 5_000.0).abs() < 5.0, "{p:?}");
        let mut again = latency_histogram();
        shared.drain_into(&mut again);
        assert!(again.is_empty(), "drained once");
    }
}
