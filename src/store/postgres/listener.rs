//! LISTEN/NOTIFY: one connection per replica, outside the pool, listens for
//! - record changes, and wakes the local Waits of the changed key (a Complete on replica B thus
//!   wakes a Wait on replica A; while the connection is down, Waits fall back to polling);
//! - invalidations sent by an admin purge, and drops the purged records from this replica's
//!   replay cache, then acknowledges each on the same connection;
//! - those acknowledgements, for the purges this replica is waiting on (see `super::admin`).
//!
//! Every time the connection (re)starts listening, the replay cache is emptied first: an
//! invalidation sent while it was not listening was missed.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures_util::stream::poll_fn;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, Config, Connection, Notification};

use super::cache::CompletedRecords;
use super::sql;
use super::tls::DbTls;
use crate::domain::{Key, Namespace};
use crate::store::waiters::Waiters;

/// What the listener serves: the Waits to wake, the cache to invalidate, the acknowledgements to
/// collect.
pub struct Listened {
    pub waiters: Arc<Waiters>,
    pub completed: Arc<CompletedRecords>,
    pub acks: Arc<Acks>,
    /// Whether the connection is listening.
    pub listening: Arc<AtomicBool>,
    /// Notified each time the connection starts listening.
    pub up: Arc<Notify>,
}

/// Acknowledgements of this replica's invalidations: by audit id, the listener sessions (backend
/// process ids) that applied it.
#[derive(Default)]
pub struct Acks {
    pending: Mutex<HashMap<i64, HashSet<i32>>>,
    arrived: Notify,
}

/// Acknowledgements of one invalidation are collected for as long as this lives: dropped (the
/// purge failed, finished, or its caller went away), it stops collecting.
pub struct Expected {
    acks: Arc<Acks>,
    pub id: i64,
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.acks.lock().remove(&self.id);
    }
}

impl Acks {
    /// Starts collecting acknowledgements of invalidation `id`; call before it is committed, so
    /// none can arrive unseen.
    pub fn expect(self: &Arc<Self>, id: i64) -> Expected {
        self.lock().insert(id, HashSet::new());
        Expected {
            acks: self.clone(),
            id,
        }
    }

    fn received(&self, id: i64, session: i32) {
        if let Some(sessions) = self.lock().get_mut(&id) {
            sessions.insert(session);
            self.arrived.notify_waiters();
        }
    }

    fn missing(&self, id: i64, sessions: &[i32]) -> Vec<i32> {
        let pending = self.lock();
        let acked = pending.get(&id);
        sessions
            .iter()
            .copied()
            .filter(|session| !acked.is_some_and(|acked| acked.contains(session)))
            .collect()
    }

    /// Waits until every one of `sessions` acknowledged `id`, or `limit` passes; returns those
    /// that did not.
    pub async fn wait(&self, id: i64, sessions: &[i32], limit: Duration) -> Vec<i32> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            // Registered before looking, so an acknowledgement between the look and the wait
            // still wakes it.
            arrived.as_mut().enable();
            let missing = self.missing(id, sessions);
            if missing.is_empty() {
                return missing;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.missing(id, sessions);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, HashSet<i32>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Keeps a LISTEN connection open for as long as the process runs, reconnecting with backoff.
pub async fn run(config: Config, tls: DbTls, listened: Arc<Listened>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let ended = match config.connect(tls.clone()).await {
            Ok((client, connection)) => listen(client, connection, &listened).await,
            Err(error) => Err(error),
        };
        listened.listening.store(false, Ordering::SeqCst);
        match ended {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(error) => tracing::debug!(%error, "LISTEN connection failed; Waits poll meanwhile"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn listen<S, T>(
    client: Client,
    connection: Connection<S, T>,
    listened: &Listened,
) -> Result<(), tokio_postgres::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The connection is driven by a task of its own, so the loop below can send statements
    // (acknowledgements) while notifications keep arriving.
    let (sender, mut messages) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut connection = connection;
        let mut stream = poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = stream.next().await {
            let failed = message.is_err();
            if sender.send(message).is_err() || failed {
                break;
            }
        }
    });
    let _stop_driver = AbortOnDrop(driver);
    client.batch_execute(sql::LISTEN_ALL).await?;
    client.batch_execute(sql::MARK_LISTENING).await?;
    // Invalidations may have been missed while not listening: forget every cached record, and
    // let every Wait look again.
    listened.completed.clear();
    listened.listening.store(true, Ordering::SeqCst);
    listened.up.notify_waiters();
    listened.waiters.wake_all();
    while let Some(message) = messages.recv().await {
        if let AsyncMessage::Notification(notification) = message? {
            deliver(&notification, &client, listened).await?;
        }
    }
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn deliver(
    notification: &Notification,
    client: &Client,
    listened: &Listened,
) -> Result<(), tokio_postgres::Error> {
    let payload = notification.payload();
    match notification.channel() {
        sql::CHANGES_CHANNEL => wake(payload, &listened.waiters),
        sql::INVALIDATE_CHANNEL => {
            let Some((id, target)) = payload.split_once(' ') else {
                return Ok(());
            };
            if target == "*" {
                listened.completed.clear();
            } else if let Some((namespace, key)) = target.split_once('/') {
                listened.completed.forget(namespace, key);
                wake(target, &listened.waiters);
            }
            // Only now, with the record gone from this replica's cache, may the purge return.
            client.execute(sql::NOTIFY_INVALIDATED, &[&id]).await?;
        }
        sql::INVALIDATED_CHANNEL => {
            if let Ok(id) = payload.parse() {
                listened.acks.received(id, notification.process_id());
            }
        }
        _ => {}
    }
    Ok(())
}

/// Wakes the Waits of `namespace/key` (namespaces cannot contain `/`).
fn wake(payload: &str, waiters: &Waiters) {
    let Some((namespace, key)) = payload.split_once('/') else {
        return;
    };
    if let (Ok(namespace), Ok(key)) = (
        Namespace::parse(namespace.to_string()),
        Key::parse(key.to_string()),
    ) {
        waiters.wake(&namespace, &key);
    }
}
