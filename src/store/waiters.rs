//! Waits, shared by both stores: the loop a Wait runs (`wait`), and how a local Wait is woken when
//! its key changes (one `Notify` per key being waited on, created by the first waiter and gone
//! with the last). The PostgreSQL store feeds the wake-ups from LISTEN/NOTIFY so a Complete on one
//! replica wakes waiters on every replica.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex, Weak},
    time::{Duration, SystemTime},
};

use tokio::{sync::Notify, time::Instant};

use super::StoreError;
use crate::domain::{decide_wait, Key, Namespace, Record, WaitCommand, WaitDecision, WaitOutcome};

/// A Wait, as both stores run it: looks at the record with `read` (which returns it, live or not,
/// with the store's time; its argument says whether this is the Wait's first look) and answers
/// when `decide_wait` says it is completed or free, or when the Wait's timeout (or a little before
/// it, the caller's deadline) has passed. Meanwhile it sleeps until the key changes, its lease may
/// have expired, or `poll` (if it says so) has passed, and looks again. Reading is bounded by the
/// caller's deadline, not by the Wait's own timeout: a Wait always answers with the record's
/// state.
/// Pause before a Wait looks again after a look failed retryably.
const LOOK_RETRY: Duration = Duration::from_millis(250);

pub async fn wait<Read>(
    waiters: &Waiters,
    command: &WaitCommand,
    deadline: Option<Instant>,
    read: impl Fn(bool) -> Read,
    poll: impl Fn() -> Option<Duration>,
) -> Result<WaitOutcome, StoreError>
where
    Read: Future<Output = Result<(Option<Record>, SystemTime), StoreError>>,
{
    let until = wait_until(command.timeout, deadline);
    let registration = waiters.register(&command.namespace, &command.key);
    let mut first_look = true;
    // The record as last seen held: what a look that cannot finish in time answers with.
    let mut last_held: Option<Record> = None;
    loop {
        // Listen before looking, so a change in between is not missed.
        let notified = registration.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (record, now) = match (read(first_look).await, last_held.take()) {
            (Ok(look), _) => look,
            // The last look, after the Wait's time is up, could not finish before the caller's
            // deadline (a slow or busy database): the key was held when last seen, so the
            // answer is TIMED_OUT with that record rather than no answer at all.
            (Err(StoreError::DeadlineExceeded), Some(record)) if Instant::now() >= until => {
                return Ok(WaitOutcome::TimedOut { record })
            }
            // The database cannot answer now (a failover, a restart) but the Wait has time
            // left: it looks again shortly instead of failing. The LISTEN connection's return
            // wakes every Wait, which cuts the pause short.
            (Err(StoreError::Unavailable(reason)), held) if Instant::now() + LOOK_RETRY < until => {
                tracing::debug!(%reason, "a Wait's look failed; looking again");
                last_held = held;
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(LOOK_RETRY) => {}
                }
                continue;
            }
            (Err(error), _) => return Err(error),
        };
        first_look = false;
        match (decide_wait(record.as_ref(), now), record) {
            (WaitDecision::Completed, Some(record)) => {
                return Ok(WaitOutcome::Completed { record })
            }
            (WaitDecision::Held { lease_expires_at }, Some(record)) => {
                if Instant::now() >= until {
                    return Ok(WaitOutcome::TimedOut { record });
                }
                let lease_left = lease_expires_at.duration_since(now).unwrap_or_default();
                let look_again = poll().map_or(lease_left, |poll| lease_left.min(poll));
                let wake = until.min(Instant::now() + look_again);
                last_held = Some(record);
                // Either way, look again: the next round answers.
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

/// When a Wait must give up: its own timeout or, a little before it, the caller's deadline —
/// early enough that the TIMED_OUT answer reaches the caller before it stops listening.
fn wait_until(timeout: Duration, deadline: Option<Instant>) -> Instant {
    let own = Instant::now() + timeout;
    let margin = Duration::from_millis(20);
    deadline.map_or(own, |deadline| {
        deadline.checked_sub(margin).unwrap_or(deadline).min(own)
    })
}

type WaitKey = (Namespace, Key);

/// The keys being waited on in this process.
#[derive(Default)]
pub struct Waiters {
    keys: Mutex<HashMap<WaitKey, Weak<Notify>>>,
}

/// A registration; the key's entry goes away when the last one is dropped.
pub struct Registration<'a> {
    waiters: &'a Waiters,
    key: WaitKey,
    pub notify: Arc<Notify>,
}

impl Waiters {
    /// Registers interest in `key`. Register before reading the record, so a change between the
    /// read and the wait is not missed.
    pub fn register(&self, namespace: &Namespace, key: &Key) -> Registration<'_> {
        let wait_key = (namespace.clone(), key.clone());
        // A std Mutex: held for a map lookup, never across an await.
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let notify = match keys.get(&wait_key).and_then(Weak::upgrade) {
            Some(notify) => notify,
            None => {
                // Entries whose last registration raced its removal linger as dead weak
                // references; sweep them now and then so the map stays as small as the waits.
                if keys.len() % 256 == 255 {
                    keys.retain(|_, weak| weak.strong_count() > 0);
                }
                let notify = Arc::new(Notify::new());
                keys.insert(wait_key.clone(), Arc::downgrade(&notify));
                notify
            }
        };
        Registration {
            waiters: self,
            key: wait_key,
            notify,
        }
    }

    /// Wakes every local waiter of `key`.
    pub fn wake(&self, namespace: &Namespace, key: &Key) {
        let notify = {
            let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            keys.get(&(namespace.clone(), key.clone()))
                .and_then(Weak::upgrade)
        };
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    /// Wakes every local waiter (e.g. after notifications may have been lost).
    pub fn wake_all(&self) {
        let all: Vec<Arc<Notify>> = {
            let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            keys.values().filter_map(Weak::upgrade).collect()
        };
        for notify in all {
            notify.notify_waiters();
        }
    }

    /// Keys with at least one waiter.
    pub fn len(&self) -> usize {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.values().filter(|weak| weak.strong_count() > 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut keys = self.waiters.keys.lock().unwrap_or_else(|p| p.into_inner());
        // This registration still holds one strong reference; the entry goes with the last one.
        if Arc::strong_count(&self.notify) == 1 {
            keys.remove(&self.key);
        }
    }
}
