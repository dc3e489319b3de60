//! Record batch compression: Kafka's four codecs, the one place both the broker (which
//! validates compressed batches by decompressing them) and the client (which compresses
//! the batches it produces and decompresses those it fetches) encode and decode them.
//!
//! A compressed batch keeps its 61-byte header in the clear; only the records after it
//! are compressed, as one block, in the codec the low three attribute bits name:
//!
//! | id | codec  | framing                                                          |
//! |----|--------|------------------------------------------------------------------|
//! | 0  | none   |                                                                  |
//! | 1  | gzip   | gzip (RFC 1952), one or more members                             |
//! | 2  | snappy | raw snappy (librdkafka) or xerial-framed (`\x82SNAPPY\0`, Java and kafka-python): both are read, raw is written |
//! | 3  | lz4    | the LZ4 frame format (KIP-57), independent blocks                |
//! | 4  | zstd   | a zstd frame                                                     |
//!
//! Decompression is bounded: a batch may decompress to at most
//! [`decompressed_bytes_max`] of its encoded size, and the decoders stop as soon as
//! they pass it (they never produce everything and check afterwards; the output buffer
//! grows to at most the bound, not past it), so a decompression bomb costs the reader at
//! most that much memory. Raw snappy checks the length a block declares before it
//! allocates; xerial-framed snappy allocates block by block, within the same bound.
//!
//! The bound is per batch; [`DECOMPRESSION_BUDGET`] bounds the sum. Validation (the
//! partition writers, many at once) takes its batch's bound from it before decompressing,
//! so bombs sent to many partitions at once wait for one another instead of each holding
//! its bound.

use std::fmt;
use std::io::{Read, Write};
use std::str::FromStr;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::error::InvalidBatch;

/// A batch may decompress to at most this many times its encoded size...
pub const DECOMPRESSION_RATIO_MAX: usize = 64;
/// ...but always to this much (small batches of repetitive records compress far
/// better than 64:1)...
pub const DECOMPRESSED_BYTES_FLOOR: usize = 4 << 20;
/// ...and never to more than this, whatever the batch size.
pub const DECOMPRESSED_BYTES_CAP: usize = 256 << 20;

/// The most bytes the records of a compressed batch of `batch_len` encoded bytes may
/// decompress to. It depends on the batch alone, so every reader (the broker accepting
/// it, a timestamp lookup, a decoding fetch, a client) applies the same bound without
/// knowing the topic's settings when it was written, and a batch accepted once stays
/// readable after `max_message_bytes` changes.
pub fn decompressed_bytes_max(batch_len: usize) -> usize {
    batch_len
        .saturating_mul(DECOMPRESSION_RATIO_MAX)
        .clamp(DECOMPRESSED_BYTES_FLOOR, DECOMPRESSED_BYTES_CAP)
}

/// The most decompressed bytes batch validation may hold at once, across the process:
/// one batch at the largest bound. It is fixed (it bounds memory against bombs, it does
/// not limit throughput: a batch of ordinary records takes the 4 MiB floor, so 64
/// partitions validate at once).
pub const DECOMPRESSION_BUDGET_BYTES: usize = DECOMPRESSED_BYTES_CAP;

/// The process-wide budget validation decompresses within ([`DecompressionBudget`]).
pub static DECOMPRESSION_BUDGET: DecompressionBudget =
    DecompressionBudget::new(DECOMPRESSION_BUDGET_BYTES);

/// Bytes of decompression output that may be held at once. Takers block until what they
/// ask for is free: the callers are writer threads, and waiting there is backpressure
/// (their producers wait for the write).
#[derive(Debug)]
pub struct DecompressionBudget {
    capacity: usize,
    state: Mutex<BudgetState>,
    freed: Condvar,
}

#[derive(Debug)]
struct BudgetState {
    used: usize,
    /// Takers blocked in [`DecompressionBudget::acquire`] (tests wait for one).
    waiting: usize,
}

impl DecompressionBudget {
    /// A budget of `capacity` bytes.
    pub const fn new(capacity: usize) -> DecompressionBudget {
        DecompressionBudget {
            capacity,
            state: Mutex::new(BudgetState {
                used: 0,
                waiting: 0,
            }),
            freed: Condvar::new(),
        }
    }

    /// Takes `bytes` (at most the capacity: more is taken as all of it), waiting until
    /// they are free; they return when the permit drops.
    pub fn acquire(&self, bytes: usize) -> DecompressionPermit<'_> {
        let bytes = bytes.min(self.capacity);
        let mut state = self.lock();
        state.waiting += 1;
        while self.capacity - state.used < bytes {
            state = self
                .freed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.waiting -= 1;
        state.used += bytes;
        DecompressionPermit {
            budget: self,
            bytes,
        }
    }

