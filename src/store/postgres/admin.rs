//! The admin API on PostgreSQL: listings, counts, and audited changes.
//!
//! A change (PurgeRecord, ForceRelease, PurgeRecords) is one transaction: lock the record, let
//! the domain decide, change it, insert the audit entry. If any statement fails, nothing
//! happened: there is no change without its entry.
//!
//! **Purges and the replicas' replay caches.** A replica answers replays of completed records
//! from its cache (`cache`) without asking the database; a purge deletes a completed record early,
//! so every replica must drop it before the purge returns — invalidated, not waited out. NOTIFY
//! alone does not do it: it is delivered asynchronously after commit, so a replica could still
//! answer from its cache right after the purge returned. So a purge, in its transaction, sends an
//! invalidation naming its audit id; every replica's listener drops the record from its cache and
//! then acknowledges on the same connection; the purging replica waits, after commit, until every
//! listener session of the database (found by `application_name` in `pg_stat_activity`) has
//! acknowledged. A listener that does not within `ACK_LIMIT` (a hung replica) has its session
//! terminated: its replica stops hearing invalidations, and empties its cache when it listens
//! again (`listener`). A read under way during the invalidation cannot put the record back
//! (`CompletedRecords::remember` checks the cache's generation).
//!
//! What this cannot cover: a replica cut off from the database keeps answering replays from its
//! cache (that is the cache's point during an outage) and hears of a purge made meanwhile only
//! when its listener reconnects — within about 5 s (the listener's backoff) of the database being
//! reachable again. ForceRelease needs no invalidation: only completed records are cached, and
//! ForceRelease refuses them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_postgres::Object;
use tokio_postgres::{types::ToSql, Row};

use super::errors::from_db;
use super::listener::{Acks, Expected};
use super::row::{db_now, record_from_row};
use super::sql;
use crate::domain::admin::{
    decide_change, AuditAction, AuditEntry, AuditPage, BulkPurge, ListAuditQuery, ListRecordsQuery,
    NamespaceSummary, RecordChange, RecordFilter, RecordPage, RecordPosition,
};
use crate::domain::{Key, Namespace, Record, RecordState};
use crate::store::StoreError;

/// How long a purge waits for every replica's listener to acknowledge its invalidation before
/// it terminates the sessions of those that did not.
pub const ACK_LIMIT: Duration = Duration::from_secs(2);

fn state_code(state: RecordState) -> i16 {
    match state {
        RecordState::InProgress => 1,
        RecordState::Completed => 2,
    }
}

/// The parameters $1..$7 of `sql::record_filter!`.
struct FilterParams {
    namespace: String,
    states: Vec<i16>,
    key_prefix: String,
    holder: Option<String>,
    stuck_only: bool,
    created_after: Option<SystemTime>,
    created_before: Option<SystemTime>,
}

impl FilterParams {
    fn of(filter: &RecordFilter) -> Self {
        Self {
            namespace: filter.namespace.as_str().to_string(),
            states: filter.states.iter().copied().map(state_code).collect(),
            key_prefix: filter.key_prefix.clone(),
            holder: filter.holder.clone(),
            stuck_only: filter.stuck_only,
            created_after: filter.created_after,
            created_before: filter.created_before,
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.namespace,
            &self.states,
            &self.key_prefix,
            &self.holder,
            &self.stuck_only,
            &self.created_after,
            &self.created_before,
        ]
    }
}

