//! Adaptive batching of Completes: the Completes waiting at the same moment go to PostgreSQL as
//! one statement and one commit. There is no added delay: a Complete that finds a free batch slot
//! goes at once, alone; only while every slot is busy do the newcomers queue, and the next batch
//! takes them all. A Complete the batch statement does not apply (a refusal, or the same key twice
//! in one batch) takes the ordinary one-by-one path, which decides and explains it.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_postgres::types::ToSql;

use super::errors::from_db;
use super::row::{micros, record_from_row};
use super::sql::COMPLETE_BATCH;
use super::{complete_on, Guarded, PostgresStore};
use crate::domain::{CompleteCommand, Record};
use crate::store::StoreError;

/// One Complete waiting for its batch.
pub struct CompleteJob {
    pub command: CompleteCommand,
    /// The caller's deadline, if it set one.
    pub deadline: Option<tokio::time::Instant>,
    pub reply: oneshot::Sender<Result<Record, StoreError>>,
}

/// Forms batches from `jobs` and runs at most `slots` of them at once.
pub async fn run(
    store: PostgresStore,
    mut jobs: mpsc::Receiver<CompleteJob>,
    max_batch: usize,
    slots: usize,
) {
    let slots = Arc::new(Semaphore::new(slots.max(1)));
    while let Some(first) = jobs.recv().await {
        // Wait for a free slot first: while all are busy, newcomers queue and join this batch.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if batch.len() > 1 {
            store
                .shared_batches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let store = store.clone();
        tokio::spawn(async move {
            let _permit = permit;
            execute(&store, batch).await;
        });
    }
}

async fn execute(store: &PostgresStore, batch: Vec<CompleteJob>) {
    // Callers' deadlines reach the database: once every caller of the batch has stopped waiting,
    // the statement is cancelled. (While one still waits, the others' Completes may commit after
    // they gave up, exactly like a Complete whose answer was lost; a retry returns the record.)
    let deadline = if batch.iter().all(|job| job.deadline.is_some()) {
        batch.iter().filter_map(|job| job.deadline).max()
    } else {
        None
    };
    let outcome = async { on_connection!(store, deadline, |client| apply(&client, &batch)) }.await;
    match outcome {
        Ok(results) => {
            for (job, result) in batch.into_iter().zip(results) {
                let _ = job.reply.send(result);
            }
        }
        Err(error) => {
            let message = error.to_string();
            for job in batch {
                let _ = job.reply.send(Err(match &error {
                    StoreError::Unavailable(_) => StoreError::Unavailable(message.clone()),
                    StoreError::DeadlineExceeded => StoreError::DeadlineExceeded,
                    _ => StoreError::Internal(message.clone()),
                }));
            }
        }
    }
}

/// Runs the batch statement, then the one-by-one path for whatever it did not apply.
async fn apply(
    client: &Guarded,
    batch: &[CompleteJob],
) -> Result<Vec<Result<Record, StoreError>>, StoreError> {
    let mut namespaces = Vec::with_capacity(batch.len());
    let mut keys = Vec::with_capacity(batch.len());
    let mut tokens = Vec::with_capacity(batch.len());
    let mut bodies = Vec::with_capacity(batch.len());
    let mut codes = Vec::with_capacity(batch.len());
    let mut metadata = Vec::with_capacity(batch.len());
    let mut retentions = Vec::with_capacity(batch.len());
    let mut positions = Vec::with_capacity(batch.len());
    for (position, job) in batch.iter().enumerate() {
        let command = &job.command;
        namespaces.push(command.namespace.as_str());
        keys.push(command.key.as_str());
        tokens.push(command.lease_token.as_bytes().as_slice());
        bodies.push(command.result.body.as_slice());
        codes.push(command.result.code);
        let (names, values): (Vec<&str>, Vec<&str>) = command
            .result
            .metadata
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .unzip();
        metadata.push(
            serde_json::to_string(&(names, values))
                .map_err(|error| StoreError::Internal(format!("metadata: {error}")))?,
        );
        retentions.push(command.retention.map(micros));
        positions.push(i32::try_from(position).unwrap_or(i32::MAX));
    }
    let statement = client
        .prepare_cached(COMPLETE_BATCH)
        .await
        .map_err(from_db)?;
    let parameters: [&(dyn ToSql + Sync); 8] = [
        &namespaces,
        &keys,
        &tokens,
        &bodies,
        &codes,
        &metadata,
        &retentions,
        &positions,
    ];
    let rows = client
        .query(&statement, &parameters)
        .await
        .map_err(from_db)?;
    let mut results: Vec<Option<Result<Record, StoreError>>> = batch.iter().map(|_| None).collect();
    for row in &rows {
        let position: i32 = row.try_get(super::sql::AFTER_RECORD + 2).map_err(from_db)?;
        if let Some(slot) = usize::try_from(position)
            .ok()
            .and_then(|p| results.get_mut(p))
        {
            *slot = Some(record_from_row(row));
        }
    }
    let mut settled = Vec::with_capacity(batch.len());
    for (job, result) in batch.iter().zip(results) {
        settled.push(match result {
            Some(result) => result,
            None => complete_on(client, &job.command).await,
        });
    }
    Ok(settled)
}
