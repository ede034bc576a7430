//! Acknowledged Completes survive a SIGKILLed idemd and a crashed PostgreSQL; a dead or frozen
//! database gives UNAVAILABLE within the query timeout, and idemd recovers by itself when it
//! returns.
//!
//! What survived is read back through a store with the replay cache off (`TestServer::uncached`)
//! or through a freshly started process: a replica that answered the Complete has the record in
//! its cache and would answer it even if PostgreSQL had lost it.

use std::time::{Duration, Instant};

use idemd::proto::idempotency::v1 as pb;
use idemd::proto::idempotency::v1::idempotency_service_client::IdempotencyServiceClient;
use idemd::store::postgres::PostgresConfig;
use tonic::Code;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use crate::harness::*;
use crate::processes::{Cluster, IdemdProcess};

const NS: &str = "durability";

/// Time beyond the store's query timeout for an UNAVAILABLE to reach the client: the gRPC round
/// trip on loopback and a busy 2-core scheduler. Not a speed target: the bound under test is the
/// configured query timeout, which covers waiting for a connection and the statement together.
const ANSWER_MARGIN: Duration = Duration::from_secs(1);

/// A result whose bytes cover every value, different per record.
fn result_for(index: usize) -> pb::Result {
    let body = (0..=255u8)
        .cycle()
        .skip(index)
        .take(300 + index * 7)
        .collect();
    pb::Result {
        body,
        code: i32::try_from(index).unwrap_or(0) - 50,
        metadata: [
            ("index".to_string(), index.to_string()),
            ("ünïcode".to_string(), "välue ✓".to_string()),
        ]
        .into_iter()
        .collect(),
    }
}

/// Acquires and completes `count` keys; returns (key, acknowledged record) pairs.
async fn complete_many(client: &mut Client, count: usize) -> Vec<(String, pb::Record)> {
    let mut done = Vec::new();
    for index in 0..count {
        let key = unique_key(&format!("durable-{index}"));
        let lease = client
            .acquire(acquire_request(NS, &key, b"fp"))
            .await
            .expect("acquire")
            .into_inner()
            .lease
            .expect("lease");
        let record = client
            .complete(pb::CompleteRequest {
                namespace: NS.into(),
                key: key.clone(),
                lease_token: lease.token,
                result: Some(result_for(index)),
                retention: None,
            })
            .await
            .expect("complete")
            .into_inner()
            .record
            .expect("record");
        done.push((key, record));
    }
    done
}

/// Every acknowledged record reads back identical, by Get and by Acquire's replay.
async fn assert_all_there(client: &mut Client, done: &[(String, pb::Record)]) {
    for (key, acknowledged) in done {
        let record = client
            .get(pb::GetRequest {
                namespace: NS.into(),
                key: key.clone(),
            })
            .await
            .unwrap_or_else(|status| panic!("acknowledged record {key} is gone: {status:?}"))
            .into_inner()
            .record;
        assert_eq!(record.as_ref(), Some(acknowledged), "record {key} changed");
        let replay = client
            .acquire(acquire_request(NS, key, b"fp"))
            .await
            .expect("acquire")
            .into_inner();
        assert_eq!(replay.outcome(), pb::Outcome::Completed);
        assert_eq!(replay.record.expect("record").result, acknowledged.result);
    }
}

/// Every acknowledged record reads back identical from PostgreSQL itself, through a store that
/// keeps no replay cache.
async fn assert_all_in_database(url: &str, done: &[(String, pb::Record)]) {
    let reader = TestServer::uncached(url).await;
    assert_all_there(&mut reader.client().await, done).await;
    reader.stop().await;
}

