//! Wakes local Waits when a key they wait on changes: one `Notify` per key being waited on,
//! created by the first waiter and gone with the last. Shared by both stores; the PostgreSQL store
//! feeds it from LISTEN/NOTIFY so a Complete on one replica wakes waiters on every replica.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

use tokio::sync::Notify;

use crate::domain::{Key, Namespace};

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
