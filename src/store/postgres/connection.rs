//! The connection pool, and how one command uses a pooled connection: within one time budget
//! (the query timeout, or less when the caller's deadline comes first) for waiting for the
//! connection and running the statements, cancelling them in PostgreSQL when it runs out.

use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, QueueMode, RecyclingMethod, Runtime, Timeouts,
};
use tokio::time::Instant;

use super::cache::CompletedRecords;
use super::errors::from_pool;
use super::identity::{self, ServerWatch};
use super::tls::DbTls;
use crate::store::StoreError;

/// What every new connection reports its server to (see `identity`).
pub struct Watched {
    pub servers: std::sync::Arc<ServerWatch>,
    pub completed: std::sync::Arc<CompletedRecords>,
}

/// The pool, and the bounds every command runs within.
#[derive(Clone)]
pub struct Connections {
    pool: Pool,
    /// The replay cache, which stops answering when a connection fails (see `cache`).
    completed: std::sync::Arc<CompletedRecords>,
    tls: DbTls,
    connect_timeout: Duration,
    query_timeout: Duration,
}

impl Connections {
    /// Builds the pool; connections open lazily, so this succeeds while the database is down.
    /// `connect_timeout` bounds opening one connection and waiting for a free one;
    /// `query_timeout` bounds one command's database work.
    pub fn new(
        driver_config: tokio_postgres::Config,
        tls: DbTls,
        pool_size: usize,
        connect_timeout: Duration,
        query_timeout: Duration,
        watched: Watched,
    ) -> Result<Self, StoreError> {
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = Manager::from_config(driver_config, tls.clone(), manager_config);
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            // The connection returned last goes out first: at low load the same few backends
            // serve, warm, instead of each command waking the one that slept longest (FIFO).
            // Same-minute A/B on 2 cores: 26 of 30 cells at 4–64 clients faster, by ~10 % at
            // the median (docs/PERFORMANCE.md).
            .queue_mode(QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(connect_timeout))
            .create_timeout(Some(connect_timeout))
            .recycle_timeout(Some(connect_timeout))
            .post_create(identity::post_create(
                watched.servers.clone(),
                watched.completed.clone(),
            ))
            .post_recycle(identity::post_recycle(watched.servers))
            .build()
            .map_err(|error| StoreError::Internal(format!("cannot build pool: {error}")))?;
        Ok(Self {
            pool,
            completed: watched.completed,
            tls,
            connect_timeout,
            query_timeout,
        })
    }

    /// The pool, for metrics and shutdown.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Runs `work` on a pooled connection within the budget `deadline` allows. When the budget
    /// runs out, the caller gets DEADLINE_EXCEEDED if its deadline set the budget (else
    /// UNAVAILABLE), the running statement is cancelled in PostgreSQL and the connection is
    /// closed rather than reused (see `Guarded`).
    pub async fn run<T>(
        &self,
        deadline: Option<Instant>,
        work: impl AsyncFnOnce(&mut Object) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // One budget for the whole command: waiting for a connection spends it too.
        let budget = Budget::new(deadline, self.query_timeout);
        let mut client = Guarded::new(self.client(budget).await?, &self.tls, self.connect_timeout);
        let outcome = tokio::time::timeout_at(budget.end, work(&mut *client)).await;
        let Ok(result) = outcome else {
            // Dropping the unfinished connection cancels the statement and closes it.
            drop(client);
            return Err(if budget.by_caller {
                StoreError::DeadlineExceeded
            } else {
                // A server that stopped answering may be on its way out (see `run`'s errors).
                self.completed.suspend();
                StoreError::Unavailable(format!(
                    "database did not answer within {:?}",
                    self.query_timeout
                ))
            });
        };
        match &result {
            // The connection just failed in a way a retry may cure: a broken socket, a server
            // shutting down, or a server that has become read-only (a demoted primary). A new
            // connection is the retry's best chance (a multi-host URL's target_session_attrs
            // finds the writable server), so this one does not go back to the pool.
            // Until a new connection says which server it reached, the replay cache is quiet:
            // this may be the start of a failover to a server that lacks some of its records.
            Err(StoreError::Unavailable(_)) => {
                self.completed.suspend();
                client.discard();
            }
            // A command that succeeded on a connection of the current server (the pool hands
            // out no other, and each reported its server when it opened) shows that server still
            // answers: the cache may answer for it again. Without this, an error the server
            // itself reports (a serialization failure, say) kept the cache quiet until the pool
            // happened to open a new connection.
            Ok(_) => {
                self.completed.confirm();
                client.finish();
            }
            Err(_) => client.finish(),
        }
        result
    }

    /// A pooled connection, waiting no longer than the budget allows.
    async fn client(&self, budget: Budget) -> Result<Object, StoreError> {
        let wait = budget.time.min(self.connect_timeout);
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
                if budget.by_caller && wait == budget.time =>
            {
                Err(StoreError::DeadlineExceeded)
            }
            Ok(Err(error)) => {
                // Opening a connection failed (not merely waiting for a free one): the server
                // may be changing, so the replay cache waits for the next one to report.
                if !matches!(
                    error,
                    deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)
                ) {
                    self.completed.suspend();
                }
                Err(from_pool(error))
            }
            Err(_) => Err(StoreError::Unavailable(format!(
                "no database connection within {wait:?}"
            ))),
        }
    }
}

/// How long one command may take, and whose limit that is.
#[derive(Clone, Copy)]
struct Budget {
    /// The time the command may take from now.
    time: Duration,
    /// When that time is up.
    end: Instant,
    /// Whether the caller's deadline set it (rather than the query timeout).
    by_caller: bool,
}

impl Budget {
    /// The query timeout, or less if the caller's deadline comes first.
    fn new(deadline: Option<Instant>, query_timeout: Duration) -> Self {
        let (time, by_caller) = match deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left < query_timeout {
                    (left, true)
                } else {
                    (query_timeout, false)
                }
            }
            None => (query_timeout, false),
        };
        Self {
            time,
            end: Instant::now() + time,
            by_caller,
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

    /// The command finished, but the connection is not to be reused: it is closed (its
    /// statements are over, so there is nothing to cancel) and the pool opens a new one.
    fn discard(mut self) {
        self.finished = true;
        if let Some(object) = self.object.take() {
            drop(Object::take(object));
        }
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
