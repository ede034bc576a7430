//! The embedded in-memory store: the same semantics as PostgreSQL, for trying idemd and for local
//! development. Records are neither durable nor shared between replicas. It holds at most
//! `max_records` (`--max-records`): when full, a new key first sweeps expired records out, and is
//! refused with `StoreError::Full` if that frees nothing.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
    time::SystemTime,
};

use tokio::time::Instant;

use super::counts::{self, Event, MinuteCounter};
use super::waiters::{self, Waiters};
use super::{AdminStore, Store, StoreError};
use crate::defaults;
use crate::domain::admin::{
    decide_change, is_stuck, AuditAction, AuditEntry, AuditPage, BulkPurge, ListAuditQuery,
    ListRecordsQuery, MinuteCounts, NamespaceSummary, RecordChange, RecordPage, RecordPosition,
};
use crate::domain::{
    decide_acquire, decide_complete, decide_release, decide_renew, unfinished_expiry,
    AcquireCommand, AcquireDecision, AcquireOutcome, CompleteCommand, CompleteDecision, GetCommand,
    Key, Lease, LeaseRejection, LeaseToken, Namespace, Record, RecordState, ReleaseCommand,
    ReleaseDecision, RenewCommand, RenewDecision, WaitCommand, WaitOutcome,
};
use crate::telemetry::metrics;

const SHARDS: usize = 32;

type Shard = HashMap<(Namespace, Key), Record>;

/// Records in sharded hash maps. Each shard is a `std::sync::Mutex`, not a Tokio mutex, because
/// no asynchronous operation happens while it is held.
pub struct MemoryStore {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    /// Source of fencing tokens: strictly increasing across all keys, like the database sequence.
    fencing: AtomicU64,
    /// Local Waits, woken by Complete and Release.
    waiters: Waiters,
    /// The store's clock: the system's, or a test's.
    clock: Clock,
    /// Most records held, live or expired-but-not-yet-reaped.
    max_records: u64,
    /// Records held. Changed only under the lock of the shard whose map changes, so it never
    /// lags a map by more than the calls in progress.
    records: AtomicU64,
    /// No record expires before this (nanoseconds since the Unix epoch): a lower bound, lowered
    /// (under the shard's lock) by every write that sets an expiry, and made exact again by each
    /// sweep. While it lies ahead, a full store refuses a new key without sweeping: a sweep visits
    /// every record, too dear to pay on each refused call.
    earliest_expiry: AtomicU64,
    /// One sweep at a time: a sweep in progress holds `earliest_expiry` above its true value.
    sweeping: Mutex<()>,
    /// The admin changes, oldest first, at most `AUDIT_ENTRIES_KEPT`. An admin change holds this
    /// lock from before it reads the record until its entry is in, so no change is without its
    /// entry. Lock order: this, then a shard.
    audit: Mutex<AuditLog>,
    /// GetNamespaceStats' per-minute counts of events (see `counts`).
    counts: MinuteCounter,
}

/// Audit entries the memory store keeps (the oldest go first); PostgreSQL keeps them all.
pub const AUDIT_ENTRIES_KEPT: usize = 100_000;

#[derive(Default)]
struct AuditLog {
    entries: std::collections::VecDeque<AuditEntry>,
    last_id: u64,
}

impl AuditLog {
    fn append(&mut self, mut entry: AuditEntry) -> AuditEntry {
        self.last_id += 1;
        entry.id = self.last_id;
        if self.entries.len() >= AUDIT_ENTRIES_KEPT {
            self.entries.pop_front();
        }
        self.entries.push_back(entry.clone());
        entry
    }
}

