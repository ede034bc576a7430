//! GetNamespaceStats on PostgreSQL, where each replica counts events in memory and adds them into
//! `idemd_minute_counts` about once a second: two replicas' counts add up, a replica restarted
//! after a graceful stop neither loses nor doubles its counts, a flush whose answer was lost is
//! not added twice, a replica killed with SIGKILL keeps what it flushed, and the reaper forgets
//! minutes older than 25 hours. (What the counts mean, on both stores, is
//! `admin::namespaces_and_stats_count`.)

use std::sync::Arc;
use std::time::Duration;

use idemd::domain::{AcquireCommand, AcquireOutcome, Fingerprint, Holder, Key, Namespace};
use idemd::server::ServerSettings;
use idemd::store::postgres::PostgresConfig;
use idemd::store::{AdminStore, PostgresStore, Store};

use crate::admin::{acquire, complete, stats_totals};
use crate::faults::{database_behind_proxy, Fault};
use crate::harness::*;
use crate::processes::IdemdProcess;

/// The namespace's counts as stored in the table: (created, completed, taken over).
async fn stored(sql: &tokio_postgres::Client, namespace: &str) -> (i64, i64, i64) {
    let row = sql
        .query_one(
            "SELECT COALESCE(sum(created), 0)::bigint, COALESCE(sum(completed), 0)::bigint,
                    COALESCE(sum(taken_over), 0)::bigint
             FROM idemd_minute_counts WHERE namespace = $1",
            &[&namespace],
        )
        .await
        .expect("read counts");
    (row.get(0), row.get(1), row.get(2))
}

/// Acquires and completes `count` new keys of `namespace`.
async fn finish_keys(server: &TestServer, namespace: &str, prefix: &str, count: usize) {
    let mut client = server.client().await;
    for index in 0..count {
        let key = format!("{prefix}-{index}");
        let lease = acquire(&mut client, namespace, &key, 60_000, "w").await;
        complete(&mut client, namespace, &key, &lease.token).await;
    }
}

/// Replica A and replica B count events of one namespace in the same minutes; each answers the
/// sum of both once the other has flushed (the flush adds into the shared rows, it does not
/// overwrite them), and never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_from_two_replicas_add_up() {
    const NS: &str = "stats-replicas";
    let database = TestDatabase::create().await;
    let replica_a = TestServer::on_database(&database, test_settings()).await;
    let replica_b = TestServer::on_database(&database, test_settings()).await;
    finish_keys(&replica_a, NS, "a", 3).await;
    finish_keys(&replica_b, NS, "b", 2).await;
    let mut client_b = replica_b.client().await;
    acquire(&mut client_b, NS, "b-running", 60_000, "w").await;
    // Each replica's own events show at once, before any flush.
    let mut admin_a = replica_a.admin().await;
    let own = stats_totals(&mut admin_a, NS).await;
    assert!(own.0 >= 3 && own.1 >= 3, "A's own events: {own:?}");
    let sql = database.connect().await;
    // Both replicas flush within about a second; then the table holds the sum.
    eventually(
        Duration::from_secs(10),
        "both replicas' counts stored",
        || {
            let sql = &sql;
            async move { stored(sql, NS).await == (6, 5, 0) }
        },
    )
    .await;
    let mut admin_b = replica_b.admin().await;
    assert_eq!(stats_totals(&mut admin_a, NS).await, (6, 5, 0));
    assert_eq!(stats_totals(&mut admin_b, NS).await, (6, 5, 0));
    replica_a.stop().await;
    replica_b.stop().await;
    assert_eq!(
        stored(&sql, NS).await,
        (6, 5, 0),
        "a stop adds nothing twice"
    );
}

/// A replica stopped gracefully adds its last counts on the way out; started again on the same
/// database, it answers them once, counts on from there, and its later flushes add only what is
/// new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_after_a_restart_does_not_double_count() {
    const NS: &str = "stats-restart";
    let database = TestDatabase::create().await;
    let sql = database.connect().await;
    // Flushes only at shutdown in this first life: whatever the table holds then came from it.
    let first_life = ServerSettings {
        counts_flush_interval: Duration::from_secs(3600),
        ..test_settings()
    };
    let replica = TestServer::on_database(&database, first_life).await;
    finish_keys(&replica, NS, "before", 4).await;
    assert_eq!(
        stored(&sql, NS).await,
        (0, 0, 0),
        "no flush before the stop"
    );
    replica.stop().await;
    assert_eq!(
        stored(&sql, NS).await,
        (4, 4, 0),
        "the stop flushed the last counts"
    );

    let replica = TestServer::on_database(&database, test_settings()).await;
    let mut admin_client = replica.admin().await;
    assert_eq!(stats_totals(&mut admin_client, NS).await, (4, 4, 0));
    finish_keys(&replica, NS, "after", 2).await;
    assert_eq!(stats_totals(&mut admin_client, NS).await, (6, 6, 0));
    eventually(Duration::from_secs(10), "the new counts stored", || {
        let sql = &sql;
        async move { stored(sql, NS).await == (6, 6, 0) }
    })
    .await;
    assert_eq!(stats_totals(&mut admin_client, NS).await, (6, 6, 0));
    replica.stop().await;
    assert_eq!(stored(&sql, NS).await, (6, 6, 0));
}