    /// Bytes taken now.
    pub fn used(&self) -> usize {
        self.lock().used
    }

    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.lock().waiting
    }

    // The state is two counters updated together; a panic cannot leave them torn.
    fn lock(&self) -> MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Bytes of a [`DecompressionBudget`], given back on drop.
#[derive(Debug)]
pub struct DecompressionPermit<'a> {
    budget: &'a DecompressionBudget,
    bytes: usize,
}

impl Drop for DecompressionPermit<'_> {
    fn drop(&mut self) {
        self.budget.lock().used -= self.bytes;
        self.budget.freed.notify_all();
    }
}

/// The compression codec of a batch (attribute bits 0-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// Records stored as they are.
    #[default]
    None,
    /// gzip (DEFLATE).
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4, frame format.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    /// Every codec, `None` first.
    pub const ALL: [Compression; 5] = [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ];

    /// The codec with this attribute id, or `None` for the unused ids 5-7.
    pub fn from_id(id: u8) -> Option<Compression> {
        Compression::ALL.get(usize::from(id)).copied()
    }

    /// The attribute id (0-4).
    pub fn id(self) -> u8 {
        self as u8
    }

    /// The name Kafka's `compression.type` uses.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    /// Appends `input` compressed with this codec to `out` (for `None`, `input` itself).
    pub fn compress(self, input: &[u8], out: &mut Vec<u8>) {
        self.try_compress(input, out)
            .expect("compressing into memory cannot fail");
    }

    fn try_compress(self, input: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        match self {
            Compression::None => {
                out.extend_from_slice(input);
                Ok(())
            }
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
                e.write_all(input)?;
                e.finish().map(drop)
            }
            Compression::Snappy => {
                // Raw snappy, as librdkafka writes it; every Kafka client reads it.
                let start = out.len();
                out.resize(start + snap::raw::max_compress_len(input.len()), 0);
                let n = snap::raw::Encoder::new()
                    .compress(input, &mut out[start..])
                    .map_err(std::io::Error::other)?;
                out.truncate(start + n);
                Ok(())
            }
            Compression::Lz4 => {
                // Independent blocks: Kafka's Java LZ4 reader refuses linked ones.
                let info = lz4_flex::frame::FrameInfo::new()
                    .block_mode(lz4_flex::frame::BlockMode::Independent);
                let mut e = lz4_flex::frame::FrameEncoder::with_frame_info(info, out);
                e.write_all(input)?;
                e.finish().map(drop).map_err(std::io::Error::other)
            }
            Compression::Zstd => zstd::stream::copy_encode(input, out, ZSTD_LEVEL),
        }
    }

    /// Appends `input` decompressed to `out`, refusing (with nothing useful in `out`)
    /// a payload that is not valid for the codec or decompresses to more than `limit`
    /// bytes.
    pub fn decompress(
        self,
        input: &[u8],
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), InvalidBatch> {
        self.decode(input, limit, None, out)
    }

    /// Appends the first `n` bytes `input` decompresses to (fewer if it decompresses to
    /// fewer) to `out`, decoding no further where the codec streams (gzip, lz4, zstd, the
    /// blocks of xerial-framed snappy): reading the first record of a batch costs that
    /// record, not the batch. A raw snappy block is one unit: it is decompressed whole,
    /// within `limit`. Refuses like [`Compression::decompress`] what it decodes.
    pub fn decompress_prefix(
        self,
        input: &[u8],
        n: usize,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), InvalidBatch> {
        self.decode(input, limit, Some(n.min(limit)), out)
    }

    /// Both of the above: everything within `limit`, or (`prefix`) its first bytes.
    fn decode(
        self,
        input: &[u8],
        limit: usize,
        prefix: Option<usize>,
        out: &mut Vec<u8>,
    ) -> Result<(), InvalidBatch> {
        let start = out.len();
        let corrupt = |reason: String| InvalidBatch::Decompression {
            codec: self.name(),
            reason,
        };
        let too_large = InvalidBatch::DecompressedTooLarge {
            codec: self.name(),
            limit,
        };
        match self {
            Compression::None => match prefix {
                Some(n) => {
                    out.extend_from_slice(&input[..n.min(input.len())]);
                    Ok(())
                }
                None if input.len() > limit => Err(too_large),
                None => {
                    out.extend_from_slice(input);
                    Ok(())
                }
            },
            Compression::Gzip => read_bounded(
                flate2::read::MultiGzDecoder::new(input),
                limit,
                prefix,
                out,
                corrupt,
                too_large,
            ),
            Compression::Snappy => match input.strip_prefix(XERIAL_MAGIC) {
                Some(framed) => decompress_xerial(framed, limit, prefix, out)
                    .map_err(|e| e.into_error(corrupt, too_large)),
                None => {
                    snappy_block(input, limit, out).map_err(|e| e.into_error(corrupt, too_large))
                }
            }
            .map(|()| {
                if let Some(n) = prefix {
                    out.truncate(out.len().min(start + n));
                }
            }),
            Compression::Lz4 => read_bounded(
                lz4_flex::frame::FrameDecoder::new(input),
                limit,
                prefix,
                out,
                corrupt,
                too_large,
            ),
            Compression::Zstd => {
                let mut decoder = zstd::stream::read::Decoder::with_buffer(input)
                    .map_err(|e| corrupt(e.to_string()))?;
                // A frame names its window size and the decoder allocates it: refuse
                // windows far larger than the output may be, so a crafted header cannot
                // make it allocate much more than the bound.
                decoder
                    .window_log_max(zstd_window_log_max(limit))
                    .map_err(|e| corrupt(e.to_string()))?;
                read_bounded(decoder, limit, prefix, out, corrupt, too_large)
            }
        }
        .inspect_err(|_| out.truncate(start))
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = String;

    /// Parses `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    fn from_str(s: &str) -> Result<Compression, String> {
        Compression::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("compression {s:?} is not one of none, gzip, snappy, lz4, zstd"))
    }
}

