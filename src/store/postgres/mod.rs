//! The PostgreSQL store: the source of truth. One round trip per RPC on the hot path; the
//! decisions that need a second statement (taking over a lease, explaining a refusal) re-read the
//! row and apply the domain's decision functions, guarded by compare-and-set.
//!
//! This file holds the store and its `Store` impl; each job has a file of its own:
//! `config` (settings), `connection` (the pool, and one command's connection within its time
//! budget), `commands` (the SQL-running code of each command), `sql` (every SQL text), `batch`
//! (Acquires and Completes sharing statements), `cache` (completed records for replays),
//! `identity` (which server a connection reached, and what a failover changes),
//! `listener` (LISTEN/NOTIFY for Waits and cache invalidation), `admin` (the admin API), `counts`
//! (GetNamespaceStats' per-minute counts), `reaper`, `stats`, `migrate` (the schema), `row` (rows to records), `errors` (driver errors to
//! `StoreError`) and `tls`.

mod admin;
mod batch;
mod cache;
mod commands;
mod config;
mod connection;
mod counts;
mod errors;
mod identity;
mod listener;
pub mod migrate;
mod reaper;
mod row;
mod sql;
mod stats;
mod tls;

pub use self::config::PostgresConfig;
pub use self::tls::DbTls;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use deadpool_postgres::Pool;
use tokio::time::Instant;
use tracing::Instrument;

use self::batch::Batcher;
use self::cache::CompletedRecords;
use self::commands::{Acquires, Completes};
use self::connection::{Connections, Watched};
use self::identity::ServerWatch;
use super::counts::{acquire_event, completion_time, Event};
use super::waiters::{self, Waiters};
use super::{AdminStore, Store, StoreError};
use crate::domain::admin::{
    AuditAction, AuditPage, BulkPurge, ListAuditQuery, ListRecordsQuery, MinuteCounts,
    NamespaceSummary, RecordChange, RecordPage,
};
use crate::domain::{
    decide_acquire, AcquireCommand, AcquireDecision, AcquireOutcome, CompleteCommand, GetCommand,
    Lease, Record, ReleaseCommand, RenewCommand, WaitCommand, WaitOutcome,
};
use crate::telemetry::metrics;

/// How often a Wait re-reads the record while the LISTEN connection is down.
const WAIT_POLL_UNLISTENED: Duration = Duration::from_secs(1);

/// The span of one command's store work: a child of the RPC's span, in traces. At TRACE level
/// under `telemetry::traces::STORE_TARGET`: without traces (and unless the log filter asks for
/// trace-level logs) it is never created, so the hot path pays one level check.
macro_rules! store_span {
    ($name:literal, $operation:literal) => {
        tracing::trace_span!(
            target: "idemd::store",
            "store",
            otel.name = $name,
            db.system.name = "postgresql",
            db.operation.name = $operation,
            idemd.batch_size = tracing::field::Empty,
            idemd.cache = tracing::field::Empty,
        )
    };
}

/// Notes on a store span whether the replay cache answered. A span that was not created (no
/// traces) costs one check.
fn record_cache(span: &tracing::Span, hit_or_miss: &'static str) {
    if !span.is_disabled() {
        span.record("idemd.cache", hit_or_miss);
    }
}

/// Records in PostgreSQL, behind a bounded connection pool.
#[derive(Clone)]
pub struct PostgresStore {
    connections: Connections,
    tls: DbTls,
    /// The driver configuration, for the LISTEN connection.
    driver_config: tokio_postgres::Config,
    /// Local Waits, woken through LISTEN/NOTIFY.
    waiters: Arc<Waiters>,
    /// Whether the LISTEN connection is up (else Waits poll faster).
    listening: Arc<AtomicBool>,
    /// Starts the LISTEN connection: at start when the replay cache is on (it must hear of
    /// purges), else on the first Wait or admin change.
    listener_started: Arc<std::sync::Once>,
    /// Acknowledgements of this replica's cache invalidations (see `admin`).
    acks: Arc<listener::Acks>,
    /// Notified each time the LISTEN connection starts listening.
    listener_up: Arc<tokio::sync::Notify>,
    wait_poll: Duration,
    /// Acquires and Completes go through these when batching is on (see `batch`).
    batchers: Option<Arc<Batchers>>,
    /// Times an Acquire's insert-or-get statement came back empty because a concurrent insert
    /// of the same key committed mid-statement (and the store decided again).
    insert_races: Arc<AtomicU64>,
    /// The block the reaper's sweep of the table goes on from.
    reap_cursor: Arc<AtomicU64>,
    /// Completed records, so replays skip the database.
    completed: Arc<CompletedRecords>,
    /// The database server this replica talks to (see `identity`).
    servers: Arc<ServerWatch>,
    /// GetNamespaceStats' per-minute counts of the events this replica answered (see `counts`).
    counts: Arc<counts::ReplicaCounts>,
}

