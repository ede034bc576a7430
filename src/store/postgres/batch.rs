//! Adaptive batching: the Acquires (and, separately, the Completes) waiting at the same moment go
//! to PostgreSQL as one statement and one commit, so under load the database spends far fewer
//! statements and commits per request than one-statement-per-request SQL.
//!
//! There is no added delay. Each kind of command has a few batch slots. A command that finds a
//! free slot and nobody queued runs at once, alone, on its own task, by the ordinary one-command
//! path. Only while every slot is busy do newcomers queue; a slot that frees up takes everything
//! queued (up to the batch size) as the next batch, on a worker task that keeps going while the
//! queue is not empty. A batch is sorted by (namespace, key), so batches on every replica touch
//! rows in one global order. The callers whose commands the batch statement settled get their
//! answers as soon as it commits. Whatever it does not settle (a key that already exists, the same
//! key twice in one batch, a refused Complete, a deadlock) goes back to its caller, which runs it
//! by the one-command path on a pooled connection of its own, within its own deadline: it decides
//! and explains it exactly as without batching, and one slow key holds up nobody else.

use std::{
    collections::VecDeque,
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use deadpool_postgres::Object;
use tokio::{sync::oneshot, time::Instant};
use tokio_postgres::{error::SqlState, types::ToSql};

use super::errors::from_db;
use super::row::{micros, record_from_row};
use super::sql::{ACQUIRE_BATCH, AFTER_RECORD, COMPLETE_BATCH};
use super::{acquire_on, complete_on, Guarded, PostgresStore};
use crate::domain::{AcquireCommand, AcquireOutcome, CompleteCommand, LeaseToken, Record};
use crate::store::StoreError;
use crate::telemetry::metrics;

/// A command that can share a statement with others of its kind.
pub trait Batched: Send + Sync + Sized + 'static {
    type Output: Send + 'static;
    /// The metric label of this kind of command.
    const NAME: &'static str;

    /// The row the command touches: batches are sorted by it.
    fn row(&self) -> (&str, &str);

    /// The ordinary one-command path, which settles every case.
    fn one(
        &self,
        store: &PostgresStore,
        client: &Object,
    ) -> impl Future<Output = Result<Self::Output, StoreError>> + Send;

    /// One statement for all of `commands` (at least two, sorted by row): `Some` for each command
    /// it settled, `None` for each left to the one-command path.
    fn many(
        commands: &[&Self],
        client: &Object,
    ) -> impl Future<Output = Result<Vec<Option<Self::Output>>, StoreError>> + Send;
}

/// One queued command and where its answer goes.
struct Job<C: Batched> {
    command: C,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Reply<C>>,
}

/// What a batch tells a queued caller.
enum Reply<C: Batched> {
    /// The batch settled the command (or failed as a whole).
    Settled(Result<C::Output, StoreError>),
    /// The batch statement left the command to the one-command path: the caller runs it.
    Alone(C),
}

struct Queue<C: Batched> {
    jobs: VecDeque<Job<C>>,
    free_slots: usize,
}

/// The batch slots and queue of one kind of command.
pub struct Batcher<C: Batched> {
    queue: Mutex<Queue<C>>,
    max_batch: usize,
    /// Statements that carried more than one command.
    shared: AtomicU64,
}

