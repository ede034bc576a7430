//! Losing the primary under load: a primary and a streaming standby (`Rig::start_pair`), three
//! replicas on a multi-host URL with `target_session_attrs=read-write`, the chaos workload, and a
//! failover mid-load. The promotion is `pg_ctl promote` from the test, after a pause for an HA
//! manager's detection, except in `primary_node_killed_pg_auto_failover_promotes`, where a
//! pg_auto_failover formation (`Rig::start_formation`) fails over by itself; building one takes
//! about 30 s, so the other scenarios do without (docs/RELIABILITY.md).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use idemd::proto::idempotency::v1 as pb;
use idemd::proto::idempotency::v1::idempotency_service_client::IdempotencyServiceClient;
use tokio::task::JoinHandle;
use tonic::Code;

use super::history::{Call, Op, Reply, Violation};
use super::rig::Rig;
use super::{run, Database, Scenario};
use crate::processes::Replication;

/// Between the primary's death and the promotion: a little under what pg_auto_failover took
/// here with its health checks tightened (1.8 s by hand on an idle box, 3.9 to 7.2 s in
/// `primary_node_killed_pg_auto_failover_promotes` on loaded cores).
const DETECTION: Duration = Duration::from_millis(1500);

/// The namespace of the Wait that spans the failover (apart from the workload's keys).
const WAIT_NAMESPACE: &str = "chaos-failover-wait";

/// A Wait started on one replica before the fault, on a key another replica holds.
struct WaitAcross {
    key: String,
    lease: pb::Lease,
    wait: JoinHandle<Result<tonic::Response<pb::WaitResponse>, tonic::Status>>,
}

impl WaitAcross {
    /// Takes a lease through replica 0 and starts a Wait through replica 1; returns once the
    /// Wait has looked at the record (its first look marks the record as waited on).
    async fn start(rig: &Arc<Rig>) -> Self {
        let key = crate::harness::unique_key("wait-across");
        let mut holder = IdempotencyServiceClient::new(rig.channel(0));
        let mut request = crate::harness::acquire_request(WAIT_NAMESPACE, &key, b"w");
        request.lease_ttl = crate::harness::ms(60_000);
        let lease = holder
            .acquire(request)
            .await
            .expect("acquire the waited-on key")
            .into_inner()
            .lease
            .expect("granted");
        let mut waiter = IdempotencyServiceClient::new(rig.channel(1));
        let wait_key = key.clone();
        let wait = tokio::spawn(async move {
            waiter
                .wait(pb::WaitRequest {
                    namespace: WAIT_NAMESPACE.into(),
                    key: wait_key,
                    timeout: crate::harness::ms(45_000),
                })
                .await
        });
        let admin = rig.admin().await;
        crate::harness::eventually(Duration::from_secs(10), "the Wait looked", || {
            let (admin, key) = (&admin, key.clone());
            async move {
                admin
                    .query_opt(
                        "SELECT 1 FROM idemd_records WHERE namespace = $1 AND key = $2 \
                         AND has_waiters",
                        &[&WAIT_NAMESPACE, &key],
                    )
                    .await
                    .is_ok_and(|row| row.is_some())
            }
        })
        .await;
        Self { key, lease, wait }
    }

    /// Completes the key through replica 2 (retrying while the failover lasts) and checks that
    /// the Wait, started before the fault, answers COMPLETED with that result.
    async fn finish(self, rig: &Arc<Rig>) {
        let mut completer = IdempotencyServiceClient::new(rig.channel(2));
        let started = std::time::Instant::now();
        loop {
            let outcome = completer
                .complete(pb::CompleteRequest {
                    namespace: WAIT_NAMESPACE.into(),
                    key: self.key.clone(),
                    lease_token: self.lease.token.clone(),
                    result: Some(crate::harness::sample_result("wait-across")),
                    retention: None,
                })
                .await;
            match outcome {
                Ok(_) => break,
                Err(status)
                    if status.code() == Code::Unavailable
                        && started.elapsed() < Duration::from_secs(20) =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!("completing the waited-on key failed: {status:?}"),
            }
        }
        let answered = tokio::time::timeout(Duration::from_secs(15), self.wait)
            .await
            .expect("the Wait started before the failover was not answered")
            .expect("wait task")
            .expect("the Wait started before the failover failed")
            .into_inner();
        assert_eq!(
            answered.record.map(|record| record.state()),
            Some(pb::RecordState::Completed),
            "the Wait started before the failover"
        );
    }
}