/// The batch slots and queues of the two batched commands.
struct Batchers {
    acquires: Arc<Batcher<Acquires>>,
    completes: Arc<Batcher<Completes>>,
}

impl PostgresStore {
    /// Builds the pool; connections open lazily, so this succeeds while the database is down.
    pub fn connect(config: &PostgresConfig) -> Result<Self, StoreError> {
        let (driver_config, tls) = config.connection_settings().map_err(StoreError::Internal)?;
        let completed = Arc::new(CompletedRecords::new(config.replay_cache_bytes));
        let servers = Arc::new(ServerWatch::new());
        let connections = Connections::new(
            driver_config.clone(),
            tls.clone(),
            config.pool_size,
            config.connect_timeout,
            config.query_timeout,
            Watched {
                servers: servers.clone(),
                completed: completed.clone(),
            },
        )?;
        let insert_races = Arc::<AtomicU64>::default();
        let batchers = (config.max_batch > 1).then(|| {
            // The pool serves every other command meanwhile.
            let slots = config.batch_slots.max(1);
            let acquires = Acquires {
                insert_races: insert_races.clone(),
                completed: completed.clone(),
            };
            Arc::new(Batchers {
                acquires: Arc::new(Batcher::new(
                    acquires,
                    connections.clone(),
                    config.max_batch,
                    slots,
                )),
                completes: Arc::new(Batcher::new(
                    Completes {
                        completed: completed.clone(),
                    },
                    connections.clone(),
                    config.max_batch,
                    slots,
                )),
            })
        });
        let store = Self {
            connections,
            tls,
            driver_config,
            waiters: Arc::default(),
            listening: Arc::default(),
            listener_started: Arc::new(std::sync::Once::new()),
            acks: Arc::default(),
            listener_up: Arc::default(),
            wait_poll: config.wait_poll,
            batchers,
            insert_races,
            reap_cursor: Arc::default(),
            completed,
            servers,
            counts: Arc::new(counts::ReplicaCounts::new()?),
        };
        // A cache that does not hear of purges could replay a purged record. Outside a runtime
        // (a tool building the store) the listener starts with the first command instead.
        if store.completed.enabled() && tokio::runtime::Handle::try_current().is_ok() {
            store.start_listener();
        }
        Ok(store)
    }

    /// The pool, for metrics and shutdown.
    pub fn pool(&self) -> &Pool {
        self.connections.pool()
    }

    /// How many statements carried more than one Acquire, and more than one Complete.
    pub fn shared_batches(&self) -> (u64, u64) {
        self.batchers.as_ref().map_or((0, 0), |batchers| {
            (
                batchers.acquires.shared_batches(),
                batchers.completes.shared_batches(),
            )
        })
    }

    /// How many Acquires, and how many Completes, wait in the batch queues now.
    pub fn queued(&self) -> (usize, usize) {
        self.batchers.as_ref().map_or((0, 0), |batchers| {
            (batchers.acquires.queued(), batchers.completes.queued())
        })
    }

    /// Whether the LISTEN connection is up.
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    /// How many Acquires lost the insert race described at `sql::ACQUIRE_INSERT_OR_GET` and
    /// decided again.
    pub fn acquire_insert_races(&self) -> u64 {
        self.insert_races.load(Ordering::Relaxed)
    }

    fn start_listener(&self) {
        self.listener_started.call_once(|| {
            let listened = listener::Listened {
                waiters: self.waiters.clone(),
                completed: self.completed.clone(),
                acks: self.acks.clone(),
                listening: self.listening.clone(),
                up: self.listener_up.clone(),
            };
            tokio::spawn(listener::run(
                self.driver_config.clone(),
                self.tls.clone(),
                Arc::new(listened),
            ));
        });
    }
}

impl Store for PostgresStore {
    async fn wait(
        &self,
        command: WaitCommand,
        deadline: Option<Instant>,
    ) -> Result<WaitOutcome, StoreError> {
        let span = store_span!("postgresql wait", "wait");
        self.start_listener();
        let command = &command;
        // The first look marks the record as waited on, so that its Complete notifies.
        let read = |first_look| {
            self.connections.run(deadline, async move |client| {
                commands::read_for_wait(client, command, first_look).await
            })
        };
        // Notifications can be lost: look again now and then, more often without LISTEN.
        let poll = || {
            Some(if self.listening.load(Ordering::SeqCst) {
                self.wait_poll
            } else {
                WAIT_POLL_UNLISTENED.min(self.wait_poll)
            })
        };
        waiters::wait(&self.waiters, command, deadline, read, poll)
            .instrument(span)
            .await
    }

