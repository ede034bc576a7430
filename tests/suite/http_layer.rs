//! The Rust client's tower `IdempotencyLayer` (feature `http`) in an axum app served on
//! 127.0.0.1, against a live idemd: what the conformance driver (http_middleware.rs) does not
//! reach through the example app's routes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing;
use axum::Router;
use idemd_client::http::{FingerprintOptions, IdempotencyLayer};
use idemd_client::IdempotencyClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::processes::IdemdProcess;

type Runs = Arc<Mutex<HashMap<String, u32>>>;

/// Counts a run of `route` for the body's `id`; returns the count.
fn count(runs: &Runs, route: &str, body: &Bytes) -> u32 {
    let body: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let id = body["id"].as_str().unwrap_or("-").to_owned();
    let mut runs = runs.lock().expect("runs");
    let n = runs.entry(format!("{route} {id}")).or_default();
    *n += 1;
    *n
}

fn runs_of(runs: &Runs, route: &str, id: &str) -> u32 {
    runs.lock()
        .expect("runs")
        .get(&format!("{route} {id}"))
        .copied()
        .unwrap_or(0)
}

struct App {
    addr: SocketAddr,
    runs: Runs,
    _idemd: IdemdProcess,
}

async fn start_app() -> App {
    let idemd = IdemdProcess::start(&[]);
    let client = IdempotencyClient::connect(format!("http://{}", idemd.addr))
        .await
        .expect("client");
    let base =
        IdempotencyLayer::new(client.clone(), "rust-layer").lease_ttl(Duration::from_secs(3));
    let runs = Runs::default();
    let app = Router::new()
        .route(
            "/big",
            routing::post(|State(runs): State<Runs>, body: Bytes| async move {
                let run = count(&runs, "big", &body);
                (StatusCode::CREATED, format!("{run}:{}", "x".repeat(5000)))
            })
            .layer(base.clone().max_stored(1000)),
        )
        .route(
            "/hangs",
            routing::post(
                |State(runs): State<Runs>, headers: HeaderMap, body: Bytes| async move {
                    let run = count(&runs, "hangs", &body);
                    if headers.get("x-answer").is_none() {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    (StatusCode::CREATED, format!("{run}"))
                },
            )
            .layer(base.clone()),
        )
        .route(
            "/misconfigured",
            routing::post(|| async { StatusCode::CREATED })
                .layer(IdempotencyLayer::new(client, "not a namespace!")),
        )
        .route(
            "/exclude",
            routing::post(|State(runs): State<Runs>, body: Bytes| async move {
                (
                    StatusCode::CREATED,
                    format!("{}", count(&runs, "exclude", &body)),
                )
            })
            .layer(base.fingerprint(FingerprintOptions {
                exclude: vec!["ts".into()],
                ..Default::default()
            })),
        )
        .with_state(runs.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    App {
        addr,
        runs,
        _idemd: idemd,
    }
}

pub(crate) struct Answer {
    pub status: u16,
    /// The status line and headers, in lower case.
    pub head: String,
    pub body: String,
}

fn request_bytes(path: &str, key: &str, body: &impl std::fmt::Display, extra: &str) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nIdempotency-Key: {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One HTTP/1.1 POST of JSON with an Idempotency-Key (and `extra` header lines), on its own
/// connection.
pub(crate) async fn post(
    addr: SocketAddr,
    path: &str,
    key: &str,
    body: impl std::fmt::Display,
    extra: &str,
) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(&request_bytes(path, key, &body, extra))
        .await
        .expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .expect("an answer within 30 s")
        .expect("read");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    Answer {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

fn unique(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_sends_a_response_too_large_to_store_and_releases_the_key() {
    let app = start_app().await;
    let (key, id) = (unique("k"), unique("big"));
    let first = post(app.addr, "/big", &key, serde_json::json!({"id": id}), "").await;
    assert_eq!(first.status, 201);
    assert_eq!(
        first.body.len(),
        "1:".len() + 5000,
        "the whole body went out"
    );
    let second = post(app.addr, "/big", &key, serde_json::json!({"id": id}), "").await;
    assert_eq!(second.status, 201);
    assert!(
        !second.head.contains("idempotent-replayed"),
        "{}",
        second.head
    );
    assert!(
        second.body.starts_with("2:"),
        "the retry ran the handler again"
    );
    assert_eq!(runs_of(&app.runs, "big", &id), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_releases_the_key_when_the_caller_goes_away() {
    let app = start_app().await;
    let (key, id) = (unique("k"), unique("hangs"));
    let mut stream = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    stream
        .write_all(&request_bytes(
            "/hangs",
            &key,
            &serde_json::json!({"id": id}),
            "",
        ))
        .await
        .expect("send");
    let started = Instant::now();
    while runs_of(&app.runs, "hangs", &id) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the handler never ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(stream);
    // Released, not held until the lease (3 s) expires: well within it, the retry runs again.
    let gone = Instant::now();
    let retry = || {
        post(
            app.addr,
            "/hangs",
            &key,
            serde_json::json!({"id": id}),
            "X-Answer: 1\r\n",
        )
    };
    let mut answer = retry().await;
    while answer.status == 409 && gone.elapsed() < Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(10)).await; // the Release is on its way
        answer = retry().await;
    }
    assert_eq!(
        answer.status, 201,
        "still {} 1.5 s after the caller went away",
        answer.status
    );
    assert_eq!(answer.body, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_answers_idemd_rejected_when_idemd_refuses_its_configuration() {
    let app = start_app().await;
    let answer = post(
        app.addr,
        "/misconfigured",
        &unique("k"),
        serde_json::json!({}),
        "",
    )
    .await;
    assert_eq!(answer.status, 500);
    assert!(
        answer
            .head
            .contains("content-type: application/problem+json"),
        "{}",
        answer.head
    );
    let problem: serde_json::Value =
        serde_json::from_str(&answer.body).expect("a problem document");
    assert!(
        problem["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("#idemd-rejected")),
        "{problem}"
    );
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("InvalidArgument")),
        "{problem}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_leaves_excluded_fields_out_of_the_fingerprint() {
    let app = start_app().await;
    let (key, id) = (unique("k"), unique("exclude"));
    let first = post(
        app.addr,
        "/exclude",
        &key,
        serde_json::json!({"id": id, "amount": 5, "ts": "10:00"}),
        "",
    )
    .await;
    assert_eq!(first.status, 201);
    let again = post(
        app.addr,
        "/exclude",
        &key,
        serde_json::json!({"id": id, "amount": 5, "ts": "10:01"}),
        "",
    )
    .await;
    assert_eq!(again.status, 201);
    assert!(
        again.head.contains("idempotent-replayed: true"),
        "{}",
        again.head
    );
    assert_eq!(again.body, first.body);
    let changed = post(
        app.addr,
        "/exclude",
        &key,
        serde_json::json!({"id": id, "amount": 6, "ts": "10:00"}),
        "",
    )
    .await;
    assert_eq!(changed.status, 422);
    assert_eq!(runs_of(&app.runs, "exclude", &id), 1);
}
