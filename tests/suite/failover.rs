//! Losing the primary: multi-host URLs, readiness while no writable server is reachable, and what
//! a promotion changes for the replay cache and the fencing tokens. Servers are real PostgreSQL
//! 15 clusters of the test's own (a primary and a streaming standby made by pg_basebackup); the
//! chaos suite runs the same failovers under load with three idemd processes.

use std::sync::Arc;
use std::time::Duration;

use idemd::proto::idempotency::v1 as pb;
use idemd::store::postgres::{migrate, PostgresConfig};
use idemd::store::{PostgresStore, Store};
use tonic::Code;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use crate::harness::*;
use crate::processes::{free_port, Cluster, Replication};

const NS: &str = "failover";

async fn readiness(channel: tonic::transport::Channel) -> ServingStatus {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: idemd::server::SERVICE_NAME.into(),
        })
        .await
        .map(|response| response.into_inner().status())
        .unwrap_or(ServingStatus::Unknown)
}

async fn await_readiness(channel: &tonic::transport::Channel, wanted: ServingStatus) {
    eventually(
        Duration::from_secs(20),
        &format!("readiness {wanted:?}"),
        || {
            let channel = channel.clone();
            async move { readiness(channel).await == wanted }
        },
    )
    .await;
}

/// The database name at the end of a `postgres://…/name` URL.
fn database_name(url: &str) -> &str {
    url.rsplit_once('/').map_or(url, |(_, name)| name)
}

/// Acquire then Complete `key`; returns the fencing token and the stored record.
async fn complete(client: &mut Client, key: &str) -> (u64, pb::Record) {
    let lease = client
        .acquire(acquire_request(NS, key, b"f"))
        .await
        .expect("acquire")
        .into_inner()
        .lease
        .expect("granted");
    let record = client
        .complete(pb::CompleteRequest {
            namespace: NS.into(),
            key: key.into(),
            lease_token: lease.token,
            result: Some(sample_result(key)),
            retention: None,
        })
        .await
        .expect("complete")
        .into_inner()
        .record
        .expect("record");
    (lease.fencing_token, record)
}

/// Repeats `call` while it answers UNAVAILABLE (a failover in progress), for up to 20 s.
async fn through_failover<T, F, Fut>(what: &str, mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let started = std::time::Instant::now();
    loop {
        match call().await {
            Err(status)
                if status.code() == Code::Unavailable
                    && started.elapsed() < Duration::from_secs(20) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) if status.code() == Code::Unavailable => {
                panic!("{what}: still UNAVAILABLE after 20 s: {status:?}")
            }
            other => return other,
        }
    }
}