/// Where the memory store reads the time.
pub type Clock = std::sync::Arc<dyn Fn() -> SystemTime + Send + Sync>;

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            fencing: AtomicU64::new(0),
            waiters: Waiters::default(),
            clock: std::sync::Arc::new(SystemTime::now),
            max_records: defaults::MAX_RECORDS,
            records: AtomicU64::new(0),
            earliest_expiry: AtomicU64::new(u64::MAX),
            sweeping: Mutex::new(()),
            audit: Mutex::new(AuditLog::default()),
            counts: MinuteCounter::default(),
        }
    }

    /// A store that holds at most `max_records` records (at least one).
    pub fn bounded(max_records: u64) -> Self {
        Self {
            max_records: max_records.max(1),
            ..Self::new()
        }
    }

    /// A store that reads the time from `clock` (for model tests that move time by hand).
    pub fn with_clock(clock: Clock) -> Self {
        Self {
            clock,
            ..Self::new()
        }
    }

    fn now(&self) -> SystemTime {
        (self.clock)()
    }

    fn shard(&self, namespace: &Namespace, key: &Key) -> MutexGuard<'_, Shard> {
        let index = (self.hasher.hash_one((namespace, key)) as usize) % SHARDS;
        // A poisoned shard only means another request panicked mid-way; every write below is a
        // single assignment, so the map is still consistent.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts one more record, unless the store is full.
    fn reserve_record(&self) -> bool {
        self.records
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held < self.max_records).then_some(held + 1)
            })
            .is_ok()
    }

    /// Keeps `earliest_expiry` a lower bound; call under the lock of the record's shard.
    fn note_expiry(&self, expires_at: SystemTime) {
        let nanos = epoch_nanos(expires_at);
        // Most expiries lie after the bound: a load alone does not contend as fetch_min would.
        if nanos < self.earliest_expiry.load(Ordering::Relaxed) {
            self.earliest_expiry.fetch_min(nanos, Ordering::Relaxed);
        }
    }

    /// Deletes every expired record, to make room in a full store; returns how many. Does
    /// nothing when no record can have expired yet. Takes each shard's lock in turn: call it
    /// holding none.
    fn sweep_expired(&self, now: SystemTime) -> u64 {
        // One sweep at a time. A caller that finds one running waits for it rather than giving
        // up: given up, it would be refused STORE_FULL just before the running sweep makes room.
        // Once in, it finds the bound moved past `now` and returns at once. Only a full store
        // with expired records ever gets here, so the wait (one pass over the map) is rare.
        let _one_at_a_time = self.sweeping.lock().unwrap_or_else(|p| p.into_inner());
        if self.earliest_expiry.load(Ordering::Relaxed) > epoch_nanos(now) {
            return 0;
        }
        // Recomputed from the survivors; a write to a shard already swept lowers it again.
        self.earliest_expiry.store(u64::MAX, Ordering::Relaxed);
        let mut deleted = 0;
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let before = shard.len();
            let mut earliest = u64::MAX;
            shard.retain(|_, record| {
                let live = record.is_live(now);
                if live {
                    earliest = earliest.min(epoch_nanos(record.expires_at));
                }
                live
            });
            let removed = (before - shard.len()) as u64;
            self.records.fetch_sub(removed, Ordering::Relaxed);
            self.earliest_expiry.fetch_min(earliest, Ordering::Relaxed);
            deleted += removed;
        }
        metrics::reaped(deleted);
        deleted
    }

    fn next_fencing_token(&self) -> u64 {
        self.fencing.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Number of records held, live or expired-but-not-yet-reaped.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys that at least one Wait is waiting on.
    pub fn waited_keys(&self) -> usize {
        self.waiters.len()
    }
}

/// A time as nanoseconds since the Unix epoch (0 before it, saturating far after it).
fn epoch_nanos(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
        })
}

fn new_token() -> Result<LeaseToken, StoreError> {
    LeaseToken::generate().map_err(|error| StoreError::Internal(format!("no randomness: {error}")))
}

