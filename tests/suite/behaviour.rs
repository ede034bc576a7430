//! The client behaviour suite (clients/BEHAVIOUR.md): every case of clients/behaviour/cases.json
//! runs through every client's helper against a scripted fake idemd (fake_idemd.rs), and a test
//! per language fails on any difference from what the case expects, naming each failing case.
//!
//! A runner is a program that takes `ADDRESS CASES_FILE CASE_NAME` and prints one line of JSON
//! (`error`, `work_runs`, `body`, `replayed`, `protected`); the Rust runner is the function
//! `run_rust_case` below, in-process, with the same output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idemd_client::proto::idempotency::v1 as client_pb;
use idemd_client::{ClientError, IdempotencyClient, Options, RetryPolicy, WorkError};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::fake_idemd::{FakeIdemd, ScriptedAnswer};

const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/behaviour/cases.json");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[allow(dead_code)]
    comment: String,
    defaults: serde_json::Map<String, Value>,
    default_work: Value,
    cases: Vec<Case>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    why: String,
    #[serde(default)]
    options: serde_json::Map<String, Value>,
    #[serde(default)]
    work: Option<Value>,
    script: BTreeMap<String, Vec<ScriptedAnswer>>,
    expect: Expected,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expected {
    error: Option<String>,
    work_runs: u64,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    replayed: Option<bool>,
    #[serde(default)]
    protected: Option<bool>,
    calls: Vec<String>,
}

/// A case's options, `defaults` merged under its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseOptions {
    fail_open: bool,
    max_attempts: u32,
    backoff_initial_ms: u64,
    backoff_max_ms: u64,
    rpc_timeout_ms: u64,
    max_waits: u32,
    wait_timeout_ms: u64,
    lease_ttl_ms: u64,
}

/// What a case's work does.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Work {
    #[serde(default)]
    returns: Option<String>,
    #[serde(default)]
    fails: Option<String>,
    #[serde(default)]
    store: Option<String>,
}

/// The error kinds of BEHAVIOUR.md: an expected `error` outside them is a typo in a case.
const KINDS: &[&str] = &[
    "unavailable",
    "rate_limited",
    "overloaded",
    "store_full",
    "unauthenticated",
    "permission_denied",
    "invalid_request",
    "fingerprint_mismatch",
    "lease_lost",
    "in_progress",
    "internal",
    "rpc_error",
    "work_failed",
];

fn load_cases() -> CaseFile {
    let text = std::fs::read_to_string(CASES).expect("read clients/behaviour/cases.json");
    serde_json::from_str(&text).expect("clients/behaviour/cases.json is a case file")
}

fn options_of(file: &CaseFile, case: &Case) -> CaseOptions {
    let mut merged = file.defaults.clone();
    merged.extend(case.options.clone());
    serde_json::from_value(Value::Object(merged))
        .unwrap_or_else(|error| panic!("case {}: bad options: {error}", case.name))
}

fn work_of(file: &CaseFile, case: &Case) -> Work {
    let work = case
        .work
        .clone()
        .unwrap_or_else(|| file.default_work.clone());
    serde_json::from_value(work)
        .unwrap_or_else(|error| panic!("case {}: bad work: {error}", case.name))
}

/// The differences between what a runner printed (and the fake saw) and what the case expects.
fn differences(case: &Case, outcome: &Value, calls: &[String]) -> Vec<String> {
    let expect = &case.expect;
    let mut found = Vec::new();
    let mut compare = |field: &str, expected: Value| {
        let actual = outcome.get(field).cloned().unwrap_or(Value::Null);
        if actual != expected {
            found.push(format!("{field}: expected {expected}, got {actual}"));
        }
    };
    compare("error", json!(expect.error));
    compare("work_runs", json!(expect.work_runs));
    if expect.error.is_none() {
        compare("body", json!(expect.body));
        compare("replayed", json!(expect.replayed));
        compare("protected", json!(expect.protected));
    }
    if calls != expect.calls.as_slice() {
        found.push(format!(
            "calls: expected {:?}, the fake saw {calls:?}",
            expect.calls
        ));
    }
    found
}

