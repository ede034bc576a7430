//! Network faults between idemd and PostgreSQL, injected by a small TCP proxy of our own:
//! black-holed packets, cut connections, added latency. idemd must answer UNAVAILABLE (never hang,
//! never INTERNAL), recover by itself, and lose nothing acknowledged.

use std::{sync::Arc, time::Duration};

use idemd::proto::idempotency::v1 as pb;
use idemd::store::postgres::PostgresConfig;
use idemd::store::PostgresStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::Code;

use crate::harness::*;

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Accept and read, forward nothing: packets vanish, no RST.
    BlackHole,
    /// Close every connection and refuse new ones.
    Cut,
    /// Forward after a delay.
    Delay(Duration),
}

/// A TCP proxy in front of `upstream` whose behaviour the test switches at will.
pub struct FaultProxy {
    pub addr: std::net::SocketAddr,
    fault: watch::Sender<Fault>,
}

impl FaultProxy {
    pub async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (fault, faults) = watch::channel(Fault::Pass);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *faults.borrow() == Fault::Cut {
                    drop(client);
                    continue;
                }
                let faults = faults.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        _ = pump(client_read, server_write, faults.clone()) => {}
                        _ = pump(server_read, client_write, faults) => {}
                    }
                });
            }
        });
        Self { addr, fault }
    }

    pub fn set(&self, fault: Fault) {
        let _ = self.fault.send(fault);
    }
}

/// A proxy in front of the shared PostgreSQL, and the URL of `database` through it.
pub async fn database_behind_proxy(database: &TestDatabase) -> (FaultProxy, String) {
    let proxy = FaultProxy::start("127.0.0.1:5432".parse().expect("addr")).await;
    let name = database.url.rsplit('/').next().expect("db name");
    let url = format!("postgres://postgres@{}/{name}", proxy.addr);
    (proxy, url)
}

/// An in-process server on `database`, reaching it through a fault proxy, with short bounds.
pub async fn server_behind_proxy(
    database: &TestDatabase,
    query_timeout: Duration,
) -> (FaultProxy, TestServer) {
    let (proxy, url) = database_behind_proxy(database).await;
    let config = PostgresConfig {
        pool_size: 4,
        connect_timeout: Duration::from_secs(1),
        query_timeout,
        ..PostgresConfig::new(url)
    };
    let server = TestServer::start(
        Arc::new(PostgresStore::connect(&config).expect("pool")),
        test_settings(),
    )
    .await;
    (proxy, server)
}

/// Copies one direction, applying the current fault to every chunk.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut faults: watch::Receiver<Fault>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            changed = faults.changed() => {
                if changed.is_err() || *faults.borrow() == Fault::Cut {
                    return;
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let fault = *faults.borrow();
        match fault {
            Fault::Cut => return,
            Fault::BlackHole => continue,
            Fault::Delay(delay) => tokio::time::sleep(delay).await,
            Fault::Pass => {}
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

fn get(key: &str) -> tonic::Request<pb::GetRequest> {
    let mut request = tonic::Request::new(pb::GetRequest {
        namespace: "faults".into(),
        key: key.into(),
    });
    // Far beyond the store's query timeout: an answer before it proves idemd does not hang.
    request.set_timeout(Duration::from_secs(30));
    request
}

async fn complete(client: &mut Client, key: &str) -> pb::Record {
    let lease = client
        .acquire(acquire_request("faults", key, b""))
        .await
        .expect("acquire")
        .into_inner()
        .lease
        .expect("lease");
    client
        .complete(pb::CompleteRequest {
            namespace: "faults".into(),
            key: key.into(),
            lease_token: lease.token,
            result: Some(sample_result(key)),
            retention: None,
        })
        .await
        .expect("complete")
        .into_inner()
        .record
        .expect("record")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_faults_to_postgres_give_unavailable_and_recover() {
    let database = TestDatabase::create().await;
    let (proxy, server) = server_behind_proxy(&database, Duration::from_secs(2)).await;
    let mut client = server.client().await;
    let mut acknowledged = vec![complete(&mut client, &unique_key("before")).await];

    // Completed records are answered from the replica's cache; an absent key needs the database.
    let absent = unique_key("absent");
    for fault in [Fault::BlackHole, Fault::Cut] {
        proxy.set(fault);
        for _ in 0..3 {
            let status = client
                .get(get(&absent))
                .await
                .expect_err("database unreachable");
            assert_eq!(status.code(), Code::Unavailable, "{fault:?}: {status:?}");
            assert_eq!(reason(&status), "STORE_UNAVAILABLE");
        }
        proxy.set(Fault::Pass);
        eventually(Duration::from_secs(30), "recovery", || {
            let mut client = client.clone();
            let key = absent.clone();
            async move {
                client
                    .get(get(&key))
                    .await
                    .is_err_and(|status| status.code() == Code::NotFound)
            }
        })
        .await;
        acknowledged.push(complete(&mut client, &unique_key("after")).await);
    }

    // Slow, not broken: every call succeeds.
    proxy.set(Fault::Delay(Duration::from_millis(30)));
    acknowledged.push(complete(&mut client, &unique_key("slow")).await);
    proxy.set(Fault::Pass);

    // Read back from PostgreSQL itself: this replica has every acknowledged record in its
    // replay cache and would answer them even if the database had lost them.
    let reader = TestServer::uncached(&database.url).await;
    let mut direct = reader.client().await;
    for record in &acknowledged {
        let stored = direct
            .get(get(&record.key))
            .await
            .expect("get from the database")
            .into_inner()
            .record
            .expect("record");
        assert_eq!(
            &stored, record,
            "an acknowledged Complete changed or vanished"
        );
    }
    reader.stop().await;
    server.stop().await;
}