/// A synchronous standby loses nothing: SIGKILL to every process of the primary mid-load, the
/// standby promoted, load goes on. The history must hold every promise (0 violations), and a
/// Wait started before the fault is answered after it. Then the old primary comes back as a
/// standby of the new one, on its old port (the first host of the replicas' URL), under load:
/// it must not confuse them (a read-only server, skipped by `target_session_attrs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_synchronous_standby_promoted() {
    let scenario = Scenario {
        database: Database::Pair(Replication::Synchronous),
        ..Scenario::new("primary SIGKILLed, synchronous standby promoted")
    };
    run(scenario, |rig| async move {
        let waiting = WaitAcross::start(&rig).await;
        let fault = rig.inject(format!(
            "SIGKILL to every process of the primary, pg_ctl promote {} ms later",
            DETECTION.as_millis()
        ));
        rig.blocking(|rig| rig.cluster().kill_all()).await;
        tokio::time::sleep(DETECTION).await;
        rig.promote().await;
        rig.heal(fault).await;
        waiting.finish(&rig).await;
        let rejoin = rig.inject("old primary rebuilt as a standby of the new one, same port");
        rig.blocking(|rig| {
            let new_primary = rig.standby.as_ref().expect("a pair");
            rig.cluster().rejoin_as_standby_of(new_primary);
        })
        .await;
        rig.heal(rejoin).await;
    })
    .await;
}

/// The same loss of the primary, with a real HA manager doing the failover: a pg_auto_failover
/// formation (monitor, primary, synchronous standby; monitor health checks tightened, see
/// `processes::MONITOR_SETTINGS`). SIGKILL to the primary node's keeper and PostgreSQL
/// together, as a lost machine; the monitor notices and promotes the standby by itself, load
/// goes on, 0 violations. Then the old node's keeper restarts: pg_auto_failover rejoins it as a
/// standby of the new primary, under load, and the replicas must not be confused by it (any
/// INTERNAL is a violation of the history).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_node_killed_pg_auto_failover_promotes() {
    let scenario = Scenario {
        database: Database::AutoFailover,
        ..Scenario::new("primary node SIGKILLed, pg_auto_failover promotes its synchronous standby")
    };
    run(scenario, |rig| async move {
        let formation = || rig.formation.as_ref().expect("a formation");
        assert_eq!(formation().states().as_deref(), Some("primary,secondary"));
        // pg_auto_failover makes the standby synchronous by itself with two nodes (its
        // number_sync_standbys left at its default; synchronous_standby_names is `ANY 1 (standby)`).
        let admin = rig.admin().await;
        let replication: Vec<(String, String)> = admin
            .query(
                "SELECT current_setting('synchronous_commit'), sync_state \
                 FROM pg_stat_replication WHERE state = 'streaming'",
                &[],
            )
            .await
            .expect("the primary's replication state")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        assert!(
            matches!(replication.as_slice(), [(commit, sync)] if commit == "on" && (sync == "quorum" || sync == "sync")),
            "not one synchronous standby: {replication:?}"
        );
        let fault = rig.inject(
            "SIGKILL to the primary node's keeper and postgres, until pg_auto_failover \
             reports the standby promoted",
        );
        let killed = std::time::Instant::now();
        rig.blocking(|rig| {
            let formation = rig.formation.as_ref().expect("a formation");
            formation.kill_node(0);
            // node1 takes writes from wait_primary on (no standby to wait for yet).
            formation.wait_for("promotion of node1", |formation| {
                formation.states().is_some_and(|states| {
                    states.ends_with(",wait_primary") || states.ends_with(",primary")
                })
            });
        })
        .await;
        rig.note_promoted();
        let detected = killed.elapsed();
        let recovery = rig.heal(fault).await;
        eprintln!(
            "pg_auto_failover: standby promoted {} ms after SIGKILL; every replica served {} ms \
             after that",
            detected.as_millis(),
            recovery.as_millis()
        );
        let rejoin = rig.inject("old primary's keeper restarted, rejoined as a standby");
        let restarted = std::time::Instant::now();
        rig.blocking(|rig| {
            let formation = rig.formation.as_ref().expect("a formation");
            formation.restart_node(0);
            formation.wait_for("node0 back as a standby", |formation| {
                formation.states().as_deref() == Some("secondary,primary")
            });
        })
        .await;
        let rejoined = restarted.elapsed();
        let recovery = rig.heal(rejoin).await;
        eprintln!(
            "pg_auto_failover: old primary rejoined as a standby {} ms after its keeper \
             restarted; every replica served {} ms after that",
            rejoined.as_millis(),
            recovery.as_millis()
        );
    })
    .await;
}