impl<C: Batched> Batcher<C> {
    pub fn new(max_batch: usize, slots: usize) -> Self {
        Self {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                free_slots: slots.max(1),
            }),
            max_batch: max_batch.max(1),
            shared: AtomicU64::new(0),
        }
    }

    /// How many statements carried more than one command.
    pub fn shared_batches(&self) -> u64 {
        self.shared.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<C>> {
        // The lock guards plain data and no code under it can panic midway; a poisoned lock
        // still holds a consistent queue.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `command`, alone at once if a slot is free and nobody waits, else in the next batch.
    pub async fn run(
        self: &Arc<Self>,
        store: &PostgresStore,
        command: C,
        deadline: Option<Instant>,
    ) -> Result<C::Output, StoreError> {
        let queued = {
            let mut queue = self.lock();
            if queue.free_slots > 0 && queue.jobs.is_empty() {
                queue.free_slots -= 1;
                Err(command)
            } else {
                let (reply, answer) = oneshot::channel();
                queue.jobs.push_back(Job {
                    command,
                    deadline,
                    reply,
                });
                let start_worker = queue.free_slots > 0;
                if start_worker {
                    queue.free_slots -= 1;
                }
                Ok((answer, start_worker))
            }
        };
        let command = match queued {
            Ok((answer, start_worker)) => {
                return self
                    .await_batch(store, answer, start_worker, deadline)
                    .await
            }
            Err(command) => command,
        };
        // Alone. The guard hands the slot on (to a worker for whatever queued meanwhile) however
        // this ends, even if the caller gives up and this future is dropped.
        let _slot = Slot {
            batcher: self.clone(),
            store: store.clone(),
        };
        on_connection!(store, deadline, |client| command.one(store, &client))
    }

    async fn await_batch(
        self: &Arc<Self>,
        store: &PostgresStore,
        answer: oneshot::Receiver<Reply<C>>,
        start_worker: bool,
        deadline: Option<Instant>,
    ) -> Result<C::Output, StoreError> {
        if start_worker {
            self.spawn_worker(store);
        }
        let answer = match deadline {
            // The batch runs on; only this caller stops waiting for it.
            Some(deadline) => tokio::time::timeout_at(deadline, answer)
                .await
                .map_err(|_| StoreError::DeadlineExceeded)?,
            None => answer.await,
        };
        let reply = answer
            .map_err(|_| StoreError::Internal("the batch carrying this command was lost".into()))?;
        match reply {
            Reply::Settled(result) => result,
            // Outside the batch slots: the pool bounds these like any other command.
            Reply::Alone(command) => {
                on_connection!(store, deadline, |client| command.one(store, &client))
            }
        }
    }

    /// A slot came free: a worker takes the queue, or the slot goes back.
    fn hand_on(self: &Arc<Self>, store: &PostgresStore) {
        let mut queue = self.lock();
        if queue.jobs.is_empty() || tokio::runtime::Handle::try_current().is_err() {
            queue.free_slots += 1;
        } else {
            drop(queue);
            self.spawn_worker(store);
        }
    }

    /// Runs batches with one slot until the queue is empty, then frees the slot.
    fn spawn_worker(self: &Arc<Self>, store: &PostgresStore) {
        let (batcher, store) = (self.clone(), store.clone());
        tokio::spawn(async move {
            // However the worker ends (the queue is empty, or the task is aborted or panics), the
            // guard hands its slot on: to a new worker if jobs queued meanwhile, else back.
            let _slot = Slot {
                batcher: batcher.clone(),
                store: store.clone(),
            };
            loop {
                let batch = {
                    let mut queue = batcher.lock();
                    let mut batch = Vec::new();
                    while batch.len() < batcher.max_batch {
                        let Some(job) = queue.jobs.pop_front() else {
                            break;
                        };
                        // Its caller gave up before the batch formed: it never runs.
                        if !job.reply.is_closed() {
                            batch.push(job);
                        }
                    }
                    if batch.is_empty() {
                        return;
                    }
                    batch
                };
                batcher.execute(&store, batch).await;
            }
        });
    }

    async fn execute(&self, store: &PostgresStore, mut batch: Vec<Job<C>>) {
        batch.sort_by(|a, b| a.command.row().cmp(&b.command.row()));
        if batch.len() > 1 {
            self.shared.fetch_add(1, Ordering::Relaxed);
        }
        metrics::store_batch(C::NAME, batch.len());
        // Callers' deadlines reach the database: once every caller of the batch has stopped
        // waiting, the statement is cancelled. (While one still waits, the others' commands may
        // commit after they gave up, exactly like a command whose answer was lost.)
        let deadline = if batch.iter().all(|job| job.deadline.is_some()) {
            batch.iter().filter_map(|job| job.deadline).max()
        } else {
            None
        };
        if batch.len() == 1 {
            if let Some(job) = batch.pop() {
                let outcome = async {
                    on_connection!(store, deadline, |client| job.command.one(store, &client))
                }
                .await;
                let _ = job.reply.send(Reply::Settled(outcome));
            }
            return;
        }
        let commands: Vec<&C> = batch.iter().map(|job| &job.command).collect();
        let outcome =
            async { on_connection!(store, deadline, |client| C::many(&commands, &client)) }.await;
        drop(commands);
        match outcome {
            Ok(results) => {
                let mut results = results.into_iter();
                for job in batch {
                    let reply = match results.next().flatten() {
                        Some(output) => Reply::Settled(Ok(output)),
                        None => Reply::Alone(job.command),
                    };
                    let _ = job.reply.send(reply);
                }
            }
            Err(error) => {
                for job in batch {
                    let _ = job.reply.send(Reply::Settled(Err(error.clone())));
                }
            }
        }
    }
}

/// A batch slot held by a command running alone or by a worker; dropping it hands the slot on.
struct Slot<C: Batched> {
    batcher: Arc<Batcher<C>>,
    store: PostgresStore,
}

impl<C: Batched> Drop for Slot<C> {
    fn drop(&mut self) {
        self.batcher.hand_on(&self.store);
    }
}

/// Runs a batch statement. Batches take their rows in one global order, so they should not
/// deadlock; should PostgreSQL still report a deadlock or a serialization failure, every command
/// goes back to its caller for the one-command path rather than failing.
async fn query_batch(
    client: &Object,
    sql: &str,
    parameters: &[&(dyn ToSql + Sync)],
) -> Result<Option<Vec<tokio_postgres::Row>>, StoreError> {
    let statement = client.prepare_cached(sql).await.map_err(from_db)?;
    let rows = client.query(&statement, parameters).await;
    match rows {
        Ok(rows) => Ok(Some(rows)),
        Err(error)
            if matches!(
                error.code(),
                Some(&SqlState::T_R_DEADLOCK_DETECTED | &SqlState::T_R_SERIALIZATION_FAILURE)
            ) =>
        {
            Ok(None)
        }
        Err(error) => Err(from_db(error)),
    }
}

impl Batched for AcquireCommand {
    type Output = AcquireOutcome;
    const NAME: &'static str = "acquire";

    fn row(&self) -> (&str, &str) {
        (self.namespace.as_str(), self.key.as_str())
    }

    async fn one(
        &self,
        store: &PostgresStore,
        client: &Object,
    ) -> Result<AcquireOutcome, StoreError> {
        acquire_on(client, self, &store.insert_races, &store.completed).await
    }

    async fn many(
        commands: &[&Self],
        client: &Object,
    ) -> Result<Vec<Option<AcquireOutcome>>, StoreError> {
        let tokens = commands
            .iter()
            .map(|_| LeaseToken::generate())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| StoreError::Internal(format!("no randomness: {error}")))?;
        let namespaces: Vec<&str> = commands.iter().map(|c| c.namespace.as_str()).collect();
        let keys: Vec<&str> = commands.iter().map(|c| c.key.as_str()).collect();
        let fingerprints: Vec<&[u8]> = commands.iter().map(|c| c.fingerprint.as_bytes()).collect();
        let token_bytes: Vec<&[u8]> = tokens.iter().map(|t| t.as_bytes().as_slice()).collect();
        let holders: Vec<&str> = commands.iter().map(|c| c.holder.as_str()).collect();
        let ttls: Vec<i64> = commands.iter().map(|c| micros(c.lease_ttl)).collect();
        let retentions: Vec<i64> = commands.iter().map(|c| micros(c.retention)).collect();
        let parameters: [&(dyn ToSql + Sync); 7] = [
            &namespaces,
            &keys,
            &fingerprints,
            &token_bytes,
            &holders,
            &ttls,
            &retentions,
        ];
        let mut settled: Vec<Option<AcquireOutcome>> = commands.iter().map(|_| None).collect();
        let Some(rows) = query_batch(client, ACQUIRE_BATCH, &parameters).await? else {
            return Ok(settled);
        };
        for row in &rows {
            let record = record_from_row(row)?;
            // Lease tokens are random and fresh: the token names the input row.
            let index = tokens.iter().position(|token| *token == record.lease_token);
            if let Some(slot) = index.and_then(|index| settled.get_mut(index)) {
                *slot = Some(AcquireOutcome::Acquired {
                    lease: record.lease(),
                    record,
                    taken_over: false,
                });
            }
        }
        Ok(settled)
    }
}