/// A multi-host URL (both spellings libpq accepts) whose first host refuses connections and
/// whose second is a read-only server: migrations, the pool, the LISTEN connection of Waits and
/// the reaper all reach the third, writable one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_urls_reach_the_writable_server_past_dead_and_read_only_ones() {
    let read_only = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("start cluster");
    let dead = free_port();
    for form in ["url", "key-value"] {
        let database = TestDatabase::create_empty().await;
        let name = database_name(&database.url).to_string();
        // The same database on the read-only server, so that only its read-only state can make
        // idemd pass it by.
        let (admin, connection) =
            tokio_postgres::connect(&read_only.admin_url(), tokio_postgres::NoTls)
                .await
                .expect("connect to the read-only server");
        tokio::spawn(connection);
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("a twin database");
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {name} SET default_transaction_read_only = on"
            ))
            .await
            .expect("make the twin read-only");
        let writable = port_of(&admin_url());
        let url = match form {
            "url" => format!(
                "postgres://postgres@127.0.0.1:{dead},127.0.0.1:{},127.0.0.1:{writable}/{name}\
                 ?target_session_attrs=read-write",
                read_only.port()
            ),
            _ => format!(
                "host=127.0.0.1,127.0.0.1,127.0.0.1 port={dead},{},{writable} user=postgres \
                 dbname={name} target_session_attrs=read-write",
                read_only.port()
            ),
        };
        let config = PostgresConfig {
            pool_size: 2,
            // Waits are answered by NOTIFY on the LISTEN connection, not by polling.
            wait_poll: Duration::from_secs(600),
            ..PostgresConfig::new(url)
        };
        let applied = migrate::migrate(&config).await.expect("migrate");
        assert_eq!(
            applied.last().copied(),
            Some(migrate::latest_version()),
            "{form}: migrations ran on the writable server"
        );
        let store = Arc::new(PostgresStore::connect(&config).expect("pool"));
        let server = TestServer::start(store.clone(), test_settings()).await;
        let mut client = server.client().await;
        await_readiness(&server.channel().await, ServingStatus::Serving).await;

        let key = unique_key("multi-host");
        let lease = client
            .acquire(acquire_request(NS, &key, b"f"))
            .await
            .unwrap_or_else(|status| panic!("{form}: acquire: {status:?}"))
            .into_inner()
            .lease
            .expect("granted");
        let mut waiter = client.clone();
        let wait_key = key.clone();
        let wait = tokio::spawn(async move {
            waiter
                .wait(pb::WaitRequest {
                    namespace: NS.into(),
                    key: wait_key,
                    timeout: ms(60_000),
                })
                .await
        });
        eventually(
            Duration::from_secs(10),
            "the LISTEN connection is up",
            || {
                let listening = store.listening();
                async move { listening }
            },
        )
        .await;
        client
            .complete(pb::CompleteRequest {
                namespace: NS.into(),
                key: key.clone(),
                lease_token: lease.token,
                result: Some(sample_result("multi-host")),
                retention: None,
            })
            .await
            .unwrap_or_else(|status| panic!("{form}: complete: {status:?}"));
        let answered = tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the Wait is answered by the notification, long before its poll")
            .expect("wait task")
            .unwrap_or_else(|status| panic!("{form}: wait: {status:?}"))
            .into_inner();
        assert_eq!(
            answered.record.map(|record| record.state()),
            Some(pb::RecordState::Completed),
            "{form}"
        );
        store
            .reap_expired(100)
            .await
            .unwrap_or_else(|error| panic!("{form}: the reaper's round failed: {error}"));
        server.stop().await;
        drop(admin);
    }
}

/// Readiness follows the primary: NOT_SERVING while the only server is read-only (as a demoted
/// primary or a standby is), SERVING again once it takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_not_serving_while_no_writable_primary_is_reachable() {
    let database = TestDatabase::create().await;
    let server = TestServer::on_database(&database, test_settings()).await;
    let channel = server.channel().await;
    await_readiness(&channel, ServingStatus::Serving).await;

    let admin = database.connect().await;
    let name = database_name(&database.url).to_string();
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
    await_readiness(&channel, ServingStatus::NotServing).await;

    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} RESET default_transaction_read_only"
        ))
        .await
        .expect("make the database writable");
    await_readiness(&channel, ServingStatus::Serving).await;
    server.stop().await;
}