/// A demoted or fenced primary stays up, read-only, while the standby is promoted: replicas
/// must leave it within seconds (its 25006 errors are UNAVAILABLE and close the connection; a new
/// one skips it thanks to `target_session_attrs`), never answering INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_primary_left_running_read_only() {
    let scenario = Scenario {
        database: Database::Pair(Replication::Synchronous),
        ..Scenario::new("old primary left running read-only, standby promoted")
    };
    run(scenario, |rig| async move {
        let fault = rig.inject("primary made read-only (reload), standby promoted 500 ms later");
        let admin = rig.admin().await;
        admin
            .batch_execute("ALTER SYSTEM SET default_transaction_read_only = on")
            .await
            .expect("make the primary read-only");
        admin
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .expect("reload");
        tokio::time::sleep(Duration::from_millis(500)).await;
        rig.promote().await;
        rig.heal(fault).await;
    })
    .await;
}

/// An asynchronous standby that is behind when the primary dies (its WAL receiver stopped
/// 500 ms earlier, the lag a loaded network gives): the failover loses the acknowledged Completes
/// of that window. This run counts them and what the replay caches did; it fails on anything
/// the loss does not explain (fencing going back, an error other than UNAVAILABLE, a cache that
/// still vouched for a lost record after its replica reached the new primary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_asynchronous_standby_behind() {
    let scenario = Scenario {
        database: Database::Pair(Replication::Asynchronous),
        lossy: true,
        ..Scenario::new("primary SIGKILLed, asynchronous standby 500 ms behind promoted")
    };
    run(scenario, |rig| async move {
        let standby = rig
            .standby
            .as_ref()
            .expect("a pair")
            .admin_url()
            .to_string();
        let (standby, connection) = tokio_postgres::connect(&standby, tokio_postgres::NoTls)
            .await
            .expect("connect to the standby");
        tokio::spawn(connection);
        let fault = rig.inject(format!(
            "standby cut off, primary SIGKILLed 500 ms later, pg_ctl promote {} ms after that",
            DETECTION.as_millis()
        ));
        standby
            .batch_execute("ALTER SYSTEM SET primary_conninfo = ''")
            .await
            .expect("cut the standby off");
        standby
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .expect("reload the standby");
        tokio::time::sleep(Duration::from_millis(500)).await;
        rig.blocking(|rig| rig.cluster().kill_all()).await;
        tokio::time::sleep(DETECTION).await;
        rig.promote().await;
        rig.heal(fault).await;
    })
    .await;
}

/// What a lossy failover did, from the history.
pub struct Loss {
    /// Acknowledged Completes whose result the new primary does not have.
    lost: usize,
    /// Answers with a lost result after the promotion, from a replica that had not yet
    /// written to the new primary (its cache could not know yet).
    cached_before_reconnect: usize,
    /// The same, after that replica had written to the new primary: must be 0.
    cached_after_reconnect: usize,
    /// Calls with a lease granted before the promotion that found no record after it: the
    /// grant itself was lost.
    leases_lost: usize,
    /// The checker's violations, all explained by the loss.
    violations: usize,
}

impl fmt::Display for Loss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "lost {} acknowledged Completes; replay caches answered a lost result {} times \
             after the promotion before their replica reached the new primary, {} times after; \
             {} leases lost; {} violations, all from the loss",
            self.lost,
            self.cached_before_reconnect,
            self.cached_after_reconnect,
            self.leases_lost,
            self.violations
        )
    }
}