    async fn acquire(
        &self,
        command: AcquireCommand,
        deadline: Option<Instant>,
    ) -> Result<AcquireOutcome, StoreError> {
        let span = store_span!("postgresql acquire", "acquire");
        if self.completed.enabled() {
            self.start_listener();
        }
        // A replay of a record completed and still live: the database would answer the same.
        if let Some((record, now)) = self.completed.live(&command.namespace, &command.key) {
            match decide_acquire(Some(&record), &command.fingerprint, now) {
                AcquireDecision::Completed => {
                    record_cache(&span, "hit");
                    metrics::replay_cache_hit();
                    return Ok(AcquireOutcome::Completed { record });
                }
                AcquireDecision::FingerprintMismatch => {
                    record_cache(&span, "hit");
                    metrics::replay_cache_hit();
                    return Err(StoreError::FingerprintMismatch);
                }
                _ => {}
            }
        }
        record_cache(&span, "miss");
        let lease_ttl = command.lease_ttl;
        let outcome = async {
            if let Some(batchers) = &self.batchers {
                return batchers.acquires.run(command, deadline).await;
            }
            self.connections
                .run(deadline, async |client| {
                    commands::acquire(client, &command, &self.insert_races, &self.completed).await
                })
                .await
        }
        .instrument(span)
        .await?;
        if let Some((namespace, event, at)) = acquire_event(&outcome, lease_ttl) {
            self.counts.counter.count(namespace, at, event);
        }
        Ok(outcome)
    }

    async fn complete(
        &self,
        command: CompleteCommand,
        deadline: Option<Instant>,
    ) -> Result<Record, StoreError> {
        let span = store_span!("postgresql complete", "complete");
        let (record, stored) = async {
            match &self.batchers {
                Some(batchers) => batchers.completes.run(command, deadline).await,
                None => {
                    self.connections
                        .run(deadline, async |client| {
                            let generation = self.completed.generation();
                            let (record, stored) = commands::complete(client, &command).await?;
                            self.completed
                                .remember(&record, generation, identity::created(client));
                            Ok((record, stored))
                        })
                        .await
                }
            }
        }
        .instrument(span)
        .await?;
        if stored {
            self.counts.counter.count(
                &record.namespace,
                completion_time(&record),
                Event::Completed,
            );
        }
        Ok(record)
    }

    async fn release(
        &self,
        command: ReleaseCommand,
        deadline: Option<Instant>,
    ) -> Result<(), StoreError> {
        self.connections
            .run(deadline, async |client| {
                commands::release(client, &command).await
            })
            .instrument(store_span!("postgresql release", "release"))
            .await
    }

    async fn renew(
        &self,
        command: RenewCommand,
        deadline: Option<Instant>,
    ) -> Result<Lease, StoreError> {
        self.connections
            .run(deadline, async |client| {
                commands::renew(client, &command).await
            })
            .instrument(store_span!("postgresql renew", "renew"))
            .await
    }

    async fn get(
        &self,
        command: GetCommand,
        deadline: Option<Instant>,
    ) -> Result<Record, StoreError> {
        let span = store_span!("postgresql get", "get");
        if let Some((record, _)) = self.completed.live(&command.namespace, &command.key) {
            record_cache(&span, "hit");
            metrics::replay_cache_hit();
            return Ok(record);
        }
        record_cache(&span, "miss");
        self.connections
            .run(deadline, async |client| {
                commands::get(client, &command, &self.completed).await
            })
            .instrument(span)
            .await
    }

    async fn reap_expired(&self, batch: u32) -> Result<u64, StoreError> {
        self.connections
            .run(None, async |client| {
                reaper::reap(client, batch, &self.reap_cursor).await
            })
            .await
    }

    async fn flush_counts(&self) -> Result<(), StoreError> {
        self.counts.flush(&self.connections).await
    }

    async fn report_metrics(&self) {
        let status = self.connections.pool().status();
        metrics::pool(
            status.max_size,
            status.size,
            status.available,
            status.waiting,
        );
        let estimate = self
            .connections
            .run(None, async |client| stats::estimate_records(client).await)
            .await;
        if let Ok((in_progress, completed)) = estimate {
            metrics::records(in_progress, completed);
        }
    }

