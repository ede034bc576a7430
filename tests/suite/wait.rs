//! Wait: in-flight duplicates wait for the result instead of polling, on both stores, and across
//! replicas through LISTEN/NOTIFY.

use std::{sync::Arc, time::Duration};

use idemd::proto::idempotency::v1 as pb;
use idemd::store::postgres::PostgresConfig;
use idemd::store::{MemoryStore, PostgresStore};
use tonic::Code;

use crate::harness::*;

const NS: &str = "waiting";

fn wait_request(key: &str, timeout_ms: u64) -> pb::WaitRequest {
    pb::WaitRequest {
        namespace: NS.into(),
        key: key.into(),
        timeout: ms(timeout_ms),
    }
}

async fn lease(client: &mut Client, key: &str, ttl_ms: u64) -> pb::Lease {
    let mut request = acquire_request(NS, key, b"");
    request.lease_ttl = ms(ttl_ms);
    client
        .acquire(request)
        .await
        .expect("acquire")
        .into_inner()
        .lease
        .expect("lease")
}

/// Completes, releases, lease expiry, no record, timeout: what every store must answer.
async fn wait_outcomes(
    server: &TestServer,
    until_waiting: impl Fn(String) -> futures_util::future::BoxFuture<'static, ()>,
) {
    let mut client = server.client().await;

    // No record: free at once.
    let response = client
        .wait(wait_request(&unique_key("none"), 10_000))
        .await
        .expect("wait")
        .into_inner();
    assert_eq!(response.outcome(), pb::WaitOutcome::Free);
    assert!(response.record.is_none());

    // Completed while waiting: the result comes back. The timeout and lease are long, so only
    // a wake-up can end the Wait in time.
    let key = unique_key("complete");
    let held = lease(&mut client, &key, 60_000).await;
    let waiting = {
        let mut client = client.clone();
        let key = key.clone();
        tokio::spawn(async move { client.wait(wait_request(&key, 60_000)).await })
    };
    until_waiting(key.clone()).await;
    client
        .complete(pb::CompleteRequest {
            namespace: NS.into(),
            key: key.clone(),
            lease_token: held.token,
            result: Some(sample_result("waited")),
            retention: None,
        })
        .await
        .expect("complete");
    let response = waiting.await.expect("task").expect("wait").into_inner();
    assert_eq!(response.outcome(), pb::WaitOutcome::Completed);
    assert_eq!(
        response.record.expect("record").result,
        Some(sample_result("waited"))
    );

    // Released while waiting: free, so the waiter may Acquire.
    let key = unique_key("release");
    let held = lease(&mut client, &key, 60_000).await;
    let waiting = {
        let mut client = client.clone();
        let key = key.clone();
        tokio::spawn(async move { client.wait(wait_request(&key, 60_000)).await })
    };
    until_waiting(key.clone()).await;
    client
        .release(pb::ReleaseRequest {
            namespace: NS.into(),
            key: key.clone(),
            lease_token: held.token,
        })
        .await
        .expect("release");
    let response = waiting.await.expect("task").expect("wait").into_inner();
    assert_eq!(response.outcome(), pb::WaitOutcome::Free);
    let acquired = client
        .acquire(acquire_request(NS, &key, b""))
        .await
        .expect("acquire")
        .into_inner();
    assert_eq!(acquired.outcome(), pb::Outcome::Acquired);

    // The lease runs out while waiting: free.
    let key = unique_key("expire");
    lease(&mut client, &key, 300).await;
    let response = client
        .wait(wait_request(&key, 60_000))
        .await
        .expect("wait")
        .into_inner();
    assert_eq!(response.outcome(), pb::WaitOutcome::Free);
    assert_eq!(
        response.record.expect("record").state(),
        pb::RecordState::InProgress
    );

    // Still held when the timeout passes: timed out, with the current record.
    let key = unique_key("timeout");
    lease(&mut client, &key, 60_000).await;
    let response = client
        .wait(wait_request(&key, 200))
        .await
        .expect("wait")
        .into_inner();
    assert_eq!(response.outcome(), pb::WaitOutcome::TimedOut);
    assert_eq!(
        response.record.expect("record").state(),
        pb::RecordState::InProgress
    );
    // The caller's deadline ends it too, with an answer before the deadline.
    let mut request = tonic::Request::new(wait_request(&key, 60_000));
    request.set_timeout(Duration::from_millis(300));
    let response = client
        .wait(request)
        .await
        .expect("answered before the deadline")
        .into_inner();
    assert_eq!(response.outcome(), pb::WaitOutcome::TimedOut);

    // A very short timeout still answers with the current state.
    let response = client
        .wait(wait_request(&key, 10))
        .await
        .expect("wait")
        .into_inner();
    assert_eq!(response.outcome(), pb::WaitOutcome::TimedOut);
    let invalid = client
        .wait(pb::WaitRequest {
            namespace: NS.into(),
            key: key.clone(),
            timeout: ms(600_000),
        })
        .await;
    assert_status(invalid, Code::InvalidArgument, "INVALID_REQUEST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_outcomes_memory() {
    let store = Arc::new(MemoryStore::new());
    let server = TestServer::start(store.clone(), test_settings()).await;
    wait_outcomes(&server, move |_key| {
        let store = store.clone();
        Box::pin(async move {
            eventually(Duration::from_secs(10), "the Wait is waiting", || {
                let waiting = store.waited_keys() == 1;
                async move { waiting }
            })
            .await;
        })
    })
    .await;
}

/// Until the record is marked as waited on (the Wait's first step).
fn marked(
    database: Arc<TestDatabase>,
) -> impl Fn(String) -> futures_util::future::BoxFuture<'static, ()> {
    move |key: String| {
        let database = database.clone();
        Box::pin(async move {
            let db = database.connect().await;
            eventually(
                Duration::from_secs(10),
                "the Wait marked the record",
                || {
                    let db = &db;
                    let key = key.clone();
                    async move {
                        db.query_one(
                        "SELECT has_waiters FROM idemd_records WHERE namespace = $1 AND key = $2",
                        &[&NS, &key],
                    )
                    .await
                    .map(|row| row.get::<_, bool>(0))
                    .unwrap_or(false)
                    }
                },
            )
            .await;
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_outcomes_postgres() {
    let database = Arc::new(TestDatabase::create().await);
    // A fallback poll longer than every wait in the test: only NOTIFY can wake the Waits early.
    let store = PostgresStore::connect(&PostgresConfig {
        wait_poll: Duration::from_secs(300),
        ..database.config()
    })
    .expect("pool");
    let server = TestServer::start(Arc::new(store), test_settings()).await;
    wait_outcomes(&server, marked(database.clone())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_on_one_replica_wakes_a_wait_on_another() {
    let database = Arc::new(TestDatabase::create().await);
    let config = PostgresConfig {
        wait_poll: Duration::from_secs(300),
        ..database.config()
    };
    let waiting_store = Arc::new(PostgresStore::connect(&config).expect("pool"));
    let replica_a = TestServer::start(waiting_store.clone(), test_settings()).await;
    let replica_b = TestServer::start(
        Arc::new(PostgresStore::connect(&config).expect("pool")),
        test_settings(),
    )
    .await;
    let (mut a, mut b) = (replica_a.client().await, replica_b.client().await);
    let key = unique_key("cross");
    let held = lease(&mut b, &key, 60_000).await;
    // Many duplicates wait on A.
    let mut waits = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let mut a = a.clone();
        let key = key.clone();
        waits.spawn(async move { a.wait(wait_request(&key, 60_000)).await });
    }
    marked(database.clone())(key.clone()).await;
    eventually(Duration::from_secs(10), "replica A listens", || {
        let listening = waiting_store.listening();
        async move { listening }
    })
    .await;
    b.complete(pb::CompleteRequest {
        namespace: NS.into(),
        key: key.clone(),
        lease_token: held.token,
        result: Some(sample_result("cross")),
        retention: None,
    })
    .await
    .expect("complete on B");
    while let Some(done) = waits.join_next().await {
        let response = done.expect("task").expect("wait").into_inner();
        assert_eq!(response.outcome(), pb::WaitOutcome::Completed);
        assert_eq!(
            response.record.expect("record").result,
            Some(sample_result("cross"))
        );
    }
    // A fresh Wait on A is answered at once.
    let response = a
        .wait(wait_request(&key, 60_000))
        .await
        .expect("wait")
        .into_inner();
    assert_eq!(response.outcome(), pb::WaitOutcome::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_bounded() {
    let settings = idemd::server::ServerSettings {
        max_waiters: 1,
        ..test_settings()
    };
    let store = Arc::new(MemoryStore::new());
    let server = TestServer::start(store.clone(), settings).await;
    let mut client = server.client().await;
    let key = unique_key("bounded");
    lease(&mut client, &key, 60_000).await;
    let first = {
        let mut client = client.clone();
        let key = key.clone();
        tokio::spawn(async move { client.wait(wait_request(&key, 2_000)).await })
    };
    eventually(Duration::from_secs(10), "first Wait waiting", || {
        let waiting = store.waited_keys() == 1;
        async move { waiting }
    })
    .await;
    assert_status(
        client.wait(wait_request(&key, 2_000)).await,
        Code::ResourceExhausted,
        "TOO_MANY_WAITERS",
    );
    // Waits do not take the RPC budget: other calls still work.
    client
        .get(pb::GetRequest {
            namespace: NS.into(),
            key: key.clone(),
        })
        .await
        .expect("get while waiting");
    let response = first.await.expect("task").expect("wait").into_inner();
    assert_eq!(response.outcome(), pb::WaitOutcome::TimedOut);
}
