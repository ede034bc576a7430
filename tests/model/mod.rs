//! The reference model of a record's state machine, written once and included by path from both
//! the model tests in CI (`tests/suite/model.rs`, proptest) and the cargo-fuzz target
//! `fuzz/fuzz_targets/memory_store_model.rs` (long local runs). It needs only std, futures-util
//! and idemd, so the fuzz crate can include it as it is.
//!
//! Random sequences of Acquire/Complete/Release/Renew/Get (and, from the byte decoder, Wait and
//! Reap) with time moving forward run against the memory store and against a deliberately simple
//! reference model written straight from the README's semantics table. They must agree on every
//! answer.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures_util::FutureExt;
use idemd::domain::{
    AcquireCommand, AcquireOutcome, CompleteCommand, Fingerprint, GetCommand, Holder, Key,
    LeaseRejection, LeaseToken, Namespace, RecordState, ReleaseCommand, RenewCommand, StoredResult,
    WaitCommand, WaitOutcome,
};
use idemd::store::{MemoryStore, Store, StoreError};

/// One step. `lease` is the index of a lease in grant order; an index never granted stands for a
/// forged token. Times are milliseconds.
#[derive(Debug, Clone)]
pub enum Op {
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
        /// `None`: keep the retention given at Acquire.
        retention: Option<u64>,
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
    /// A Wait with a zero timeout: it answers at once (TIMED_OUT while a live lease is held).
    Wait {
        key: u8,
    },
    /// Delete every expired record; invisible to every other answer.
    Reap,
    Advance {
        ms: u64,
    },
}

/// What both sides answer, in a comparable form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
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
    WaitCompleted { tag: u8 },
    WaitFree { record: bool },
    WaitTimedOut { attempts: u32 },
    Reaped { deleted: u64, left: usize },
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
            Op::Complete {
                key,
                lease,
                tag,
                retention,
            } => match self.live(key, now).cloned() {
                None => Answer::NotFound,
                Some(r) if r.lease != lease => Answer::LeaseNotHeld,
                Some(r) if r.tag.is_some() => Answer::Stored {
                    tag: r.tag.unwrap_or_default(),
                },
                Some(r) if r.released => Answer::LeaseNotHeld,
                Some(mut r) => {
                    r.tag = Some(tag);
                    r.retention = retention.unwrap_or(r.retention);
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
            Op::Wait { key } => match self.live(key, now) {
                None => Answer::WaitFree { record: false },
                Some(r) => match r.tag {
                    Some(tag) => Answer::WaitCompleted { tag },
                    None if !r.released && now < r.lease_expires => Answer::WaitTimedOut {
                        attempts: r.attempts,
                    },
                    None => Answer::WaitFree { record: true },
                },
            },
            Op::Reap => {
                let before = self.records.len();
                self.records.retain(|_, r| now < r.expires);
                Answer::Reaped {
                    deleted: (before - self.records.len()) as u64,
                    left: self.records.len(),
                }
            }
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

/// Runs `ops` against a fresh memory store and the model; the first disagreement is the error.
pub fn run(ops: &[Op]) -> Result<(), String> {
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
                            if lease.fencing_token <= last_fencing {
                                return Err(format!(
                                    "fencing tokens increase: {} after {last_fencing}, at {op:?} t={now}ms",
                                    lease.fencing_token
                                ));
                            }
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
            Op::Complete {
                key,
                lease,
                tag,
                retention,
            } => {
                let (namespace, key) = name(key);
                let command = CompleteCommand {
                    namespace,
                    key,
                    lease_token: token(lease),
                    result: result(tag),
                    retention: retention.map(Duration::from_millis),
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
            Op::Wait { key } => {
                let (namespace, key) = name(key);
                let command = WaitCommand {
                    namespace,
                    key,
                    timeout: Duration::ZERO,
                };
                let answer = match store.wait(command, None).now_or_never().expect("immediate") {
                    Ok(WaitOutcome::Completed { record }) => Answer::WaitCompleted {
                        tag: record.result.map(|r| r.body[0]).unwrap_or(255),
                    },
                    Ok(WaitOutcome::Free { record }) => Answer::WaitFree {
                        record: record.is_some(),
                    },
                    Ok(WaitOutcome::TimedOut { record }) => Answer::WaitTimedOut {
                        attempts: record.attempts,
                    },
                    Err(error) => rejection(error),
                };
                if store.waited_keys() != 0 {
                    return Err(format!(
                        "a finished Wait left {} waited keys behind, at {op:?} t={now}ms",
                        store.waited_keys()
                    ));
                }
                Some(answer)
            }
            Op::Reap => {
                let deleted = store
                    .reap_expired(u32::MAX)
                    .now_or_never()
                    .expect("immediate")
                    .map_err(|error| format!("reap failed: {error}"))?;
                Some(Answer::Reaped {
                    deleted,
                    left: store.len(),
                })
            }
        };
        if got != expected {
            return Err(format!(
                "after {op:?} at t={now}ms: the store answered {got:?}, the model {expected:?}"
            ));
        }
    }
    Ok(())
}

/// Most ops decoded from one input.
pub const MAX_OPS: usize = 512;

/// Ops from arbitrary bytes (the fuzz target's input, and the CI proptest's): each op is a selector
/// byte and up to four argument bytes (missing bytes read as 0). Wider than the proptest strategy
/// in `tests/suite/model.rs`: more keys and fingerprints, any TTL and retention from 1 ms to about
/// 2 s, Complete with its own retention, zero-timeout Waits, and reaping.
pub fn ops_from_bytes(data: &[u8]) -> Vec<Op> {
    let mut bytes = data.iter().copied();
    let mut ops = Vec::new();
    // Acquires so far: lease indices are drawn mostly from the recent ones.
    let mut acquires = 0usize;
    while let Some(selector) = bytes.next() {
        if ops.len() == MAX_OPS {
            break;
        }
        let mut arg = || bytes.next().unwrap_or(0);
        let lease = |back: u8| match back % 8 {
            7 => usize::MAX,
            back => acquires.saturating_sub(1 + usize::from(back)),
        };
        let op = match selector % 16 {
            0..=3 => {
                acquires += 1;
                Op::Acquire {
                    key: arg() % 4,
                    fp: arg() % 3,
                    ttl: 1 + u64::from(arg()) * 4,
                    retention: 1 + u64::from(arg()) * 8,
                }
            }
            4..=6 => {
                let (key, lease, tag, retention) = (arg() % 4, lease(arg()), arg() % 200, arg());
                Op::Complete {
                    key,
                    lease,
                    tag,
                    retention: (retention % 2 == 1).then(|| 1 + u64::from(retention / 2) * 16),
                }
            }
            7 => Op::Release {
                key: arg() % 4,
                lease: lease(arg()),
            },
            8 | 9 => Op::Renew {
                key: arg() % 4,
                lease: lease(arg()),
                ttl: 1 + u64::from(arg()) * 4,
            },
            10 => Op::Get { key: arg() % 4 },
            11 => Op::Wait { key: arg() % 4 },
            12 => Op::Reap,
            _ => Op::Advance {
                ms: u64::from(arg()) * 4,
            },
        };
        ops.push(op);
    }
    ops
}
