//! The PostgreSQL store: the source of truth. One round trip per RPC on the hot path; the
//! decisions that need a second statement (taking over a lease, explaining a refusal) re-read the
//! row and apply the domain's decision functions, guarded by compare-and-set.

mod cache;
mod errors;
mod listener;
pub mod migrate;
mod row;
mod sql;
mod tls;

pub use self::tls::DbTls;

use std::{
    str::FromStr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio::time::Instant;

use self::cache::CompletedRecords;
use self::errors::{from_db, from_pool};
use self::row::{db_now, micros, record_from_row};
use super::waiters::Waiters;
use super::{wait_until, Store, StoreError};
use crate::domain::{
    decide_acquire, decide_complete, decide_release, decide_renew, decide_wait, AcquireCommand,
    AcquireDecision, AcquireOutcome, CompleteCommand, CompleteDecision, GetCommand, Lease,
    LeaseRejection, LeaseToken, Record, ReleaseCommand, ReleaseDecision, RenewCommand,
    RenewDecision, WaitCommand, WaitDecision, WaitOutcome,
};
use crate::telemetry::metrics;

/// How often a command re-decides after losing a race before giving up. Each lost race means
/// another writer made progress on the key, so a handful is plenty.
const MAX_DECISION_ROUNDS: usize = 8;

/// Connection settings of the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// A libpq-style URL or key=value string.
    pub url: String,
    /// Most connections the pool opens.
    pub pool_size: usize,
    /// Bound on opening one connection, and on waiting for a free one.
    pub connect_timeout: Duration,
    /// Bound on one command's database work; past it the caller gets UNAVAILABLE and the
    /// connection is discarded (it may be black-holed).
    pub query_timeout: Duration,
    /// Extra CA certificates (PEM) to verify the database's certificate with `sslmode=require`.
    pub ca_file: Option<std::path::PathBuf>,
    /// How often a Wait re-reads its record without a notification: a lost notification delays
    /// a Wait by at most this much.
    pub wait_poll: Duration,
    /// Most Acquires (or Completes) sent to PostgreSQL as one statement when they arrive
    /// together (see `batch`); 1 turns batching off.
    pub max_batch: usize,
    /// Batched statements of each kind in flight at once (see `batch`).
    pub batch_slots: usize,
    /// Bytes of completed records kept in memory so replays skip the database (see `cache`);
    /// 0 turns the cache off.
    pub replay_cache_bytes: u64,
}

impl PostgresConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: usize::from(crate::defaults::POOL_SIZE),
            connect_timeout: crate::defaults::DB_CONNECT_TIMEOUT.value,
            query_timeout: crate::defaults::DB_QUERY_TIMEOUT.value,
            ca_file: None,
            wait_poll: crate::defaults::DB_WAIT_POLL,
            max_batch: usize::from(crate::defaults::DB_BATCH),
            batch_slots: usize::from(crate::defaults::DB_BATCH_SLOTS),
            replay_cache_bytes: crate::defaults::REPLAY_CACHE_BYTES,
        }
    }

    /// The driver configuration and how to secure it (see `tls`).
    pub fn connection_settings(&self) -> Result<(tokio_postgres::Config, DbTls), String> {
        let mut config = self.driver_config()?;
        let tls = DbTls::for_config(&mut config, self.ca_file.as_deref())?;
        Ok((config, tls))
    }

    /// The driver configuration, with idemd's defaults for what the URL leaves unset.
    pub fn driver_config(&self) -> Result<tokio_postgres::Config, String> {
        let mut config = tokio_postgres::Config::from_str(&self.url)
            .map_err(|error| format!("not a valid PostgreSQL URL or key=value string ({error})"))?;
        if config.get_application_name().is_none() {
            config.application_name("idemd");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.connect_timeout);
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        Ok(config)
    }
}