/// Runs every case through one language's runner and fails naming every case that differs.
/// `run` gets the fake's address and the case, and returns the runner's JSON outcome (or why it
/// has none).
async fn run_every_case<F, Fut>(language: &str, mut run: F)
where
    F: FnMut(String, Case, CaseOptions, Work) -> Fut,
    Fut: std::future::Future<Output = Result<Value, String>>,
{
    let file = load_cases();
    assert!(file.cases.len() >= 30, "the case file lost cases");
    let mut failures = Vec::new();
    for case in &file.cases {
        if let Some(kind) = &case.expect.error {
            assert!(
                KINDS.contains(&kind.as_str()),
                "case {}: unknown kind {kind}",
                case.name
            );
        }
        let fake = FakeIdemd::start(&case.script)
            .await
            .unwrap_or_else(|error| panic!("case {}: {error}", case.name));
        let options = options_of(&file, case);
        let work = work_of(&file, case);
        // A runner that never ends would hang the suite: every case fits in far less.
        let outcome = tokio::time::timeout(
            Duration::from_secs(60),
            run(fake.address.to_string(), case.clone(), options, work),
        )
        .await
        .unwrap_or_else(|_| Err("the runner did not finish within 60 s".into()));
        match outcome {
            Ok(outcome) => {
                let found = differences(case, &outcome, &fake.calls());
                if !found.is_empty() {
                    failures.push(format!(
                        "{} ({}):\n    {}\n    runner printed {outcome}",
                        case.name,
                        case.why,
                        found.join("\n    ")
                    ));
                }
            }
            Err(error) => failures.push(format!("{} ({}): {error}", case.name, case.why)),
        }
    }
    assert!(
        failures.is_empty(),
        "the {language} client differs from clients/BEHAVIOUR.md in {} of {} cases:\n{}",
        failures.len(),
        file.cases.len(),
        failures.join("\n")
    );
}

/// Runs an external runner: `program args… ADDRESS CASES_FILE CASE_NAME`, one JSON line out.
async fn run_process(mut command: Command, address: String, case: &Case) -> Result<Value, String> {
    command.args([address.as_str(), CASES, case.name.as_str()]);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|error| format!("runner task failed: {error}"))?
        .map_err(|error| format!("cannot start the runner: {error}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "the runner exited with {}:\n{stdout}\n{stderr}",
            output.status
        ));
    }
    let line = stdout.lines().rev().find(|line| !line.trim().is_empty());
    line.and_then(|line| serde_json::from_str(line).ok())
        .ok_or_else(|| format!("the runner printed no JSON outcome:\n{stdout}\n{stderr}"))
}

/// The kind (BEHAVIOUR.md) of a Rust client error.
pub(crate) fn rust_kind(error: &ClientError<String>) -> &'static str {
    match error {
        ClientError::Unavailable(_) => "unavailable",
        ClientError::RateLimited(_) => "rate_limited",
        ClientError::Overloaded(_) => "overloaded",
        ClientError::StoreFull(_) => "store_full",
        ClientError::Unauthenticated(_) => "unauthenticated",
        ClientError::PermissionDenied(_) => "permission_denied",
        ClientError::InvalidRequest(_) => "invalid_request",
        ClientError::FingerprintMismatch => "fingerprint_mismatch",
        ClientError::LeaseLost(_) => "lease_lost",
        ClientError::InProgress(_) => "in_progress",
        ClientError::Internal(_) => "internal",
        ClientError::Rpc(_) => "rpc_error",
        ClientError::Work(_) => "work_failed",
    }
}

/// The Rust runner: the Rust client's helper against `address`, the outcome as a runner prints it.
async fn run_rust_case(
    address: String,
    case: Case,
    options: CaseOptions,
    work: Work,
) -> Result<Value, String> {
    let client = IdempotencyClient::connect(format!("http://{address}"))
        .await
        .map_err(|error| format!("cannot make a channel: {error}"))?;
    let helper_options = Options {
        lease_ttl: Duration::from_millis(options.lease_ttl_ms),
        max_waits: options.max_waits,
        wait_timeout: Duration::from_millis(options.wait_timeout_ms),
        fail_open: options.fail_open,
        rpc_timeout: Duration::from_millis(options.rpc_timeout_ms),
        retry: RetryPolicy {
            max_attempts: options.max_attempts,
            initial_backoff: Duration::from_millis(options.backoff_initial_ms),
            max_backoff: Duration::from_millis(options.backoff_max_ms),
        },
        ..Options::default()
    };
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let outcome = client
        .idempotent(
            "behaviour",
            &case.name,
            b"behaviour-fingerprint".to_vec(),
            helper_options,
            move |_lease| async move {
                counted.fetch_add(1, Ordering::SeqCst);
                match (work.returns.clone(), work.fails.as_deref()) {
                    (Some(body), None) => Ok(client_pb::Result {
                        body: body.into_bytes(),
                        ..Default::default()
                    }),
                    (None, Some("retryable")) => Err(WorkError::Retryable("retryable".to_string())),
                    (None, Some("terminal")) => Err(WorkError::Terminal {
                        error: "terminal".to_string(),
                        result: work.store.clone().map(|body| client_pb::Result {
                            body: body.into_bytes(),
                            ..Default::default()
                        }),
                    }),
                    _ => Err(WorkError::Retryable(format!("unknown work {work:?}"))),
                }
            },
        )
        .await;
    let work_runs = runs.load(Ordering::SeqCst);
    Ok(match outcome {
        Ok(outcome) => json!({
            "error": null,
            "work_runs": work_runs,
            "body": String::from_utf8_lossy(&outcome.result.body),
            "replayed": outcome.replayed,
            "protected": outcome.protected,
        }),
        Err(error) => json!({
            "error": rust_kind(&error),
            "work_runs": work_runs,
            "body": null, "replayed": null, "protected": null,
            "detail": error.to_string(),
        }),
    })
}

