//! Validated requests to a store, and what the store answers.

use std::time::Duration;

use super::record::{Lease, Record};
use super::values::{Fingerprint, Holder, Key, LeaseToken, Namespace, StoredResult};

/// Acquire `key` for the caller.
#[derive(Debug, Clone)]
pub struct AcquireCommand {
    pub namespace: Namespace,
    pub key: Key,
    pub fingerprint: Fingerprint,
    pub lease_ttl: Duration,
    pub retention: Duration,
    pub holder: Holder,
}

/// Store the result of the work and end the lease.
#[derive(Debug, Clone)]
pub struct CompleteCommand {
    pub namespace: Namespace,
    pub key: Key,
    pub lease_token: LeaseToken,
    pub result: StoredResult,
    /// `None`: keep the retention given at Acquire.
    pub retention: Option<Duration>,
}

/// Give the key back.
#[derive(Debug, Clone)]
pub struct ReleaseCommand {
    pub namespace: Namespace,
    pub key: Key,
    pub lease_token: LeaseToken,
}

/// Extend the lease to `now + lease_ttl`.
#[derive(Debug, Clone)]
pub struct RenewCommand {
    pub namespace: Namespace,
    pub key: Key,
    pub lease_token: LeaseToken,
    pub lease_ttl: Duration,
}

/// Read one record.
#[derive(Debug, Clone)]
pub struct GetCommand {
    pub namespace: Namespace,
    pub key: Key,
}

/// What Acquire decided, with the record as of that decision.
#[derive(Debug, Clone)]
pub enum AcquireOutcome {
    /// The caller holds `lease`; `taken_over` tells whether an earlier lease was superseded.
    Acquired {
        lease: Lease,
        record: Record,
        taken_over: bool,
    },
    /// Someone else holds a live lease.
    InProgress {
        record: Record,
        retry_after: Duration,
    },
    /// Replay of the stored result.
    Completed { record: Record },
}

/// Wait until `key` is completed or free, for at most `timeout`.
#[derive(Debug, Clone)]
pub struct WaitCommand {
    pub namespace: Namespace,
    pub key: Key,
    pub timeout: Duration,
}

/// How a Wait ended.
#[derive(Debug, Clone)]
pub enum WaitOutcome {
    /// The record is completed.
    Completed { record: Record },
    /// Nobody holds the key; `record` is the unfinished record, if one is still live.
    Free { record: Option<Record> },
    /// The time ran out while a live lease was held.
    TimedOut { record: Record },
}
