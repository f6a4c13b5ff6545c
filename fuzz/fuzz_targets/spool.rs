//! The spool decoder on arbitrary file bytes: every outcome is a record list or a typed
//! `SpoolError` (never a panic, never an allocation larger than the file).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use stateshift::migrate::spool::{decode_all, SpoolError};

fuzz_target!(|data: &[u8]| {
    match decode_all(Path::new("fuzz.spool"), data) {
        Ok(records) => {
            let bytes: usize = records
                .iter()
                .map(|r| 10 + r.db.len() + r.rp.len() + r.precision.len() + r.body.len())
                .sum();
            assert_eq!(bytes, data.len(), "records must cover the whole spool");
        }
        Err(SpoolError::Corrupt { offset, .. }) => {
            assert!(
                (offset as usize) < data.len(),
                "corrupt offset past the end"
            );
        }
        Err(e) => panic!("in-memory decoding can only find corruption, got {e}"),
    }
});