#[tokio::test]
async fn behaviour_rust_client() {
    run_every_case("Rust", |address, case, options, work| {
        run_rust_case(address, case, options, work)
    })
    .await;
}

pub(crate) fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Python runner, on the sync `Client` or (with `IDEMD_BEHAVIOUR_PYTHON=asyncio`) on the
/// asyncio `AsyncClient`.
async fn run_python_cases(language: &str, flavour: &str) {
    let python_path = repository().join("clients/python");
    let runner = python_path.join("tests/behaviour_runner.py");
    run_every_case(language, |address, case, _options, _work| {
        let mut command = Command::new("python3");
        command.arg(&runner);
        // This checkout's client, whatever else is installed.
        command.env("PYTHONPATH", &python_path);
        command.env("IDEMD_BEHAVIOUR_PYTHON", flavour);
        async move { run_process(command, address, &case).await }
    })
    .await;
}

#[tokio::test]
async fn behaviour_python_client() {
    run_python_cases("Python", "sync").await;
}

#[tokio::test]
async fn behaviour_python_asyncio_client() {
    run_python_cases("Python asyncio", "asyncio").await;
}

/// Compiles the Node client and its runner into `dist-behaviour/` (not `dist/`, which the Node
/// suite's `npm test` cleans and rebuilds, possibly at the same time).
fn build_node_runner() -> PathBuf {
    build_node_tests("dist-behaviour").join("test/behaviour-runner.js")
}

/// Compiles the Node client and its test folder into `clients/node/OUT_DIR` (each user of the
/// compiled programs its own, so one compiling never rewrites files another is running).
pub(crate) fn build_node_tests(out_dir: &str) -> PathBuf {
    let dir = repository().join("clients/node");
    assert!(
        dir.join("node_modules").exists(),
        "run `npm ci --prefix clients/node` first (CI's .ci/run does)"
    );
    let out = dir.join(out_dir);
    let status = Command::new("node")
        .current_dir(&dir)
        .args(["node_modules/typescript/bin/tsc", "-p", ".", "--outDir"])
        .arg(&out)
        .status()
        .expect("run tsc");
    assert!(status.success(), "tsc could not compile the Node client");
    out
}

#[tokio::test]
async fn behaviour_node_client() {
    let runner = build_node_runner();
    run_every_case("Node", |address, case, _options, _work| {
        let mut command = Command::new("node");
        command.arg(&runner);
        async move { run_process(command, address, &case).await }
    })
    .await;
}

/// Builds the Go runner (`clients/go/internal/behaviourrunner`) once into Cargo's test temp dir.
fn build_go_runner() -> PathBuf {
    build_go_program("behaviourrunner")
}

/// Builds `clients/go/internal/NAME` into Cargo's test temp dir as `go-NAME`.
pub(crate) fn build_go_program(name: &str) -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("go-{name}"));
    let output = Command::new("go")
        .current_dir(repository().join("clients/go"))
        .args(["build", "-o"])
        .arg(&out)
        .arg(format!("./internal/{name}"))
        .output()
        .expect("run go build (Go is installed by .ci/run)");
    assert!(
        output.status.success(),
        "go build of internal/{name} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

#[tokio::test]
async fn behaviour_go_client() {
    let runner = tokio::task::spawn_blocking(build_go_runner)
        .await
        .expect("build the Go runner");
    run_every_case("Go", |address, case, _options, _work| {
        let command = Command::new(&runner);
        async move { run_process(command, address, &case).await }
    })
    .await;
}

#[tokio::test]
async fn behaviour_java_client() {
    // Compiles the client and its runner once (Maven), then each case is one JVM start.
    let runner = tokio::task::spawn_blocking(crate::java_client::java_behaviour_runner)
        .await
        .expect("build the Java runner");
    drop(runner);
    run_every_case("Java", |address, case, _options, _work| {
        let command = crate::java_client::java_behaviour_runner();
        async move { run_process(command, address, &case).await }
    })
    .await;
}