/// Asynchronous replication, and the standby cut off before the primary dies: the promoted
/// standby lacks the last records and the last fencing tokens. idemd must not answer the lost
/// Complete from its replay cache (the record is gone: a new Acquire is granted), and the new
/// lease's fencing token must exceed every token the old primary handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_lossy_failover_the_cache_forgets_and_fencing_tokens_still_grow() {
    let primary = Arc::new(
        tokio::task::spawn_blocking(|| Cluster::primary(Replication::Asynchronous))
            .await
            .expect("start primary"),
    );
    let database = TestDatabase::create_on(&primary.admin_url()).await;
    let standby = Arc::new(
        tokio::task::spawn_blocking({
            let primary = primary.clone();
            move || primary.standby()
        })
        .await
        .expect("start standby"),
    );
    let name = database_name(&database.url).to_string();
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{name}?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let config = PostgresConfig {
        pool_size: 2,
        connect_timeout: Duration::from_secs(1),
        query_timeout: Duration::from_secs(2),
        ..PostgresConfig::new(url)
    };
    let store = Arc::new(PostgresStore::connect(&config).expect("pool"));
    let server = TestServer::start(store, test_settings()).await;
    let channel = server.channel().await;
    let mut client = server.client().await;
    await_readiness(&channel, ServingStatus::Serving).await;

    // Replicated before the standby is cut off.
    let kept = unique_key("kept");
    let (_, kept_record) = complete(&mut client, &kept).await;
    let standby_sql = connect_to(&with_database(&standby.admin_url(), &name)).await;
    eventually(
        Duration::from_secs(20),
        "the standby has replayed it",
        || {
            let (standby_sql, kept) = (&standby_sql, kept.clone());
            async move {
                standby_sql
                    .query_opt(
                        "SELECT 1 FROM idemd_records WHERE key = $1 AND state = 2",
                        &[&kept],
                    )
                    .await
                    .is_ok_and(|row| row.is_some())
            }
        },
    )
    .await;
    // Cut off: the primary goes on committing what the standby never receives.
    standby_sql
        .batch_execute("ALTER SYSTEM SET primary_conninfo = ''")
        .await
        .expect("detach the standby");
    standby_sql
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload the standby");
    eventually(
        Duration::from_secs(20),
        "the standby stops receiving",
        || {
            let standby_sql = &standby_sql;
            async move {
                standby_sql
                    .query_one("SELECT count(*) FROM pg_stat_wal_receiver", &[])
                    .await
                    .is_ok_and(|row| row.get::<_, i64>(0) == 0)
            }
        },
    )
    .await;
    let lost = unique_key("lost");
    let (lost_token, _) = complete(&mut client, &lost).await;
    // The lost record is in this replica's replay cache now.
    let cached = client
        .get(pb::GetRequest {
            namespace: NS.into(),
            key: lost.clone(),
        })
        .await
        .expect("get before the failover")
        .into_inner();
    assert!(cached.record.is_some());
    // More tokens than PostgreSQL logs ahead of a sequence (32), so that the standby's copy of
    // the sequence is behind them.
    let mut highest = lost_token;
    for n in 0..40 {
        let lease = client
            .acquire(acquire_request(NS, &format!("{lost}-{n}"), b"f"))
            .await
            .expect("acquire")
            .into_inner()
            .lease
            .expect("granted");
        highest = highest.max(lease.fencing_token);
    }

    tokio::task::spawn_blocking({
        let primary = primary.clone();
        move || primary.kill_all()
    })
    .await
    .expect("kill the primary");
    // No writable server: not ready (and the cache stops answering).
    await_readiness(&channel, ServingStatus::NotServing).await;
    tokio::task::spawn_blocking({
        let standby = standby.clone();
        move || standby.promote()
    })
    .await
    .expect("promote the standby");

    // The lost Complete is not answered from the cache: the database no longer has it.
    let read = through_failover("get the lost key", || {
        let mut client = client.clone();
        let lost = lost.clone();
        async move {
            client
                .get(pb::GetRequest {
                    namespace: NS.into(),
                    key: lost,
                })
                .await
        }
    })
    .await;
    assert_eq!(
        read.map(|r| r.into_inner().record.is_some())
            .map_err(|s| s.code()),
        Err(Code::NotFound),
        "a Complete the failover lost was answered (from the replay cache?)"
    );
    await_readiness(&channel, ServingStatus::Serving).await;
    // The key is granted again, with a token above every one the old primary handed out.
    let again = client
        .acquire(acquire_request(NS, &lost, b"f"))
        .await
        .expect("acquire the lost key again")
        .into_inner();
    let lease = again.lease.expect("the lost key is granted again");
    assert!(
        lease.fencing_token > highest,
        "fencing went back across the promotion: {} after {highest}",
        lease.fencing_token
    );
    // What was replicated is still there, with its result.
    let kept_now = get_record(&mut client, NS, &kept).await;
    assert_eq!(kept_now.result, kept_record.result);
    server.stop().await;
}

async fn connect_to(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

/// The port of a `postgres://user@host:port/name` URL.
fn port_of(url: &str) -> u16 {
    url.rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}
