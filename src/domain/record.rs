//! A record's state machine, written once. Both stores apply these decisions; the PostgreSQL
//! store's single-statement fast paths are the same rules phrased as SQL guards (see
//! `store/postgres/sql.rs`), and the shared conformance suite holds the two to each other.
//!
//! ```text
//!            Acquire (no live record)           Complete (current token)
//!   absent ───────────────────────────▶ IN_PROGRESS ───────────────────▶ COMPLETED
//!     ▲                                   │   ▲  │                           │
//!     │        Release / lease expiry     │   │  │ Acquire after expiry     │
//!     │        (lease no longer live) ────┘   └──┘ or release: take over    │
//!     └──────────────── expires_at passes (retention): treated as absent ◀──┘
//! ```

use std::time::{Duration, SystemTime};

use super::values::{Fingerprint, Holder, Key, LeaseToken, Namespace, StoredResult};

/// Lifecycle state of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    InProgress,
    Completed,
}

/// Everything a store keeps about one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub namespace: Namespace,
    pub key: Key,
    pub state: RecordState,
    pub fingerprint: Fingerprint,
    /// Token of the current lease, or of the lease that completed the record. A secret: the
    /// wire layer never encodes it in a `Record`.
    pub lease_token: LeaseToken,
    /// The holder gave the lease back with Release; the key is free.
    pub released: bool,
    pub fencing_token: u64,
    pub attempts: u32,
    pub holder: Holder,
    /// Retention of the record, applied from completion (or from lease expiry while unfinished).
    pub retention: Duration,
    pub created_at: SystemTime,
    pub lease_expires_at: SystemTime,
    pub completed_at: Option<SystemTime>,
    pub expires_at: SystemTime,
    pub result: Option<StoredResult>,
    /// Bumped by every write; with the fencing token it guards a store's compare-and-set.
    pub revision: u64,
}

impl Record {
    /// A record past its retention is treated as absent.
    pub fn is_live(&self, now: SystemTime) -> bool {
        now < self.expires_at
    }

    /// An in-progress record whose holder still has the key.
    pub fn lease_is_live(&self, now: SystemTime) -> bool {
        self.state == RecordState::InProgress && !self.released && now < self.lease_expires_at
    }

    pub fn lease(&self) -> Lease {
        Lease {
            token: self.lease_token,
            fencing_token: self.fencing_token,
            expires_at: self.lease_expires_at,
        }
    }
}

/// A lease on a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub token: LeaseToken,
    pub fencing_token: u64,
    pub expires_at: SystemTime,
}

/// What Acquire must do with the key's current record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireDecision {
    /// No live record: create one (replacing an expired record, if any) and grant a lease.
    Create,
    /// An in-progress record whose lease expired or was released: grant a new lease on it.
    TakeOver,
    /// Someone else holds a live lease.
    InProgress { retry_after: Duration },
    /// The work is done: replay the stored result.
    Completed,
    /// The key was acquired for a different request.
    FingerprintMismatch,
}

pub fn decide_acquire(
    existing: Option<&Record>,
    fingerprint: &Fingerprint,
    now: SystemTime,
) -> AcquireDecision {
    let Some(record) = existing.filter(|record| record.is_live(now)) else {
        return AcquireDecision::Create;
    };
    if record.fingerprint != *fingerprint {
        return AcquireDecision::FingerprintMismatch;
    }
    match record.state {
        RecordState::Completed => AcquireDecision::Completed,
        RecordState::InProgress if record.lease_is_live(now) => AcquireDecision::InProgress {
            retry_after: record
                .lease_expires_at
                .duration_since(now)
                .unwrap_or_default(),
        },
        RecordState::InProgress => AcquireDecision::TakeOver,
    }
}

/// Why a lease-holder's request (Complete, Release, Renew) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseRejection {
    /// No live record for the key.
    NotFound,
    /// The token is not the key's current lease (taken over, released, or never issued).
    LeaseNotHeld,
    /// The record is completed (Release, Renew).
    RecordCompleted,
}