    /// Ready when the server takes writes and has the schema. A standby or a read-only server
    /// (a demoted or fenced primary) is not ready: the error discards the connection, so the
    /// next round opens a new one, which a multi-host URL with `target_session_attrs=read-write`
    /// sends to the writable server. Each round also notices a changed server (see `identity`)
    /// while the replica is idle.
    async fn check_ready(&self) -> Result<(), StoreError> {
        self.connections
            .run(None, async |client| {
                let server = identity::ask(client).await?;
                self.servers
                    .observe(server.identity, identity::created(client), &self.completed);
                if server.read_only {
                    return Err(StoreError::Unavailable(
                        "the database server is read-only (a standby, or a demoted primary): \
                         no writable primary reachable"
                            .into(),
                    ));
                }
                // New connections raise the fencing floor before their first use; this covers
                // a connection that outlived its server's promotion (a URL without
                // `target_session_attrs=read-write` can hold one to a standby).
                identity::fencing_floor(client, &server).await?;
                migrate::check_schema(client).await
            })
            .await
    }
}

impl PostgresStore {
    /// Starts this replica's listener and waits (at most `admin::ACK_LIMIT`) until it listens:
    /// the acknowledgements of a purge arrive through it. Without it they would all be missed,
    /// and every other replica's listener cut off as silent.
    async fn ensure_listening(&self) {
        self.start_listener();
        let up = self.listener_up.notified();
        tokio::pin!(up);
        up.as_mut().enable();
        if self.listening.load(Ordering::SeqCst) {
            return;
        }
        if tokio::time::timeout(admin::ACK_LIMIT, up).await.is_err() {
            tracing::warn!("this replica's LISTEN connection is down: a purge cannot hear the other replicas acknowledge, and will end their listeners' sessions");
        }
    }

    /// Returns once every replica's listener dropped what invalidation `id` names from its cache
    /// (see `admin` for why and how), or had its session ended for not answering in time.
    async fn await_invalidation(&self, expected: listener::Expected) {
        let id = expected.id;
        let sessions = self
            .connections
            .run(None, async |client| admin::listener_sessions(client).await)
            .await;
        let sessions = match sessions {
            Ok(sessions) => sessions,
            Err(error) => {
                tracing::error!(%error, audit_id = id, "cannot list the replicas' listeners after a purge: their caches may answer the purged records until their listeners reconnect");
                return;
            }
        };
        let silent = self.acks.wait(id, &sessions, admin::ACK_LIMIT).await;
        drop(expected);
        if silent.is_empty() {
            return;
        }
        tracing::warn!(?silent, audit_id = id, "replica listeners did not acknowledge a purge in time; ending their sessions so their caches are emptied");
        let ended = self
            .connections
            .run(None, async |client| {
                admin::terminate_listeners(client, &silent).await
            })
            .await;
        if let Err(error) = ended {
            tracing::error!(%error, "cannot end the silent listeners' sessions");
        }
    }
}

impl AdminStore for PostgresStore {
    async fn list_records(&self, query: ListRecordsQuery) -> Result<RecordPage, StoreError> {
        self.connections
            .run(None, async |client| {
                admin::list_records(client, &query).await
            })
            .await
    }

    async fn list_namespaces(&self) -> Result<Vec<NamespaceSummary>, StoreError> {
        self.connections
            .run(None, async |client| admin::list_namespaces(client).await)
            .await
    }

    async fn namespace_stats(
        &self,
        namespace: crate::domain::Namespace,
        window: Duration,
    ) -> Result<Vec<MinuteCounts>, StoreError> {
        self.counts
            .stats(&self.connections, &namespace, window)
            .await
    }

    async fn purge_record(&self, change: RecordChange) -> Result<Record, StoreError> {
        self.ensure_listening().await;
        let (record, invalidation) = self
            .connections
            .run(None, async |client| {
                admin::change_record(client, &change, AuditAction::PurgeRecord, &self.acks).await
            })
            .await?;
        // Its own cache at once, whether or not its listener is up.
        self.completed
            .forget(change.namespace.as_str(), change.key.as_str());
        if let Some(expected) = invalidation {
            self.await_invalidation(expected).await;
        }
        Ok(record)
    }

    async fn force_release(&self, change: RecordChange) -> Result<Record, StoreError> {
        let (record, _) = self
            .connections
            .run(None, async |client| {
                admin::change_record(client, &change, AuditAction::ForceRelease, &self.acks).await
            })
            .await?;
        Ok(record)
    }

    async fn purge_records(&self, purge: BulkPurge) -> Result<u64, StoreError> {
        if !purge.dry_run {
            self.ensure_listening().await;
        }
        let (count, invalidation) = self
            .connections
            .run(None, async |client| {
                admin::purge_records(client, &purge, &self.acks).await
            })
            .await?;
        if let Some(expected) = invalidation {
            self.completed.clear();
            self.await_invalidation(expected).await;
        }
        Ok(count)
    }

    async fn list_audit(&self, query: ListAuditQuery) -> Result<AuditPage, StoreError> {
        self.connections
            .run(None, async |client| admin::list_audit(client, &query).await)
            .await
    }
}