/// Records in PostgreSQL, behind a bounded connection pool.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    tls: DbTls,
    /// The driver configuration, for the LISTEN connection.
    driver_config: tokio_postgres::Config,
    /// Local Waits, woken through LISTEN/NOTIFY.
    waiters: Arc<Waiters>,
    /// Whether the LISTEN connection is up (else Waits poll faster).
    listening: Arc<AtomicBool>,
    /// Starts the LISTEN connection on the first Wait.
    listener_started: Arc<std::sync::Once>,
    connect_timeout: Duration,
    query_timeout: Duration,
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
}

impl PostgresStore {
    /// Builds the pool; connections open lazily, so this succeeds while the database is down.
    pub fn connect(config: &PostgresConfig) -> Result<Self, StoreError> {
        let (driver_config, tls) = config.connection_settings().map_err(StoreError::Internal)?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &tls {
            DbTls::Plain => {
                Manager::from_config(driver_config.clone(), tokio_postgres::NoTls, manager_config)
            }
            DbTls::Verified(connector) => {
                Manager::from_config(driver_config.clone(), connector.clone(), manager_config)
            }
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.connect_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .build()
            .map_err(|error| StoreError::Internal(format!("cannot build pool: {error}")))?;
        Ok(Self {
            pool,
            tls,
            driver_config,
            waiters: Arc::default(),
            listening: Arc::default(),
            listener_started: Arc::new(std::sync::Once::new()),
            connect_timeout: config.connect_timeout,
            query_timeout: config.query_timeout,
            wait_poll: config.wait_poll,
            batchers: (config.max_batch > 1).then(|| {
                // The pool serves every other command meanwhile.
                let slots = config.batch_slots.max(1);
                Arc::new(Batchers {
                    acquires: Arc::new(Batcher::new(config.max_batch, slots)),
                    completes: Arc::new(Batcher::new(config.max_batch, slots)),
                })
            }),
            insert_races: Arc::default(),
            reap_cursor: Arc::default(),
            completed: Arc::new(CompletedRecords::new(config.replay_cache_bytes)),
        })
    }

    /// The pool, for metrics and shutdown.
    pub fn pool(&self) -> &Pool {
        &self.pool
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

    /// Whether the LISTEN connection is up.
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    /// How many Acquires lost the insert race described at `sql::ACQUIRE_INSERT_OR_GET` and
    /// decided again.
    pub fn acquire_insert_races(&self) -> u64 {
        self.insert_races.load(Ordering::Relaxed)
    }

    /// How long one command may take: the query timeout, or less if the caller's deadline
    /// comes first (then `true`).
    fn budget(&self, deadline: Option<Instant>) -> (Duration, bool) {
        match deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left < self.query_timeout {
                    (left, true)
                } else {
                    (self.query_timeout, false)
                }
            }
            None => (self.query_timeout, false),
        }
    }

    /// A pooled connection, waiting no longer than the budget allows.
    async fn client(&self, budget: Duration, by_caller: bool) -> Result<Object, StoreError> {
        let wait = budget.min(self.connect_timeout);
        let timeouts = Timeouts {
            wait: Some(wait),
            create: Some(wait),
            recycle: Some(wait),
        };
        // deadpool applies its timeouts one after another (wait for a slot, then create or
        // recycle); the command gets one bound for all of it.
        match tokio::time::timeout(wait, self.pool.timeout_get(&timeouts)).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(deadpool_postgres::PoolError::Timeout(_))) | Err(_)
                if by_caller && wait == budget =>
            {
                Err(StoreError::DeadlineExceeded)
            }
            Ok(Err(error)) => Err(from_pool(error)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no database connection within {wait:?}"
            ))),
        }
    }

    /// Settles one command's database work, run under `tokio::time::timeout(budget, ..)`. When
    /// the budget ran out, the running statement is cancelled on the server and the connection
    /// is closed rather than reused (see `Guarded`).
    fn settle<T>(
        &self,
        client: Guarded,
        outcome: Result<Result<T, StoreError>, tokio::time::error::Elapsed>,
        by_caller: bool,
    ) -> Result<T, StoreError> {
        match outcome {
            Ok(result) => {
                client.finish();
                result
            }
            Err(_) => {
                // Dropping the unfinished connection cancels the statement and closes it.
                drop(client);
                if by_caller {
                    Err(StoreError::DeadlineExceeded)
                } else {
                    Err(StoreError::Unavailable(format!(
                        "database did not answer within {:?}",
                        self.query_timeout
                    )))
                }
            }
        }
    }
}

