//! Completed records, kept per replica so replays skip the database.
//!
//! A completed record never changes until it expires at the end of its retention: nothing in
//! idemd writes a completed row again, and the reaper deletes only expired rows. So while a cached
//! record is live, the answer the database would give to a replayed Acquire (COMPLETED, or
//! FINGERPRINT_MISMATCH) or to a Get is exactly the cached one, decided by the same domain rules.
//!
//! Only expiry depends on time, and time is the database's (`now()`). The replica's clock may
//! disagree with it, so the cache tracks the offset between the two from every database answer
//! that carries `now()`, measured so that it over-estimates the database's clock (the statement
//! started after it was sent), and adds a margin. Until it has seen the database's clock once, it
//! answers nothing. Erring, it treats a record as expired a little early and asks the database.
//!
//! The one exception to "a completed record never changes" is the admin API's purge, which
//! deletes a record early. Every replica then drops it from its cache (see `super::listener` and
//! `super::admin`), and a read that was under way while it did so must not put the record back:
//! each read takes the cache's `generation` before asking the database, and `remember` undoes its
//! insert if an invalidation happened since.
//!
//! "The database" must stay the same one: after a failover to a standby that replicated
//! asynchronously, a cached record may be missing from the new primary. So the cache answers only
//! while the server is known (`super::identity` reports every new connection's server): it goes
//! quiet when a connection fails, until a command succeeds on a current connection or a new one
//! has reported, and it is emptied when the reported server differs from the last (records from
//! connections to the old one are then refused, see `remember`).

