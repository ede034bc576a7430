//! What operators touch: the command line, migrations, reflection, health, the reaper.

use std::{process::Command, sync::Arc, time::Duration};

use idemd::proto::idempotency::v1 as pb;
use idemd::store::{MemoryStore, Store};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_reflection::pb::{v1, v1alpha};

use crate::harness::*;

fn idemd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_idemd"))
        .args(args)
        .output()
        .expect("run idemd")
}

#[test]
fn version_and_help() {
    let version = idemd(&["--version"]);
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("idemd "));
    let help = idemd(&["--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success());
    for expected in ["serve", "migrate", "--listen", "IDEMD_DATABASE_URL"] {
        assert!(text.contains(expected), "--help lacks {expected}:\n{text}");
    }
    let serve_help = idemd(&["serve", "--help"]);
    let text = String::from_utf8_lossy(&serve_help.stdout);
    for expected in [
        "IDEMD_LISTEN",
        "IDEMD_DEFAULT_LEASE_TTL",
        "IDEMD_MAX_RETENTION",
        "IDEMD_CONSOLE_LISTEN",
        "[default: 127.0.0.1:50051]",
    ] {
        assert!(
            text.contains(expected),
            "serve --help lacks {expected}:\n{text}"
        );
    }
}

#[test]
fn invalid_settings_exit_nonzero_naming_the_setting() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["serve", "--default-lease-ttl", "2h"],
            "--default-lease-ttl",
        ),
        (&["serve", "--min-retention", "0s"], "--min-retention"),
        (
            &["serve", "--min-lease-ttl", "2h", "--max-lease-ttl", "1h"],
            "--min-lease-ttl",
        ),
        (&["serve", "--listen", "not-an-address"], "--listen"),
        (
            &["serve", "--console-listen", "not-an-address"],
            "--console-listen",
        ),
        (
            &["serve", "--console-listen", "127.0.0.1:0", "--console-tls"],
            "--tls-cert",
        ),
        (&["serve", "--reaper-interval", "soon"], "--reaper-interval"),
        (
            &["serve", "--database-url", "postgres://[bad"],
            "--database-url",
        ),
        (&["serve", "--log-level", "[[["], "--log-level"),
    ];
    for (args, setting) in cases {
        let output = idemd(args);
        assert!(!output.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(setting),
            "{args:?}: stderr does not name {setting}: {stderr}"
        );
    }
    let output = Command::new(env!("CARGO_BIN_EXE_idemd"))
        .arg("serve")
        .env("IDEMD_MAX_RESULT_BYTES", "-1")
        .output()
        .expect("run idemd");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--max-result-bytes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_once() {
    let database = TestDatabase::create_empty().await;
    let url = database.url.clone();
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || idemd(&["migrate", "--database-url", &url]))
        })
        .collect();
    for run in runs {
        let output = run.join().expect("thread");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let client = database.connect().await;
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM idemd_schema_migrations ORDER BY version",
            &[],
        )
        .await
        .expect("versions")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let latest = idemd::store::postgres::migrate::latest_version();
    assert_eq!(versions, (1..=latest).collect::<Vec<_>>());
    assert!(
        idemd(&["migrate", "--database-url", &url]).status.success(),
        "re-running is a no-op"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmigrated_database_is_not_ready() {
    let database = TestDatabase::create_empty().await;
    let store = database.store();
    let error = store.check_ready().await.expect_err("no schema");
    assert!(error.to_string().contains("idemd migrate"), "{error}");
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_describe_the_api_with_comments() {
    let server = TestServer::memory().await;
    let channel = server.channel().await;

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let requests = tokio_stream::iter(vec![
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        },
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "idempotency.v1.AcquireRequest".into(),
                ),
            ),
        },
    ]);
    let mut responses = client
        .server_reflection_info(requests)
        .await
        .expect("reflection v1")
        .into_inner();
    let mut services = Vec::new();
    let mut described = false;
    while let Some(response) = responses.next().await {
        match response
            .expect("response")
            .message_response
            .expect("message")
        {
            v1::server_reflection_response::MessageResponse::ListServicesResponse(list) => {
                services = list.service.into_iter().map(|s| s.name).collect();
            }
            v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files) => {
                let file = prost_types::FileDescriptorProto::decode(
                    files.file_descriptor_proto[0].as_slice(),
                )
                .expect("descriptor");
                assert_eq!(file.package(), "idempotency.v1");
                let comments: String = file
                    .source_code_info
                    .expect("comments are kept for grpcurl describe")
                    .location
                    .iter()
                    .map(|location| location.leading_comments().to_string())
                    .collect();
                assert!(comments.contains("Tenant or service scope of the key"));
                described = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(described);
    for expected in ["idempotency.v1.IdempotencyService", "grpc.health.v1.Health"] {
        assert!(
            services.iter().any(|s| s == expected),
            "{expected} not in {services:?}"
        );
    }

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let requests = tokio_stream::iter(vec![v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    }]);
    let mut responses = client
        .server_reflection_info(requests)
        .await
        .expect("reflection v1alpha")
        .into_inner();
    let response = responses.next().await.expect("one response").expect("ok");
    match response.message_response.expect("message") {
        v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list) => {
            assert!(list
                .service
                .iter()
                .any(|s| s.name == "idempotency.v1.IdempotencyService"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn health_reports_liveness_and_readiness() {
    let server = TestServer::memory().await;
    let mut health = HealthClient::new(server.channel().await);
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("overall health")
        .into_inner();
    assert_eq!(overall.status(), ServingStatus::Serving);
    // Readiness turns SERVING once the store answers; Watch streams the change.
    let mut watch = health
        .watch(HealthCheckRequest {
            service: idemd::server::SERVICE_NAME.into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let became_ready = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(update) = watch.next().await {
            if update.expect("update").status() == ServingStatus::Serving {
                return true;
            }
        }
        false
    })
    .await
    .expect("readiness within 10 s");
    assert!(became_ready);
}

async fn expire_some_records(server: &TestServer, expired: usize, live: usize) {
    let mut client = server.client().await;
    for index in 0..expired + live {
        let key = unique_key("reap");
        let mut request = acquire_request("reaper", &key, b"");
        request.retention = ms(if index < expired { 10 } else { 3_600_000 });
        let lease = client
            .acquire(request)
            .await
            .expect("acquire")
            .into_inner()
            .lease
            .expect("lease");
        client
            .complete(pb::CompleteRequest {
                namespace: "reaper".into(),
                key,
                lease_token: lease.token,
                result: Some(sample_result("reap")),
                retention: None,
            })
            .await
            .expect("complete");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaper_deletes_only_expired_records_in_batches_postgres() {
    let database = TestDatabase::create().await;
    let store = Arc::new(database.store());
    let server = TestServer::start(store.clone(), test_settings()).await;
    expire_some_records(&server, 5, 3).await;
    assert_eq!(store.reap_expired(2).await.expect("reap"), 2);
    assert_eq!(store.reap_expired(10).await.expect("reap"), 3);
    assert_eq!(store.reap_expired(10).await.expect("reap"), 0);
    let remaining: i64 = database
        .connect()
        .await
        .query_one("SELECT count(*) FROM idemd_records", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(remaining, 3);
}

/// With no index on `expires_at`, the reaper sweeps the table by block ranges: expired rows far
/// past the first range, and more of them in one range than a batch holds, are all found, over
/// calls that each do bounded work, and no live row is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaper_sweeps_the_whole_table_by_block_ranges_postgres() {
    let database = TestDatabase::create().await;
    let client = database.connect().await;
    // Rows of about 600 bytes: 40,000 live ones fill roughly 3,000 blocks of 8 KiB, well past one
    // step (1,024 blocks). Expired rows: 5 at the start, 2,500 at the end of the table.
    let insert = |from: i32, to: i32, expired: bool| {
        format!(
            "INSERT INTO idemd_records (namespace, key, state, fingerprint, lease_token, released,
                fencing_token, attempts, holder, retention_us, revision, created_at,
                lease_expires_at, completed_at, expires_at, result_body, result_code)
             SELECT 'sweep', 'k' || i, 2, '', '\\x00', false, i, 1, '', 1000000, 2, now(), now(),
                now(), now() + interval '{}', convert_to(repeat('x', 500), 'UTF8'), 200
             FROM generate_series({from}, {to}) AS i",
            if expired { "-1 hour" } else { "1 hour" }
        )
    };
    for (from, to, expired) in [(1, 5, true), (6, 40_005, false), (40_006, 42_505, true)] {
        client
            .batch_execute(&insert(from, to, expired))
            .await
            .expect("insert rows");
    }
    let blocks: i64 = client
        .query_one(
            "SELECT pg_relation_size('idemd_records') / current_setting('block_size')::bigint",
            &[],
        )
        .await
        .expect("table size")
        .get(0);
    assert!(
        blocks > 2 * 1024,
        "the table must span several steps: {blocks} blocks"
    );

    let store = database.store();
    let mut deleted = Vec::new();
    loop {
        let batch = store.reap_expired(1000).await.expect("reap");
        if batch == 0 || deleted.len() > 10 {
            break;
        }
        deleted.push(batch);
    }
    assert!(deleted.iter().all(|&batch| batch <= 1000), "{deleted:?}");
    assert_eq!(deleted.iter().sum::<u64>(), 2_505, "{deleted:?}");
    let (live, expired): (i64, i64) = {
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE expires_at > now()),
                        count(*) FILTER (WHERE expires_at <= now())
                 FROM idemd_records",
                &[],
            )
            .await
            .expect("count");
        (row.get(0), row.get(1))
    };
    assert_eq!((live, expired), (40_000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaper_deletes_only_expired_records_in_batches_memory() {
    let store = Arc::new(MemoryStore::new());
    let server = TestServer::start(store.clone(), test_settings()).await;
    expire_some_records(&server, 5, 3).await;
    assert_eq!(store.reap_expired(2).await.expect("reap"), 2);
    assert_eq!(store.reap_expired(10).await.expect("reap"), 3);
    assert_eq!(store.reap_expired(10).await.expect("reap"), 0);
    assert_eq!(store.len(), 3);
}

/// The memory store holds at most `--max-records`. Full, it refuses a new key with
/// RESOURCE_EXHAUSTED (STORE_FULL), while the keys it holds keep working; a record that has
/// expired is swept out to make room, without waiting for the reaper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_is_bounded_and_sweeps_expired_records_to_make_room() {
    use crate::processes::IdemdProcess;

    let server = IdemdProcess::start(&[
        "--max-records",
        "3",
        "--min-lease-ttl",
        "10ms",
        "--min-retention",
        "10ms",
        "--reaper-interval",
        "1h",
    ]);
    let mut client = pb::idempotency_service_client::IdempotencyServiceClient::connect(format!(
        "http://{}",
        server.addr
    ))
    .await
    .expect("connect");
    let ns = "bounded";
    let (done, held, brief) = (unique_key("done"), unique_key("held"), unique_key("brief"));
    let acquire = |key: &str| acquire_request(ns, key, b"");
    let lease = |response: tonic::Response<pb::AcquireResponse>| {
        let response = response.into_inner();
        assert_eq!(response.outcome(), pb::Outcome::Acquired);
        response.lease.expect("lease")
    };
    // Three records: `done` completed, `held` in progress, `brief` gone soon after its lease.
    let done_lease = lease(client.acquire(acquire(&done)).await.expect("acquire"));
    client
        .complete(pb::CompleteRequest {
            namespace: ns.into(),
            key: done.clone(),
            lease_token: done_lease.token,
            result: Some(sample_result("done")),
            retention: None,
        })
        .await
        .expect("complete");
    let held_lease = lease(client.acquire(acquire(&held)).await.expect("acquire"));
    let mut short = acquire(&brief);
    short.lease_ttl = ms(1000);
    short.retention = ms(10);
    let brief_expires_at = client
        .acquire(short)
        .await
        .expect("acquire")
        .into_inner()
        .record
        .expect("record")
        .expires_at;

    // Full: a new key is refused...
    let refused = client.acquire(acquire(&unique_key("new"))).await;
    assert_status(refused, Code::ResourceExhausted, "STORE_FULL");
    // ...while the keys it holds keep working: a replay, a Get, a Renew, a Release, a takeover.
    let replay = client
        .acquire(acquire(&done))
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(replay.outcome(), pb::Outcome::Completed);
    assert_eq!(
        replay.record.expect("record").result,
        Some(sample_result("done"))
    );
    get_record(&mut client, ns, &held).await;
    client
        .renew(pb::RenewRequest {
            namespace: ns.into(),
            key: held.clone(),
            lease_token: held_lease.token.clone(),
            lease_ttl: None,
        })
        .await
        .expect("renew");
    client
        .release(pb::ReleaseRequest {
            namespace: ns.into(),
            key: held.clone(),
            lease_token: held_lease.token,
        })
        .await
        .expect("release");
    lease(client.acquire(acquire(&held)).await.expect("takeover"));

    // Once `brief` has expired, a new key sweeps it out and takes its place.
    wait_past(to_system_time(&brief_expires_at)).await;
    lease(
        client
            .acquire(acquire(&unique_key("new")))
            .await
            .expect("room made"),
    );
    let gone = client
        .get(pb::GetRequest {
            namespace: ns.into(),
            key: brief,
        })
        .await;
    assert_status(gone, Code::NotFound, "RECORD_NOT_FOUND");
    // And full again.
    let refused = client.acquire(acquire(&unique_key("new"))).await;
    assert_status(refused, Code::ResourceExhausted, "STORE_FULL");
}