/// A pooled connection lent to one command. If the command does not finish — its time ran out,
/// or its future was dropped because tonic abandoned the RPC at the client's deadline — the
/// running statement is cancelled on the server and the connection is closed instead of going
/// back to the pool: a late cancel request must never hit the next caller's statement.
struct Guarded {
    object: Option<Object>,
    tls: DbTls,
    bound: Duration,
    finished: bool,
}

impl Guarded {
    fn new(object: Object, tls: &DbTls, bound: Duration) -> Self {
        Self {
            object: Some(object),
            tls: tls.clone(),
            bound,
            finished: false,
        }
    }

    /// The command finished: the connection goes back to the pool.
    fn finish(mut self) {
        self.finished = true;
    }
}

impl std::ops::Deref for Guarded {
    type Target = Object;

    fn deref(&self) -> &Object {
        // Present from construction until drop; nothing else takes it.
        self.object
            .as_ref()
            .expect("a guarded connection holds its object until dropped")
    }
}

impl std::ops::DerefMut for Guarded {
    fn deref_mut(&mut self) -> &mut Object {
        self.object
            .as_mut()
            .expect("a guarded connection holds its object until dropped")
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let Some(object) = self.object.take() else {
            return;
        };
        let token = object.cancel_token();
        // Detach from the pool: dropping it closes the connection.
        drop(Object::take(object));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (bound, tls) = (self.bound, self.tls.clone());
        runtime.spawn(async move {
            let _ = tokio::time::timeout(bound, tls.cancel(token)).await;
        });
    }
}

async fn fetch(
    client: &Object,
    namespace: &str,
    key: &str,
) -> Result<(Option<Record>, std::time::SystemTime), StoreError> {
    let statement = client.prepare_cached(sql::GET).await.map_err(from_db)?;
    let rows = client
        .query(&statement, &[&namespace, &key])
        .await
        .map_err(from_db)?;
    match rows.first() {
        Some(row) => Ok((Some(record_from_row(row)?), db_now(row, sql::AFTER_RECORD)?)),
        None => {
            let now = client
                .query_one("SELECT now()", &[])
                .await
                .map_err(from_db)?;
            Ok((None, db_now(&now, 0)?))
        }
    }
}

fn lost_too_many_races(command: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "{command} kept racing with concurrent writers of the same key; retry"
    ))
}

