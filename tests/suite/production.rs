//! Running it in production: metrics, logs, graceful shutdown, deadlines, overload.

use std::{sync::Arc, time::Duration};

use idemd::proto::idempotency::v1 as pb;
use idemd::proto::idempotency::v1::idempotency_service_client::IdempotencyServiceClient;
use idemd::server::{ServerSettings, SERVICE_NAME};
use idemd::store::MemoryStore;
use tokio::task::JoinSet;
use tonic::transport::Endpoint;
use tonic::Code;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use crate::harness::*;
use crate::processes::{http_get, IdemdProcess};

const NS: &str = "production";

async fn connect(addr: std::net::SocketAddr) -> Client {
    IdempotencyServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

async fn acquire_lease(client: &mut Client, key: &str) -> pb::Lease {
    client
        .acquire(acquire_request(NS, key, b"fingerprint-secret"))
        .await
        .expect("acquire")
        .into_inner()
        .lease
        .expect("lease")
}

fn complete_request(key: &str, token: &str, tag: &str) -> pb::CompleteRequest {
    pb::CompleteRequest {
        namespace: NS.into(),
        key: key.into(),
        lease_token: token.into(),
        result: Some(sample_result(tag)),
        retention: None,
    }
}

/// Holds row locks on `keys` in an open transaction, so idemd's writes to them block.
async fn lock_rows(database: &TestDatabase, keys: &[String]) -> tokio_postgres::Client {
    let locker = database.connect().await;
    locker.batch_execute("BEGIN").await.expect("begin");
    for key in keys {
        locker
            .execute(
                "SELECT 1 FROM idemd_records WHERE namespace = $1 AND key = $2 FOR UPDATE",
                &[&NS, key],
            )
            .await
            .expect("lock row");
    }
    locker
}

/// Number of idemd statements waiting on a lock in `database`.
async fn blocked_statements(database: &TestDatabase) -> i64 {
    database
        .connect()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'idemd'
               AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_in_prometheus_format() {
    let database = TestDatabase::create().await;
    let server = IdemdProcess::start(&[
        "--database-url",
        &database.url,
        "--metrics-interval",
        "100ms",
    ]);
    let mut client = connect(server.addr).await;
    let key = unique_key("metrics-key");
    let lease = acquire_lease(&mut client, &key).await;
    client
        .acquire(acquire_request(NS, &key, b"fingerprint-secret"))
        .await
        .expect("in progress");
    client
        .complete(complete_request(&key, &lease.token, "m"))
        .await
        .expect("complete");
    client
        .acquire(acquire_request(NS, &key, b"fingerprint-secret"))
        .await
        .expect("replay");
    let _ = client
        .acquire(acquire_request(NS, &key, b"other"))
        .await
        .expect_err("mismatch");
    let _ = client
        .acquire(acquire_request("bad ns", &key, b""))
        .await
        .expect_err("invalid");

    let addr = server.metrics_addr;
    let scrape = move || async move {
        let (code, text) = tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
            .await
            .expect("scrape");
        assert_eq!(code, 200);
        text
    };
    // Gauges and readiness are set by background rounds: wait for both to have reported. (A new
    // connection asks its server who it is before serving, so the first readiness round can end
    // after the RPCs above.)
    eventually(
        Duration::from_secs(10),
        "pool gauges and readiness",
        || async move {
            let body = scrape().await;
            body.contains("idemd_db_pool_connections") && body.contains("idemd_store_ready 1")
        },
    )
    .await;
    let body = scrape().await;
    for expected in [
        "# TYPE idemd_rpc_requests_total counter",
        r#"idemd_rpc_requests_total{method="Acquire",code="OK"} 3"#,
        r#"idemd_rpc_requests_total{method="Acquire",code="FAILED_PRECONDITION"} 1"#,
        r#"idemd_rpc_requests_total{method="Acquire",code="INVALID_ARGUMENT"} 1"#,
        r#"idemd_rpc_requests_total{method="Complete",code="OK"} 1"#,
        r#"idemd_acquire_outcomes_total{outcome="acquired"} 1"#,
        r#"idemd_acquire_outcomes_total{outcome="in_progress"} 1"#,
        r#"idemd_acquire_outcomes_total{outcome="completed"} 1"#,
        r#"idemd_acquire_outcomes_total{outcome="fingerprint_mismatch"} 1"#,
        "# TYPE idemd_rpc_duration_seconds histogram",
        r#"idemd_rpc_duration_seconds_bucket{method="Complete",le="0.005"}"#,
        "idemd_rpc_in_flight",
        "idemd_db_pool_max_connections 16",
        "idemd_db_pool_idle_connections",
        "idemd_db_pool_waiters",
        r#"idemd_records{state="completed"}"#,
        "idemd_store_ready 1",
        r#"idemd_build_info{version=""#,
    ] {
        assert!(body.contains(expected), "metrics lack {expected}:\n{body}");
    }
    assert!(!body.contains(&key), "a key leaked into metrics");
    assert!(
        !body.contains("production"),
        "a namespace leaked into metrics"
    );
    let (code, _) = tokio::task::spawn_blocking(move || http_get(addr, "/"))
        .await
        .expect("get /");
    assert_eq!(code, 404);
}

/// Logs in JSON: one span per RPC with method, namespace, outcome, code and duration; keys only
/// at debug level; tokens, fingerprints and bodies never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_carry_rpc_spans_and_no_secrets() {
    for level in ["debug", "info"] {
        let server = IdemdProcess::start(&["--log-format", "json", "--log-level", level]);
        let mut client = connect(server.addr).await;
        let key = unique_key("log-key");
        let lease = acquire_lease(&mut client, &key).await;
        client
            .complete(complete_request(&key, &lease.token, "body-secret"))
            .await
            .expect("complete");
        let _ = client
            .get(pb::GetRequest {
                namespace: NS.into(),
                key: unique_key("absent"),
            })
            .await;
        // The last RPC's log line is written before its response, but it reaches us through a
        // pipe and a reader thread: wait for that line itself (at debug level, earlier RPCs'
        // lines satisfied a wait for any rpc line, and the Get's could still be in flight).
        let mut lines = Vec::new();
        eventually(
            Duration::from_secs(10),
            "the refused Get's log line",
            || {
                lines = server.logs();
                let done = lines.iter().any(|line| line.contains("rpc refused"));
                async move { done }
            },
        )
        .await;
        for line in &lines {
            assert!(line.starts_with('{'), "not JSON: {line}");
            assert!(!line.contains(&lease.token), "lease token leaked: {line}");
            assert!(!line.contains("body-secret"), "result body leaked: {line}");
            assert!(
                !line.contains("fingerprint-secret"),
                "fingerprint leaked: {line}"
            );
            if line.contains(&key) {
                assert_eq!(level, "debug");
                assert!(
                    line.contains(r#""level":"DEBUG""#),
                    "key outside debug: {line}"
                );
            }
        }
        let refused = lines
            .iter()
            .find(|line| line.contains("rpc refused"))
            .unwrap_or_else(|| panic!("the NOT_FOUND Get is logged at info:\n{lines:#?}"));
        for field in [
            r#""method":"Get""#,
            r#""namespace":"production""#,
            r#""code":"NOT_FOUND""#,
            "duration_ms",
        ] {
            assert!(refused.contains(field), "span lacks {field}: {refused}");
        }
        if level == "debug" {
            let finished = lines
                .iter()
                .find(|line| {
                    line.contains("rpc finished") && line.contains(r#""method":"Acquire""#)
                })
                .expect("Acquire logged at debug");
            for field in [r#""outcome":"acquired""#, r#""code":"OK""#, "duration_ms"] {
                assert!(finished.contains(field), "span lacks {field}: {finished}");
            }
        }
    }
}

/// One health Check over a connection of its own; the serving status, or why there is none.
async fn health_check(addr: &str, service: &str) -> Result<ServingStatus, String> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|error| error.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|error| format!("connect: {error}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map_err(|status| format!("{status:?}"))?;
    Ok(response.into_inner().status())
}

/// README's Shutdown, step by step: on SIGTERM readiness turns NOT_SERVING (read through the
/// health RPC on the health port while the drain runs), the API port takes no new connections,
/// the RPCs in flight finish with their answers, and idemd exits 0. RPCs sent after SIGTERM on
/// already open connections may be refused (GOAWAY), but none runs and loses its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_rpcs_and_exits_zero() {
    let database = TestDatabase::create().await;
    let mut server = IdemdProcess::start(&[
        "--database-url",
        &database.url,
        "--shutdown-grace",
        "20s",
        // The row locks hold the Completes as long as the test needs, not 5 s.
        "--db-query-timeout",
        "60s",
        "--health-listen",
        "127.0.0.1:0",
    ]);
    let health_addr = server.health_addr().await;
    eventually(Duration::from_secs(10), "readiness SERVING", || {
        let health_addr = health_addr.clone();
        async move {
            health_check(&health_addr, idemd::server::SERVICE_NAME).await
                == Ok(ServingStatus::Serving)
        }
    })
    .await;
    let mut client = connect(server.addr).await;
    let keys: Vec<String> = (0..6).map(|i| unique_key(&format!("drain-{i}"))).collect();
    let mut leases = Vec::new();
    for key in &keys {
        leases.push(acquire_lease(&mut client, key).await);
    }
    // Make the Completes wait inside PostgreSQL, so they are surely in flight at SIGTERM.
    let locker = lock_rows(&database, &keys).await;
    let mut in_flight = JoinSet::new();
    for (key, lease) in keys.iter().zip(&leases) {
        let mut client = connect(server.addr).await;
        let request = complete_request(key, &lease.token, "drained");
        in_flight.spawn(async move { client.complete(request).await });
    }
    // All six are in the server: blocked in PostgreSQL (some may share a batch statement, or
    // queue for a batch slot behind the blocked ones).
    let metrics_addr = server.metrics_addr;
    eventually(
        Duration::from_secs(10),
        "Completes in flight",
        || async move {
            let (_, metrics) =
                tokio::task::spawn_blocking(move || http_get(metrics_addr, "/metrics"))
                    .await
                    .expect("scrape");
            metrics.lines().any(|line| line == "idemd_rpc_in_flight 6")
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "Completes blocked in PostgreSQL",
        || {
            let database = &database;
            async move { blocked_statements(database).await >= 1 }
        },
    )
    .await;
    // And a steady load of fresh Acquires on connections of their own.
    let stop_load = Arc::new(tokio::sync::Notify::new());
    let mut load = JoinSet::new();
    for worker in 0..4 {
        let mut client = connect(server.addr).await;
        let stop = stop_load.clone();
        load.spawn(async move {
            // (key, status) of every Acquire this worker sent.
            let mut sent = Vec::new();
            loop {
                let key = unique_key(&format!("load-{worker}"));
                let request = acquire_request(NS, &key, b"");
                tokio::select! {
                    _ = stop.notified() => return sent,
                    result = client.acquire(request) => {
                        let failed = result.err();
                        let stop_here = failed.is_some();
                        sent.push((key, failed));
                        if stop_here {
                            return sent;
                        }
                    }
                }
            }
        });
    }

    server.terminate();
    // The drain is under way (the six Completes are held by the row locks), and meanwhile:
    // readiness reads NOT_SERVING through the health RPC, on a new connection to the health
    // port; liveness still SERVING, the process is alive.
    eventually(
        Duration::from_secs(10),
        "readiness NOT_SERVING on the health port during the drain",
        || {
            let health_addr = health_addr.clone();
            async move {
                health_check(&health_addr, idemd::server::SERVICE_NAME).await
                    == Ok(ServingStatus::NotServing)
            }
        },
    )
    .await;
    assert_eq!(
        health_check(&health_addr, "").await,
        Ok(ServingStatus::Serving),
        "liveness during the drain"
    );
    // The API port takes no new connections, while idemd still runs.
    let api_addr = server.addr;
    eventually(
        Duration::from_secs(10),
        "the API port refuses new connections",
        || {
            assert!(
                server.running(),
                "idemd exited while its API port still took connections"
            );
            async move {
                let connect = tokio::net::TcpStream::connect(api_addr);
                matches!(
                    tokio::time::timeout(Duration::from_secs(1), connect).await,
                    Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused
                )
            }
        },
    )
    .await;
    assert!(
        server.running(),
        "idemd exited before its in-flight RPCs finished"
    );
    assert_eq!(
        in_flight.len(),
        6,
        "the Completes are still in flight, held by the row locks"
    );
    assert!(
        blocked_statements(&database).await >= 1,
        "the Completes are still blocked in PostgreSQL"
    );

    // Let the in-flight Completes go: each finishes with its answer.
    locker
        .batch_execute("COMMIT")
        .await
        .expect("release row locks");
    while let Some(done) = in_flight.join_next().await {
        let record = done
            .expect("task")
            .expect("an in-flight RPC finished normally during shutdown")
            .into_inner()
            .record
            .expect("record");
        assert_eq!(record.state(), pb::RecordState::Completed);
    }
    assert_eq!(server.wait_exit(Duration::from_secs(30)), Some(0));
    assert!(
        health_check(&health_addr, "").await.is_err(),
        "the health port closes once the drain is over"
    );
    stop_load.notify_waiters();
    let mut sent = Vec::new();
    while let Some(worker) = load.join_next().await {
        sent.extend(worker.expect("load task"));
    }
    assert!(
        sent.iter().any(|(_, failed)| failed.is_none()),
        "the load ran"
    );
    // Every acknowledged Complete is there.
    let restarted = IdemdProcess::start(&["--database-url", &database.url]);
    let mut client = connect(restarted.addr).await;
    for key in &keys {
        let record = get_record(&mut client, NS, key).await;
        assert_eq!(record.result, Some(sample_result("drained")));
    }
    // An Acquire sent after SIGTERM fails in the client's transport (CANCELLED when its
    // connection closes under it, UNAVAILABLE when reconnecting is refused), never with an answer
    // of idemd (every one carries an ErrorInfo reason), and its key was never written: what must
    // never happen is an RPC that ran and lost its answer.
    for (key, failed) in &sent {
        let Some(status) = failed else { continue };
        eprintln!("load Acquire refused during shutdown: {status:?}");
        assert_eq!(
            reason(status),
            "",
            "idemd itself refused a load Acquire: {status:?}"
        );
        assert!(
            std::error::Error::source(status)
                .is_some_and(|source| source.is::<tonic::transport::Error>()),
            "not a failure of the client's transport: {status:?}"
        );
        let found = client
            .get(pb::GetRequest {
                namespace: NS.into(),
                key: key.clone(),
            })
            .await;
        assert_status(found, Code::NotFound, "RECORD_NOT_FOUND");
    }
}

/// An open health Watch (a load balancer or sidecar following readiness) does not hold shutdown
/// for the grace period: the watcher is told NOT_SERVING, its stream ends with UNAVAILABLE, and
/// the server stops at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_health_watch_does_not_hold_shutdown() {
    let grace = Duration::from_secs(30);
    let settings = ServerSettings {
        shutdown_grace: grace,
        ..test_settings()
    };
    let server = TestServer::start(Arc::new(MemoryStore::new()), settings).await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: SERVICE_NAME.into(),
        })
        .await
        .expect("watch")
        .into_inner();
    // Ready first, so the NOT_SERVING that follows is shutdown's.
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(update) = watch.message().await.expect("update") {
            if update.status() == ServingStatus::Serving {
                return;
            }
        }
        panic!("the Watch ended before readiness");
    })
    .await
    .expect("SERVING within 10 s");
    tokio::time::timeout(Duration::from_secs(5), server.stop())
        .await
        .unwrap_or_else(|_| panic!("the server did not stop within 5 s of its {grace:?} grace"));
    let mut statuses = Vec::new();
    let end = loop {
        match watch.message().await {
            Ok(Some(update)) => statuses.push(update.status()),
            Ok(None) => break Code::Ok,
            Err(status) => break status.code(),
        }
    };
    assert_eq!(
        statuses.last(),
        Some(&ServingStatus::NotServing),
        "{statuses:?}"
    );
    assert_eq!(end, Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_deadline_cancels_the_database_statement() {
    let database = TestDatabase::create().await;
    let server = TestServer::on_database(&database, test_settings()).await;
    let mut client = server.client().await;
    let key = unique_key("deadline");
    let lease = acquire_lease(&mut client, &key).await;
    let locker = lock_rows(&database, std::slice::from_ref(&key)).await;
    let mut request = tonic::Request::new(complete_request(&key, &lease.token, "too late"));
    request.set_timeout(Duration::from_millis(500));
    let status = client.complete(request).await.expect_err("deadline passes");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // The statement does not linger in PostgreSQL once the caller has gone.
    eventually(
        Duration::from_secs(10),
        "blocked statement cancelled",
        || {
            let database = &database;
            async move { blocked_statements(database).await == 0 }
        },
    )
    .await;
    locker.batch_execute("COMMIT").await.expect("release lock");
    let record = get_record(&mut client, NS, &key).await;
    assert_eq!(
        record.state(),
        pb::RecordState::InProgress,
        "the cancelled Complete wrote nothing"
    );
    client
        .complete(complete_request(&key, &lease.token, "in time"))
        .await
        .expect("a retry within the deadline completes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_resource_exhausted() {
    let database = TestDatabase::create().await;
    let settings = idemd::server::ServerSettings {
        max_concurrent_rpcs: 2,
        ..test_settings()
    };
    let server = TestServer::on_database(&database, settings).await;
    let mut client = server.client().await;
    let keys: Vec<String> = (0..2).map(|i| unique_key(&format!("busy-{i}"))).collect();
    let mut leases = Vec::new();
    for key in &keys {
        leases.push(acquire_lease(&mut client, key).await);
    }
    let locker = lock_rows(&database, &keys).await;
    let mut busy = JoinSet::new();
    for (key, lease) in keys.iter().zip(&leases) {
        let mut client = client.clone();
        let request = complete_request(key, &lease.token, "slow");
        busy.spawn(async move { client.complete(request).await });
    }
    eventually(
        Duration::from_secs(10),
        "two RPCs occupy the server",
        || {
            let database = &database;
            async move { blocked_statements(database).await == 2 }
        },
    )
    .await;
    let shed = client
        .get(pb::GetRequest {
            namespace: NS.into(),
            key: keys[0].clone(),
        })
        .await;
    assert_status(shed, Code::ResourceExhausted, "OVERLOADED");
    locker.batch_execute("COMMIT").await.expect("release locks");
    while let Some(done) = busy.join_next().await {
        done.expect("task").expect("the admitted RPCs finish");
    }
    client
        .get(pb::GetRequest {
            namespace: NS.into(),
            key: keys[0].clone(),
        })
        .await
        .expect("capacity is back");
}

/// Forwards TCP from a loopback port to `upstream`, counting the connections it accepted.
async fn counting_forwarder(
    upstream: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind forwarder");
    let addr = listener.local_addr().expect("forwarder address");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, accepted)
}

/// `--max-connection-age`: the server closes each client connection gracefully once it is that
/// old, so a long-lived client opens new ones (and, behind a connection balancer, reaches new
/// replicas). A Wait that spans several ages is answered. A call can race the final GOAWAY: tonic's
/// client then fails it with CANCELLED "connection closed" before sending it (hyper's `Canceled`:
/// the server never saw it), and it succeeds when sent again; any other failure fails the test,
/// and the count of those races is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_connections_are_replaced_and_calls_in_flight_finish() {
    let age = Duration::from_millis(500);
    let settings = ServerSettings {
        max_connection_age: Some(age),
        ..test_settings()
    };
    let server = TestServer::start(Arc::new(MemoryStore::new()), settings).await;
    let (addr, accepted) = counting_forwarder(server.addr).await;
    let mut client = connect(addr).await;

    let key = unique_key("aged");
    let lease = acquire_lease(&mut client, &key).await;
    let mut waiter = client.clone();
    let wait_key = key.clone();
    let wait = tokio::spawn(async move {
        waiter
            .wait(pb::WaitRequest {
                namespace: NS.into(),
                key: wait_key,
                timeout: ms(10_000),
            })
            .await
    });
    // Calls one after another over four connection ages: every one must succeed.
    let started = std::time::Instant::now();
    let (mut calls, mut unsent) = (0, 0);
    while started.elapsed() < age * 4 {
        let get = pb::GetRequest {
            namespace: NS.into(),
            key: key.clone(),
        };
        match client.get(get.clone()).await {
            Ok(_) => {}
            Err(status) if never_sent(&status) => {
                unsent += 1;
                client
                    .get(get)
                    .await
                    .unwrap_or_else(|status| panic!("call {calls} sent again: {status:?}"));
            }
            Err(status) => panic!("call {calls} failed: {status:?}"),
        }
        calls += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The Wait began on the first connection, long since past its age: it is still answered.
    client
        .complete(complete_request(&key, &lease.token, "aged"))
        .await
        .expect("complete");
    let answered = tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the Wait was answered")
        .expect("wait task")
        .expect("the Wait across connection ages failed")
        .into_inner();
    assert_eq!(
        answered.record.map(|record| record.state()),
        Some(pb::RecordState::Completed)
    );
    let connections = accepted.load(std::sync::atomic::Ordering::SeqCst);
    println!("{calls} calls over {connections} connections; {unsent} raced a GOAWAY, unsent");
    assert!(
        connections >= 3,
        "connections were not replaced at their age: {connections} for {calls} calls over {:?}",
        age * 4
    );
    server.stop().await;
}

/// A call the client's transport gave up before sending: hyper's `Canceled` ("connection
/// closed") under a CANCELLED status.
fn never_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        if cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return status.code() == Code::Cancelled;
        }
        source = cause.source();
    }
    false
}

