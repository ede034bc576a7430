//! Where records live. One `Store` trait, two engines (`memory`, `postgres`), one conformance
//! suite (`tests/suite/conformance.rs`) that both must pass; the Wait loop both run is in
//! `waiters`.

use std::future::Future;

use tokio::time::Instant;

use crate::domain::admin::{
    AdminRejection, AuditPage, BulkPurge, ListAuditQuery, ListRecordsQuery, MinuteCounts,
    NamespaceSummary, RecordChange, RecordPage,
};
use crate::domain::{
    AcquireCommand, AcquireOutcome, CompleteCommand, GetCommand, Lease, LeaseRejection, Record,
    ReleaseCommand, RenewCommand, WaitCommand, WaitOutcome,
};

pub mod counts;
pub mod memory;
pub mod postgres;
pub mod waiters;

pub use memory::MemoryStore;
pub use postgres::PostgresStore;

/// Why a store could not carry out a command.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the key already has a record with a different fingerprint")]
    FingerprintMismatch,
    #[error("{}", rejection_message(*.0))]
    Rejected(LeaseRejection),
    /// An admin change refused by the record's state.
    #[error("{}", admin_rejection_message(*.0))]
    AdminRejected(AdminRejection),
    /// The database cannot be reached or did not answer in time; the caller may retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store holds as many records as it may and none has expired: a new key cannot be
    /// stored (existing keys still can). Only the memory store is bounded.
    #[error("the store is full: it holds its maximum of {0} records and none has expired")]
    Full(u64),
    /// The caller's deadline passed before the store answered; the work was cancelled.
    #[error("the call's deadline passed before the store answered")]
    DeadlineExceeded,
    /// A bug, or data the store cannot make sense of.
    #[error("internal store error: {0}")]
    Internal(String),
}

fn rejection_message(rejection: LeaseRejection) -> &'static str {
    match rejection {
        LeaseRejection::NotFound => "no live record for this namespace and key",
        LeaseRejection::LeaseNotHeld => {
            "the lease token is not the key's current lease (it was taken over, released or never issued)"
        }
        LeaseRejection::RecordCompleted => "the record is already completed",
    }
}

fn admin_rejection_message(rejection: AdminRejection) -> &'static str {
    match rejection {
        AdminRejection::NotFound => "no live record for this namespace and key",
        AdminRejection::StaleRecord => {
            "the record's fencing token is not the expected one: it changed since it was read; nothing was changed"
        }
        AdminRejection::RecordCompleted => {
            "the record is completed: only an in-progress record has a lease to release"
        }
    }
}

impl From<AdminRejection> for StoreError {
    fn from(rejection: AdminRejection) -> Self {
        StoreError::AdminRejected(rejection)
    }
}

impl From<LeaseRejection> for StoreError {
    fn from(rejection: LeaseRejection) -> Self {
        StoreError::Rejected(rejection)
    }
}

/// A storage engine for idempotency records. Every method applies the decision functions of
/// `crate::domain`, with time taken from the store's own clock. `deadline` is the caller's gRPC
/// deadline: a store stops waiting (and cancels its database work) when it passes.
pub trait Store: Send + Sync + 'static {
    /// Claim a key, or report that it is in progress or completed.
    fn acquire(
        &self,
        command: AcquireCommand,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<AcquireOutcome, StoreError>> + Send;

    /// Store a result under the current lease; returns the completed record.
    fn complete(
        &self,
        command: CompleteCommand,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<Record, StoreError>> + Send;

    /// Give the key back.
    fn release(
        &self,
        command: ReleaseCommand,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Extend the current lease.
    fn renew(
        &self,
        command: RenewCommand,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<Lease, StoreError>> + Send;

    /// Read a live record.
    fn get(
        &self,
        command: GetCommand,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<Record, StoreError>> + Send;

    /// Wait until the key is completed or free, or `command.timeout` or `deadline` passes.
    fn wait(
        &self,
        command: WaitCommand,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<WaitOutcome, StoreError>> + Send;

    /// Delete up to `batch` expired records; returns how many were deleted. With several replicas
    /// only one reaps at a time (the others return 0).
    fn reap_expired(&self, batch: u32) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Hands this replica's per-minute event counts (see `counts`) on to where every replica's
    /// GetNamespaceStats reads them: on PostgreSQL, adds them into `idemd_minute_counts` in one
    /// statement. Run about once a second and at shutdown, never on the hot path. Counts a flush
    /// could not hand on are kept and go with the next.
    fn flush_counts(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Publishes the store's gauges (pool usage, record counts) to the metrics recorder.
    fn report_metrics(&self) -> impl Future<Output = ()> + Send;

    /// Ok when the store can serve requests (reachable, schema current).
    fn check_ready(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The operators' view of a store: listings, counts, and changes that are audited. Every change
/// writes its audit entry atomically with the change (one transaction on PostgreSQL, one lock on
/// the memory store). Both stores run the admin cases of the conformance suite
/// (`tests/suite/admin.rs`).
pub trait AdminStore: Send + Sync + 'static {
    /// A page of a namespace's live records matching a filter, newest first.
    fn list_records(
        &self,
        query: ListRecordsQuery,
    ) -> impl Future<Output = Result<RecordPage, StoreError>> + Send;

    /// A summary of every namespace with live records, ordered by name.
    fn list_namespaces(
        &self,
    ) -> impl Future<Output = Result<Vec<NamespaceSummary>, StoreError>> + Send;

    /// Per-minute counts of a namespace's events (records created, completed, taken over) over
    /// `window` ending now, every minute present: every replica's flushed counts, plus this
    /// replica's not yet flushed.
    fn namespace_stats(
        &self,
        namespace: crate::domain::Namespace,
        window: std::time::Duration,
    ) -> impl Future<Output = Result<Vec<MinuteCounts>, StoreError>> + Send;

    /// Deletes a live record; returns it as it was. On return no replica answers from a cache
    /// as if it still existed.
    fn purge_record(
        &self,
        change: RecordChange,
    ) -> impl Future<Output = Result<Record, StoreError>> + Send;

    /// Ends an in-progress record's lease now; returns the record after the change.
    fn force_release(
        &self,
        change: RecordChange,
    ) -> impl Future<Output = Result<Record, StoreError>> + Send;

    /// Counts (dry run) or deletes at most `limit` records matching the filter.
    fn purge_records(
        &self,
        purge: BulkPurge,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// A page of a namespace's audit entries, newest first.
    fn list_audit(
        &self,
        query: ListAuditQuery,
    ) -> impl Future<Output = Result<AuditPage, StoreError>> + Send;
}
