//! Concurrent duplicates: exactly one caller gets the lease, whatever the interleaving, across
//! replicas sharing one database.

use std::sync::Arc;

use idemd::proto::idempotency::v1 as pb;
use idemd::store::MemoryStore;
use tokio::task::JoinSet;

use crate::harness::*;

const NS: &str = "concurrency";
const CALLERS: usize = 100;

/// Fires `CALLERS` concurrent Acquires of `key`, alternating between the clients, and returns
/// how many got each outcome, plus the leases granted.
async fn stampede(clients: &[Client], key: &str) -> (usize, usize, Vec<pb::Lease>) {
    let mut calls = JoinSet::new();
    for caller in 0..CALLERS {
        let mut client = clients[caller % clients.len()].clone();
        let mut request = acquire_request(NS, key, b"same request");
        request.holder = format!("caller-{caller}");
        calls.spawn(async move { client.acquire(request).await });
    }
    let (mut acquired, mut in_progress, mut leases) = (0, 0, Vec::new());
    while let Some(joined) = calls.join_next().await {
        let response = joined
            .expect("task")
            .expect("every duplicate gets an answer")
            .into_inner();
        match response.outcome() {
            pb::Outcome::Acquired => {
                acquired += 1;
                leases.push(response.lease.expect("lease"));
            }
            pb::Outcome::InProgress => in_progress += 1,
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    (acquired, in_progress, leases)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_winner_across_two_replicas_sharing_postgres() {
    let database = TestDatabase::create().await;
    let store_a = Arc::new(database.store());
    let store_b = Arc::new(database.store());
    let replica_a = TestServer::start(store_a.clone(), test_settings()).await;
    let replica_b = TestServer::start(store_b.clone(), test_settings()).await;
    // Several connections per replica, so requests really run side by side.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(replica_a.client().await);
        clients.push(replica_b.client().await);
    }
    for round in 0..20 {
        let key = unique_key(&format!("stampede-{round}"));
        let (acquired, in_progress, leases) = stampede(&clients, &key).await;
        assert_eq!(acquired, 1, "round {round}: exactly one ACQUIRED");
        assert_eq!(in_progress, CALLERS - 1, "round {round}");
        let db = database.connect().await;
        let rows: i64 = db
            .query_one(
                "SELECT count(*) FROM idemd_records WHERE namespace = $1 AND key = $2",
                &[&NS, &key],
            )
            .await
            .expect("count")
            .get(0);
        assert_eq!(rows, 1);
        let fencing: i64 = db
            .query_one(
                "SELECT fencing_token FROM idemd_records WHERE namespace = $1 AND key = $2",
                &[&NS, &key],
            )
            .await
            .expect("fencing")
            .get(0);
        assert_eq!(fencing as u64, leases[0].fencing_token);
    }
    // The insert race of the single-statement Acquire (a concurrent insert commits while the
    // statement runs, so neither of its branches returns a row) really happened in these
    // stampedes, and every caller still got a correct answer.
    let races = store_a.acquire_insert_races() + store_b.acquire_insert_races();
    eprintln!("insert races hit and re-decided: {races}");
    assert!(
        races > 0,
        "the stampedes never hit the insert race; the test proves nothing"
    );
    replica_a.stop().await;
    replica_b.stop().await;
}

/// Many callers find the same expired lease at once: exactly one takes it over.
async fn one_takeover_of_an_expired_lease(server: &TestServer) {
    let mut client = server.client().await;
    let clients: Vec<Client> = vec![client.clone(), server.client().await, server.client().await];
    for round in 0..5 {
        let key = unique_key(&format!("takeover-{round}"));
        let mut request = acquire_request(NS, &key, b"same request");
        request.lease_ttl = ms(50);
        let first = client.acquire(request).await.expect("acquire").into_inner();
        let first = first.lease.expect("lease");
        wait_past(to_system_time(&first.expires_at)).await;
        let (acquired, in_progress, leases) = stampede(&clients, &key).await;
        assert_eq!((acquired, in_progress), (1, CALLERS - 1), "round {round}");
        assert!(leases[0].fencing_token > first.fencing_token);
        let record = get_record(&mut client, NS, &key).await;
        assert_eq!(record.attempts, 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_takeover_postgres() {
    let database = TestDatabase::create().await;
    let server = TestServer::on_database(&database, test_settings()).await;
    one_takeover_of_an_expired_lease(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_takeover_memory() {
    one_takeover_of_an_expired_lease(&TestServer::memory().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_winner_memory() {
    let server = TestServer::start(Arc::new(MemoryStore::new()), test_settings()).await;
    let clients = vec![server.client().await, server.client().await];
    for round in 0..5 {
        let (acquired, in_progress, _) =
            stampede(&clients, &unique_key(&format!("mem-{round}"))).await;
        assert_eq!((acquired, in_progress), (1, CALLERS - 1));
    }
}

/// Acquires and Completes sent to PostgreSQL in shared batches keep every rule. Acquires: many
/// keys, each asked for by several callers at once (so one batch often holds the same key twice),
/// and exactly one caller per key gets the lease. Completes: a retried Complete with the same
/// token (even in the same batch) returns the one stored result, a stale token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_acquires_and_completes_keep_the_rules() {
    let database = TestDatabase::create().await;
    let store = Arc::new(
        idemd::store::PostgresStore::connect(&idemd::store::postgres::PostgresConfig {
            max_batch: 64,
            // One slot per command: the rest queue and go in shared batches.
            batch_slots: 1,
            pool_size: 4,
            ..database.config()
        })
        .expect("pool"),
    );
    let server = TestServer::start(store.clone(), test_settings()).await;
    let mut client = server.client().await;
    let mut acquires = JoinSet::new();
    for index in 0..150 {
        let key = unique_key(&format!("batch-{index}"));
        for caller in 0..3 {
            let mut client = client.clone();
            let mut request = acquire_request(NS, &key, b"");
            request.holder = format!("caller-{caller}");
            let key = key.clone();
            acquires.spawn(async move { (key, client.acquire(request).await) });
        }
    }
    let mut granted: std::collections::HashMap<String, Vec<pb::Lease>> = Default::default();
    while let Some(joined) = acquires.join_next().await {
        let (key, result) = joined.expect("task");
        let response = result.expect("every Acquire is answered").into_inner();
        let leases = granted.entry(key).or_default();
        match response.outcome() {
            pb::Outcome::Acquired => leases.push(response.lease.expect("lease")),
            pb::Outcome::InProgress => {}
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(granted.len(), 150);
    let mut leases = Vec::new();
    for (key, mut won) in granted {
        assert_eq!(
            won.len(),
            1,
            "{key}: exactly one of three callers holds the lease"
        );
        leases.push((key, won.remove(0).token));
    }
    let mut fencing: Vec<u64> = Vec::new();
    for (key, _) in &leases {
        fencing.push(get_record(&mut client, NS, key).await.fencing_token);
    }
    fencing.sort_unstable();
    fencing.dedup();
    assert_eq!(
        fencing.len(),
        leases.len(),
        "no two leases share a fencing token"
    );
    // Keys ending in an even digit keep the retention given at Acquire; the others set one hour.
    let one_hour = |key: &str| key.ends_with(['1', '3', '5', '7', '9']);
    // Each result names its key, and the one-hour keys carry one more metadata pair, so a batch
    // holds results of different sizes: a result stored on the wrong row, or metadata cut at the
    // wrong place, shows.
    let result_for = |key: &str, tag: &str| {
        let mut result = sample_result(&format!("{tag}:{key}"));
        if one_hour(key) {
            result.metadata.insert("x-extra".into(), key.into());
        }
        result
    };
    let complete = |key: &str, token: &str, tag: &str| pb::CompleteRequest {
        namespace: NS.into(),
        key: key.into(),
        lease_token: token.into(),
        result: Some(result_for(key, tag)),
        retention: one_hour(key).then_some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
    };
    let mut calls = JoinSet::new();
    for (key, token) in &leases {
        for (token, tag) in [
            (token.clone(), "first"),
            (token.clone(), "second"),
            ("0123456789abcdef0123456789abcdef".to_string(), "forged"),
        ] {
            let mut client = client.clone();
            let request = complete(key, &token, tag);
            let key = key.clone();
            calls.spawn(async move { (key, tag, client.complete(request).await) });
        }
    }
    let mut answers: std::collections::HashMap<String, Vec<pb::Record>> = Default::default();
    while let Some(joined) = calls.join_next().await {
        let (key, tag, result) = joined.expect("task");
        match (tag, result) {
            ("forged", result) => {
                assert_status(result, tonic::Code::FailedPrecondition, "LEASE_NOT_HELD");
            }
            (_, result) => {
                let record = result
                    .expect("complete")
                    .into_inner()
                    .record
                    .expect("record");
                answers.entry(key).or_default().push(record);
            }
        }
    }
    for (key, records) in &answers {
        assert_eq!(records.len(), 2);
        assert_eq!(
            records[0], records[1],
            "{key}: both Completes return the one stored record"
        );
        let stored = get_record(&mut client, NS, key).await;
        assert_eq!(&stored, &records[0]);
        let result = stored
            .result
            .as_ref()
            .expect("a completed record has its result");
        assert!(
            *result == result_for(key, "first") || *result == result_for(key, "second"),
            "{key}: the stored result is one this key's Completes sent"
        );
        let (completed, expires) = (
            stored.completed_at.expect("completed_at"),
            stored.expires_at.expect("expires_at"),
        );
        let kept = expires.seconds - completed.seconds;
        if one_hour(key) {
            assert!(
                (3599..=3601).contains(&kept),
                "{key}: retention set at Complete, {kept} s"
            );
        } else {
            assert!(kept > 3601, "{key}: retention given at Acquire, {kept} s");
        }
    }
    assert_eq!(answers.len(), leases.len());
    assert!(
        store.shared_batches().1 > 0,
        "no batch carried more than one Complete: the test proves nothing about batching"
    );
}
