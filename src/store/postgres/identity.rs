//! Which PostgreSQL server idemd is talking to, and what changes when that server changes.
//!
//! Behind a multi-host URL (or a DNS name or Service that moves), a failover silently hands idemd
//! another server: the promoted standby. Every new connection asks the server who it is
//! (`SERVER_IDENTITY`: the cluster's system identifier and its current timeline, which every
//! promotion raises). When that differs from what the replica saw before:
//!
//! - the replay cache is dropped: with asynchronous replication the new primary may lack records
//!   the cache holds, and the cache must not vouch for what the database no longer has;
//! - pooled connections opened before are closed when next taken from the pool, so no command
//!   keeps talking to the old server (a demoted primary still answers reads);
//! - the fencing sequence is raised to the new timeline's floor (see `fencing_floor`), so that
//!   tokens handed out after the promotion exceed every token the old primary handed out, even
//!   those that never reached the standby.
//!
//! The readiness check asks the same question every round, so a replica that is idle notices too.

use std::sync::Mutex;
use std::time::Instant;

use deadpool_postgres::{Hook, HookError, Object};
use tokio_postgres::Client;

use super::cache::CompletedRecords;
use super::errors::from_db;
use super::sql;
use crate::store::StoreError;

/// Bits of a fencing token below the timeline: each timeline starts its tokens at
/// `timeline << TIMELINE_SHIFT`, and has room for 2^44 (1.7e13) of them before it would reach
/// the next timeline's floor; timelines up to 2^19 fit in a positive bigint.
const TIMELINE_SHIFT: u32 = 44;

/// What one connection found at the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerIdentity {
    /// `pg_control_system().system_identifier`: the same on a primary and the standbys made from
    /// it, different for an unrelated cluster.
    pub system: i64,
    /// The timeline the server writes (a primary) or replays (a standby).
    pub timeline: i64,
}

/// A server's identity and whether it takes writes.
#[derive(Debug, Clone, Copy)]
pub struct ServerState {
    pub identity: ServerIdentity,
    /// A standby, or a server made read-only (`default_transaction_read_only`).
    pub read_only: bool,
    /// The fencing sequence's last value: `None` before migrations created it, `Some(None)`
    /// before its first token (or right after a raise to a floor).
    fencing_last: Option<Option<i64>>,
}

impl ServerState {
    /// The smallest fencing token this server's timeline may hand out.
    fn fencing_floor(&self) -> Option<i64> {
        self.identity
            .timeline
            .checked_shl(TIMELINE_SHIFT)
            .filter(|floor| *floor > 0 && (*floor >> TIMELINE_SHIFT) == self.identity.timeline)
    }
}

/// Asks the server on `client` who it is.
pub async fn ask(client: &Client) -> Result<ServerState, StoreError> {
    let row = client
        .query_one(sql::SERVER_IDENTITY, &[])
        .await
        .map_err(from_db)?;
    Ok(ServerState {
        identity: ServerIdentity {
            system: row.try_get(0).map_err(from_db)?,
            timeline: row.try_get(1).map_err(from_db)?,
        },
        read_only: row.try_get(2).map_err(from_db)?,
        fencing_last: if row.try_get(3).map_err(from_db)? {
            Some(row.try_get(4).map_err(from_db)?)
        } else {
            None
        },
    })
}

/// The server this replica saw last, and since when connections are known to reach it.
pub struct ServerWatch {
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    identity: Option<ServerIdentity>,
    /// Connections created before this may reach a previous server.
    current_since: Option<Instant>,
}

impl ServerWatch {
    pub fn new() -> Self {
        Self {
            seen: Mutex::new(Seen::default()),
        }
    }

    /// Notes that a connection created at `created` reached `identity`. On a change the replay
    /// cache is dropped and older connections are no longer current. Returns whether it changed.
    pub fn observe(
        &self,
        identity: ServerIdentity,
        created: Instant,
        completed: &CompletedRecords,
    ) -> bool {
        // A std mutex: nothing awaits while it is held.
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let previous = seen.identity.replace(identity);
        if previous.is_none() || previous == Some(identity) {
            completed.confirm();
            return false;
        }
        seen.current_since = Some(
            seen.current_since
                .map_or(created, |since| since.max(created)),
        );
        // Dropped while the lock is held: a connection that observes the next change waits, so
        // the cache is never cleared for an older change after a newer one.
        completed.forget_before(created);
        completed.confirm();
        tracing::warn!(
            previous_system = previous.map(|p| p.system),
            previous_timeline = previous.map(|p| p.timeline),
            system = identity.system,
            timeline = identity.timeline,
            "the database server changed (a failover?): replay cache dropped, connections to \
             the previous server are closed"
        );
        true
    }