async fn acquire_on(
    client: &Object,
    command: &AcquireCommand,
    races: &AtomicU64,
    completed: &CompletedRecords,
) -> Result<AcquireOutcome, StoreError> {
    let token = LeaseToken::generate()
        .map_err(|error| StoreError::Internal(format!("no randomness: {error}")))?;
    let token_bytes: &[u8] = token.as_bytes();
    let lease_ttl = micros(command.lease_ttl);
    let retention = micros(command.retention);
    let insert = client
        .prepare_cached(sql::ACQUIRE_INSERT_OR_GET)
        .await
        .map_err(from_db)?;
    let grant = client
        .prepare_cached(sql::ACQUIRE_GRANT)
        .await
        .map_err(from_db)?;
    let (namespace, key) = (command.namespace.as_str(), command.key.as_str());
    let fingerprint: &[u8] = command.fingerprint.as_bytes();
    let holder = command.holder.as_str();
    for _ in 0..MAX_DECISION_ROUNDS {
        let sent = SystemTime::now();
        let rows = client
            .query(
                &insert,
                &[
                    &namespace,
                    &key,
                    &fingerprint,
                    &token_bytes,
                    &holder,
                    &lease_ttl,
                    &retention,
                ],
            )
            .await
            .map_err(from_db)?;
        // No row: a concurrent insert of this key committed while the statement ran (see
        // `sql::ACQUIRE_INSERT_OR_GET`). Deciding again sees it.
        let Some(row) = rows.first() else {
            races.fetch_add(1, Ordering::Relaxed);
            metrics::acquire_insert_race();
            continue;
        };
        let record = record_from_row(row)?;
        let created: bool = row.try_get(sql::AFTER_RECORD).map_err(from_db)?;
        if created {
            return Ok(AcquireOutcome::Acquired {
                lease: record.lease(),
                record,
                taken_over: false,
            });
        }
        let now = db_now(row, sql::AFTER_RECORD + 1)?;
        completed.clock.observe(sent, now);
        let replace = match decide_acquire(Some(&record), &command.fingerprint, now) {
            AcquireDecision::FingerprintMismatch => {
                completed.remember(&record);
                return Err(StoreError::FingerprintMismatch);
            }
            AcquireDecision::Completed => {
                completed.remember(&record);
                return Ok(AcquireOutcome::Completed { record });
            }
            AcquireDecision::InProgress { retry_after } => {
                return Ok(AcquireOutcome::InProgress {
                    record,
                    retry_after,
                })
            }
            AcquireDecision::Create => true,
            AcquireDecision::TakeOver => false,
        };
        let expected_fencing = i64::try_from(record.fencing_token)
            .map_err(|_| StoreError::Internal("fencing token out of range".into()))?;
        let expected_revision = i64::try_from(record.revision)
            .map_err(|_| StoreError::Internal("revision out of range".into()))?;
        let granted = client
            .query_opt(
                &grant,
                &[
                    &namespace,
                    &key,
                    &fingerprint,
                    &token_bytes,
                    &holder,
                    &lease_ttl,
                    &retention,
                    &replace,
                    &expected_fencing,
                    &expected_revision,
                ],
            )
            .await
            .map_err(from_db)?;
        if let Some(row) = granted {
            let record = record_from_row(&row)?;
            return Ok(AcquireOutcome::Acquired {
                lease: record.lease(),
                record,
                taken_over: !replace,
            });
        }
        // Someone wrote the row since we read it: decide again on what it is now.
    }
    Err(lost_too_many_races("Acquire"))
}

async fn complete_on(client: &Object, command: &CompleteCommand) -> Result<Record, StoreError> {
    let statement = client
        .prepare_cached(sql::COMPLETE)
        .await
        .map_err(from_db)?;
    let (namespace, key) = (command.namespace.as_str(), command.key.as_str());
    let token: &[u8] = command.lease_token.as_bytes();
    let (meta_keys, meta_values): (Vec<&str>, Vec<&str>) = command
        .result
        .metadata
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .unzip();
    let retention = command.retention.map(micros);
    let body: &[u8] = &command.result.body;
    for _ in 0..MAX_DECISION_ROUNDS {
        let updated = client
            .query_opt(
                &statement,
                &[
                    &namespace,
                    &key,
                    &token,
                    &body,
                    &command.result.code,
                    &meta_keys,
                    &meta_values,
                    &retention,
                ],
            )
            .await
            .map_err(from_db)?;
        if let Some(row) = updated {
            return record_from_row(&row);
        }
        let (record, now) = fetch(client, namespace, key).await?;
        match decide_complete(record.as_ref(), &command.lease_token, now) {
            CompleteDecision::Reject(rejection) => return Err(rejection.into()),
            CompleteDecision::AlreadyCompleted => {
                return record.ok_or(StoreError::Rejected(LeaseRejection::NotFound))
            }
            // The row changed between the two statements; try the update again.
            CompleteDecision::Store => continue,
        }
    }
    Err(lost_too_many_races("Complete"))
}

