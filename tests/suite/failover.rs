//! Losing the primary: multi-host URLs, readiness while no writable server is reachable, and what
//! a promotion changes for the replay cache and the fencing tokens. Servers are real PostgreSQL
//! 15 clusters of the test's own (a primary and a streaming standby made by pg_basebackup); the
//! chaos suite runs the same failovers under load with three idemd processes.

use std::sync::Arc;
use std::time::Duration;

use idemd::proto::idempotency::v1 as pb;
use idemd::store::postgres::{migrate, PostgresConfig};
use idemd::store::{PostgresStore, Store};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use crate::harness::*;
use crate::processes::{free_port, Cluster};

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

/// The port of a `postgres://user@host:port/name` URL.
fn port_of(url: &str) -> u16 {
    url.rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}