async fn connect(addr: std::net::SocketAddr) -> Client {
    IdempotencyServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completes_survive_sigkill_of_idemd() {
    let database = TestDatabase::create().await;
    let server = IdemdProcess::start(&["--database-url", &database.url]);
    let mut client = connect(server.addr).await;
    let done = complete_many(&mut client, 40).await;
    server.kill();

    // A new process has an empty replay cache: its answers come from PostgreSQL.
    let restarted = IdemdProcess::start(&["--database-url", &database.url]);
    let mut client = connect(restarted.addr).await;
    assert_all_there(&mut client, &done).await;
}

async fn readiness(channel: tonic::transport::Channel) -> ServingStatus {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: idemd::server::SERVICE_NAME.into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_gives_unavailable_then_recovers() {
    let cluster = Cluster::start();
    let database = TestDatabase::create_on(&cluster.admin_url()).await;
    let config = PostgresConfig {
        pool_size: 4,
        connect_timeout: Duration::from_secs(1),
        query_timeout: Duration::from_secs(2),
        ..PostgresConfig::new(database.url.clone())
    };
    let store = std::sync::Arc::new(idemd::store::PostgresStore::connect(&config).expect("pool"));
    let server = TestServer::start(store, test_settings()).await;
    let mut client = server.client().await;
    let channel = server.channel().await;
    eventually(Duration::from_secs(10), "readiness SERVING", || {
        let channel = channel.clone();
        async move { readiness(channel).await == ServingStatus::Serving }
    })
    .await;
    let done = complete_many(&mut client, 20).await;
    let in_flight_key = unique_key("in-flight");
    let in_flight = client
        .acquire(acquire_request(NS, &in_flight_key, b""))
        .await
        .expect("acquire")
        .into_inner()
        .lease
        .expect("lease");

    cluster.crash();

    // Every RPC that needs the database answers UNAVAILABLE, well before the client's deadline.
    let deadline = Duration::from_secs(20);
    let mut slowest = Duration::ZERO;
    for attempt in 0..3 {
        let mut request = tonic::Request::new(acquire_request(NS, &unique_key("outage"), b""));
        request.set_timeout(deadline);
        let started = Instant::now();
        let status = client.acquire(request).await.expect_err("database is down");
        slowest = slowest.max(started.elapsed());
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "attempt {attempt}: {status:?}"
        );
        assert_eq!(reason(&status), "STORE_UNAVAILABLE");
        let mut request = tonic::Request::new(pb::GetRequest {
            namespace: NS.into(),
            key: done[0].0.clone(),
        });
        request.set_timeout(deadline);
        let started = Instant::now();
        let status = client.get(request).await.expect_err("database is down");
        slowest = slowest.max(started.elapsed());
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    eprintln!("slowest UNAVAILABLE answer during the outage: {slowest:?}");
    assert!(
        slowest <= config.query_timeout + ANSWER_MARGIN,
        "an UNAVAILABLE took {slowest:?}, beyond the query timeout of {:?}",
        config.query_timeout
    );
    eventually(Duration::from_secs(10), "readiness NOT_SERVING", || {
        let channel = channel.clone();
        async move { readiness(channel).await == ServingStatus::NotServing }
    })
    .await;

    cluster.start_again();
    let recovery = Instant::now();
    eventually(Duration::from_secs(30), "RPCs succeed again", || {
        let mut client = client.clone();
        let key = done[0].0.clone();
        async move {
            client
                .get(pb::GetRequest {
                    namespace: NS.into(),
                    key,
                })
                .await
                .is_ok()
        }
    })
    .await;
    eprintln!(
        "recovered {:?} after the database came back",
        recovery.elapsed()
    );
    // Every acknowledged Complete survived the crash of PostgreSQL: read from the database
    // itself, since this replica has them all in its replay cache.
    assert_all_in_database(&database.url, &done).await;
    // And the replica that lived through the outage answers the same.
    assert_all_there(&mut client, &done).await;
    // The lease granted before the crash is still held and can complete.
    let completed = client
        .complete(pb::CompleteRequest {
            namespace: NS.into(),
            key: in_flight_key,
            lease_token: in_flight.token,
            result: Some(result_for(99)),
            retention: None,
        })
        .await
        .expect("lease from before the crash completes")
        .into_inner()
        .record
        .expect("record");
    assert_eq!(completed.fencing_token, in_flight.fencing_token);
    eventually(Duration::from_secs(10), "readiness SERVING again", || {
        let channel = channel.clone();
        async move { readiness(channel).await == ServingStatus::Serving }
    })
    .await;
    server.stop().await;
    drop(database);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_database_gives_unavailable_within_the_query_timeout() {
    let cluster = Cluster::start();
    let database = TestDatabase::create_on(&cluster.admin_url()).await;
    let config = PostgresConfig {
        pool_size: 4,
        connect_timeout: Duration::from_secs(1),
        query_timeout: Duration::from_secs(2),
        ..PostgresConfig::new(database.url.clone())
    };
    let store = std::sync::Arc::new(idemd::store::PostgresStore::connect(&config).expect("pool"));
    let server = TestServer::start(store, test_settings()).await;
    let mut client = server.client().await;
    let done = complete_many(&mut client, 5).await;

    // Open connections stay open but nothing answers: the worst case for a client.
    cluster.signal_all("STOP");
    let mut slowest = Duration::ZERO;
    for _ in 0..3 {
        let mut request = tonic::Request::new(acquire_request(NS, &unique_key("frozen"), b""));
        request.set_timeout(Duration::from_secs(20));
        let started = Instant::now();
        let status = client
            .acquire(request)
            .await
            .expect_err("database is frozen");
        slowest = slowest.max(started.elapsed());
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    eprintln!("slowest UNAVAILABLE answer while frozen: {slowest:?}");
    cluster.signal_all("CONT");
    assert!(
        slowest <= config.query_timeout + ANSWER_MARGIN,
        "an UNAVAILABLE took {slowest:?}, beyond the query timeout of {:?}",
        config.query_timeout
    );

    eventually(Duration::from_secs(30), "RPCs succeed again", || {
        let mut client = client.clone();
        async move {
            client
                .acquire(acquire_request(NS, &unique_key("thawed"), b""))
                .await
                .is_ok()
        }
    })
    .await;
    assert_all_in_database(&database.url, &done).await;
    assert_all_there(&mut client, &done).await;
    server.stop().await;
    drop(database);
}

/// Connections killed by the database and new connections refused (as during maintenance):
/// UNAVAILABLE, never INTERNAL, and recovery when connections are allowed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_terminated_connections_give_unavailable() {
    let database = TestDatabase::create().await;
    let server = TestServer::on_database(&database, test_settings()).await;
    let mut client = server.client().await;
    let done = complete_many(&mut client, 3).await;
    let name = database
        .url
        .rsplit('/')
        .next()
        .expect("database name")
        .to_string();
    let admin = {
        let (admin, connection) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls)
            .await
            .expect("admin");
        tokio::spawn(connection);
        admin
    };
    admin
        .batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
        .await
        .expect("refuse new connections");
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&name],
        )
        .await
        .expect("terminate backends");
    for _ in 0..3 {
        let status = client
            .get(pb::GetRequest {
                namespace: NS.into(),
                key: done[0].0.clone(),
            })
            .await
            .expect_err("no connection possible");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(reason(&status), "STORE_UNAVAILABLE");
    }
    admin
        .batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .await
        .expect("allow connections");
    eventually(Duration::from_secs(10), "recovered", || {
        let mut client = client.clone();
        let key = done[0].0.clone();
        async move {
            client
                .get(pb::GetRequest {
                    namespace: NS.into(),
                    key,
                })
                .await
                .is_ok()
        }
    })
    .await;
    assert_all_in_database(&database.url, &done).await;
    assert_all_there(&mut client, &done).await;
    server.stop().await;
}

