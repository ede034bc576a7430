//! One input of the fingerprint fuzzers, checked in one place: the cargo-fuzz target
//! `fuzz/fuzz_targets/fingerprint.rs` and the CI proptest in `tests/suite/fuzzing.rs` both include
//! this file by path. It needs only serde_json, serde_json_canonicalizer and idemd-client.
//!
//! Bytes that parse as JSON get a fingerprint (`idemd_client::fingerprint`) without panicking,
//! and equal canonical inputs get equal fingerprints: the same value written compactly or pretty
//! printed, and the canonical text itself (canonicalization is a fixed point). A value without a
//! canonical form (integers beyond 2^53 - 1) is refused the same way whichever way it is written.

use idemd_client::fingerprint;
use serde_json::Value;

/// Checks one input; false when it is not JSON. Panics on any broken invariant.
pub fn check(data: &[u8]) -> bool {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return false;
    };
    let expected = fingerprint(&value).map_err(|error| error.to_string());
    if let Ok(bytes) = &expected {
        assert_eq!(bytes.len(), 32, "a SHA-256 digest");
    }
    let rewritten = [
        serde_json::to_vec(&value).expect("a Value serializes"),
        serde_json::to_vec_pretty(&value).expect("a Value serializes"),
    ];
    for text in rewritten {
        let again: Value = serde_json::from_slice(&text).expect("serialized JSON parses");
        assert_eq!(
            fingerprint(&again).map_err(|error| error.to_string()),
            expected,
            "{}",
            String::from_utf8_lossy(&text)
        );
    }
    if let Ok(canonical) = serde_json_canonicalizer::to_vec(&value) {
        let reparsed: Value = serde_json::from_slice(&canonical).expect("canonical JSON parses");
        assert_eq!(
            serde_json_canonicalizer::to_vec(&reparsed).ok().as_ref(),
            Some(&canonical),
            "canonical form is a fixed point: {}",
            String::from_utf8_lossy(&canonical)
        );
        assert_eq!(fingerprint(&reparsed).ok(), expected.clone().ok());
    }
    true
}
