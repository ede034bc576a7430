//! GetNamespaceStats on PostgreSQL: this replica's per-minute event counts (`store::counts`),
//! added into `idemd_minute_counts` about once a second by one statement, and read back from
//! there plus what this replica has not flushed yet.
//!
//! The hot path only counts in memory. A flush takes the counts out and sends them with the
//! next sequence number of this replica (a random id per process); until PostgreSQL confirms,
//! they stay aside as the unconfirmed flush, which is sent again, unchanged and with the same
//! number, before anything newer: the statement adds a flush's counts only the first time its
//! number arrives (`sql::FLUSH_COUNTS`), so a flush whose answer was lost is not counted twice.
//!
//! A read takes the flush lock shared, a flush exclusively: while GetNamespaceStats reads the
//! table and then this replica's counts, no flush moves counts from one to the other, so each is
//! counted once. What the other replicas have not flushed yet is missing (at most about a
//! second's worth).

use std::time::{Duration, SystemTime};

use deadpool_postgres::Object;
use tokio::sync::RwLock;

use super::connection::Connections;
use super::errors::from_db;
use super::row::micros;
use super::sql;
use crate::domain::admin::{minute_slot, MinuteCounts};
use crate::domain::Namespace;
use crate::store::counts::{
    self, add_minutes, minute_key, minute_time, window_minutes, MinuteCounter, Tally,
};
use crate::store::StoreError;

/// This replica's counts, and its flushes.
pub struct ReplicaCounts {
    /// Counted since the last flush took them.
    pub counter: MinuteCounter,
    /// The replica's id in `idemd_count_flushes`.
    replica: i64,
    flushes: RwLock<Flushes>,
}

#[derive(Default)]
struct Flushes {
    /// The sequence number of the last flush made.
    seq: i64,
    /// The last flush, while PostgreSQL has not confirmed it.
    unconfirmed: Option<Tally>,
}

impl ReplicaCounts {
    pub fn new() -> Result<Self, StoreError> {
        let mut id = [0u8; 8];
        getrandom::fill(&mut id)
            .map_err(|error| StoreError::Internal(format!("no randomness: {error}")))?;
        Ok(Self {
            counter: MinuteCounter::default(),
            replica: i64::from_le_bytes(id),
            flushes: RwLock::new(Flushes::default()),
        })
    }

    /// Sends the unconfirmed flush, if any, then what was counted since, each on a pooled
    /// connection.
    pub async fn flush(&self, connections: &Connections) -> Result<(), StoreError> {
        let mut flushes = self.flushes.write().await;
        // Counts of minutes no window reaches any more are not worth keeping through an outage.
        let kept_from = SystemTime::now()
            .checked_sub(counts::COUNTS_KEPT)
            .map_or(0, minute_key);
        for _ in 0..2 {
            if flushes.unconfirmed.is_none() {
                if self.counter.is_empty() {
                    return Ok(());
                }
                let mut tally = self.counter.take();
                counts::forget_before(&mut tally, kept_from);
                flushes.seq += 1;
                flushes.unconfirmed = Some(tally);
            }
            let seq = flushes.seq;
            if let Some(tally) = &flushes.unconfirmed {
                connections
                    .run(None, async |client| {
                        flush(client, self.replica, seq, tally).await
                    })
                    .await?;
            }
            flushes.unconfirmed = None;
        }
        Ok(())
    }

    /// Per-minute counts of `namespace` over `window`: the table's rows plus this replica's
    /// unflushed counts.
    pub async fn stats(
        &self,
        connections: &Connections,
        namespace: &Namespace,
        window: Duration,
    ) -> Result<Vec<MinuteCounts>, StoreError> {
        let flushes = self.flushes.read().await;
        let (now, rows) = connections
            .run(None, async |client| {
                read_minutes(client, namespace, window).await
            })
            .await?;
        let (mut minutes, first_minute) = window_minutes(window, now);
        for row in rows {
            if let Some(slot) = minute_slot(&mut minutes, row.minute) {
                slot.created = slot.created.saturating_add(row.counts.created);
                slot.completed = slot.completed.saturating_add(row.counts.completed);
                slot.taken_over = slot.taken_over.saturating_add(row.counts.taken_over);
            }
        }
        if let Some(ours) = flushes
            .unconfirmed
            .as_ref()
            .and_then(|tally| tally.get(namespace.as_str()))
        {
            add_minutes(ours, first_minute, &mut minutes);
        }
        self.counter.add_to(namespace, first_minute, &mut minutes);
        Ok(minutes)
    }
}

