//! Per-minute event counts of each namespace, as GetNamespaceStats reports them: records created,
//! completed and taken over. Each replica counts the events it answers, in memory, as it answers
//! them; the memory store reads its counts back directly, the PostgreSQL store adds them into the
//! table `idemd_minute_counts` about once a second (`postgres::counts`) and reads that table plus
//! what it has not flushed yet.
//!
//! Counting is one short lock of a small map per command. The lock is a `std::sync::Mutex`, not
//! a Tokio one, because nothing asynchronous happens while it is held.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use crate::domain::admin::{fill_minutes, minute_of, minute_slot, MinuteCounts};
use crate::domain::{AcquireOutcome, Namespace, Record};

/// How long counts are kept: the longest stats window (24 h) and an hour to spare, so a window
/// that starts in a minute being forgotten still finds it.
pub const COUNTS_KEPT: Duration = Duration::from_secs(25 * 3600);

/// What happened in one minute of one namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub created: u64,
    pub completed: u64,
    pub taken_over: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.created = self.created.saturating_add(other.created);
        self.completed = self.completed.saturating_add(other.completed);
        self.taken_over = self.taken_over.saturating_add(other.taken_over);
    }
}

/// One event that GetNamespaceStats counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An Acquire created a record: the key had none, or only an expired one.
    Created,
    /// A Complete stored a result (a retried Complete that finds its result stored does not
    /// count again).
    Completed,
    /// An Acquire took a live record over from a lease that had expired or was released.
    TakenOver,
}

/// Counts by namespace, then by minute (seconds since the Unix epoch of the minute's start).
pub type Tally = HashMap<String, BTreeMap<u64, Counts>>;

/// Seconds since the Unix epoch of the start of the minute `time` falls in.
pub fn minute_key(time: SystemTime) -> u64 {
    minute_of(time)
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// The minute a minute key names.
pub fn minute_time(minute: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(minute)
}

/// The event of an Acquire's outcome, if any: its namespace, what happened, and when (the
/// store's time, which the record carries: the database's on PostgreSQL).
pub fn acquire_event(
    outcome: &AcquireOutcome,
    lease_ttl: Duration,
) -> Option<(&Namespace, Event, SystemTime)> {
    match outcome {
        AcquireOutcome::Acquired {
            record,
            taken_over: false,
            ..
        } => Some((&record.namespace, Event::Created, record.created_at)),
        // A takeover keeps the record's creation time; its lease starts now.
        AcquireOutcome::Acquired {
            record,
            taken_over: true,
            ..
        } => Some((
            &record.namespace,
            Event::TakenOver,
            record
                .lease_expires_at
                .checked_sub(lease_ttl)
                .unwrap_or(record.lease_expires_at),
        )),
        AcquireOutcome::InProgress { .. } | AcquireOutcome::Completed { .. } => None,
    }
}

/// When a record's result was stored (its completion time).
pub fn completion_time(record: &Record) -> SystemTime {
    record.completed_at.unwrap_or(record.created_at)
}

/// A replica's counts not yet handed on (to the table, on PostgreSQL).
#[derive(Default)]
pub struct MinuteCounter {
    tally: Mutex<Tally>,
}

impl MinuteCounter {
    fn lock(&self) -> MutexGuard<'_, Tally> {
        // Every change under the lock is a single addition: a poisoned lock still holds
        // consistent counts.
        self.tally.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one event of `namespace` at `time`.
    pub fn count(&self, namespace: &Namespace, time: SystemTime, event: Event) {
        let minute = minute_key(time);
        let mut tally = self.lock();
        // Looked up by `&str` first: a namespace already counted costs no allocation.
        let minutes = match tally.get_mut(namespace.as_str()) {
            Some(minutes) => minutes,
            None => tally.entry(namespace.as_str().to_string()).or_default(),
        };
        let counts = minutes.entry(minute).or_default();
        match event {
            Event::Created => counts.created += 1,
            Event::Completed => counts.completed += 1,
            Event::TakenOver => counts.taken_over += 1,
        }
    }

    /// Takes every count out (for a flush), leaving none.
    pub fn take(&self) -> Tally {
        std::mem::take(&mut *self.lock())
    }

    /// Whether nothing was counted since the last `take`.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Adds `namespace`'s counts of the minutes from `first_minute` on to `into`.
    pub fn add_to(&self, namespace: &Namespace, first_minute: u64, into: &mut [MinuteCounts]) {
        let tally = self.lock();
        if let Some(minutes) = tally.get(namespace.as_str()) {
            add_minutes(minutes, first_minute, into);
        }
    }

    /// Forgets the counts of minutes before `before` (a minute key).
    pub fn forget_before(&self, before: u64) {
        forget_before(&mut self.lock(), before);
    }
}

/// Adds the `minutes` from `first_minute` on to the matching entries of `into` (as
/// `fill_minutes` made them).
pub fn add_minutes(minutes: &BTreeMap<u64, Counts>, first_minute: u64, into: &mut [MinuteCounts]) {
    for (&minute, &counts) in minutes.range(first_minute..) {
        if let Some(slot) = minute_slot(into, minute_time(minute)) {
            slot.created = slot.created.saturating_add(counts.created);
            slot.completed = slot.completed.saturating_add(counts.completed);
            slot.taken_over = slot.taken_over.saturating_add(counts.taken_over);
        }
    }
}

/// Forgets the counts of minutes before `before` (a minute key), and namespaces left empty.
pub fn forget_before(tally: &mut Tally, before: u64) {
    tally.retain(|_, minutes| {
        *minutes = minutes.split_off(&before);
        !minutes.is_empty()
    });
}

/// Adds `more` into `tally`.
pub fn merge(tally: &mut Tally, more: Tally) {
    for (namespace, minutes) in more {
        let into = tally.entry(namespace).or_default();
        for (minute, counts) in minutes {
            into.entry(minute).or_default().add(counts);
        }
    }
}

/// Every minute of `window` ending at `now`, counts zero, and the key of the first.
pub fn window_minutes(window: Duration, now: SystemTime) -> (Vec<MinuteCounts>, u64) {
    let start = now.checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH);
    (fill_minutes(start, now), minute_key(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace(name: &str) -> Namespace {
        Namespace::parse(name.into()).expect("namespace")
    }

    #[test]
    fn counts_land_in_their_minute_and_namespace() {
        let counter = MinuteCounter::default();
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 * 60);
        let (a, b) = (namespace("a"), namespace("b"));
        counter.count(&a, base + Duration::from_secs(59), Event::Created);
        counter.count(&a, base + Duration::from_secs(60), Event::Completed);
        counter.count(&a, base + Duration::from_secs(61), Event::TakenOver);
        counter.count(&b, base, Event::Created);
        let (mut minutes, first) =
            window_minutes(Duration::from_secs(120), base + Duration::from_secs(120));
        assert_eq!(minutes.len(), 3);
        counter.add_to(&a, first, &mut minutes);
        let seen: Vec<(u64, u64, u64)> = minutes
            .iter()
            .map(|m| (m.created, m.completed, m.taken_over))
            .collect();
        assert_eq!(seen, [(1, 0, 0), (0, 1, 1), (0, 0, 0)]);
        let taken = counter.take();
        assert!(counter.is_empty());
        assert_eq!(taken.len(), 2);
        let mut again = Tally::default();
        merge(&mut again, taken.clone());
        merge(&mut again, taken);
        assert_eq!(again["a"][&minute_key(base)].created, 2);
        forget_before(&mut again, minute_key(base) + 60);
        assert!(!again.contains_key("b"), "b's only minute is forgotten");
        assert_eq!(again["a"].len(), 1);
    }
}
