//! Model-based test: random sequences of Acquire/Complete/Release/Renew/Get with time moving
//! forward, run against the memory store and against a deliberately simple reference model
//! written straight from the README's semantics table. They must agree on every answer.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures_util::FutureExt;
use idemd::domain::{
    AcquireCommand, AcquireOutcome, CompleteCommand, Fingerprint, GetCommand, Holder, Key,
    LeaseRejection, LeaseToken, Namespace, RecordState, ReleaseCommand, RenewCommand, StoredResult,
};
use idemd::store::{MemoryStore, Store, StoreError};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Acquire {
        key: u8,
        fp: u8,
        ttl: u64,
        retention: u64,
    },
    Complete {
        key: u8,
        lease: usize,
        tag: u8,
    },
    Release {
        key: u8,
        lease: usize,
    },
    Renew {
        key: u8,
        lease: usize,
        ttl: u64,
    },
    Get {
        key: u8,
    },
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3u8, 0..2u8, prop_oneof![Just(50u64), Just(200)], prop_oneof![Just(100u64), Just(1000)])
            .prop_map(|(key, fp, ttl, retention)| Op::Acquire { key, fp, ttl, retention }),
        2 => (0..3u8, 0..6usize, 0..3u8).prop_map(|(key, lease, tag)| Op::Complete { key, lease, tag }),
        1 => (0..3u8, 0..6usize).prop_map(|(key, lease)| Op::Release { key, lease }),
        1 => (0..3u8, 0..6usize, prop_oneof![Just(50u64), Just(300)]).prop_map(|(key, lease, ttl)| Op::Renew { key, lease, ttl }),
        1 => (0..3u8).prop_map(|key| Op::Get { key }),
        2 => (0..400u64).prop_map(|ms| Op::Advance { ms }),
    ]
}

/// What both sides answer, in a comparable form.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Acquired { attempts: u32 },
    InProgress { retry_after_ms: u64 },
    Completed { tag: u8 },
    Mismatch,
    Ok,
    Stored { tag: u8 },
    NotFound,
    LeaseNotHeld,
    RecordCompleted,
    Renewed,
    Record { completed: bool, attempts: u32 },
}

#[derive(Debug, Clone)]
struct ModelRecord {
    fp: u8,
    tag: Option<u8>,
    lease: usize,
    released: bool,
    lease_expires: u64,
    retention: u64,
    expires: u64,
    attempts: u32,
}

/// The reference model: the semantics table, nothing clever.
#[derive(Default)]
struct Model {
    records: HashMap<u8, ModelRecord>,
    leases: Vec<u8>,
}

impl Model {
    fn live(&self, key: u8, now: u64) -> Option<&ModelRecord> {
        self.records.get(&key).filter(|r| now < r.expires)
    }

    fn apply(&mut self, op: &Op, now: u64) -> Option<Answer> {
        Some(match *op {
            Op::Acquire {
                key,
                fp,
                ttl,
                retention,
            } => {
                let lease = self.leases.len();
                match self.live(key, now).cloned() {
                    None => {
                        self.leases.push(key);
                        self.records.insert(
                            key,
                            ModelRecord {
                                fp,
                                tag: None,
                                lease,
                                released: false,
                                lease_expires: now + ttl,
                                retention,
                                expires: now + ttl + retention,
                                attempts: 1,
                            },
                        );
                        Answer::Acquired { attempts: 1 }
                    }
                    Some(r) if r.fp != fp => Answer::Mismatch,
                    Some(r) if r.tag.is_some() => Answer::Completed {
                        tag: r.tag.unwrap_or_default(),
                    },
                    Some(r) if !r.released && now < r.lease_expires => Answer::InProgress {
                        retry_after_ms: r.lease_expires - now,
                    },
                    Some(r) => {
                        self.leases.push(key);
                        let attempts = r.attempts + 1;
                        self.records.insert(
                            key,
                            ModelRecord {
                                fp,
                                tag: None,
                                lease,
                                released: false,
                                lease_expires: now + ttl,
                                retention,
                                expires: now + ttl + retention,
                                attempts,
                            },
                        );
                        Answer::Acquired { attempts }
                    }
                }
            }
            Op::Complete { key, lease, tag } => match self.live(key, now).cloned() {
                None => Answer::NotFound,
                Some(r) if r.lease != lease => Answer::LeaseNotHeld,
                Some(r) if r.tag.is_some() => Answer::Stored {
                    tag: r.tag.unwrap_or_default(),
                },
                Some(r) if r.released => Answer::LeaseNotHeld,
                Some(mut r) => {
                    r.tag = Some(tag);
                    r.expires = now + r.retention;
                    self.records.insert(key, r);
                    Answer::Stored { tag }
                }
            },
            Op::Release { key, lease } => match self.live(key, now).cloned() {
                None => Answer::Ok,
                Some(r) if r.lease != lease => Answer::LeaseNotHeld,
                Some(r) if r.tag.is_some() => Answer::RecordCompleted,
                Some(r) if r.released => Answer::Ok,
                Some(mut r) => {
                    r.released = true;
                    r.lease_expires = now;
                    r.expires = now + r.retention;
                    self.records.insert(key, r);
                    Answer::Ok
                }
            },
            Op::Renew { key, lease, ttl } => match self.live(key, now).cloned() {
                None => Answer::NotFound,
                Some(r) if r.lease != lease => Answer::LeaseNotHeld,
                Some(r) if r.tag.is_some() => Answer::RecordCompleted,
                Some(r) if r.released => Answer::LeaseNotHeld,
                Some(mut r) => {
                    r.lease_expires = now + ttl;
                    r.expires = r.lease_expires + r.retention;
                    self.records.insert(key, r);
                    Answer::Renewed
                }
            },
            Op::Get { key } => match self.live(key, now) {
                None => Answer::NotFound,
                Some(r) => Answer::Record {
                    completed: r.tag.is_some(),
                    attempts: r.attempts,
                },
            },
            Op::Advance { .. } => return None,
        })
    }
}

