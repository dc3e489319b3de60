//! The record batch decoder: every batch of the input, checked as the log checks an
//! appended batch (compressed ones decompressed, bounded), and then read as a consumer
//! reads it. Nothing may panic, and a batch
//! that validates must decode record by record, headers included, to its record count.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_storage::batch::batches;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses whether CRCs are made right (most runs) or left as sent.
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 0x0f != 0 {
        strata_fuzz::fix_crcs(&mut bytes);
    }
    for batch in batches(&bytes) {
        let Ok(batch) = batch else { break };
        let header = *batch.header();
        let _ = (header.last_offset(), header.next_offset());
        let mut scratch = Vec::new();
        if batch.validate_records().is_ok() {
            let mut count = 0i32;
            let records = batch.records_with(&mut scratch).expect("a validated batch decompresses");
            for record in records {
                let record = record.expect("a validated batch decodes");
                assert_eq!(record.offset, header.base_offset + count as u64);
                assert_eq!(record.headers().count(), record.header_count());
                count += 1;
            }
            assert_eq!(count, header.record_count);
        } else if let Ok(records) = batch.records_with(&mut scratch) {
            for record in records {
                let Ok(record) = record else { break };
                record.headers().for_each(drop);
            }
        }
    }
});
