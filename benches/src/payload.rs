//! The run's clock and the messages the generator writes.
//!
//! Every message starts with a 16-byte header, little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | send time: nanoseconds since the run's epoch ([`Clock`]); for fixed-rate runs the *intended* send time |
//! | 8..16 | message id: producer index in the top 24 bits, that producer's sequence number in the low 40 |
//!
//! and is filled up to the message size with a fixed pattern. Producers and consumers run
//! in one process, so they share the clock: a consumer computes end-to-end latency as
//! its own clock reading minus the send time in the header.
//!
//! Messages are made in one reused buffer; sinks that need owned `Bytes` get copies cut
//! from a large slab ([`Payloads`]), one allocation per megabyte of messages rather than
//! one per message.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};

/// Bytes of the header at the start of every message.
pub const HEADER_BYTES: usize = 16;
/// Bits of the message id that hold the sequence number.
const SEQUENCE_BITS: u32 = 40;
/// Size of one payload slab.
const SLAB_BYTES: usize = 1 << 20;

/// The run's clock: nanoseconds since an epoch taken when the run starts.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
    wall_ms_at_epoch: i64,
}

impl Clock {
    /// A clock whose epoch is now.
    pub fn start() -> Clock {
        let wall_ms_at_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Clock {
            epoch: Instant::now(),
            wall_ms_at_epoch,
        }
    }

    /// Nanoseconds since the epoch.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The wall-clock time (ms since the Unix epoch) of a reading of this clock, for
    /// record timestamps.
    #[inline]
    pub fn wall_ms(&self, ns: u64) -> i64 {
        self.wall_ms_at_epoch + (ns / 1_000_000) as i64
    }
}

/// The id of `producer`'s message number `sequence`.
#[inline]
pub fn message_id(producer: u32, sequence: u64) -> u64 {
    (u64::from(producer) << SEQUENCE_BITS) | (sequence & ((1 << SEQUENCE_BITS) - 1))
}

/// A message's header: send time (ns on the run's clock), producer and sequence
/// number; `None` if the message is shorter than a header.
#[inline]
pub fn read_header(message: &[u8]) -> Option<(u64, u32, u64)> {
    let sent_ns = u64::from_le_bytes(message.get(0..8)?.try_into().ok()?);
    let id = u64::from_le_bytes(message.get(8..16)?.try_into().ok()?);
    Some((
        sent_ns,
        (id >> SEQUENCE_BITS) as u32,
        id & ((1 << SEQUENCE_BITS) - 1),
    ))
}

/// Makes messages of one size without an allocation per message: the header is
/// written into a pre-filled message buffer ([`Payloads::stamp`]), which a sink either
/// reads in place ([`Payloads::current`]) or copies into a shared slab as `Bytes`
/// ([`Payloads::copy_out`]).
#[derive(Debug)]
pub struct Payloads {
    /// The current message; only the header changes between messages.
    message: Vec<u8>,
    slab: BytesMut,
}

impl Payloads {
    /// Messages of `message_bytes` bytes (at least [`HEADER_BYTES`]).
    pub fn new(message_bytes: usize) -> Payloads {
        assert!(
            message_bytes >= HEADER_BYTES,
            "messages must hold the {HEADER_BYTES}-byte header"
        );
        // A pattern rather than zeros, so nothing along the way can treat the payload
        // as sparse or trivially compressible.
        let message = (0..message_bytes)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(7))
            .collect();
        Payloads {
            message,
            slab: BytesMut::new(),
        }
    }

    /// Makes the next message: writes its header.
    #[inline]
    pub fn stamp(&mut self, sent_ns: u64, id: u64) {
        self.message[0..8].copy_from_slice(&sent_ns.to_le_bytes());
        self.message[8..16].copy_from_slice(&id.to_le_bytes());
    }

    /// The current message, in place.
    #[inline]
    pub fn current(&self) -> &[u8] {
        &self.message
    }

    /// A copy of the current message as `Bytes`, cut from a slab that is allocated once
    /// per megabyte of messages.
    #[inline]
    pub fn copy_out(&mut self) -> Bytes {
        let size = self.message.len();
        if self.slab.capacity() - self.slab.len() < size {
            self.slab = BytesMut::with_capacity(SLAB_BYTES.max(size));
        }
        self.slab.extend_from_slice(&self.message);
        // Hands out the filled part; the slab keeps its remaining capacity.
        self.slab.split().freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_payloads_keep_their_size() {
        let mut payloads = Payloads::new(100);
        payloads.stamp(123_456_789, message_id(3, 42));
        let a = payloads.copy_out();
        assert_eq!(payloads.current(), &a[..]);
        payloads.stamp(7, message_id(0, (1 << 40) - 1));
        let b = payloads.copy_out();
        assert_eq!((a.len(), b.len()), (100, 100));
        assert_eq!(read_header(&a), Some((123_456_789, 3, 42)));
        assert_eq!(read_header(&b), Some((7, 0, (1 << 40) - 1)));
        assert_eq!(a[16..], b[16..], "the filler does not change");
        assert_eq!(read_header(&a[..15]), None);
    }

    #[test]
    fn payloads_larger_than_a_slab_work() {
        let mut payloads = Payloads::new(SLAB_BYTES + 5);
        for i in 0..3 {
            payloads.stamp(i, message_id(0, i));
            let m = payloads.copy_out();
            assert_eq!(m.len(), SLAB_BYTES + 5);
            assert_eq!(read_header(&m), Some((i, 0, i)));
        }
    }
}
