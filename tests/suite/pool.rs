//! The pool lends the connection returned last (LIFO): at low load the same few PostgreSQL
//! backends serve the commands, warm, while the rest of the pool sits idle, instead of every
//! command waking the backend that has slept longest (deadpool's default, FIFO). PostgreSQL's
//! own view of its sessions shows which backends ran a statement.

use idemd::proto::idempotency::v1 as pb;
use tokio::task::JoinSet;

use crate::harness::*;

const NAMESPACE: &str = "pool";

/// A Get of a key nobody has: always a statement in PostgreSQL (the replay cache cannot answer).
async fn miss(client: &mut Client) {
    let status = client
        .get(pb::GetRequest {
            namespace: NAMESPACE.into(),
            key: unique_key("missing"),
        })
        .await
        .expect_err("no such record");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
}

/// The pool's sessions (not the listener's, not this test's), and how many of them started a
/// statement after `since`.
async fn sessions(sql: &tokio_postgres::Client, since: Option<std::time::SystemTime>) -> i64 {
    let row = sql
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND backend_type = 'client backend'
               AND pid <> pg_backend_pid() AND application_name <> 'idemd-listener'
               AND ($1::timestamptz IS NULL OR query_start > $1::timestamptz)",
            &[&since],
        )
        .await
        .expect("pg_stat_activity");
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_caller_reuses_the_connection_returned_last() {
    let database = TestDatabase::create().await;
    let server = TestServer::on_database(&database, test_settings()).await;
    let client = server.client().await;
    // A burst opens most of the pool (8 connections in the tests' configuration).
    let mut burst = JoinSet::new();
    for _ in 0..64 {
        let mut client = client.clone();
        burst.spawn(async move { miss(&mut client).await });
    }
    while let Some(done) = burst.join_next().await {
        done.expect("task");
    }
    let sql = database.connect().await;
    let opened = sessions(&sql, None).await;
    assert!(
        opened >= 4,
        "the burst opened {opened} connections: too few to tell the pool's order"
    );
    // Then one caller at a time. The database's clock marks the start.
    let since: std::time::SystemTime = sql
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .expect("clock")
        .get(0);
    let mut client = client.clone();
    for _ in 0..40 {
        miss(&mut client).await;
    }
    let used = sessions(&sql, Some(since)).await;
    // One connection serves them all; a second may have run the counts' flush or the reaper
    // meanwhile. Lent in turn (FIFO), all `opened` would have.
    assert!(
        (1..=2).contains(&used),
        "{used} of {opened} pooled connections ran the 40 sequential Gets"
    );
}