/// Counts what an asynchronous failover lost (see `Loss`) and asserts what must hold anyway:
/// fencing tokens never go back, no error but retryable ones, and no replay cache vouches for a
/// lost result once its replica has reached the new primary.
pub fn judge_loss(
    ops: &[Op],
    violations: &[Violation],
    finals: &[(String, String)],
    promoted: Option<SystemTime>,
    replicas: usize,
) -> Loss {
    let promoted = promoted.expect("the lossy scenario promotes the standby");
    // The result the new primary holds for each key, as read without any cache at the end.
    let uncached = replicas;
    let mut durable: std::collections::HashMap<&str, Option<&Vec<u8>>> = Default::default();
    for op in ops.iter().filter(|op| op.replica == uncached) {
        if let Reply::Read { body } = &op.reply {
            durable.insert(op.key.as_str(), body.as_ref());
        }
    }
    // Acknowledged before the promotion, and not what the new primary holds now.
    let lost: Vec<(&str, &Vec<u8>)> = ops
        .iter()
        .filter(|op| op.returned <= promoted)
        .filter_map(|op| match &op.reply {
            Reply::Stored { body } => Some((op.key.as_str(), body)),
            _ => None,
        })
        .filter(|(key, body)| durable.get(key).copied().flatten() != Some(*body))
        .collect();
    // Each replica's first write answered by the new primary.
    let reconnected: Vec<Option<SystemTime>> = (0..replicas)
        .map(|replica| {
            ops.iter()
                .filter(|op| op.replica == replica && op.invoked >= promoted)
                .filter(|op| matches!(op.reply, Reply::Acquired { .. } | Reply::Stored { .. }))
                .map(|op| op.returned)
                .min()
        })
        .collect();
    let (mut before, mut after) = (0, 0);
    for op in ops
        .iter()
        .filter(|op| op.invoked >= promoted && op.replica < replicas)
    {
        let body = match &op.reply {
            Reply::Completed { body } => body,
            Reply::Read { body: Some(body) } => body,
            _ => continue,
        };
        if !lost
            .iter()
            .any(|(key, lost)| *key == op.key && *lost == body)
        {
            continue;
        }
        match reconnected[op.replica] {
            Some(at) if op.invoked >= at => after += 1,
            _ => before += 1,
        }
    }
    // A lease granted on the old primary in the lost window: its Complete, Renew or Release
    // after the promotion finds no record. Any other NOT_FOUND is not explained by the loss.
    let lease_lost = |v: &Violation| {
        v.what.starts_with("unexpected error NotFound")
            && v.ops.iter().any(|op| {
                op.invoked >= promoted
                    && matches!(
                        op.reply,
                        Reply::Failed {
                            code: Code::NotFound,
                            ..
                        }
                    ) && match op.call {
                    Call::Complete { fence, .. }
                    | Call::Renew { fence }
                    | Call::Release { fence } => ops.iter().any(|grant| {
                        grant.key == op.key
                            && grant.returned <= promoted
                            && matches!(grant.reply, Reply::Acquired { fence: f, .. } if f == fence)
                    }),
                    _ => false,
                }
            })
    };
    let leases_lost = violations.iter().filter(|v| lease_lost(v)).count();
    let unexplained: Vec<String> = violations
        .iter()
        .filter(|v| !lease_lost(v))
        .filter(|v| {
            v.what.starts_with("fencing token went")
                || v.what.starts_with("two grants with fencing token")
                || v.what.starts_with("unexpected error")
                || v.what.starts_with("a result no Complete ever sent")
        })
        .map(ToString::to_string)
        .collect();
    assert!(
        unexplained.is_empty(),
        "violations a lost tail does not explain:\n{}",
        unexplained.join("\n")
    );
    assert!(
        finals.is_empty(),
        "keys stuck after the failover: {finals:?}"
    );
    assert_eq!(
        after, 0,
        "a replay cache answered a lost result after its replica had reached the new primary"
    );
    Loss {
        lost: lost.len(),
        cached_before_reconnect: before,
        cached_after_reconnect: after,
        leases_lost,
        violations: violations.len(),
    }
}

/// Per replica: from the end of its last call that failed retryably to the end of its first call
/// invoked after that and answered otherwise (the recovery a client of that replica saw); `None`
/// for a replica none of whose calls failed.
pub fn recovery_per_replica(ops: &[Op], replicas: usize) -> Vec<Option<std::time::Duration>> {
    let failed = |op: &Op| matches!(op.reply, Reply::Failed { code, .. } if super::retryable(code));
    (0..replicas)
        .map(|replica| {
            let last_failure = ops
                .iter()
                .filter(|op| op.replica == replica && failed(op))
                .map(|op| op.returned)
                .max()?;
            let first_success = ops
                .iter()
                .filter(|op| op.replica == replica && !failed(op) && op.invoked >= last_failure)
                .map(|op| op.returned)
                .min()?;
            first_success.duration_since(last_failure).ok()
        })
        .collect()
}

/// `recovery_per_replica`, as the report shows it.
pub fn describe_recovery(recovery: &[Option<std::time::Duration>]) -> String {
    let each: Vec<String> = recovery
        .iter()
        .map(|at| match at {
            Some(at) => format!("{} ms", at.as_millis()),
            None => "never failed".into(),
        })
        .collect();
    format!(
        "last failed call to first success, per replica: {}",
        each.join(", ")
    )
}
