//! Adaptive batching: the Acquires (and, separately, the Completes) waiting at the same moment go
//! to PostgreSQL as one statement and one commit, so under load the database spends far fewer
//! statements and commits per request than one-statement-per-request SQL.
//!
//! There is no added delay. Each kind of command has a few batch slots. A command that finds a
//! free slot and nobody queued runs at once, alone, in the caller's task, by the ordinary
//! one-command path. Only while every slot is busy do newcomers queue; a slot that frees up takes
//! everything queued (up to the batch size) as the next batch, on a worker task that keeps going
//! while the queue is not empty. One worker at most drains the queue: a slot that frees up while
//! it runs takes a single waiter, alone, and otherwise leaves the queue to it, so that under load
//! the queue goes in as few statements (and commits) as possible, while at low load nobody waits
//! behind a batch when a slot is free. A batch is sorted by (namespace, key), so batches on every
//! replica touch rows in one global order. The callers whose commands the batch statement settled get their
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

use super::connection::Connections;
use crate::store::StoreError;
use crate::telemetry::{metrics, traces};

/// A kind of command that can share a statement with others of its kind (its statements are in
/// `commands`).
pub trait Batched: Send + Sync + 'static {
    type Command: Send + Sync + 'static;
    type Output: Send + 'static;
    /// The metric label of this kind of command.
    const NAME: &'static str;

    /// The row the command touches: batches are sorted by it.
    fn row(command: &Self::Command) -> (&str, &str);

    /// The ordinary one-command path, which settles every case.
    fn one(
        &self,
        command: &Self::Command,
        client: &Object,
    ) -> impl Future<Output = Result<Self::Output, StoreError>> + Send;

    /// One statement for all of `commands` (at least two, sorted by row): `Some` for each command
    /// it settled, `None` for each left to the one-command path.
    fn many(
        &self,
        commands: &[&Self::Command],
        client: &Object,
    ) -> impl Future<Output = Result<Vec<Option<Self::Output>>, StoreError>> + Send;
}

/// One queued command and where its answer goes.
struct Job<K: Batched> {
    command: K::Command,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Reply<K>>,
}

/// What a batch tells a queued caller.
enum Reply<K: Batched> {
    /// The batch of this many commands settled the command (or failed as a whole).
    Settled(Result<K::Output, StoreError>, usize),
    /// The batch statement (of this many commands) left the command to the one-command path:
    /// the caller runs it.
    Alone(K::Command, usize),
}

struct Queue<K: Batched> {
    jobs: VecDeque<Job<K>>,
    free_slots: usize,
    /// A worker is draining the queue (on one of the slots). There is never more than one: the
    /// other slots serve commands that find nobody queued, or a single waiter, so under load the
    /// queue goes in as few statements as possible.
    draining: bool,
}

/// The batch slots and queue of one kind of command, and the connections its statements run on.
pub struct Batcher<K: Batched> {
    kind: K,
    connections: Connections,
    queue: Mutex<Queue<K>>,
    max_batch: usize,
    /// Statements that carried more than one command.
    shared: AtomicU64,
}