async fn release_on(client: &Object, command: &ReleaseCommand) -> Result<(), StoreError> {
    let statement = client.prepare_cached(sql::RELEASE).await.map_err(from_db)?;
    let (namespace, key) = (command.namespace.as_str(), command.key.as_str());
    let token: &[u8] = command.lease_token.as_bytes();
    for _ in 0..MAX_DECISION_ROUNDS {
        let released = client
            .query_opt(&statement, &[&namespace, &key, &token])
            .await
            .map_err(from_db)?;
        if released.is_some() {
            return Ok(());
        }
        let (record, now) = fetch(client, namespace, key).await?;
        match decide_release(record.as_ref(), &command.lease_token, now) {
            ReleaseDecision::Reject(rejection) => return Err(rejection.into()),
            ReleaseDecision::AlreadyFree => return Ok(()),
            ReleaseDecision::Release => continue,
        }
    }
    Err(lost_too_many_races("Release"))
}

async fn renew_on(client: &Object, command: &RenewCommand) -> Result<Lease, StoreError> {
    let statement = client.prepare_cached(sql::RENEW).await.map_err(from_db)?;
    let (namespace, key) = (command.namespace.as_str(), command.key.as_str());
    let token: &[u8] = command.lease_token.as_bytes();
    let lease_ttl = micros(command.lease_ttl);
    for _ in 0..MAX_DECISION_ROUNDS {
        let renewed = client
            .query_opt(&statement, &[&namespace, &key, &token, &lease_ttl])
            .await
            .map_err(from_db)?;
        if let Some(row) = renewed {
            return Ok(record_from_row(&row)?.lease());
        }
        let (record, now) = fetch(client, namespace, key).await?;
        match decide_renew(record.as_ref(), &command.lease_token, now) {
            RenewDecision::Reject(rejection) => return Err(rejection.into()),
            RenewDecision::Renew => continue,
        }
    }
    Err(lost_too_many_races("Renew"))
}

async fn get_on(
    client: &Object,
    command: &GetCommand,
    completed: &CompletedRecords,
) -> Result<Record, StoreError> {
    let sent = SystemTime::now();
    let (record, now) = fetch(client, command.namespace.as_str(), command.key.as_str()).await?;
    completed.clock.observe(sent, now);
    let record = record
        .filter(|record| record.is_live(now))
        .ok_or(StoreError::Rejected(LeaseRejection::NotFound))?;
    completed.remember(&record);
    Ok(record)
}

/// Blocks (8 KiB each) one step of the reaper scans.
const REAP_STEP_BLOCKS: u64 = 1024;
/// Most blocks one `reap_expired` call scans: 32 MiB (about 100,000 rows, 45 ms of database time
/// on the benchmark box). With a round every 10 s, the sweep gets through any table in turn at a
/// cost per round that does not grow with it.
const REAP_BUDGET_BLOCKS: u64 = 4 * REAP_STEP_BLOCKS;

/// Deletes up to `batch` expired records, sweeping on from block `cursor` (wrapping at the end of
/// the table) until the batch is full, the budget of blocks is spent, or the whole table has been
/// seen. Only the replica holding the reaper lock reaps.
async fn reap_on(client: &mut Object, batch: u32, cursor: &AtomicU64) -> Result<u64, StoreError> {
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

async fn check_schema(client: &Object) -> Result<(), StoreError> {
    let version: i32 = match client
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM idemd_schema_migrations",
            &[],
        )
        .await
    {
        Ok(row) => row.try_get(0).map_err(from_db)?,
        // Never migrated.
        Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => 0,
        Err(error) => return Err(from_db(error)),
    };
    let needed = migrate::latest_version();
    if version >= needed {
        Ok(())
    } else {
        Err(StoreError::Unavailable(format!(
            "database schema is at version {version}, this binary needs {needed}: run `idemd migrate`"
        )))
    }
}