fn rejection(error: StoreError) -> Answer {
    match error {
        StoreError::FingerprintMismatch => Answer::Mismatch,
        StoreError::Rejected(LeaseRejection::NotFound) => Answer::NotFound,
        StoreError::Rejected(LeaseRejection::LeaseNotHeld) => Answer::LeaseNotHeld,
        StoreError::Rejected(LeaseRejection::RecordCompleted) => Answer::RecordCompleted,
        other => panic!("unexpected store error {other:?}"),
    }
}

fn name(key: u8) -> (Namespace, Key) {
    (
        Namespace::parse("model".into()).expect("ns"),
        Key::parse(format!("k{key}")).expect("key"),
    )
}

fn result(tag: u8) -> StoredResult {
    StoredResult {
        body: vec![tag; 3],
        code: i32::from(tag),
        metadata: Default::default(),
    }
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let elapsed = Arc::new(Mutex::new(0u64));
    let clock = {
        let elapsed = elapsed.clone();
        Arc::new(move || start + Duration::from_millis(*elapsed.lock().expect("clock")))
    };
    let store = MemoryStore::with_clock(clock);
    let mut model = Model::default();
    // The store's lease tokens, by the model's lease index; fencing tokens seen, in grant order.
    let mut tokens: Vec<LeaseToken> = Vec::new();
    let mut last_fencing = 0;
    let forged = LeaseToken::parse("00000000000000000000000000000000").expect("token");
    for op in ops {
        let now = *elapsed.lock().expect("clock");
        let expected = model.apply(op, now);
        let token = |lease: usize| tokens.get(lease).copied().unwrap_or(forged);
        let got = match *op {
            Op::Advance { ms } => {
                *elapsed.lock().expect("clock") += ms;
                None
            }
            Op::Acquire {
                key,
                fp,
                ttl,
                retention,
            } => {
                let (namespace, key) = name(key);
                let command = AcquireCommand {
                    namespace,
                    key,
                    fingerprint: Fingerprint::parse(vec![fp]).expect("fp"),
                    lease_ttl: Duration::from_millis(ttl),
                    retention: Duration::from_millis(retention),
                    holder: Holder::default(),
                };
                Some(
                    match store
                        .acquire(command, None)
                        .now_or_never()
                        .expect("immediate")
                    {
                        Ok(AcquireOutcome::Acquired { lease, record, .. }) => {
                            prop_assert!(
                                lease.fencing_token > last_fencing,
                                "fencing tokens increase"
                            );
                            last_fencing = lease.fencing_token;
                            tokens.push(lease.token);
                            Answer::Acquired {
                                attempts: record.attempts,
                            }
                        }
                        Ok(AcquireOutcome::InProgress { retry_after, .. }) => Answer::InProgress {
                            retry_after_ms: retry_after.as_millis() as u64,
                        },
                        Ok(AcquireOutcome::Completed { record }) => Answer::Completed {
                            tag: record.result.map(|r| r.body[0]).unwrap_or(255),
                        },
                        Err(error) => rejection(error),
                    },
                )
            }
            Op::Complete { key, lease, tag } => {
                let (namespace, key) = name(key);
                let command = CompleteCommand {
                    namespace,
                    key,
                    lease_token: token(lease),
                    result: result(tag),
                    retention: None,
                };
                Some(
                    match store
                        .complete(command, None)
                        .now_or_never()
                        .expect("immediate")
                    {
                        Ok(record) => Answer::Stored {
                            tag: record.result.map(|r| r.body[0]).unwrap_or(255),
                        },
                        Err(error) => rejection(error),
                    },
                )
            }
            Op::Release { key, lease } => {
                let (namespace, key) = name(key);
                let command = ReleaseCommand {
                    namespace,
                    key,
                    lease_token: token(lease),
                };
                Some(
                    match store
                        .release(command, None)
                        .now_or_never()
                        .expect("immediate")
                    {
                        Ok(()) => Answer::Ok,
                        Err(error) => rejection(error),
                    },
                )
            }
            Op::Renew { key, lease, ttl } => {
                let (namespace, key) = name(key);
                let command = RenewCommand {
                    namespace,
                    key,
                    lease_token: token(lease),
                    lease_ttl: Duration::from_millis(ttl),
                };
                Some(
                    match store
                        .renew(command, None)
                        .now_or_never()
                        .expect("immediate")
                    {
                        Ok(_) => Answer::Renewed,
                        Err(error) => rejection(error),
                    },
                )
            }
            Op::Get { key } => {
                let (namespace, key) = name(key);
                Some(
                    match store
                        .get(GetCommand { namespace, key }, None)
                        .now_or_never()
                        .expect("immediate")
                    {
                        Ok(record) => Answer::Record {
                            completed: record.state == RecordState::Completed,
                            attempts: record.attempts,
                        },
                        Err(error) => rejection(error),
                    },
                )
            }
        };
        prop_assert_eq!(got, expected, "after {:?} at t={}ms", op, now);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn memory_store_agrees_with_the_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(&ops)?;
    }
}