impl<K: Batched> Batcher<K> {
    /// Batches of up to `max_batch` commands of `kind`, `slots` statements of them at once.
    pub fn new(kind: K, connections: Connections, max_batch: usize, slots: usize) -> Self {
        Self {
            kind,
            connections,
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                free_slots: slots.max(1),
                draining: false,
            }),
            max_batch: max_batch.max(1),
            shared: AtomicU64::new(0),
        }
    }

    /// How many statements carried more than one command.
    pub fn shared_batches(&self) -> u64 {
        self.shared.load(Ordering::Relaxed)
    }

    /// How many commands wait in the queue now.
    pub fn queued(&self) -> usize {
        self.lock().jobs.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<K>> {
        // The lock guards plain data and no code under it can panic midway; a poisoned lock
        // still holds a consistent queue.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `command`, alone at once if a slot is free and nobody waits, else in the next batch.
    pub async fn run(
        self: &Arc<Self>,
        command: K::Command,
        deadline: Option<Instant>,
    ) -> Result<K::Output, StoreError> {
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
                let start_worker = queue.free_slots > 0 && !queue.draining;
                if start_worker {
                    queue.free_slots -= 1;
                    queue.draining = true;
                }
                Ok((answer, start_worker))
            }
        };
        let command = match queued {
            Ok((answer, start_worker)) => {
                return self.await_batch(answer, start_worker, deadline).await
            }
            Err(command) => command,
        };
        batch_size(1);
        // Alone. The guard hands the slot on (to a worker for whatever queued meanwhile) however
        // this ends, even if the caller gives up and this future is dropped.
        let _slot = Slot(self.clone(), false);
        self.one(command, deadline).await
    }

    /// Runs `command` by the one-command path, on a pooled connection of its own.
    async fn one(
        &self,
        command: K::Command,
        deadline: Option<Instant>,
    ) -> Result<K::Output, StoreError> {
        self.connections
            .run(deadline, async |client| {
                self.kind.one(&command, client).await
            })
            .await
    }

    async fn await_batch(
        self: &Arc<Self>,
        answer: oneshot::Receiver<Reply<K>>,
        start_worker: bool,
        deadline: Option<Instant>,
    ) -> Result<K::Output, StoreError> {
        if start_worker {
            self.spawn_worker();
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
            Reply::Settled(result, size) => {
                batch_size(size);
                result
            }
            // Outside the batch slots: the pool bounds these like any other command.
            Reply::Alone(command, size) => {
                batch_size(size);
                self.one(command, deadline).await
            }
        }
    }

    /// A slot came free (`worker`: the draining worker's): a worker takes the queue if none
    /// drains it, else a single waiter runs alone on it, else the slot goes back.
    fn hand_on(self: &Arc<Self>, worker: bool) {
        let mut queue = self.lock();
        if worker {
            queue.draining = false;
        }
        if queue.jobs.is_empty() || tokio::runtime::Handle::try_current().is_err() {
            queue.free_slots += 1;
        } else if !queue.draining {
            queue.draining = true;
            drop(queue);
            self.spawn_worker();
        } else if queue.jobs.len() == 1 {
            // A lone waiter behind a running batch: it goes now, alone, on this slot.
            let job = queue.jobs.pop_front();
            drop(queue);
            if let Some(job) = job {
                self.spawn_single(job);
            }
        } else {
            queue.free_slots += 1;
        }
    }

    /// Runs one queued job alone on a slot it takes over.
    fn spawn_single(self: &Arc<Self>, job: Job<K>) {
        let batcher = self.clone();
        tokio::spawn(async move {
            let _slot = Slot(batcher.clone(), false);
            if !job.reply.is_closed() {
                batcher.execute(vec![job]).await;
            }
        });
    }

    /// Runs batches with one slot until the queue is empty, then frees the slot.
    fn spawn_worker(self: &Arc<Self>) {
        let batcher = self.clone();
        tokio::spawn(async move {
            // However the worker ends (the queue is empty, or the task is aborted or panics), the
            // guard hands its slot on: to a new worker if jobs queued meanwhile, else back.
            let _slot = Slot(batcher.clone(), true);
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
                batcher.execute(batch).await;
            }
        });
    }

    async fn execute(&self, mut batch: Vec<Job<K>>) {
        batch.sort_by(|a, b| K::row(&a.command).cmp(&K::row(&b.command)));
        if batch.len() > 1 {
            self.shared.fetch_add(1, Ordering::Relaxed);
        }
        metrics::store_batch(K::NAME, batch.len());
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
                let outcome = self.one(job.command, deadline).await;
                let _ = job.reply.send(Reply::Settled(outcome, 1));
            }
            return;
        }
        let size = batch.len();
        let commands: Vec<&K::Command> = batch.iter().map(|job| &job.command).collect();
        let outcome = self
            .connections
            .run(deadline, async |client| {
                self.kind.many(&commands, client).await
            })
            .await;
        drop(commands);
        match outcome {
            Ok(results) => {
                let mut results = results.into_iter();
                for job in batch {
                    let reply = match results.next().flatten() {
                        Some(output) => Reply::Settled(Ok(output), size),
                        None => Reply::Alone(job.command, size),
                    };
                    let _ = job.reply.send(reply);
                }
            }
            Err(error) => {
                for job in batch {
                    let _ = job.reply.send(Reply::Settled(Err(error.clone()), size));
                }
            }
        }
    }
}

/// Notes on the caller's store span (see `store_span!`) how many commands shared its statement.
/// The worker that ran the batch is not the caller's task, so the caller records it.
fn batch_size(size: usize) {
    // Without traces there is no store span: skip even the lookup of the current span.
    if !traces::enabled() {
        return;
    }
    // An i64: the trace layer exports u64 fields as text.
    let size = i64::try_from(size).unwrap_or(i64::MAX);
    tracing::Span::current().record("idemd.batch_size", size);
}

/// A batch slot held by a command running alone or (`true`) by the draining worker; dropping it
/// hands the slot on.
struct Slot<K: Batched>(Arc<Batcher<K>>, bool);

impl<K: Batched> Drop for Slot<K> {
    fn drop(&mut self) {
        self.0.hand_on(self.1);
    }
}
