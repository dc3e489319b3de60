//! What the fuzz targets share: making fuzzer bytes into batches the CRC check lets
//! through, so the fuzzer spends its time in the record decoder and the log rather than
//! on checksums it cannot guess.

use strata_storage::batch::{BatchHeader, BATCH_HEADER_LEN};

/// Where the CRC sits in a batch header, and where the bytes it covers start.
const CRC_AT: usize = 17;
const CRC_FROM: usize = 21;

/// Rewrites the CRC of every batch of `bytes` (back to back, as in a segment or a fetch
/// response) that has a plausible header and fits, so that it matches its contents.
/// Stops at the first header that does not parse or at a batch that runs past the end.
pub fn fix_crcs(bytes: &mut [u8]) {
    let mut at = 0;
    while bytes.len() - at >= BATCH_HEADER_LEN {
        let Ok(header) = BatchHeader::parse(&bytes[at..]) else {
            return;
        };
        let Some(end) = at.checked_add(header.size).filter(|&end| end <= bytes.len()) else {
            return;
        };
        let crc = crc32c::crc32c(&bytes[at + CRC_FROM..end]);
        bytes[at + CRC_AT..at + CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        at = end;
    }
}