/// A row of `idemd_minute_counts`.
pub struct StoredMinute {
    pub minute: SystemTime,
    pub counts: counts::Counts,
}

fn to_i64(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

fn to_u64(count: i64) -> u64 {
    u64::try_from(count).unwrap_or(0)
}

/// Runs `sql::FLUSH_COUNTS` for flush `seq` of `replica`.
pub async fn flush(
    client: &Object,
    replica: i64,
    seq: i64,
    tally: &Tally,
) -> Result<(), StoreError> {
    // Sorted by namespace (byte-wise) and minute, the same order on every replica.
    let mut rows: Vec<(&str, u64, counts::Counts)> = tally
        .iter()
        .flat_map(|(namespace, minutes)| {
            minutes
                .iter()
                .map(move |(&minute, &counts)| (namespace.as_str(), minute, counts))
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    rows.sort_unstable_by(|a, b| (a.0.as_bytes(), a.1).cmp(&(b.0.as_bytes(), b.1)));
    let namespaces: Vec<&str> = rows.iter().map(|row| row.0).collect();
    let minutes: Vec<SystemTime> = rows.iter().map(|row| minute_time(row.1)).collect();
    let created: Vec<i64> = rows.iter().map(|row| to_i64(row.2.created)).collect();
    let completed: Vec<i64> = rows.iter().map(|row| to_i64(row.2.completed)).collect();
    let taken_over: Vec<i64> = rows.iter().map(|row| to_i64(row.2.taken_over)).collect();
    let statement = client
        .prepare_cached(sql::FLUSH_COUNTS)
        .await
        .map_err(from_db)?;
    let claimed: bool = client
        .query_one(
            &statement,
            &[
                &replica,
                &seq,
                &namespaces,
                &minutes,
                &created,
                &completed,
                &taken_over,
            ],
        )
        .await
        .map_err(from_db)?
        .try_get(0)
        .map_err(from_db)?;
    if !claimed {
        tracing::debug!(
            replica,
            seq,
            "a flush of counts was applied before (its answer was lost): nothing added"
        );
    }
    Ok(())
}

/// Runs `sql::NAMESPACE_STATS`: the database's time and the namespace's stored minutes.
pub async fn read_minutes(
    client: &Object,
    namespace: &Namespace,
    window: Duration,
) -> Result<(SystemTime, Vec<StoredMinute>), StoreError> {
    let statement = client
        .prepare_cached(sql::NAMESPACE_STATS)
        .await
        .map_err(from_db)?;
    let rows = client
        .query(&statement, &[&namespace.as_str(), &micros(window)])
        .await
        .map_err(from_db)?;
    let mut now = None;
    let mut minutes = Vec::with_capacity(rows.len());
    for row in &rows {
        now = Some(row.try_get::<_, SystemTime>(0).map_err(from_db)?);
        let Some(minute) = row.try_get::<_, Option<SystemTime>>(1).map_err(from_db)? else {
            continue;
        };
        let count = |index| row.try_get::<_, i64>(index).map(to_u64).map_err(from_db);
        minutes.push(StoredMinute {
            minute,
            counts: counts::Counts {
                created: count(2)?,
                completed: count(3)?,
                taken_over: count(4)?,
            },
        });
    }
    let now = now.ok_or_else(|| StoreError::Internal("no row from the stats query".into()))?;
    Ok((now, minutes))
}

/// Deletes minutes older than `counts::COUNTS_KEPT`, and the flush numbers of replicas silent
/// as long. Run by the reaper, under its lock.
pub async fn reap(transaction: &deadpool_postgres::Transaction<'_>) -> Result<(), StoreError> {
    transaction
        .query_one(sql::REAP_COUNTS, &[&micros(counts::COUNTS_KEPT)])
        .await
        .map_err(from_db)?;
    Ok(())
}