/// Planner estimate of live rows by state: cheap (no scan), refreshed by (auto)ANALYZE.
const RECORD_ESTIMATE: &str = "SELECT
        COALESCE((SELECT reltuples FROM pg_class
                  WHERE oid = to_regclass('idemd_records')), 0)::float8,
        (SELECT most_common_vals::text FROM pg_stats
         WHERE schemaname = current_schema() AND tablename = 'idemd_records' AND attname = 'state'),
        (SELECT most_common_freqs FROM pg_stats
         WHERE schemaname = current_schema() AND tablename = 'idemd_records' AND attname = 'state')";

async fn estimate_records(client: &Object) -> Result<(f64, f64), StoreError> {
    let row = client
        .query_one(RECORD_ESTIMATE, &[])
        .await
        .map_err(from_db)?;
    let total: f64 = row.try_get::<_, f64>(0).map_err(from_db)?.max(0.0);
    let values: Option<String> = row.try_get(1).map_err(from_db)?;
    let freqs: Option<Vec<f32>> = row.try_get(2).map_err(from_db)?;
    let (mut in_progress, mut completed) = (0.0, 0.0);
    if let (Some(values), Some(freqs)) = (values, freqs) {
        let states = values.trim_matches(|c| c == '{' || c == '}').split(',');
        for (state, freq) in states.zip(freqs) {
            match state.trim() {
                "1" => in_progress = total * f64::from(freq),
                "2" => completed = total * f64::from(freq),
                _ => {}
            }
        }
    }
    Ok((in_progress.round(), completed.round()))
}

/// Runs `$work` (an expression over `$client: &Object`) on a pooled connection within the budget
/// the deadline allows, cancelling it in PostgreSQL if it runs out (see `PostgresStore::settle`).
macro_rules! on_connection {
    ($store:expr, $deadline:expr, |$client:ident| $work:expr) => {{
        // One budget for the whole command: waiting for a connection spends it too.
        let (budget, by_caller) = $store.budget($deadline);
        let end = tokio::time::Instant::now() + budget;
        #[allow(unused_mut)]
        let mut $client = Guarded::new(
            $store.client(budget, by_caller).await?,
            &$store.tls,
            $store.connect_timeout,
        );
        let outcome = tokio::time::timeout_at(end, $work).await;
        $store.settle($client, outcome, by_caller)
    }};
}

/// How often a Wait re-reads the record while the LISTEN connection is down.
const WAIT_POLL_UNLISTENED: Duration = Duration::from_secs(1);

async fn read_for_wait(
    client: &Object,
    command: &WaitCommand,
    mark: bool,
) -> Result<(Option<Record>, std::time::SystemTime), StoreError> {
    let (namespace, key) = (command.namespace.as_str(), command.key.as_str());
    if mark {
        let statement = client
            .prepare_cached(sql::MARK_WAITED_ON)
            .await
            .map_err(from_db)?;
        client
            .execute(&statement, &[&namespace, &key])
            .await
            .map_err(from_db)?;
    }
    fetch(client, namespace, key).await
}

impl PostgresStore {
    fn start_listener(&self) {
        self.listener_started.call_once(|| {
            tokio::spawn(listener::run(
                self.driver_config.clone(),
                self.tls.clone(),
                self.waiters.clone(),
                self.listening.clone(),
            ));
        });
    }
}

mod batch;

use self::batch::Batcher;

/// The batch slots and queues of the two batched commands.
struct Batchers {
    acquires: Arc<Batcher<AcquireCommand>>,
    completes: Arc<Batcher<CompleteCommand>>,
}