impl Store for MemoryStore {
    async fn acquire(
        &self,
        command: AcquireCommand,
        _deadline: Option<Instant>,
    ) -> Result<AcquireOutcome, StoreError> {
        let now = self.now();
        let token = new_token()?;
        let mut swept = false;
        loop {
            let mut shard = self.shard(&command.namespace, &command.key);
            let map_key = (command.namespace.clone(), command.key.clone());
            let existing = shard.get(&map_key);
            let lease_expires_at = now + command.lease_ttl;
            let decision = decide_acquire(existing, &command.fingerprint, now);
            let (attempts, created_at) = match (decision, existing) {
                (AcquireDecision::Create, _) | (_, None) => (1, now),
                (AcquireDecision::TakeOver, Some(record)) => {
                    (record.attempts.saturating_add(1), record.created_at)
                }
                (AcquireDecision::InProgress { retry_after }, Some(record)) => {
                    return Ok(AcquireOutcome::InProgress {
                        record: record.clone(),
                        retry_after,
                    })
                }
                (AcquireDecision::Completed, Some(record)) => {
                    return Ok(AcquireOutcome::Completed {
                        record: record.clone(),
                    })
                }
                (AcquireDecision::FingerprintMismatch, Some(_)) => {
                    return Err(StoreError::FingerprintMismatch)
                }
            };
            // A new key needs room; a key already held (even expired) is replaced in place.
            if existing.is_none() && !self.reserve_record() {
                drop(shard);
                if swept {
                    return Err(StoreError::Full(self.max_records));
                }
                self.sweep_expired(now);
                swept = true;
                continue;
            }
            let taken_over = decision == AcquireDecision::TakeOver;
            let revision = existing.map_or(0, |record| record.revision) + 1;
            let record = Record {
                namespace: command.namespace,
                key: command.key,
                state: RecordState::InProgress,
                fingerprint: command.fingerprint,
                lease_token: token,
                released: false,
                fencing_token: self.next_fencing_token(),
                attempts,
                holder: command.holder,
                retention: command.retention,
                created_at,
                lease_expires_at,
                completed_at: None,
                expires_at: unfinished_expiry(lease_expires_at, command.retention),
                result: None,
                revision,
            };
            self.note_expiry(record.expires_at);
            shard.insert(map_key, record.clone());
            drop(shard);
            let event = if taken_over {
                Event::TakenOver
            } else {
                Event::Created
            };
            self.counts.count(&record.namespace, now, event);
            return Ok(AcquireOutcome::Acquired {
                lease: record.lease(),
                record,
                taken_over,
            });
        }
    }

    async fn complete(
        &self,
        command: CompleteCommand,
        _deadline: Option<Instant>,
    ) -> Result<Record, StoreError> {
        let now = self.now();
        let mut shard = self.shard(&command.namespace, &command.key);
        let map_key = (command.namespace, command.key);
        let existing = shard.get_mut(&map_key);
        match decide_complete(existing.as_deref(), &command.lease_token, now) {
            CompleteDecision::Reject(rejection) => Err(rejection.into()),
            CompleteDecision::AlreadyCompleted | CompleteDecision::Store => {
                let record = existing.ok_or(StoreError::Rejected(LeaseRejection::NotFound))?;
                if record.state == RecordState::InProgress {
                    let retention = command.retention.unwrap_or(record.retention);
                    record.state = RecordState::Completed;
                    record.result = Some(command.result);
                    record.retention = retention;
                    record.completed_at = Some(now);
                    record.expires_at = now + retention;
                    record.revision += 1;
                    self.note_expiry(record.expires_at);
                    self.waiters.wake(&record.namespace, &record.key);
                    self.counts.count(&record.namespace, now, Event::Completed);
                }
                Ok(record.clone())
            }
        }
    }

    async fn release(
        &self,
        command: ReleaseCommand,
        _deadline: Option<Instant>,
    ) -> Result<(), StoreError> {
        let now = self.now();
        let mut shard = self.shard(&command.namespace, &command.key);
        let existing = shard.get_mut(&(command.namespace, command.key));
        match decide_release(existing.as_deref(), &command.lease_token, now) {
            ReleaseDecision::Reject(rejection) => Err(rejection.into()),
            ReleaseDecision::AlreadyFree => Ok(()),
            ReleaseDecision::Release => {
                if let Some(record) = existing {
                    record.released = true;
                    record.lease_expires_at = now;
                    record.expires_at = unfinished_expiry(now, record.retention);
                    record.revision += 1;
                    self.note_expiry(record.expires_at);
                    self.waiters.wake(&record.namespace, &record.key);
                }
                Ok(())
            }
        }
    }

    async fn renew(
        &self,
        command: RenewCommand,
        _deadline: Option<Instant>,
    ) -> Result<Lease, StoreError> {
        let now = self.now();
        let mut shard = self.shard(&command.namespace, &command.key);
        let existing = shard.get_mut(&(command.namespace, command.key));
        match (
            decide_renew(existing.as_deref(), &command.lease_token, now),
            existing,
        ) {
            (RenewDecision::Reject(rejection), _) => Err(rejection.into()),
            (RenewDecision::Renew, None) => Err(LeaseRejection::NotFound.into()),
            (RenewDecision::Renew, Some(record)) => {
                record.lease_expires_at = now + command.lease_ttl;
                record.expires_at = unfinished_expiry(record.lease_expires_at, record.retention);
                record.revision += 1;
                self.note_expiry(record.expires_at);
                Ok(record.lease())
            }
        }
    }

