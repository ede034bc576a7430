//! LISTEN/NOTIFY: one connection per replica, outside the pool, listens for record changes and
//! wakes the local Waits of the changed key. A Complete on replica B thus wakes a Wait on replica
//! A. While the connection is down (or a notification is lost), Waits fall back to polling.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use futures_util::stream::poll_fn;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::{AsyncMessage, Client, Config, Connection};

use super::sql::LISTEN_CHANGES;
use super::tls::DbTls;
use crate::domain::{Key, Namespace};
use crate::store::waiters::Waiters;

/// Keeps a LISTEN connection open for as long as the process runs, reconnecting with backoff.
pub async fn run(config: Config, tls: DbTls, waiters: Arc<Waiters>, listening: Arc<AtomicBool>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let ended = match config.connect(tls.clone()).await {
            Ok((client, connection)) => listen(client, connection, &waiters, &listening).await,
            Err(error) => Err(error),
        };
        listening.store(false, Ordering::SeqCst);
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
    mut connection: Connection<S, T>,
    waiters: &Waiters,
    listening: &AtomicBool,
) -> Result<(), tokio_postgres::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut messages = poll_fn(move |cx| connection.poll_message(cx));
    let subscribe = client.batch_execute(LISTEN_CHANGES);
    tokio::pin!(subscribe);
    // Drive the connection while the LISTEN statement runs.
    loop {
        tokio::select! {
            subscribed = &mut subscribe => { subscribed?; break; }
            message = messages.next() => match message {
                Some(Ok(message)) => deliver(message, waiters),
                Some(Err(error)) => return Err(error),
                None => return Ok(()),
            }
        }
    }
    listening.store(true, Ordering::SeqCst);
    // Notifications may have been missed while not listening: let every Wait look again.
    waiters.wake_all();
    while let Some(message) = messages.next().await {
        deliver(message?, waiters);
    }
    Ok(())
}

fn deliver(message: AsyncMessage, waiters: &Waiters) {
    let AsyncMessage::Notification(notification) = message else {
        return;
    };
    let Some((namespace, key)) = notification.payload().split_once('/') else {
        return;
    };
    if let (Ok(namespace), Ok(key)) = (
        Namespace::parse(namespace.to_string()),
        Key::parse(key.to_string()),
    ) {
        waiters.wake(&namespace, &key);
    }
}