/// What Complete must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompleteDecision {
    /// Store the result and end the lease.
    Store,
    /// A retry of a Complete that succeeded: answer with the stored record, unchanged.
    AlreadyCompleted,
    Reject(LeaseRejection),
}

/// Complete is accepted from the current token even after the lease expired, as long as nobody
/// took the key over; a released lease cannot complete.
pub fn decide_complete(
    existing: Option<&Record>,
    token: &LeaseToken,
    now: SystemTime,
) -> CompleteDecision {
    let Some(record) = existing.filter(|record| record.is_live(now)) else {
        return CompleteDecision::Reject(LeaseRejection::NotFound);
    };
    if record.lease_token != *token {
        return CompleteDecision::Reject(LeaseRejection::LeaseNotHeld);
    }
    match record.state {
        RecordState::Completed => CompleteDecision::AlreadyCompleted,
        RecordState::InProgress if record.released => {
            CompleteDecision::Reject(LeaseRejection::LeaseNotHeld)
        }
        RecordState::InProgress => CompleteDecision::Store,
    }
}

/// What Release must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseDecision {
    /// Free the key.
    Release,
    /// The key is already free (released by this token, or gone): a retried Release succeeds.
    AlreadyFree,
    Reject(LeaseRejection),
}

pub fn decide_release(
    existing: Option<&Record>,
    token: &LeaseToken,
    now: SystemTime,
) -> ReleaseDecision {
    let Some(record) = existing.filter(|record| record.is_live(now)) else {
        return ReleaseDecision::AlreadyFree;
    };
    if record.lease_token != *token {
        return ReleaseDecision::Reject(LeaseRejection::LeaseNotHeld);
    }
    match record.state {
        RecordState::Completed => ReleaseDecision::Reject(LeaseRejection::RecordCompleted),
        RecordState::InProgress if record.released => ReleaseDecision::AlreadyFree,
        RecordState::InProgress => ReleaseDecision::Release,
    }
}

/// What Renew must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewDecision {
    /// Extend the lease from now (also revives an expired lease nobody took over).
    Renew,
    Reject(LeaseRejection),
}

pub fn decide_renew(
    existing: Option<&Record>,
    token: &LeaseToken,
    now: SystemTime,
) -> RenewDecision {
    let Some(record) = existing.filter(|record| record.is_live(now)) else {
        return RenewDecision::Reject(LeaseRejection::NotFound);
    };
    if record.lease_token != *token {
        return RenewDecision::Reject(LeaseRejection::LeaseNotHeld);
    }
    match record.state {
        RecordState::Completed => RenewDecision::Reject(LeaseRejection::RecordCompleted),
        RecordState::InProgress if record.released => {
            RenewDecision::Reject(LeaseRejection::LeaseNotHeld)
        }
        RecordState::InProgress => RenewDecision::Renew,
    }
}

/// Expiry of an unfinished record: its lease end plus its retention.
pub fn unfinished_expiry(lease_expires_at: SystemTime, retention: Duration) -> SystemTime {
    lease_expires_at + retention
}

/// What a Wait sees in the key's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitDecision {
    Completed,
    /// No live lease: released, expired, or no live record.
    Free,
    /// A live lease: wait until it ends (or something changes).
    Held {
        lease_expires_at: SystemTime,
    },
}

pub fn decide_wait(existing: Option<&Record>, now: SystemTime) -> WaitDecision {
    match existing.filter(|record| record.is_live(now)) {
        None => WaitDecision::Free,
        Some(record) if record.state == RecordState::Completed => WaitDecision::Completed,
        Some(record) if record.lease_is_live(now) => WaitDecision::Held {
            lease_expires_at: record.lease_expires_at,
        },
        Some(_) => WaitDecision::Free,
    }
}