impl Batched for CompleteCommand {
    type Output = Record;
    const NAME: &'static str = "complete";

    fn row(&self) -> (&str, &str) {
        (self.namespace.as_str(), self.key.as_str())
    }

    async fn one(&self, _store: &PostgresStore, client: &Object) -> Result<Record, StoreError> {
        complete_on(client, self).await
    }

    async fn many(commands: &[&Self], client: &Object) -> Result<Vec<Option<Record>>, StoreError> {
        let namespaces: Vec<&str> = commands.iter().map(|c| c.namespace.as_str()).collect();
        let keys: Vec<&str> = commands.iter().map(|c| c.key.as_str()).collect();
        let tokens: Vec<&[u8]> = commands
            .iter()
            .map(|c| c.lease_token.as_bytes().as_slice())
            .collect();
        let bodies: Vec<&[u8]> = commands.iter().map(|c| c.result.body.as_slice()).collect();
        let codes: Vec<i32> = commands.iter().map(|c| c.result.code).collect();
        // Metadata flattened: command i's pairs are meta_names[starts[i] ..][..counts[i]]
        // (1-based, as SQL arrays are).
        let (mut meta_names, mut meta_values) = (Vec::new(), Vec::new());
        let (mut starts, mut counts) = (Vec::new(), Vec::new());
        for command in commands {
            let start = i32::try_from(meta_names.len() + 1);
            let count = i32::try_from(command.result.metadata.len());
            let (Ok(start), Ok(count)) = (start, count) else {
                return Err(StoreError::Internal(
                    "metadata too large for a batch".into(),
                ));
            };
            starts.push(start);
            counts.push(count);
            for (name, value) in &command.result.metadata {
                meta_names.push(name.as_str());
                meta_values.push(value.as_str());
            }
        }
        let retentions: Vec<Option<i64>> =
            commands.iter().map(|c| c.retention.map(micros)).collect();
        let parameters: [&(dyn ToSql + Sync); 10] = [
            &namespaces,
            &keys,
            &tokens,
            &bodies,
            &codes,
            &meta_names,
            &meta_values,
            &starts,
            &counts,
            &retentions,
        ];
        let mut settled: Vec<Option<Record>> = commands.iter().map(|_| None).collect();
        let Some(rows) = query_batch(client, COMPLETE_BATCH, &parameters).await? else {
            return Ok(settled);
        };
        for row in &rows {
            let position: i32 = row.try_get(AFTER_RECORD + 2).map_err(from_db)?;
            let slot = usize::try_from(position)
                .ok()
                .and_then(|position| settled.get_mut(position));
            if let Some(slot) = slot {
                *slot = Some(record_from_row(row)?);
            }
        }
        Ok(settled)
    }
}
