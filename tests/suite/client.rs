//! The Rust client's `idempotent` helper against live servers on both stores.

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use idemd_client::proto::idempotency::v1 as pb;
use idemd_client::{fingerprint, ClientError, IdempotencyClient, Options, WorkError};
use tokio::task::JoinSet;

use crate::harness::*;

const NS: &str = "rust-client";

fn body(text: &str) -> pb::Result {
    pb::Result {
        body: text.as_bytes().to_vec(),
        code: 201,
        ..Default::default()
    }
}

async fn client_behaviour(server: &TestServer) {
    let client = IdempotencyClient::new(server.channel().await);
    let runs = Arc::new(AtomicU32::new(0));
    let request = serde_json::json!({"order": 4711, "amount": 1250});
    let print = fingerprint(&request).expect("fingerprint");

    // Replay: the second call gets the stored result and does not run the work.
    let key = unique_key("replay");
    for expected_replay in [false, true] {
        let runs = runs.clone();
        let outcome = client
            .idempotent(
                NS,
                &key,
                print.clone(),
                Options::default(),
                |lease| async move {
                    assert!(lease.fencing_token > 0);
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, WorkError<String>>(body("charged"))
                },
            )
            .await
            .expect("idempotent");
        assert_eq!(outcome.replayed, expected_replay);
        assert_eq!(outcome.result, body("charged"));
    }
    assert_eq!(runs.swap(0, Ordering::SeqCst), 1);

    // Concurrent duplicates: one runs the work, the others Wait and replay its result.
    let key = unique_key("dupes");
    let mut calls = JoinSet::new();
    for _ in 0..10 {
        let (client, runs, key, print) = (client.clone(), runs.clone(), key.clone(), print.clone());
        calls.spawn(async move {
            client
                .idempotent(NS, &key, print, Options::default(), |_| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, WorkError<String>>(body("once"))
                })
                .await
        });
    }
    let mut replays = 0;
    while let Some(done) = calls.join_next().await {
        let outcome = done.expect("task").expect("idempotent");
        assert_eq!(outcome.result, body("once"));
        replays += usize::from(outcome.replayed);
    }
    assert_eq!(runs.swap(0, Ordering::SeqCst), 1, "the work ran once");
    assert_eq!(replays, 9);

    // A retryable failure releases the key: the next call runs the work again.
    let key = unique_key("retry");
    let failed = client
        .idempotent(NS, &key, print.clone(), Options::default(), |_| async {
            Err::<pb::Result, _>(WorkError::Retryable("card network timeout"))
        })
        .await;
    assert!(matches!(
        failed,
        Err(ClientError::Work("card network timeout"))
    ));
    let outcome = client
        .idempotent(NS, &key, print.clone(), Options::default(), |_| async {
            Ok::<_, WorkError<&str>>(body("second try"))
        })
        .await
        .expect("runs again");
    assert!(!outcome.replayed);

    // A terminal failure with a result stores it: retries replay the failure.
    let key = unique_key("declined");
    let declined = pb::Result {
        body: b"card declined".to_vec(),
        code: 402,
        ..Default::default()
    };
    let first = client
        .idempotent(NS, &key, print.clone(), Options::default(), |_| {
            let declined = declined.clone();
            async move {
                Err::<pb::Result, _>(WorkError::Terminal {
                    error: "declined",
                    result: Some(declined),
                })
            }
        })
        .await;
    assert!(matches!(first, Err(ClientError::Work("declined"))));
    let replay = client
        .idempotent(NS, &key, print.clone(), Options::default(), |_| async {
            Ok::<_, WorkError<&str>>(body("must not run"))
        })
        .await
        .expect("replay");
    assert!(replay.replayed);
    assert_eq!(replay.result, declined);

    // The lease is renewed through work longer than its TTL: a duplicate arriving meanwhile
    // waits instead of taking over.
    let key = unique_key("long");
    let options = Options {
        lease_ttl: Duration::from_millis(300),
        ..Options::default()
    };
    let long = {
        let (client, runs, key, print, options) = (
            client.clone(),
            runs.clone(),
            key.clone(),
            print.clone(),
            options.clone(),
        );
        tokio::spawn(async move {
            client
                .idempotent(NS, &key, print, options, |_| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                    Ok::<_, WorkError<String>>(body("long"))
                })
                .await
        })
    };
    eventually(Duration::from_secs(10), "the long work started", || {
        let started = runs.load(Ordering::SeqCst) == 1;
        async move { started }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await; // past two lease lengths
    let duplicate = client
        .idempotent(NS, &key, print.clone(), options, |_| async {
            Ok::<_, WorkError<String>>(body("duplicate"))
        })
        .await
        .expect("duplicate");
    assert!(
        duplicate.replayed,
        "the renewed lease kept the duplicate out"
    );
    assert_eq!(duplicate.result, body("long"));
    long.await.expect("task").expect("long work");
    assert_eq!(runs.swap(0, Ordering::SeqCst), 1);

    // The same key with another request is refused.
    let other =
        fingerprint(&serde_json::json!({"order": 4711, "amount": 9999})).expect("fingerprint");
    let mismatch = client
        .idempotent(NS, &key, other, Options::default(), |_| async {
            Ok::<_, WorkError<String>>(body("x"))
        })
        .await;
    assert!(matches!(mismatch, Err(ClientError::FingerprintMismatch)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_helper_memory() {
    client_behaviour(&TestServer::memory().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_helper_postgres() {
    client_behaviour(&TestServer::postgres().await).await;
}

#[tokio::test]
async fn client_fails_closed_or_open_when_idemd_is_down() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let client = IdempotencyClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("lazy");
    let closed = client
        .idempotent(NS, "k", Vec::new(), Options::default(), |_| async {
            Ok::<_, WorkError<String>>(body("unprotected"))
        })
        .await;
    assert!(
        matches!(closed, Err(ClientError::Unavailable(_))),
        "{closed:?}"
    );
    let open = client
        .idempotent(
            NS,
            "k",
            Vec::new(),
            Options {
                fail_open: true,
                ..Options::default()
            },
            |_| async { Ok::<_, WorkError<String>>(body("unprotected")) },
        )
        .await
        .expect("fail open runs the work");
    assert!(!open.protected && !open.replayed);
}

/// clients/rust/examples/orders.rs: many duplicates with client timeouts and retries, exactly one
/// order each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_example_creates_exactly_one_order_per_request() {
    let database = TestDatabase::create().await;
    let server = crate::processes::IdemdProcess::start(&["--database-url", &database.url]);
    let url = database.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        let example = build_orders_example();
        std::process::Command::new(example)
            .arg(format!("http://{}", server.addr))
            .arg(url)
            .output()
    })
    .await
    .expect("task")
    .expect("run the orders example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("20 orders in the table, 0 violations"),
        "{stdout}"
    );
}

/// Builds the orders example.
fn build_orders_example() -> std::path::PathBuf {
    build_client_example("orders")
}

/// Builds an example of the client crate, which is not part of this suite's build, in the
/// profile this test binary was built with, and returns its path. The packages are those the
/// README's test command tests before the server's (the client and the bench): the same
/// features, so there cargo finds it already built.
pub(crate) fn build_client_example(name: &str) -> std::path::PathBuf {
    // target/<profile directory>/deps/suite-…; the dev profile's directory is `debug`.
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => panic!("no profile directory in {}", exe.display()),
    };
    let output = std::process::Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "--locked", "--profile", profile])
        .args(["-p", "idemd-client", "-p", "idemd-bench", "--example", name])
        .output()
        .expect("run cargo");
    assert!(
        output.status.success(),
        "cargo could not build the {name} example:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    profile_dir.join("examples").join(name)
}