/// zstd level for compressing: the library's default, which librdkafka and Java use.
const ZSTD_LEVEL: i32 = 3;

/// The header xerial's snappy-java puts in front of its blocks (Java and kafka-python
/// producers), followed by two 4-byte version fields.
const XERIAL_MAGIC: &[u8] = b"\x82SNAPPY\0";

/// The largest zstd window (as a power of two) a frame may ask for when it may
/// decompress to `limit` bytes: what the output could need, but at least 8 MiB (2^23,
/// the window of the highest standard levels when the content size is not pledged, as
/// Java's zstd-jni stream writes it) and at most 2^27 (the library's own default cap).
fn zstd_window_log_max(limit: usize) -> u32 {
    let needed = usize::BITS - limit.saturating_sub(1).leading_zeros();
    needed.clamp(23, 27)
}

/// Reads `decoder` to its end into `out`, at most `limit` bytes: it reads one byte
/// more, so reaching it means the payload is larger and decoding stops there. With a
/// `prefix`, it stops after that many bytes instead, and more is no error. `out`
/// grows geometrically but never past what it may read (`read_to_end` doubles, which
/// would reach twice the bound).
fn read_bounded(
    mut decoder: impl Read,
    limit: usize,
    prefix: Option<usize>,
    out: &mut Vec<u8>,
    corrupt: impl Fn(String) -> InvalidBatch,
    too_large: InvalidBatch,
) -> Result<(), InvalidBatch> {
    /// The first step of growth, and the least.
    const STEP_MIN: usize = 64 << 10;
    let start = out.len();
    let end = start.saturating_add(prefix.unwrap_or(limit.saturating_add(1)));
    let mut filled = start;
    while filled < end {
        if filled == out.len() {
            let step = (filled - start).max(STEP_MIN).min(end - filled);
            out.reserve_exact(step);
            out.resize(filled + step, 0);
        }
        match decoder.read(&mut out[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                out.truncate(start);
                return Err(corrupt(e.to_string()));
            }
        }
    }
    out.truncate(filled);
    if prefix.is_none() && filled - start > limit {
        return Err(too_large);
    }
    Ok(())
}

enum SnappyError {
    Corrupt(String),
    TooLarge,
}

impl SnappyError {
    fn into_error(
        self,
        corrupt: impl Fn(String) -> InvalidBatch,
        too_large: InvalidBatch,
    ) -> InvalidBatch {
        match self {
            SnappyError::Corrupt(reason) => corrupt(reason),
            SnappyError::TooLarge => too_large,
        }
    }
}

/// One raw snappy block. Its uncompressed length comes first, so the bound is checked
/// before anything is allocated.
fn snappy_block(input: &[u8], limit: usize, out: &mut Vec<u8>) -> Result<(), SnappyError> {
    let corrupt = |e: snap::Error| SnappyError::Corrupt(e.to_string());
    let len = snap::raw::decompress_len(input).map_err(corrupt)?;
    if len > limit {
        return Err(SnappyError::TooLarge);
    }
    let start = out.len();
    out.resize(start + len, 0);
    let n = snap::raw::Decoder::new()
        .decompress(input, &mut out[start..])
        .map_err(corrupt)?;
    out.truncate(start + n);
    Ok(())
}

