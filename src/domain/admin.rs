//! The admin API's validated requests and what the stores answer: filters over records, keyset
//! page positions, audit entries. Pure rules; both stores apply `RecordFilter::matches` (the
//! PostgreSQL store as the SQL image in `store/postgres/sql.rs`).

use std::time::{Duration, SystemTime};

use super::record::{Record, RecordState};
use super::values::{Key, Namespace};

/// Most records or audit entries on one page.
pub const MAX_PAGE_SIZE: u32 = 500;
/// Records or audit entries on a page when the caller asks for 0.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Most records one PurgeRecords deletes.
pub const MAX_PURGE_LIMIT: u32 = 10_000;
/// Longest window of GetNamespaceStats.
pub const MAX_STATS_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Window of GetNamespaceStats when the caller gives none.
pub const DEFAULT_STATS_WINDOW: Duration = Duration::from_secs(3600);

/// Which records of a namespace a listing or a bulk purge means. Every part is optional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordFilter {
    pub namespace: Namespace,
    /// Empty: every state.
    pub states: Vec<RecordState>,
    /// Empty: every key.
    pub key_prefix: String,
    /// `None`: any holder.
    pub holder: Option<String>,
    pub stuck_only: bool,
    pub created_after: Option<SystemTime>,
    pub created_before: Option<SystemTime>,
}

impl RecordFilter {
    /// Whether a live `record` matches (the caller checks liveness and the namespace).
    pub fn matches(&self, record: &Record, now: SystemTime) -> bool {
        (self.states.is_empty() || self.states.contains(&record.state))
            && record.key.as_str().starts_with(&self.key_prefix)
            && self
                .holder
                .as_deref()
                .is_none_or(|holder| record.holder.as_str() == holder)
            && (!self.stuck_only || is_stuck(record, now))
            && self
                .created_after
                .is_none_or(|after| record.created_at > after)
            && self
                .created_before
                .is_none_or(|before| record.created_at < before)
    }

    /// The filter as text, for audit entries: what a reader needs to know what was matched.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.states.is_empty() {
            let states: Vec<&str> = self.states.iter().map(|s| state_name(*s)).collect();
            parts.push(format!("states={}", states.join(",")));
        }
        if !self.key_prefix.is_empty() {
            parts.push(format!("key_prefix={:?}", self.key_prefix));
        }
        if let Some(holder) = &self.holder {
            parts.push(format!("holder={holder:?}"));
        }
        if self.stuck_only {
            parts.push("stuck_only".into());
        }
        if let Some(after) = self.created_after {
            parts.push(format!(
                "created_after={}",
                humantime::format_rfc3339_micros(after)
            ));
        }
        if let Some(before) = self.created_before {
            parts.push(format!(
                "created_before={}",
                humantime::format_rfc3339_micros(before)
            ));
        }
        if parts.is_empty() {
            "all records".into()
        } else {
            parts.join(" ")
        }
    }
}

fn state_name(state: RecordState) -> &'static str {
    match state {
        RecordState::InProgress => "IN_PROGRESS",
        RecordState::Completed => "COMPLETED",
    }
}

/// Stuck: in progress, not released, lease expired. Nobody is working on it and nobody gave it
/// back; the next Acquire would take it over.
pub fn is_stuck(record: &Record, now: SystemTime) -> bool {
    record.state == RecordState::InProgress && !record.released && record.lease_expires_at <= now
}

/// Where a listing of records goes on: after the record with this `created_at` and key in the
/// order (created_at descending, key ascending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordPosition {
    pub created_at: SystemTime,
    pub key: Key,
}

impl RecordPosition {
    pub fn of(record: &Record) -> Self {
        Self {
            created_at: record.created_at,
            key: record.key.clone(),
        }
    }

    /// Whether `record` comes after this position in the listing's order.
    pub fn precedes(&self, record: &Record) -> bool {
        record.created_at < self.created_at
            || (record.created_at == self.created_at && record.key > self.key)
    }
}

/// A page of the listing of `filter`, after `after` (the first page when `None`).
#[derive(Debug, Clone)]
pub struct ListRecordsQuery {
    pub filter: RecordFilter,
    pub after: Option<RecordPosition>,
    pub page_size: u32,
}

/// A page of records and whether more follow.
#[derive(Debug, Clone)]
pub struct RecordPage {
    pub records: Vec<Record>,
    /// Set when another page may follow: the position of the page's last record.
    pub next: Option<RecordPosition>,
}

/// A namespace's live records at a glance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceSummary {
    pub namespace: Namespace,
    pub in_progress: u64,
    pub completed: u64,
    pub stuck: u64,
    pub oldest_in_progress: Option<SystemTime>,
}

/// What happened in one minute of a namespace (see the proto's `MinuteCounts`): events counted
/// as they happened (`store::counts`), not live records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinuteCounts {
    /// Start of the minute.
    pub minute: SystemTime,
    pub created: u64,
    pub completed: u64,
    pub taken_over: u64,
}

