//! `idemd_client::fingerprint` over arbitrary bytes: JSON gets a fingerprint without panicking,
//! and equal canonical inputs get equal fingerprints. The check lives in
//! `tests/model/fingerprint_check.rs`, shared with the CI proptest in `tests/suite/fuzzing.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/model/fingerprint_check.rs"]
mod fingerprint_check;

fuzz_target!(|data: &[u8]| {
    fingerprint_check::check(data);
});
