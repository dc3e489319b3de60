//! The message generator: one per producer, on its own OS thread.
//!
//! It makes messages ([`Payloads`]), paces them, and hands each to its backend's sink
//! as an [`Offer`]. A sink that cannot take more blocks the generator (back-pressure).
//! At max rate a message's send time is a clock reading shared by at most
//! [`STAMP_REUSE_MAX`] consecutive messages, re-read after any offer that may have
//! waited, so a send time is early by at most the time to make that many messages.
//!
//! Pacing. At a fixed rate, message `n` of a producer is *intended* to go at
//! `start + phase + n / rate`, and that intended time is what goes in the header and
//! what latencies are measured from, so a stalled system cannot hide its stall by
//! slowing the generator down (coordinated omission): messages that should have gone
//! during a stall carry their intended times and are sent as soon as the sink takes them.
//! The generator sleeps (`nanosleep`) until the next intended time; the OS wakes it some
//! tens of microseconds late, which then counts as latency: the `--null` target shows
//! that floor.

use std::time::Duration;

use crate::payload::{message_id, Clock, Payloads};
use crate::stats::Tally;

/// What a generator hands its sink.
#[derive(Debug)]
pub enum Offer<'a> {
    /// A message and its send time (intended, for fixed-rate runs).
    Message {
        /// The message, to read in place or copy out as `Bytes`.
        value: &'a mut Payloads,
        /// Send time, ns on the run's clock.
        sent_ns: u64,
    },
    /// The generator is about to sleep until the next intended send time: a sink that
    /// batches can send what it has.
    Idle,
}

/// How a sink took an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Took {
    /// Without waiting.
    AtOnce,
    /// Possibly after waiting for room (the generator reads the clock afresh).
    MayHaveWaited,
}

/// The sink's answer when it will not take more: the run is over for this producer.
#[derive(Debug)]
pub struct SinkClosed;

/// What one generator does.
#[derive(Debug, Clone)]
pub struct GeneratorPlan {
    /// Producer index (goes in the message ids).
    pub producer: u32,
    /// Message size in bytes.
    pub message_bytes: usize,
    /// Messages to send, if the run is counted.
    pub messages: Option<u64>,
    /// Stop making messages at this clock reading, if the run is timed.
    pub deadline_ns: Option<u64>,
    /// Messages per second for this producer; `None` is as fast as the sink takes them.
    pub rate: Option<f64>,
    /// Clock reading of the first intended send time (fixed-rate runs).
    pub start_ns: u64,
}

/// Messages in a row that may share one clock reading at max rate: reading the clock
/// costs about as much as encoding a small message, and consecutive messages are made
/// well under a microsecond apart.
const STAMP_REUSE_MAX: u32 = 16;

/// Runs the generator on the calling thread until its count or deadline is reached or
/// the sink closes; returns how many messages it sent. `sent` publishes the running
/// count for progress reports.
pub fn generate(
    plan: &GeneratorPlan,
    clock: Clock,
    sent: &Tally,
    mut sink: impl FnMut(Offer<'_>) -> Result<Took, SinkClosed>,
) -> u64 {
    let mut payloads = Payloads::new(plan.message_bytes);
    let messages = plan.messages.unwrap_or(u64::MAX);
    let deadline_ns = plan.deadline_ns.unwrap_or(u64::MAX);
    let interval_ns = plan.rate.map(|rate| 1e9 / rate);
    let mut sequence = 0u64;
    // Max rate: the last clock reading and how many more messages may use it.
    let (mut now_ns, mut reuses_left) = (0, 0);
    while sequence < messages {
        let sent_ns = match interval_ns {
            None => {
                if reuses_left == 0 {
                    now_ns = clock.now_ns();
                    reuses_left = STAMP_REUSE_MAX;
                }
                reuses_left -= 1;
                now_ns
            }
            Some(interval_ns) => {
                let intended_ns = plan.start_ns + (sequence as f64 * interval_ns) as u64;
                let now_ns = clock.now_ns();
                if intended_ns > now_ns {
                    if sink(Offer::Idle).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_nanos(intended_ns - now_ns));
                }
                intended_ns
            }
        };
        if sent_ns >= deadline_ns {
            break;
        }
        payloads.stamp(sent_ns, message_id(plan.producer, sequence));
        let offer = Offer::Message {
            value: &mut payloads,
            sent_ns,
        };
        match sink(offer) {
            Ok(Took::AtOnce) => {}
            Ok(Took::MayHaveWaited) => reuses_left = 0,
            Err(SinkClosed) => break,
        }
        sequence += 1;
        sent.set(sequence);
    }
    sequence
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::read_header;

    fn plan(messages: Option<u64>, rate: Option<f64>) -> GeneratorPlan {
        GeneratorPlan {
            producer: 5,
            message_bytes: 32,
            messages,
            deadline_ns: None,
            rate,
            start_ns: 0,
        }
    }

    #[test]
    fn counted_run_sends_numbered_messages() {
        let clock = Clock::start();
        let tally = Tally::default();
        let mut seen = Vec::new();
        let sent = generate(&plan(Some(10), None), clock, &tally, |offer| {
            if let Offer::Message { value, .. } = offer {
                seen.push(read_header(value.current()).expect("a header"));
            }
            Ok(Took::AtOnce)
        });
        assert_eq!(sent, 10);
        assert_eq!(tally.get(), 10);
        let ids: Vec<_> = seen.iter().map(|&(_, p, s)| (p, s)).collect();
        assert_eq!(ids, (0..10).map(|s| (5, s)).collect::<Vec<_>>());
    }

    #[test]
    fn fixed_rate_stamps_intended_times() {
        let clock = Clock::start();
        let tally = Tally::default();
        let mut times = Vec::new();
        let mut idles = 0;
        // 10,000 msgs/s: intended times 100 µs apart whatever the scheduler does.
        generate(&plan(Some(5), Some(10_000.0)), clock, &tally, |offer| {
            match offer {
                Offer::Message { sent_ns, .. } => times.push(sent_ns),
                Offer::Idle => idles += 1,
            }
            Ok(Took::AtOnce)
        });
        assert_eq!(times, vec![0, 100_000, 200_000, 300_000, 400_000]);
        assert!(idles >= 1, "the generator waited for the later messages");
    }

    #[test]
    fn closed_sink_stops_the_generator() {
        let clock = Clock::start();
        let tally = Tally::default();
        let mut taken = 0;
        let sent = generate(&plan(None, None), clock, &tally, |_| {
            taken += 1;
            if taken > 3 {
                Err(SinkClosed)
            } else {
                Ok(Took::MayHaveWaited)
            }
        });
        assert_eq!(sent, 3);
    }
}