/// xerial framing after its magic: versions (2 × 4 bytes), then blocks, each a 4-byte
/// big-endian length and a raw snappy block; with a `prefix`, only the blocks it needs.
fn decompress_xerial(
    framed: &[u8],
    limit: usize,
    prefix: Option<usize>,
    out: &mut Vec<u8>,
) -> Result<(), SnappyError> {
    let truncated = || SnappyError::Corrupt("xerial snappy framing is truncated".into());
    let mut rest = framed.get(8..).ok_or_else(truncated)?;
    let start = out.len();
    let wanted = prefix.unwrap_or(usize::MAX);
    while !rest.is_empty() && out.len() - start < wanted {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(truncated)?;
        let len = u32::from_be_bytes(*len) as usize;
        let block = tail.get(..len).ok_or_else(truncated)?;
        let used = out.len() - start;
        snappy_block(block, limit - used, out)?;
        rest = &tail[len..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn xerial(input: &[u8], block: usize) -> Vec<u8> {
        let mut out = XERIAL_MAGIC.to_vec();
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&1u32.to_be_bytes());
        for chunk in input.chunks(block.max(1)) {
            let compressed = snap::raw::Encoder::new()
                .compress_vec(chunk)
                .expect("snappy");
            out.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
            out.extend_from_slice(&compressed);
        }
        out
    }

    proptest! {
        #[test]
        fn every_codec_round_trips(input in proptest::collection::vec(any::<u8>(), 0..2000), repeat in 1usize..20) {
            let input = input.repeat(repeat);
            for codec in Compression::ALL {
                let mut compressed = Vec::new();
                codec.compress(&input, &mut compressed);
                let mut out = vec![9];
                codec.decompress(&compressed, input.len(), &mut out).expect("decompresses");
                prop_assert_eq!(&out[1..], &input[..], "{}", codec);
            }
        }

        #[test]
        fn xerial_snappy_is_read(input in proptest::collection::vec(any::<u8>(), 0..5000), block in 1usize..3000) {
            let mut out = Vec::new();
            Compression::Snappy.decompress(&xerial(&input, block), input.len(), &mut out).expect("decompresses");
            prop_assert_eq!(out, input);
        }

        /// Arbitrary bytes are refused or decoded within the bound; nothing panics.
        #[test]
        fn garbage_is_refused_or_bounded(input in proptest::collection::vec(any::<u8>(), 0..300)) {
            for codec in Compression::ALL {
                let mut out = Vec::new();
                if codec.decompress(&input, 1000, &mut out).is_ok() {
                    prop_assert!(out.len() <= 1000);
                } else {
                    prop_assert!(out.is_empty());
                }
            }
        }
    }

    #[test]
    fn a_bomb_is_refused_at_the_limit() {
        let zeros = vec![0u8; 10 << 20];
        for codec in &Compression::ALL[1..] {
            let mut bomb = Vec::new();
            codec.compress(&zeros, &mut bomb);
            assert!(bomb.len() < 1 << 20, "{codec}: {} bytes", bomb.len());
            let mut out = Vec::new();
            assert_eq!(
                codec.decompress(&bomb, 1 << 20, &mut out),
                Err(InvalidBatch::DecompressedTooLarge {
                    codec: codec.name(),
                    limit: 1 << 20
                })
            );
            assert!(out.is_empty());
            // The streaming decoders stop right after the bound instead of producing
            // all ten megabytes, and the buffer never grows past the bound (snappy
            // checks the declared length and allocates nothing).
            assert!(
                out.capacity() <= (1 << 20) + 1,
                "{codec}: {}",
                out.capacity()
            );
            codec
                .decompress(&bomb, zeros.len(), &mut out)
                .expect("within a large enough bound");
            assert_eq!(out.len(), zeros.len());
        }
        let mut out = Vec::new();
        assert!(matches!(
            Compression::Snappy.decompress(&xerial(&zeros, 64 << 10), 1 << 20, &mut out),
            Err(InvalidBatch::DecompressedTooLarge { .. })
        ));
    }

    /// The output buffer stops at the bound: `read_to_end`'s doubling took a 5 MiB
    /// bound to 8 MiB of buffer.
    #[test]
    fn the_buffer_grows_to_the_bound_not_past_it() {
        let zeros = vec![0u8; 10 << 20];
        let limit = 5 << 20;
        for codec in [Compression::Gzip, Compression::Lz4, Compression::Zstd] {
            let mut bomb = Vec::new();
            codec.compress(&zeros, &mut bomb);
            let mut out = Vec::new();
            assert!(codec.decompress(&bomb, limit, &mut out).is_err(), "{codec}");
            assert!(out.capacity() <= limit + 1, "{codec}: {}", out.capacity());
            let mut out = Vec::new();
            codec
                .decompress(&bomb[..], zeros.len(), &mut out)
                .expect("fits");
            assert!(
                out.capacity() <= zeros.len() + 1,
                "{codec}: {}",
                out.capacity()
            );
        }
    }

    #[test]
    fn the_budget_makes_takers_wait_for_what_they_need() {
        let budget = DecompressionBudget::new(10);
        let first = budget.acquire(6);
        std::thread::scope(|s| {
            // Asking for more than the capacity takes all of it, so it waits for `first`.
            let waiter = s.spawn(|| {
                let permit = budget.acquire(100);
                (permit.bytes, budget.used())
            });
            while budget.waiting() == 0 {
                std::thread::yield_now();
            }
            assert_eq!(budget.used(), 6, "the waiter took nothing yet");
            drop(first);
            assert_eq!(waiter.join().expect("no panic"), (10, 10));
        });
        assert_eq!(budget.used(), 0, "every permit gave its bytes back");
    }

    /// A prefix is read without decoding the rest: a bomb's first bytes come back where
    /// the whole is refused (raw snappy, one block, is decoded whole).
    #[test]
    fn a_prefix_decodes_only_what_it_needs() {
        let mut input = b"first record, then zeros".to_vec();
        input.resize(10 << 20, 0);
        for codec in Compression::ALL {
            let mut compressed = Vec::new();
            codec.compress(&input, &mut compressed);
            let mut out = vec![9];
            let decoded = codec.decompress_prefix(&compressed, 12, 1 << 20, &mut out);
            if codec == Compression::Snappy {
                assert!(decoded.is_err(), "a raw block is decoded whole");
                continue;
            }
            decoded.expect("the prefix decodes");
            assert_eq!(&out[1..], b"first record", "{codec}");
            let mut out = Vec::new();
            codec
                .decompress_prefix(&compressed[..], 1 << 30, input.len(), &mut out)
                .expect("a prefix longer than the whole is the whole");
            assert_eq!(out, input, "{codec}");
        }
        let mut out = Vec::new();
        Compression::Snappy
            .decompress_prefix(&xerial(&input, 64 << 10), 12, 1 << 20, &mut out)
            .expect("xerial decodes block by block");
        assert_eq!(out, b"first record");
    }

    #[test]
    fn corrupt_payloads_are_refused() {
        let input = b"some records, some records, some records".repeat(20);
        for codec in &Compression::ALL[1..] {
            let mut compressed = Vec::new();
            codec.compress(&input, &mut compressed);
            let mut out = Vec::new();
            let truncated = &compressed[..compressed.len() / 2];
            assert!(
                matches!(
                    codec.decompress(truncated, 1 << 20, &mut out),
                    Err(InvalidBatch::Decompression { codec: name, .. }) if name == codec.name()
                ),
                "{codec}"
            );
            assert!(out.is_empty());
        }
        let mut out = Vec::new();
        let framed = xerial(&input, 100);
        assert!(matches!(
            Compression::Snappy.decompress(&framed[..framed.len() - 3], 1 << 20, &mut out),
            Err(InvalidBatch::Decompression { .. })
        ));
    }

    #[test]
    fn the_bound_scales_with_the_batch_within_floor_and_cap() {
        assert_eq!(decompressed_bytes_max(100), DECOMPRESSED_BYTES_FLOOR);
        assert_eq!(decompressed_bytes_max(1 << 20), 64 << 20);
        assert_eq!(decompressed_bytes_max(64 << 20), DECOMPRESSED_BYTES_CAP);
        assert_eq!(zstd_window_log_max(1 << 20), 23);
        assert_eq!(zstd_window_log_max(1 << 24), 24);
        assert_eq!(zstd_window_log_max((1 << 24) + 1), 25);
        assert_eq!(zstd_window_log_max(DECOMPRESSED_BYTES_CAP), 27);
    }

    #[test]
    fn names_parse_and_ids_match_kafka() {
        for (id, codec) in Compression::ALL.into_iter().enumerate() {
            assert_eq!(codec.id() as usize, id);
            assert_eq!(Compression::from_id(id as u8), Some(codec));
            assert_eq!(codec.name().parse(), Ok(codec));
        }
        assert_eq!(Compression::from_id(5), None);
        assert!("brotli".parse::<Compression>().is_err());
    }
}