/// A server that stops taking writes (a demoted primary, or one made read-only to fence it)
/// answers every command with SQLSTATE 25006. That is UNAVAILABLE, never INTERNAL, and the
/// connection that got it is not reused: once a writable server is reachable again, idemd serves
/// within a few calls instead of failing on its pooled read-only sessions for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_server_is_unavailable_and_its_connections_are_replaced() {
    let database = TestDatabase::create().await;
    let config = PostgresConfig {
        pool_size: 2,
        replay_cache_bytes: 0,
        ..PostgresConfig::new(database.url.clone())
    };
    let store = std::sync::Arc::new(idemd::store::PostgresStore::connect(&config).expect("pool"));
    let server = TestServer::start(store, test_settings()).await;
    let mut client = server.client().await;
    let first = unique_key("writable");
    client
        .acquire(acquire_request(NS, &first, b"f"))
        .await
        .expect("acquire while writable");

    // Every new session of this database is read-only from now on; the pooled ones are ended.
    let admin = database.connect().await;
    let name: String = admin
        .query_one("SELECT current_database()", &[])
        .await
        .expect("database name")
        .get(0);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} SET default_transaction_read_only = on"
        ))
        .await
        .expect("make the database read-only");
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("end idemd's sessions");

    // Enough calls that both pool connections are reopened as read-only sessions and used.
    for attempt in 0..6 {
        let key = unique_key("read-only");
        let status = client
            .acquire(acquire_request(NS, &key, b"f"))
            .await
            .expect_err("a read-only server cannot grant a lease");
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "attempt {attempt}: a read-only server must be UNAVAILABLE: {status:?}"
        );
    }
    let read_only_sessions: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'idemd'",
            &[],
        )
        .await
        .expect("count sessions")
        .get(0);
    println!("idemd sessions while read-only: {read_only_sessions}");

    // Writable again for new sessions. Sessions opened while read-only stay read-only: a pool
    // that kept them would fail forever; idemd must replace them and serve.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} RESET default_transaction_read_only"
        ))
        .await
        .expect("make the database writable");
    let recovered = unique_key("writable-again");
    let mut answers = Vec::new();
    for _ in 0..(config.pool_size + 2) {
        match client.acquire(acquire_request(NS, &recovered, b"f")).await {
            Ok(response) => {
                answers.push(format!("{:?}", response.into_inner().outcome()));
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                answers.push(format!("{:?}", status.code()));
            }
        }
    }
    assert_eq!(
        answers.last().map(String::as_str),
        Some("Acquired"),
        "idemd kept its read-only sessions: {answers:?}"
    );
}