    async fn get(
        &self,
        command: GetCommand,
        _deadline: Option<Instant>,
    ) -> Result<Record, StoreError> {
        let now = self.now();
        let shard = self.shard(&command.namespace, &command.key);
        shard
            .get(&(command.namespace, command.key))
            .filter(|record| record.is_live(now))
            .cloned()
            .ok_or(StoreError::Rejected(LeaseRejection::NotFound))
    }

    async fn wait(
        &self,
        command: WaitCommand,
        deadline: Option<Instant>,
    ) -> Result<WaitOutcome, StoreError> {
        let command = &command;
        let read = |_first_look| async move {
            let now = self.now();
            let record = self
                .shard(&command.namespace, &command.key)
                .get(&(command.namespace.clone(), command.key.clone()))
                .cloned();
            Ok::<_, StoreError>((record, now))
        };
        // No polling: every change of a record here wakes its Waits.
        waiters::wait(&self.waiters, command, deadline, read, || None).await
    }

    async fn reap_expired(&self, batch: u32) -> Result<u64, StoreError> {
        let now = self.now();
        let kept_from = now.checked_sub(counts::COUNTS_KEPT).unwrap_or(now);
        self.counts.forget_before(counts::minute_key(kept_from));
        let mut budget = u64::from(batch);
        let mut deleted = 0;
        for shard in &self.shards {
            if budget == 0 {
                break;
            }
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let before = shard.len();
            shard.retain(|_, record| {
                if budget > 0 && !record.is_live(now) {
                    budget -= 1;
                    false
                } else {
                    true
                }
            });
            let removed = (before - shard.len()) as u64;
            self.records.fetch_sub(removed, Ordering::Relaxed);
            deleted += removed;
        }
        Ok(deleted)
    }

    /// The counts are the store's own: nothing to hand on.
    async fn flush_counts(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn report_metrics(&self) {
        let now = self.now();
        let (mut in_progress, mut completed) = (0usize, 0usize);
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for record in shard.values().filter(|record| record.is_live(now)) {
                match record.state {
                    RecordState::InProgress => in_progress += 1,
                    RecordState::Completed => completed += 1,
                }
            }
        }
        metrics::records(in_progress as f64, completed as f64);
    }

