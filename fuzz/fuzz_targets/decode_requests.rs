//! Request decoding and validation: a selector byte picks the request type (and the limits), the
//! rest is a protobuf message. The check lives in `tests/model/decode_check.rs`, shared with the
//! CI proptests in `tests/suite/fuzzing.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/model/decode_check.rs"]
#[allow(dead_code)] // `input` builds the proptests' inputs.
mod decode_check;

fuzz_target!(|data: &[u8]| {
    decode_check::check(data);
});