    /// Whether a connection created at `created` may be reused: it reaches the current server.
    pub fn is_current(&self, created: Instant) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.current_since.is_none_or(|since| created >= since)
    }
}

impl Default for ServerWatch {
    fn default() -> Self {
        Self::new()
    }
}

/// Raises the fencing sequence to the floor of the server's timeline, once per timeline.
///
/// Asynchronous replication can lose the tail of the old primary's history, sequence state
/// included: the promoted standby's sequence may be behind tokens the old primary handed out
/// for keys whose rows were lost too, and a new lease on such a key would get a smaller token
/// than one a client already holds. Every promotion raises the timeline, so starting each
/// timeline's tokens at `timeline << TIMELINE_SHIFT` keeps them above every earlier timeline's.
/// The advisory lock makes the check-and-set one step among replicas (`nextval` is never
/// blocked, and the sequence only ever moves up).
pub async fn fencing_floor(client: &mut Client, state: &ServerState) -> Result<(), StoreError> {
    let Some(floor) = state.fencing_floor() else {
        return Ok(());
    };
    // Nothing to raise on a read-only server, or before migrations. A sequence not yet used
    // reads as no value (even right after a raise): the check-and-set then runs and finds it
    // at the floor already, a no-op; only a database that never handed out a token pays it.
    let Some(last) = state.fencing_last else {
        return Ok(());
    };
    if state.read_only || last.is_some_and(|last| last >= floor) {
        return Ok(());
    }
    let transaction = client.transaction().await.map_err(from_db)?;
    transaction
        .execute(sql::FENCING_FLOOR_LOCK, &[&sql::FENCING_FLOOR_LOCK_KEY])
        .await
        .map_err(from_db)?;
    let raised = transaction
        .execute(sql::FENCING_FLOOR, &[&floor])
        .await
        .map_err(from_db)?;
    transaction.commit().await.map_err(from_db)?;
    if raised > 0 {
        tracing::info!(
            timeline = state.identity.timeline,
            floor,
            "fencing tokens of this timeline start at its floor"
        );
    }
    Ok(())
}

/// Checks a new connection's server (see the module's comment) before the pool lends it.
pub fn post_create(
    watch: std::sync::Arc<ServerWatch>,
    completed: std::sync::Arc<CompletedRecords>,
) -> Hook {
    Hook::async_fn(move |client, metrics| {
        let (watch, completed) = (watch.clone(), completed.clone());
        let created = metrics.created;
        Box::pin(async move {
            let state = ask(client)
                .await
                .map_err(|error| HookError::message(error.to_string()))?;
            watch.observe(state.identity, created, &completed);
            fencing_floor(client, &state)
                .await
                .map_err(|error| HookError::message(error.to_string()))?;
            Ok(())
        })
    })
}

/// Refuses, when the pool hands it out again, a connection opened before the server changed:
/// the pool closes it and takes or opens another.
pub fn post_recycle(watch: std::sync::Arc<ServerWatch>) -> Hook {
    Hook::sync_fn(move |_, metrics| {
        if watch.is_current(metrics.created) {
            Ok(())
        } else {
            Err(HookError::message(
                "connection to a previous database server",
            ))
        }
    })
}

/// When `object`'s connection was opened.
pub fn created(object: &Object) -> Instant {
    Object::metrics(object).created
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(timeline: i64) -> ServerIdentity {
        ServerIdentity {
            system: 7,
            timeline,
        }
    }

    #[test]
    fn a_new_timeline_makes_older_connections_stale() {
        let watch = ServerWatch::new();
        let completed = CompletedRecords::new(1 << 20);
        let first = Instant::now();
        assert!(!watch.observe(identity(1), first, &completed), "first look");
        assert!(!watch.observe(identity(1), Instant::now(), &completed));
        assert!(watch.is_current(first), "same server: all current");
        let promoted = Instant::now();
        assert!(watch.observe(identity(2), promoted, &completed));
        assert!(!watch.is_current(first), "opened before the promotion");
        assert!(watch.is_current(promoted));
    }

    #[test]
    fn each_timeline_has_a_higher_floor() {
        let state = |timeline| ServerState {
            identity: identity(timeline),
            read_only: false,
            fencing_last: Some(None),
        };
        let (one, two) = (state(1).fencing_floor(), state(2).fencing_floor());
        assert!(
            one.is_some() && two.is_some() && one < two,
            "{one:?} {two:?}"
        );
        assert_eq!(state(0).fencing_floor(), None, "timelines start at 1");
        assert_eq!(state(1 << 20).fencing_floor(), None, "past the bigint");
        assert_eq!(state(-1).fencing_floor(), None);
    }
}