    async fn check_ready(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

impl MemoryStore {
    /// Every live record, cloned, under each shard's lock in turn.
    fn live_records(&self, now: SystemTime, mut keep: impl FnMut(&Record) -> bool) -> Vec<Record> {
        let mut found = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            found.extend(
                shard
                    .values()
                    .filter(|record| record.is_live(now) && keep(record))
                    .cloned(),
            );
        }
        found
    }

    fn audit_log(&self) -> MutexGuard<'_, AuditLog> {
        self.audit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a single-record change under the audit lock and the record's shard lock.
    fn change_record(
        &self,
        change: RecordChange,
        action: AuditAction,
    ) -> Result<Record, StoreError> {
        let now = self.now();
        let mut audit = self.audit_log();
        let mut shard = self.shard(&change.namespace, &change.key);
        let map_key = (change.namespace.clone(), change.key.clone());
        let existing = shard.get(&map_key);
        decide_change(existing, &change, now, action == AuditAction::ForceRelease)?;
        let before = existing.cloned().ok_or(StoreError::Internal(
            "record vanished under its lock".into(),
        ))?;
        let after = match action {
            AuditAction::PurgeRecord => {
                shard.remove(&map_key);
                self.records.fetch_sub(1, Ordering::Relaxed);
                before.clone()
            }
            _ => {
                let record = shard.get_mut(&map_key).ok_or(StoreError::Internal(
                    "record vanished under its lock".into(),
                ))?;
                record.released = true;
                record.lease_expires_at = now;
                record.expires_at = unfinished_expiry(now, record.retention);
                record.revision += 1;
                self.note_expiry(record.expires_at);
                record.clone()
            }
        };
        audit.append(AuditEntry {
            id: 0,
            time: now,
            caller: change.actor.0,
            action,
            namespace: change.namespace.clone(),
            key: Some(change.key.clone()),
            filter: None,
            reason: change.reason.as_str().to_string(),
            count: 1,
            state_before: Some(before.state),
            fencing_token_before: Some(before.fencing_token),
        });
        // The key is free now: its Waits look again.
        self.waiters.wake(&change.namespace, &change.key);
        Ok(after)
    }
}

impl AdminStore for MemoryStore {
    async fn list_records(&self, query: ListRecordsQuery) -> Result<RecordPage, StoreError> {
        let now = self.now();
        let filter = &query.filter;
        let mut records = self.live_records(now, |record| {
            record.namespace == filter.namespace
                && filter.matches(record, now)
                && query
                    .after
                    .as_ref()
                    .is_none_or(|after| after.precedes(record))
        });
        records.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.key.cmp(&b.key)));
        let page_size = query.page_size as usize;
        let more = records.len() > page_size;
        records.truncate(page_size);
        let next = more
            .then(|| records.last().map(RecordPosition::of))
            .flatten();
        Ok(RecordPage { records, next })
    }

    async fn list_namespaces(&self) -> Result<Vec<NamespaceSummary>, StoreError> {
        let now = self.now();
        let mut summaries = std::collections::BTreeMap::<Namespace, NamespaceSummary>::new();
        for record in self.live_records(now, |_| true) {
            let summary = summaries
                .entry(record.namespace.clone())
                .or_insert_with(|| NamespaceSummary {
                    namespace: record.namespace.clone(),
                    in_progress: 0,
                    completed: 0,
                    stuck: 0,
                    oldest_in_progress: None,
                });
            match record.state {
                RecordState::Completed => summary.completed += 1,
                RecordState::InProgress => {
                    summary.in_progress += 1;
                    if is_stuck(&record, now) {
                        summary.stuck += 1;
                    }
                    summary.oldest_in_progress = Some(
                        summary
                            .oldest_in_progress
                            .map_or(record.created_at, |oldest| oldest.min(record.created_at)),
                    );
                }
            }
        }
        Ok(summaries.into_values().collect())
    }

    async fn namespace_stats(
        &self,
        namespace: Namespace,
        window: std::time::Duration,
    ) -> Result<Vec<MinuteCounts>, StoreError> {
        let (mut minutes, first_minute) = counts::window_minutes(window, self.now());
        self.counts.add_to(&namespace, first_minute, &mut minutes);
        Ok(minutes)
    }

    async fn purge_record(&self, change: RecordChange) -> Result<Record, StoreError> {
        self.change_record(change, AuditAction::PurgeRecord)
    }

    async fn force_release(&self, change: RecordChange) -> Result<Record, StoreError> {
        self.change_record(change, AuditAction::ForceRelease)
    }

    async fn purge_records(&self, purge: BulkPurge) -> Result<u64, StoreError> {
        let now = self.now();
        let filter = &purge.filter;
        let matches = |record: &Record| {
            record.is_live(now)
                && record.namespace == filter.namespace
                && filter.matches(record, now)
        };
        if purge.dry_run {
            let count = self.live_records(now, |record| matches(record)).len();
            return Ok((count as u64).min(u64::from(purge.limit)));
        }
        let mut audit = self.audit_log();
        let mut budget = u64::from(purge.limit);
        let mut purged = Vec::new();
        for shard in &self.shards {
            if budget == 0 {
                break;
            }
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|map_key, record| {
                if budget > 0 && matches(record) {
                    budget -= 1;
                    purged.push(map_key.clone());
                    false
                } else {
                    true
                }
            });
        }
        let count = purged.len() as u64;
        self.records.fetch_sub(count, Ordering::Relaxed);
        audit.append(AuditEntry {
            id: 0,
            time: now,
            caller: purge.actor.0,
            action: AuditAction::PurgeRecords,
            namespace: filter.namespace.clone(),
            key: None,
            filter: Some(filter.describe()),
            reason: purge.reason.as_str().to_string(),
            count,
            state_before: None,
            fencing_token_before: None,
        });
        drop(audit);
        for (namespace, key) in &purged {
            self.waiters.wake(namespace, key);
        }
        Ok(count)
    }

    async fn list_audit(&self, query: ListAuditQuery) -> Result<AuditPage, StoreError> {
        let audit = self.audit_log();
        let page_size = query.page_size as usize;
        let mut entries: Vec<AuditEntry> = audit
            .entries
            .iter()
            .rev()
            .filter(|entry| {
                entry.namespace == query.namespace
                    && query.before_id.is_none_or(|before| entry.id < before)
            })
            .take(page_size + 1)
            .cloned()
            .collect();
        let more = entries.len() > page_size;
        entries.truncate(page_size);
        let next_before_id = more.then(|| entries.last().map(|entry| entry.id)).flatten();
        Ok(AuditPage {
            entries,
            next_before_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::domain::{Fingerprint, Holder};

    fn acquire(key: &str, lease_ttl: Duration, retention: Duration) -> AcquireCommand {
        AcquireCommand {
            namespace: Namespace::parse("bounded".into()).expect("namespace"),
            key: Key::parse(key.into()).expect("key"),
            fingerprint: Fingerprint::default(),
            lease_ttl,
            retention,
            holder: Holder::default(),
        }
    }

    #[test]
    fn the_audit_log_keeps_the_newest_entries() {
        let mut log = AuditLog::default();
        let entry = AuditEntry {
            id: 0,
            time: SystemTime::UNIX_EPOCH,
            caller: "-".into(),
            action: AuditAction::PurgeRecords,
            namespace: Namespace::parse("n".into()).expect("namespace"),
            key: None,
            filter: Some("all records".into()),
            reason: "why".into(),
            count: 0,
            state_before: None,
            fencing_token_before: None,
        };
        for _ in 0..=AUDIT_ENTRIES_KEPT {
            log.append(entry.clone());
        }
        assert_eq!(log.entries.len(), AUDIT_ENTRIES_KEPT);
        assert_eq!(log.entries.front().map(|entry| entry.id), Some(2));
        assert_eq!(
            log.entries.back().map(|entry| entry.id),
            Some(AUDIT_ENTRIES_KEPT as u64 + 1)
        );
    }

    #[tokio::test]
    async fn a_full_store_sweeps_expired_records_before_refusing_a_new_key() {
        let start = SystemTime::now();
        let now = Arc::new(Mutex::new(start));
        let clock_now = now.clone();
        let store = MemoryStore {
            max_records: 2,
            ..MemoryStore::with_clock(Arc::new(move || {
                *clock_now.lock().unwrap_or_else(|p| p.into_inner())
            }))
        };
        let second = Duration::from_secs(1);
        let hour = Duration::from_secs(3600);
        store
            .acquire(acquire("brief", second, second), None)
            .await
            .expect("brief");
        store
            .acquire(acquire("long", hour, hour), None)
            .await
            .expect("long");
        let full = store.acquire(acquire("new", hour, hour), None).await;
        assert!(matches!(full, Err(StoreError::Full(2))), "{full:?}");
        // A key it holds is not a new record.
        let again = store.acquire(acquire("long", hour, hour), None).await;
        assert!(matches!(again, Ok(AcquireOutcome::InProgress { .. })));
        // `brief` expires 1 s after its lease: then it makes room.
        *now.lock().unwrap_or_else(|p| p.into_inner()) = start + 3 * second;
        let made_room = store.acquire(acquire("new", hour, hour), None).await;
        assert!(matches!(made_room, Ok(AcquireOutcome::Acquired { .. })));
        assert_eq!(store.len(), 2);
        let full = store.acquire(acquire("newer", hour, hour), None).await;
        assert!(matches!(full, Err(StoreError::Full(2))), "{full:?}");
        // The background reaper keeps the count too.
        *now.lock().unwrap_or_else(|p| p.into_inner()) = start + 2 * hour + 3 * second;
        assert_eq!(store.reap_expired(10).await.expect("reap"), 2);
        store
            .acquire(acquire("a", hour, hour), None)
            .await
            .expect("a");
        store
            .acquire(acquire("b", hour, hour), None)
            .await
            .expect("b");
        assert!(store.len() == 2);
    }
}