impl Store for PostgresStore {
    async fn wait(
        &self,
        command: WaitCommand,
        deadline: Option<Instant>,
    ) -> Result<WaitOutcome, StoreError> {
        self.start_listener();
        let until = wait_until(command.timeout, deadline);
        let registration = self.waiters.register(&command.namespace, &command.key);
        let mut marked = false;
        loop {
            // Listen before looking, so a change in between is not missed.
            let notified = registration.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mark = !marked;
            // Reading is bounded by the caller's deadline, not by the Wait's own timeout: a
            // Wait always answers with the record's state.
            let (record, now) = on_connection!(self, deadline, |client| read_for_wait(
                &client, &command, mark
            ))?;
            marked = true;
            match (decide_wait(record.as_ref(), now), record) {
                (WaitDecision::Completed, Some(record)) => {
                    return Ok(WaitOutcome::Completed { record })
                }
                (WaitDecision::Held { lease_expires_at }, Some(record)) => {
                    if Instant::now() >= until {
                        return Ok(WaitOutcome::TimedOut { record });
                    }
                    let lease_left = lease_expires_at.duration_since(now).unwrap_or_default();
                    let poll = if self.listening.load(Ordering::SeqCst) {
                        self.wait_poll
                    } else {
                        WAIT_POLL_UNLISTENED.min(self.wait_poll)
                    };
                    let wake = until.min(Instant::now() + lease_left.min(poll));
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(wake) => {}
                    }
                }
                (_, record) => {
                    let record = record.filter(|record| record.is_live(now));
                    return Ok(WaitOutcome::Free { record });
                }
            }
        }
    }

    async fn acquire(
        &self,
        command: AcquireCommand,
        deadline: Option<Instant>,
    ) -> Result<AcquireOutcome, StoreError> {
        // A replay of a record completed and still live: the database would answer the same.
        if let Some((record, now)) = self.completed.live(&command.namespace, &command.key) {
            match decide_acquire(Some(&record), &command.fingerprint, now) {
                AcquireDecision::Completed => {
                    metrics::replay_cache_hit();
                    return Ok(AcquireOutcome::Completed { record });
                }
                AcquireDecision::FingerprintMismatch => {
                    metrics::replay_cache_hit();
                    return Err(StoreError::FingerprintMismatch);
                }
                _ => {}
            }
        }
        if let Some(batchers) = &self.batchers {
            return batchers.acquires.run(self, command, deadline).await;
        }
        on_connection!(self, deadline, |client| acquire_on(
            &client,
            &command,
            &self.insert_races,
            &self.completed
        ))
    }

    async fn complete(
        &self,
        command: CompleteCommand,
        deadline: Option<Instant>,
    ) -> Result<Record, StoreError> {
        let record = match &self.batchers {
            Some(batchers) => batchers.completes.run(self, command, deadline).await?,
            None => on_connection!(self, deadline, |client| complete_on(&client, &command))?,
        };
        self.completed.remember(&record);
        Ok(record)
    }

    async fn release(
        &self,
        command: ReleaseCommand,
        deadline: Option<Instant>,
    ) -> Result<(), StoreError> {
        on_connection!(self, deadline, |client| release_on(&client, &command))
    }

    async fn renew(
        &self,
        command: RenewCommand,
        deadline: Option<Instant>,
    ) -> Result<Lease, StoreError> {
        on_connection!(self, deadline, |client| renew_on(&client, &command))
    }

    async fn get(
        &self,
        command: GetCommand,
        deadline: Option<Instant>,
    ) -> Result<Record, StoreError> {
        if let Some((record, _)) = self.completed.live(&command.namespace, &command.key) {
            metrics::replay_cache_hit();
            return Ok(record);
        }
        on_connection!(self, deadline, |client| get_on(
            &client,
            &command,
            &self.completed
        ))
    }

    async fn reap_expired(&self, batch: u32) -> Result<u64, StoreError> {
        on_connection!(self, None, |client| reap_on(
            &mut client,
            batch,
            &self.reap_cursor
        ))
    }

    async fn report_metrics(&self) {
        let status = self.pool.status();
        metrics::pool(
            status.max_size,
            status.size,
            status.available,
            status.waiting,
        );
        let estimate = async { on_connection!(self, None, |client| estimate_records(&client)) };
        if let Ok((in_progress, completed)) = estimate.await {
            metrics::records(in_progress, completed);
        }
    }

    async fn check_ready(&self) -> Result<(), StoreError> {
        on_connection!(self, None, |client| check_schema(&client))
    }
}