use std::{
    sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use quick_cache::{sync::Cache, Weighter};

use crate::domain::{Key, Namespace, Record, RecordState};

/// Added to the estimate of the database's clock: covers the replica's clock being stepped
/// between two observations.
const CLOCK_MARGIN: Duration = Duration::from_secs(1);

/// Bytes counted per entry besides its strings and result: the record's fields, the allocations
/// behind them and the table slot (measured: 16 MiB of weight is about 20 MiB of resident memory).
const ENTRY_OVERHEAD: u64 = 512;

#[derive(Clone)]
struct RecordWeight;

impl Weighter<String, Record> for RecordWeight {
    fn weight(&self, key: &String, record: &Record) -> u64 {
        let result = record.result.as_ref().map_or(0, |result| {
            result.body.len()
                + result
                    .metadata
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>()
        });
        (key.len() + record.fingerprint.as_bytes().len() + record.holder.as_str().len() + result)
            as u64
            + ENTRY_OVERHEAD
    }
}

/// The database's clock as seen from this replica.
#[derive(Default)]
pub struct DbClock {
    /// Database time minus local time, in microseconds, from the latest observation.
    offset_us: AtomicI64,
    known: AtomicBool,
}

impl DbClock {
    /// `db_now` came back from a statement sent at local time `sent`.
    pub fn observe(&self, sent: SystemTime, db_now: SystemTime) {
        let offset = match db_now.duration_since(sent) {
            Ok(ahead) => i64::try_from(ahead.as_micros()).unwrap_or(i64::MAX),
            Err(behind) => -i64::try_from(behind.duration().as_micros()).unwrap_or(i64::MAX),
        };
        self.offset_us.store(offset, Ordering::Relaxed);
        self.known.store(true, Ordering::Release);
    }

    /// A time no earlier than the database's `now()`, if the offset is known.
    pub fn now_at_least(&self) -> Option<SystemTime> {
        if !self.known.load(Ordering::Acquire) {
            return None;
        }
        let offset = self.offset_us.load(Ordering::Relaxed);
        let local = SystemTime::now() + CLOCK_MARGIN;
        if offset >= 0 {
            local.checked_add(Duration::from_micros(offset.unsigned_abs()))
        } else {
            local.checked_sub(Duration::from_micros(offset.unsigned_abs()))
        }
    }
}

/// A bounded cache of completed records, by (namespace, key).
pub struct CompletedRecords {
    records: Option<Cache<String, Record, RecordWeight>>,
    pub clock: DbClock,
    /// Bumped by every invalidation, before it removes anything.
    generation: AtomicU64,
    /// Records read on connections opened before this are not kept: they may come from a
    /// server that is no longer the primary (see `super::identity`).
    trusted_since: Mutex<Option<Instant>>,
    /// Whether the cache answers: not before a connection has told which server it reached,
    /// nor between a failed connection and the next one's report (the server may have changed
    /// meanwhile: a failover starts with connection errors).
    answering: AtomicBool,
}

fn cache_key(namespace: &str, key: &str) -> String {
    // Length-prefixed, so no (namespace, key) pair can collide with another.
    format!("{}:{namespace}{key}", namespace.len())
}

impl CompletedRecords {
    /// A cache holding at most `bytes` of records (0 turns it off).
    pub fn new(bytes: u64) -> Self {
        let records = (bytes > 0).then(|| {
            let estimated_items = usize::try_from(bytes / 1024).unwrap_or(1024).max(16);
            Cache::with_weighter(estimated_items, bytes, RecordWeight)
        });
        Self {
            records,
            clock: DbClock::default(),
            generation: AtomicU64::new(0),
            trusted_since: Mutex::new(None),
            answering: AtomicBool::new(false),
        }
    }

    /// Whether the cache is on.
    pub fn enabled(&self) -> bool {
        self.records.is_some()
    }

    /// Take this before reading a record from the database, and give it to `remember`.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Stops answering until `confirm`: a connection failed, and the server may be changing.
    pub fn suspend(&self) {
        self.answering.store(false, Ordering::SeqCst);
    }

    /// A new connection reached the server the cached records came from (or the cache was
    /// emptied for a new one): answer again.
    pub fn confirm(&self) {
        self.answering.store(true, Ordering::SeqCst);
    }

    /// Remembers `record`, read or written on a connection opened at `connected`, if it is
    /// completed, that connection reaches the current server, and no invalidation happened since
    /// `generation` was taken (the record may have been purged after it was read). Insert first,
    /// check after: an invalidation either removes the entry after the insert, or bumped the
    /// generation before the check, which then removes it.
    pub fn remember(&self, record: &Record, generation: u64, connected: Instant) {
        let Some(records) = &self.records else {
            return;
        };
        if record.state != RecordState::Completed {
            return;
        }
        // Held while inserting: `forget_before` cannot clear between the check and the insert.
        let trusted_since = self.trusted_since.lock().unwrap_or_else(|p| p.into_inner());
        if trusted_since.is_none_or(|since| connected >= since) {
            let cache_key = cache_key(record.namespace.as_str(), record.key.as_str());
            records.insert(cache_key.clone(), record.clone());
            if self.generation.load(Ordering::SeqCst) != generation {
                records.remove(&cache_key);
            }
        }
    }

    /// Drops (namespace, key): it was purged.
    pub fn forget(&self, namespace: &str, key: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(records) = &self.records {
            records.remove(&cache_key(namespace, key));
        }
    }

    /// Drops every record: many were purged, or invalidations may have been missed.
    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(records) = &self.records {
            records.clear();
        }
    }

    /// Forgets every record, and from now on keeps only records from connections opened at or
    /// after `connected`: the database server changed, and the new one may lack what the old one
    /// had (asynchronous replication loses its tail in a failover).
    pub fn forget_before(&self, connected: Instant) {
        let mut trusted_since = self.trusted_since.lock().unwrap_or_else(|p| p.into_inner());
        *trusted_since = Some(trusted_since.map_or(connected, |since| since.max(connected)));
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(records) = &self.records {
            records.clear();
        }
        drop(trusted_since);
    }

    /// The completed record of (namespace, key), if cached and certainly still live by the
    /// database's clock; the time returned is no earlier than the database's now.
    pub fn live(&self, namespace: &Namespace, key: &Key) -> Option<(Record, SystemTime)> {
        let records = self.records.as_ref()?;
        if !self.answering.load(Ordering::SeqCst) {
            return None;
        }
        let now = self.clock.now_at_least()?;
        let cache_key = cache_key(namespace.as_str(), key.as_str());
        let record = records.get(&cache_key)?;
        if record.is_live(now) {
            return Some((record, now));
        }
        records.remove(&cache_key);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_clock_is_over_estimated() {
        let clock = DbClock::default();
        assert!(
            clock.now_at_least().is_none(),
            "unknown before any observation"
        );
        let sent = SystemTime::now();
        // The database runs 10 s behind this replica.
        clock.observe(sent, sent - Duration::from_secs(10));
        let estimate = clock.now_at_least().expect("known");
        let db_now = SystemTime::now() - Duration::from_secs(10);
        assert!(estimate >= db_now, "{estimate:?} < {db_now:?}");
        assert!(estimate <= db_now + CLOCK_MARGIN + Duration::from_millis(100));
        // And 10 s ahead.
        let sent = SystemTime::now();
        clock.observe(sent, sent + Duration::from_secs(10));
        let estimate = clock.now_at_least().expect("known");
        assert!(estimate >= SystemTime::now() + Duration::from_secs(10));
    }

    #[test]
    fn keys_do_not_collide() {
        assert_ne!(cache_key("ab", "c"), cache_key("a", "bc"));
        assert_ne!(cache_key("a:", "b"), cache_key("a", ":b"));
    }
}
