//! The memory store against the reference model: the input is decoded into a sequence of
//! Acquire/Complete/Release/Renew/Get/Wait/Reap operations with time advancing, and every answer
//! must agree with the model. Model, decoder and runner live in `tests/model/mod.rs`, shared with
//! the CI proptests in `tests/suite/model.rs` and `tests/suite/fuzzing.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/model/mod.rs"]
mod model;

fuzz_target!(|data: &[u8]| {
    if let Err(disagreement) = model::run(&model::ops_from_bytes(data)) {
        panic!("{disagreement}");
    }
});