fn acquire_command(namespace: &str, key: &str) -> AcquireCommand {
    AcquireCommand {
        namespace: Namespace::parse(namespace.into()).expect("namespace"),
        key: Key::parse(key.into()).expect("key"),
        fingerprint: Fingerprint::default(),
        lease_ttl: Duration::from_secs(60),
        retention: Duration::from_secs(3600),
        holder: Holder::default(),
    }
}

async fn create(store: &PostgresStore, namespace: &str, key: &str) {
    let outcome = store
        .acquire(acquire_command(namespace, key), None)
        .await
        .expect("acquire");
    assert!(
        matches!(outcome, AcquireOutcome::Acquired { .. }),
        "{outcome:?}"
    );
}

/// A flush whose statement committed but whose answer never came back (the connection stalled
/// past the query timeout) is sent again, and the second time adds nothing: the counts are
/// stored once, and the replica's answer counts them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_whose_answer_was_lost_is_not_counted_twice() {
    const NS: &str = "stats-lost";
    let database = TestDatabase::create().await;
    let sql = database.connect().await;
    let (proxy, url) = database_behind_proxy(&database).await;
    // One connection, so the flush statement prepared by the first flush is ready on it and the
    // stalled flush is a single round trip.
    let config = PostgresConfig {
        pool_size: 1,
        query_timeout: Duration::from_millis(1000),
        replay_cache_bytes: 0,
        ..PostgresConfig::new(url)
    };
    let store = Arc::new(PostgresStore::connect(&config).expect("pool"));
    create(&store, NS, "k-1").await;
    store.flush_counts().await.expect("first flush");
    assert_eq!(stored(&sql, NS).await, (1, 0, 0));
    create(&store, NS, "k-2").await;
    create(&store, NS, "k-3").await;
    // Each way takes 600 ms: the statement reaches PostgreSQL and commits, its answer would
    // arrive after the 1 s timeout.
    proxy.set(Fault::Delay(Duration::from_millis(600)));
    let lost = store.flush_counts().await;
    assert!(lost.is_err(), "the flush's answer should be lost: {lost:?}");
    proxy.set(Fault::Pass);
    eventually(
        Duration::from_secs(10),
        "the stalled flush committed",
        || {
            let sql = &sql;
            async move { stored(sql, NS).await == (3, 0, 0) }
        },
    )
    .await;
    store.flush_counts().await.expect("the flush sent again");
    assert_eq!(stored(&sql, NS).await, (3, 0, 0), "added twice");
    let namespace = Namespace::parse(NS.into()).expect("namespace");
    let minutes = store
        .namespace_stats(namespace, Duration::from_secs(600))
        .await
        .expect("stats");
    let created: u64 = minutes.iter().map(|minute| minute.created).sum();
    assert_eq!(created, 3);
}

/// The reaper deletes stored minutes older than 25 hours, and keeps the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_forgets_minutes_older_than_25_hours() {
    let database = TestDatabase::create().await;
    let sql = database.connect().await;
    sql.batch_execute(
        "INSERT INTO idemd_minute_counts (namespace, minute, created) VALUES
            ('old', date_trunc('minute', now() - interval '25 hours 2 minutes'), 7),
            ('old', date_trunc('minute', now() - interval '24 hours'), 5),
            ('new', date_trunc('minute', now()), 1)",
    )
    .await
    .expect("insert counts");
    let store = database.store();
    store.reap_expired(100).await.expect("reap");
    let rows = sql
        .query(
            "SELECT namespace, created FROM idemd_minute_counts ORDER BY namespace, minute",
            &[],
        )
        .await
        .expect("rows");
    let left: Vec<(String, i64)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    assert_eq!(left, [("new".to_string(), 1), ("old".to_string(), 5)]);
}

/// A real `idemd serve` process flushes its counts about once a second with no shutdown in
/// sight, so a SIGKILL loses at most the last second's: what it flushed stays, and a replica
/// started on the same database answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_with_sigkill_keeps_what_it_flushed() {
    const NS: &str = "stats-killed";
    let database = TestDatabase::create().await;
    let sql = database.connect().await;
    let killed = IdemdProcess::start(&["--database-url", &database.url]);
    let mut client = Client::connect(format!("http://{}", killed.addr))
        .await
        .expect("connect");
    for index in 0..3 {
        let key = format!("k-{index}");
        let lease = acquire(&mut client, NS, &key, 60_000, "w").await;
        complete(&mut client, NS, &key, &lease.token).await;
    }
    eventually(Duration::from_secs(10), "the counts flushed", || {
        let sql = &sql;
        async move { stored(sql, NS).await == (3, 3, 0) }
    })
    .await;
    // One more event, then SIGKILL before (or just after) the next flush.
    acquire(&mut client, NS, "last", 60_000, "w").await;
    killed.kill();
    let left = stored(&sql, NS).await;
    assert!(
        left == (3, 3, 0) || left == (4, 3, 0),
        "flushed counts lost or changed: {left:?}"
    );
    let restarted = IdemdProcess::start(&["--database-url", &database.url]);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", restarted.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut admin_client = AdminClient::new(channel);
    let answered = stats_totals(&mut admin_client, NS).await;
    assert_eq!(
        answered,
        (
            u64::try_from(left.0).expect("count"),
            u64::try_from(left.1).expect("count"),
            0
        )
    );
}