pub async fn list_records(
    client: &Object,
    query: &ListRecordsQuery,
) -> Result<RecordPage, StoreError> {
    let filter = FilterParams::of(&query.filter);
    // One more than a page, to know whether another follows.
    let limit = i64::from(query.page_size) + 1;
    let mut params = filter.params();
    params.push(&limit);
    let after_time;
    let after_key;
    let statement = match &query.after {
        None => sql::LIST_RECORDS_FIRST,
        Some(position) => {
            after_time = position.created_at;
            after_key = position.key.as_str().to_string();
            params.push(&after_time);
            params.push(&after_key);
            sql::LIST_RECORDS_AFTER
        }
    };
    let statement = client.prepare_cached(statement).await.map_err(from_db)?;
    let rows = client.query(&statement, &params).await.map_err(from_db)?;
    let mut records = rows
        .iter()
        .map(record_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let more = records.len() > query.page_size as usize;
    records.truncate(query.page_size as usize);
    let next = more
        .then(|| records.last().map(RecordPosition::of))
        .flatten();
    Ok(RecordPage { records, next })
}

fn count(row: &Row, index: usize) -> Result<u64, StoreError> {
    let value: i64 = row.try_get(index).map_err(from_db)?;
    u64::try_from(value).map_err(|_| StoreError::Internal("negative count".into()))
}

fn namespace(text: String) -> Result<Namespace, StoreError> {
    Namespace::parse(text)
        .map_err(|_| StoreError::Internal("unexpected value in a namespace column".into()))
}

pub async fn list_namespaces(client: &Object) -> Result<Vec<NamespaceSummary>, StoreError> {
    let statement = client
        .prepare_cached(sql::LIST_NAMESPACES)
        .await
        .map_err(from_db)?;
    let rows = client.query(&statement, &[]).await.map_err(from_db)?;
    rows.iter()
        .map(|row| {
            Ok(NamespaceSummary {
                namespace: namespace(row.try_get(0).map_err(from_db)?)?,
                in_progress: count(row, 1)?,
                completed: count(row, 2)?,
                stuck: count(row, 3)?,
                oldest_in_progress: row.try_get(4).map_err(from_db)?,
            })
        })
        .collect()
}

/// Inserts the audit entry of a change in its transaction; returns its id.
#[allow(clippy::too_many_arguments)]
async fn insert_audit(
    transaction: &deadpool_postgres::Transaction<'_>,
    caller: &str,
    action: AuditAction,
    namespace: &Namespace,
    key: Option<&Key>,
    filter: Option<&str>,
    reason: &str,
    count: u64,
    before: Option<&Record>,
) -> Result<i64, StoreError> {
    let statement = transaction
        .prepare_cached(sql::INSERT_AUDIT)
        .await
        .map_err(from_db)?;
    let count = i64::try_from(count).unwrap_or(i64::MAX);
    let state_before = before.map(|record| state_code(record.state));
    let fencing_before =
        before.map(|record| i64::try_from(record.fencing_token).unwrap_or(i64::MAX));
    let row = transaction
        .query_one(
            &statement,
            &[
                &caller,
                &action.name(),
                &namespace.as_str(),
                &key.map(Key::as_str),
                &filter,
                &reason,
                &count,
                &state_before,
                &fencing_before,
            ],
        )
        .await
        .map_err(from_db)?;
    row.try_get(0).map_err(from_db)
}

/// PurgeRecord or ForceRelease in one transaction. Returns the record (as it was, for a purge;
/// as it is now, for a release) and, for a purge, its invalidation, whose acknowledgements the
/// caller then awaits.
pub async fn change_record(
    client: &mut Object,
    change: &RecordChange,
    action: AuditAction,
    acks: &Arc<Acks>,
) -> Result<(Record, Option<Expected>), StoreError> {
    let (namespace, key) = (change.namespace.as_str(), change.key.as_str());
    let transaction = client.transaction().await.map_err(from_db)?;
    let lock = transaction
        .prepare_cached(sql::LOCK_RECORD)
        .await
        .map_err(from_db)?;
    let rows = transaction
        .query(&lock, &[&namespace, &key])
        .await
        .map_err(from_db)?;
    let (existing, now) = match rows.first() {
        Some(row) => (Some(record_from_row(row)?), db_now(row, sql::AFTER_RECORD)?),
        None => {
            let now = transaction
                .query_one(sql::DB_NOW, &[])
                .await
                .map_err(from_db)?;
            (None, db_now(&now, 0)?)
        }
    };
    decide_change(
        existing.as_ref(),
        change,
        now,
        action == AuditAction::ForceRelease,
    )?;
    let before = existing.ok_or(StoreError::Internal("decided on a missing record".into()))?;
    let after = if action == AuditAction::PurgeRecord {
        let delete = transaction
            .prepare_cached(sql::DELETE_RECORD)
            .await
            .map_err(from_db)?;
        transaction
            .execute(&delete, &[&namespace, &key])
            .await
            .map_err(from_db)?;
        before.clone()
    } else {
        let release = transaction
            .prepare_cached(sql::FORCE_RELEASE)
            .await
            .map_err(from_db)?;
        let row = transaction
            .query_one(&release, &[&namespace, &key])
            .await
            .map_err(from_db)?;
        record_from_row(&row)?
    };
    let id = insert_audit(
        &transaction,
        &change.actor.0,
        action,
        &change.namespace,
        Some(&change.key),
        None,
        change.reason.as_str(),
        1,
        Some(&before),
    )
    .await?;
    // The key is free now (or gone): every replica's Waits on it look again.
    transaction
        .execute(sql::NOTIFY_CHANGED, &[&namespace, &key])
        .await
        .map_err(from_db)?;
    let invalidation = if action == AuditAction::PurgeRecord {
        transaction
            .execute(
                sql::NOTIFY_INVALIDATE,
                &[&format!("{id} {namespace}/{key}")],
            )
            .await
            .map_err(from_db)?;
        Some(acks.expect(id))
    } else {
        None
    };
    transaction.commit().await.map_err(from_db)?;
    Ok((after, invalidation))
}

/// PurgeRecords: a dry run counts; a real run deletes and writes its audit entry in one
/// transaction, and returns its invalidation (every cached record, `*`) when it deleted any.
pub async fn purge_records(
    client: &mut Object,
    purge: &BulkPurge,
    acks: &Arc<Acks>,
) -> Result<(u64, Option<Expected>), StoreError> {
    let filter = FilterParams::of(&purge.filter);
    let limit = i64::from(purge.limit);
    let mut params = filter.params();
    params.push(&limit);
    if purge.dry_run {
        let statement = client
            .prepare_cached(sql::COUNT_MATCHING)
            .await
            .map_err(from_db)?;
        let row = client
            .query_one(&statement, &params)
            .await
            .map_err(from_db)?;
        return Ok((count(&row, 0)?, None));
    }
    let transaction = client.transaction().await.map_err(from_db)?;
    let statement = transaction
        .prepare_cached(sql::PURGE_MATCHING)
        .await
        .map_err(from_db)?;
    let deleted = transaction
        .query(&statement, &params)
        .await
        .map_err(from_db)?
        .len() as u64;
    let id = insert_audit(
        &transaction,
        &purge.actor.0,
        AuditAction::PurgeRecords,
        &purge.filter.namespace,
        None,
        Some(&purge.filter.describe()),
        purge.reason.as_str(),
        deleted,
        None,
    )
    .await?;
    let invalidation = if deleted > 0 {
        transaction
            .execute(sql::NOTIFY_INVALIDATE, &[&format!("{id} *")])
            .await
            .map_err(from_db)?;
        Some(acks.expect(id))
    } else {
        None
    };
    transaction.commit().await.map_err(from_db)?;
    Ok((deleted, invalidation))
}

/// The listener sessions that must acknowledge an invalidation committed just before.
pub async fn listener_sessions(client: &Object) -> Result<Vec<i32>, StoreError> {
    let rows = client
        .query(sql::LISTENER_SESSIONS, &[&sql::LISTENER_APPLICATION_NAME])
        .await
        .map_err(from_db)?;
    rows.iter()
        .map(|row| row.try_get(0).map_err(from_db))
        .collect()
}

/// Ends listener sessions that did not acknowledge in time.
pub async fn terminate_listeners(client: &Object, sessions: &[i32]) -> Result<(), StoreError> {
    for session in sessions {
        client
            .execute(sql::TERMINATE_LISTENER, &[session])
            .await
            .map_err(from_db)?;
    }
    Ok(())
}

pub async fn list_audit(client: &Object, query: &ListAuditQuery) -> Result<AuditPage, StoreError> {
    let statement = client
        .prepare_cached(sql::LIST_AUDIT)
        .await
        .map_err(from_db)?;
    let before = query
        .before_id
        .map(|id| i64::try_from(id).unwrap_or(i64::MAX));
    let limit = i64::from(query.page_size) + 1;
    let rows = client
        .query(&statement, &[&query.namespace.as_str(), &before, &limit])
        .await
        .map_err(from_db)?;
    let mut entries = rows
        .iter()
        .map(audit_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let more = entries.len() > query.page_size as usize;
    entries.truncate(query.page_size as usize);
    let next_before_id = more.then(|| entries.last().map(|entry| entry.id)).flatten();
    Ok(AuditPage {
        entries,
        next_before_id,
    })
}

fn audit_from_row(row: &Row) -> Result<AuditEntry, StoreError> {
    let corrupt =
        |what: &str| StoreError::Internal(format!("unexpected value in idemd_audit.{what}"));
    let id: i64 = row.try_get(0).map_err(from_db)?;
    let action: String = row.try_get(3).map_err(from_db)?;
    let key: Option<String> = row.try_get(5).map_err(from_db)?;
    let state_before: Option<i16> = row.try_get(9).map_err(from_db)?;
    let fencing_before: Option<i64> = row.try_get(10).map_err(from_db)?;
    Ok(AuditEntry {
        id: u64::try_from(id).map_err(|_| corrupt("id"))?,
        time: row.try_get(1).map_err(from_db)?,
        caller: row.try_get(2).map_err(from_db)?,
        action: AuditAction::parse(&action).ok_or_else(|| corrupt("action"))?,
        namespace: namespace(row.try_get(4).map_err(from_db)?)?,
        key: key
            .map(|key| Key::parse(key).map_err(|_| corrupt("key")))
            .transpose()?,
        filter: row.try_get(6).map_err(from_db)?,
        reason: row.try_get(7).map_err(from_db)?,
        count: count(row, 8)?,
        state_before: match state_before {
            None => None,
            Some(1) => Some(RecordState::InProgress),
            Some(2) => Some(RecordState::Completed),
            Some(_) => return Err(corrupt("state_before")),
        },
        fencing_token_before: fencing_before
            .map(|token| u64::try_from(token).map_err(|_| corrupt("fencing_token_before")))
            .transpose()?,
    })
}