/// A connection balancer like a ClusterIP Service: each new TCP connection goes to the next
/// backend of a list that can grow.
struct RoundRobinBalancer {
    addr: std::net::SocketAddr,
    backends: Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
}

impl RoundRobinBalancer {
    async fn start(backends: Vec<std::net::SocketAddr>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind balancer");
        let addr = listener.local_addr().expect("balancer address");
        let backends = Arc::new(std::sync::Mutex::new(backends));
        let list = backends.clone();
        tokio::spawn(async move {
            let mut next = 0usize;
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = {
                    let list = list.lock().unwrap_or_else(|p| p.into_inner());
                    next += 1;
                    list[next % list.len()]
                };
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { addr, backends }
    }

    fn add(&self, backend: std::net::SocketAddr) {
        self.backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(backend);
    }
}

/// The scale-out the connection age is for: three replicas behind a connection balancer, one
/// client process with 8 long-lived connections under load, then a fourth replica. Within two
/// connection ages the fourth serves its share of the calls (measured: its share of the calls in
/// the third age after it joined, against a fair 25 %), and no call fails but the unsent
/// GOAWAY races (see `old_connections_are_replaced_and_calls_in_flight_finish`), sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_gets_its_share_within_two_connection_ages() {
    let age = Duration::from_secs(1);
    let mut servers = Vec::new();
    for index in 0..4 {
        let settings = ServerSettings {
            max_connection_age: Some(age),
            ..test_settings()
        };
        let server = TestServer::start(Arc::new(MemoryStore::new()), settings).await;
        // Each replica's own store says which replica answers.
        let mut client = server.client().await;
        let lease = acquire_lease(&mut client, "whoami").await;
        client
            .complete(complete_request("whoami", &lease.token, &index.to_string()))
            .await
            .expect("complete whoami");
        servers.push(server);
    }
    let balancer = RoundRobinBalancer::start(servers[..3].iter().map(|s| s.addr).collect()).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(connect(balancer.addr).await);
    }
    let tally = Arc::new(std::sync::Mutex::new(
        Vec::<(std::time::Instant, usize)>::new(),
    ));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut workers = JoinSet::new();
    for worker in 0..16 {
        let mut client = clients[worker % clients.len()].clone();
        let (tally, stopped) = (tally.clone(), stopped.clone());
        workers.spawn(async move {
            let mut unsent = 0usize;
            while !*stopped.borrow() {
                let get = pb::GetRequest {
                    namespace: NS.into(),
                    key: "whoami".into(),
                };
                let record = match client.get(get.clone()).await {
                    Ok(response) => response.into_inner(),
                    Err(status) if never_sent(&status) => {
                        unsent += 1;
                        client.get(get).await.expect("sent again").into_inner()
                    }
                    Err(status) => panic!("a call failed: {status:?}"),
                };
                let replica = record
                    .record
                    .and_then(|record| record.result)
                    .and_then(|result| result.metadata.get("x-tag").cloned())
                    .and_then(|index| index.parse::<usize>().ok())
                    .expect("whoami names its replica");
                tally
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((std::time::Instant::now(), replica));
            }
            unsent
        });
    }
    tokio::time::sleep(age).await;
    balancer.add(servers[3].addr);
    let joined = std::time::Instant::now();
    // Two ages for every connection to have been replaced, then one age measured.
    tokio::time::sleep(age * 3).await;
    let _ = stop.send(true);
    let mut unsent = 0;
    while let Some(worker) = workers.join_next().await {
        unsent += worker.expect("worker");
    }
    let tally = tally.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let window: Vec<usize> = tally
        .iter()
        .filter(|(at, _)| *at >= joined + age * 2)
        .map(|(_, replica)| *replica)
        .collect();
    let shares: Vec<f64> = (0..4)
        .map(|replica| {
            window.iter().filter(|r| **r == replica).count() as f64 / window.len().max(1) as f64
        })
        .collect();
    println!(
        "calls per replica's share in the third age after the fourth joined: {shares:.2?} \
         ({} calls, {unsent} unsent GOAWAY races sent again)",
        window.len()
    );
    assert!(
        shares[3] >= 0.15,
        "the new replica's share stayed below 15 % (fair: 25 %): {shares:.2?}"
    );
    for server in servers {
        server.stop().await;
    }
}
