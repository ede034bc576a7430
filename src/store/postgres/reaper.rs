//! The reaper's sweep: deletes expired records a range of blocks at a time, and per-minute
//! counts older than 25 hours, on the replica that holds the reaper lock.

use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::Object;

use super::counts;
use super::errors::from_db;
use super::sql;
use crate::store::StoreError;

/// Blocks (8 KiB each) one step of the reaper scans.
const REAP_STEP_BLOCKS: u64 = 1024;
/// Most blocks one `reap_expired` call scans: 32 MiB (about 100,000 rows, 45 ms of database time
/// on the benchmark box). With a round every 10 s, the sweep gets through any table in turn at a
/// cost per round that does not grow with it.
const REAP_BUDGET_BLOCKS: u64 = 4 * REAP_STEP_BLOCKS;

/// Deletes up to `batch` expired records, sweeping on from block `cursor` (wrapping at the end of
/// the table) until the batch is full, the budget of blocks is spent, or the whole table has been
/// seen. Only the replica holding the reaper lock reaps.
pub async fn reap(client: &mut Object, batch: u32, cursor: &AtomicU64) -> Result<u64, StoreError> {
    let transaction = client.transaction().await.map_err(from_db)?;
    let leader: bool = transaction
        .query_one(sql::REAPER_TRY_LOCK, &[&sql::REAPER_LOCK_KEY])
        .await
        .map_err(from_db)?
        .try_get(0)
        .map_err(from_db)?;
    if !leader {
        return Ok(0);
    }
    // GetNamespaceStats' old minutes: a few rows by index, whatever the records table holds.
    counts::reap(&transaction).await?;
    let batch = u64::from(batch);
    let (mut deleted, mut scanned) = (0u64, 0u64);
    while deleted < batch {
        let start = cursor.load(Ordering::Relaxed);
        let limit = i64::try_from(batch - deleted).unwrap_or(i64::MAX);
        let row = transaction
            .query_one(
                sql::REAP_RANGE,
                &[
                    &(start as i64),
                    &((start + REAP_STEP_BLOCKS) as i64),
                    &limit,
                ],
            )
            .await
            .map_err(from_db)?;
        let offered: i64 = row.try_get(0).map_err(from_db)?;
        let gone: i64 = row.try_get(1).map_err(from_db)?;
        let table_blocks: i64 = row.try_get(2).map_err(from_db)?;
        deleted += gone.max(0) as u64;
        if offered >= limit {
            // The range may hold more: the next call starts here again.
            break;
        }
        let next = start + REAP_STEP_BLOCKS;
        let table_blocks = table_blocks.max(0) as u64;
        cursor.store(
            if next >= table_blocks { 0 } else { next },
            Ordering::Relaxed,
        );
        scanned += REAP_STEP_BLOCKS;
        if scanned >= REAP_BUDGET_BLOCKS || scanned >= table_blocks {
            break;
        }
    }
    transaction.commit().await.map_err(from_db)?;
    Ok(deleted)
}
