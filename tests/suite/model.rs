//! Model-based test: random sequences of Acquire/Complete/Release/Renew/Get with time moving
//! forward, run against the memory store and against a deliberately simple reference model
//! written straight from the README's semantics table. They must agree on every answer.
//!
//! The model, the runner and the byte decoder of ops live in `tests/model/mod.rs`, shared with the
//! cargo-fuzz target `fuzz/fuzz_targets/memory_store_model.rs`; the second proptest below runs
//! that target's input decoding (wider ops: Wait, Reap, Complete with retention) in CI.

use proptest::prelude::*;

#[path = "../model/mod.rs"]
mod reference;

use reference::{ops_from_bytes, run, Op};

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3u8, 0..2u8, prop_oneof![Just(50u64), Just(200)], prop_oneof![Just(100u64), Just(1000)])
            .prop_map(|(key, fp, ttl, retention)| Op::Acquire { key, fp, ttl, retention }),
        2 => (0..3u8, 0..6usize, 0..3u8).prop_map(|(key, lease, tag)| Op::Complete { key, lease, tag, retention: None }),
        1 => (0..3u8, 0..6usize).prop_map(|(key, lease)| Op::Release { key, lease }),
        1 => (0..3u8, 0..6usize, prop_oneof![Just(50u64), Just(300)]).prop_map(|(key, lease, ttl)| Op::Renew { key, lease, ttl }),
        1 => (0..3u8).prop_map(|key| Op::Get { key }),
        2 => (0..400u64).prop_map(|ms| Op::Advance { ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn memory_store_agrees_with_the_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(&ops).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// The cargo-fuzz target `memory_store_model`, in CI.
    #[test]
    fn memory_store_agrees_with_the_model_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        run(&ops_from_bytes(&data)).map_err(TestCaseError::fail)?;
    }
}