/// The start of the minute `time` falls in.
pub fn minute_of(time: SystemTime) -> SystemTime {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    SystemTime::UNIX_EPOCH + Duration::from_secs(since - since % 60)
}

/// The entry of `minutes` (as `fill_minutes` made them) that `time` falls in.
pub fn minute_slot(minutes: &mut [MinuteCounts], time: SystemTime) -> Option<&mut MinuteCounts> {
    let first = minutes.first()?.minute;
    let offset = minute_of(time).duration_since(first).ok()?;
    minutes.get_mut(usize::try_from(offset.as_secs() / 60).ok()?)
}

/// Every minute from the one `start` falls in to the one `end` falls in, counts zero.
pub fn fill_minutes(start: SystemTime, end: SystemTime) -> Vec<MinuteCounts> {
    let mut minutes = Vec::new();
    let mut minute = minute_of(start);
    while minute <= end {
        minutes.push(MinuteCounts {
            minute,
            created: 0,
            completed: 0,
            taken_over: 0,
        });
        minute += Duration::from_secs(60);
    }
    minutes
}

/// Why an operator changes something: 1–500 characters without control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason(String);

impl Reason {
    pub const MAX_CHARS: usize = 500;

    pub fn parse(value: String) -> Result<Self, String> {
        let chars = value.chars().count();
        if value.trim().is_empty() {
            return Err("is required: say why (1-500 characters)".into());
        }
        if chars > Self::MAX_CHARS {
            return Err(format!(
                "must be at most {} characters, got {chars}",
                Self::MAX_CHARS
            ));
        }
        if value.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Who asked for an admin change, as the audit log names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

/// Delete one record (`PurgeRecord`) or end its lease (`ForceRelease`).
#[derive(Debug, Clone)]
pub struct RecordChange {
    pub namespace: Namespace,
    pub key: Key,
    pub reason: Reason,
    /// Change only if the record's fencing token is this one.
    pub expected_fencing_token: Option<u64>,
    pub actor: Actor,
}

/// Count or delete the records matching `filter` (`PurgeRecords`).
#[derive(Debug, Clone)]
pub struct BulkPurge {
    pub filter: RecordFilter,
    pub reason: Reason,
    pub dry_run: bool,
    pub limit: u32,
    pub actor: Actor,
}

/// What an audit entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditAction {
    PurgeRecord,
    ForceRelease,
    PurgeRecords,
}

impl AuditAction {
    pub fn name(self) -> &'static str {
        match self {
            AuditAction::PurgeRecord => "PurgeRecord",
            AuditAction::ForceRelease => "ForceRelease",
            AuditAction::PurgeRecords => "PurgeRecords",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [
            AuditAction::PurgeRecord,
            AuditAction::ForceRelease,
            AuditAction::PurgeRecords,
        ]
        .into_iter()
        .find(|action| action.name() == name)
    }
}

/// One admin change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: u64,
    pub time: SystemTime,
    pub caller: String,
    pub action: AuditAction,
    pub namespace: Namespace,
    /// The key changed; `None` for a bulk purge.
    pub key: Option<Key>,
    /// The filter of a bulk purge, as text.
    pub filter: Option<String>,
    pub reason: String,
    pub count: u64,
    pub state_before: Option<RecordState>,
    pub fencing_token_before: Option<u64>,
}

/// A page of a namespace's audit entries, newest first, after entry `before_id`.
#[derive(Debug, Clone)]
pub struct ListAuditQuery {
    pub namespace: Namespace,
    /// Only entries with a smaller id (the previous page's last); `None` for the first page.
    pub before_id: Option<u64>,
    pub page_size: u32,
}

/// A page of audit entries and whether more follow.
#[derive(Debug, Clone)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Set when another page may follow: the id of the page's last entry.
    pub next_before_id: Option<u64>,
}

/// Why an admin change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRejection {
    /// No live record for the key.
    NotFound,
    /// The record's fencing token is not the expected one.
    StaleRecord,
    /// ForceRelease of a completed record.
    RecordCompleted,
}

/// Checks an admin change against the record it targets (`None` or not live: absent).
pub fn decide_change(
    existing: Option<&Record>,
    change: &RecordChange,
    now: SystemTime,
    needs_in_progress: bool,
) -> Result<(), AdminRejection> {
    let Some(record) = existing.filter(|record| record.is_live(now)) else {
        return Err(AdminRejection::NotFound);
    };
    if change
        .expected_fencing_token
        .is_some_and(|expected| expected != record.fencing_token)
    {
        return Err(AdminRejection::StaleRecord);
    }
    if needs_in_progress && record.state == RecordState::Completed {
        return Err(AdminRejection::RecordCompleted);
    }
    Ok(())
}
