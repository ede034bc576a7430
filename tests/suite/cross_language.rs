//! The cross-language test (issue 20): one real idemd on a fresh PostgreSQL database, and a
//! worker in each of the five client languages (Rust in-process with idemd-client; Python, Node,
//! Go and Java as processes) using the same keys at once.
//!
//! A worker reads commands, one JSON line each on stdin: `{"namespace", "repeats", "calls":
//! [{"key", "request"}]}`, answers `{"ready": true}`, and on the next line (`go`) runs its
//! client's helper for every call `repeats` times, all runs
//! at once, with the fingerprint its own client computes from `request`; the work returns
//! `LANGUAGE:KEY:N`, different on every run. It prints one JSON line per run (`key`,
//! `work_runs`, `error` as a kind of clients/BEHAVIOUR.md, `body`, `replayed`) and then
//! `{"done": runs}`. The side effects are counted here, outside idemd, from those lines: every
//! work run a worker reports is one side effect. The workers are clients/python/tests/
//! xlang_worker.py, clients/node/test/xlang-worker.ts, clients/go/internal/xlangworker and
//! clients/java/src/test/java/dev/idemd/client/XlangWorker.java.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use idemd_client::proto::idempotency::v1 as client_pb;
use idemd_client::{fingerprint, IdempotencyClient, Options};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::behaviour::{build_go_program, build_node_tests, repository, rust_kind};
use crate::harness::TestDatabase;
use crate::processes::IdemdProcess;

/// The keys every language uses at once, and how many times each worker runs each of them.
const KEYS: usize = 20;
const REPEATS: usize = 3;
/// Far more than a command takes even on a loaded machine: a worker that hangs fails the test.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// One run of the helper, as a worker reports it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Run {
    key: String,
    work_runs: u64,
    error: Option<String>,
    body: Option<String>,
    replayed: Option<bool>,
    /// Read only through `Debug`, in the failure messages: what the error said.
    #[serde(default)]
    #[allow(dead_code)]
    detail: Option<String>,
}

/// A worker program in another language, started once and fed commands.
struct ProcessWorker {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: tempfile::NamedTempFile,
}

impl ProcessWorker {
    fn start(mut command: Command, address: &str) -> Self {
        let stderr = tempfile::NamedTempFile::new().expect("a file for the worker's stderr");
        let mut child = command
            .arg(address)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                stderr.reopen().expect("reopen the worker's stderr file"),
            ))
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {command:?}: {error}"));
        let stdin = child.stdin.take().expect("the worker's stdin is piped");
        let stdout = child.stdout.take().expect("the worker's stdout is piped");
        let (sender, lines) = mpsc::unbounded_channel();
        // A thread reads the worker's stdout, so the test can wait for lines with a deadline.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    async fn next_line(&mut self) -> Result<Value, String> {
        let line = tokio::time::timeout(COMMAND_LIMIT, self.lines.recv())
            .await
            .map_err(|_| format!("no answer within {COMMAND_LIMIT:?}\n{}", self.stderr()))?
            .ok_or_else(|| format!("the worker ended\n{}", self.stderr()))?;
        serde_json::from_str(&line)
            .map_err(|error| format!("a line that is not JSON ({error}): {line}"))
    }

    fn send(&mut self, line: &str) -> Result<(), String> {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .map_err(|error| format!("cannot send a command: {error}\n{}", self.stderr()))
    }

    /// Sends a command and waits until the worker is ready to start it.
    async fn prepare(&mut self, command: &Value) -> Result<(), String> {
        self.send(&command.to_string())?;
        let ready = self.next_line().await?;
        if ready.get("ready").is_none() {
            return Err(format!("expected {{\"ready\": ...}}, got {ready}"));
        }
        Ok(())
    }

    /// Starts the prepared command and collects its runs.
    async fn finish(&mut self) -> Result<Vec<Run>, String> {
        self.send("go")?;
        let mut runs = Vec::new();
        loop {
            let value = self.next_line().await?;
            if let Some(done) = value.get("done") {
                if done != &json!(runs.len()) {
                    return Err(format!("done says {done}, after {} runs", runs.len()));
                }
                return Ok(runs);
            }
            runs.push(
                serde_json::from_value(value.clone())
                    .map_err(|error| format!("a run line of another shape ({error}): {value}"))?,
            );
        }
    }
}

impl Drop for ProcessWorker {
    fn drop(&mut self) {
        // Ending already is fine: this only makes sure no worker outlives the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Rust worker: the same protocol, in-process, on the Rust client.
struct RustWorker {
    client: IdempotencyClient,
    work_runs: Arc<AtomicU64>,
    prepared: Option<Value>,
}

impl RustWorker {
    async fn finish(&mut self) -> Result<Vec<Run>, String> {
        let command = self.prepared.take().ok_or("no command prepared")?;
        let namespace = command["namespace"].as_str().ok_or("no namespace")?;
        let repeats = command["repeats"].as_u64().ok_or("no repeats")?;
        let calls = command["calls"].as_array().ok_or("no calls")?;
        let mut runs = Vec::new();
        for call in calls {
            let key = call["key"].as_str().ok_or("a call without a key")?;
            for _ in 0..repeats {
                runs.push(run_rust(
                    self.client.clone(),
                    namespace.to_string(),
                    key.to_string(),
                    call["request"].clone(),
                    self.work_runs.clone(),
                ));
            }
        }
        Ok(join_all(runs).await)
    }
}

async fn run_rust(
    client: IdempotencyClient,
    namespace: String,
    key: String,
    request: Value,
    work_runs: Arc<AtomicU64>,
) -> Run {
    let fingerprint = match fingerprint(&request) {
        Ok(fingerprint) => fingerprint,
        Err(error) => {
            return Run {
                key,
                work_runs: 0,
                error: Some(format!("unmapped: {error}")),
                body: None,
                replayed: None,
                detail: None,
            }
        }
    };
    let executed = Arc::new(AtomicU64::new(0));
    let counted = executed.clone();
    let body_key = key.clone();
    let outcome = client
        .idempotent(
            &namespace,
            &key,
            fingerprint,
            Options::default(),
            move |_lease| async move {
                counted.fetch_add(1, Ordering::SeqCst);
                let n = work_runs.fetch_add(1, Ordering::SeqCst) + 1;
                // The work takes a moment, as real work does, so other callers meet the key held.
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok::<_, idemd_client::WorkError<String>>(client_pb::Result {
                    body: format!("rust:{body_key}:{n}").into_bytes(),
                    ..Default::default()
                })
            },
        )
        .await;
    let work_runs = executed.load(Ordering::SeqCst);
    match outcome {
        Ok(outcome) => Run {
            key,
            work_runs,
            error: None,
            body: Some(String::from_utf8_lossy(&outcome.result.body).into_owned()),
            replayed: Some(outcome.replayed),
            detail: None,
        },
        Err(error) => Run {
            key,
            work_runs,
            error: Some(rust_kind(&error).to_string()),
            body: None,
            replayed: None,
            detail: Some(error.to_string()),
        },
    }
}

enum Runner {
    Process(ProcessWorker),
    Rust(RustWorker),
}

struct Worker {
    language: &'static str,
    runner: Runner,
}

impl Worker {
    /// Hands the worker a command; it starts when `finish` says so, so that every language's
    /// calls start together (a worker process would otherwise start late by its own start-up).
    async fn prepare(&mut self, command: &Value) {
        let prepared = match &mut self.runner {
            Runner::Process(worker) => worker.prepare(command).await,
            Runner::Rust(worker) => {
                worker.prepared = Some(command.clone());
                Ok(())
            }
        };
        prepared.unwrap_or_else(|error| panic!("the {} worker: {error}", self.language));
    }

    /// Starts the prepared command; a worker that cannot answer fails the test, naming its
    /// language.
    async fn finish(&mut self) -> Vec<Run> {
        let runs = match &mut self.runner {
            Runner::Process(worker) => worker.finish().await,
            Runner::Rust(worker) => worker.finish().await,
        };
        runs.unwrap_or_else(|error| panic!("the {} worker: {error}", self.language))
    }

    async fn run(&mut self, command: &Value) -> Vec<Run> {
        self.prepare(command).await;
        self.finish().await
    }
}

fn command(namespace: &str, repeats: usize, calls: &[(String, Value)]) -> Value {
    json!({
        "namespace": namespace,
        "repeats": repeats,
        "calls": calls
            .iter()
            .map(|(key, request)| json!({"key": key, "request": request}))
            .collect::<Vec<_>>(),
    })
}

/// Every worker's runs must be one per call and repeat: a worker that skipped runs (or never
/// ran) fails here, whatever the others did.
fn assert_every_run_reported(
    language: &str,
    runs: &[Run],
    calls: &[(String, Value)],
    repeats: usize,
) {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for run in runs {
        *seen.entry(run.key.as_str()).or_default() += 1;
    }
    let expected: BTreeMap<&str, usize> = calls
        .iter()
        .map(|(key, _)| (key.as_str(), repeats))
        .collect();
    assert_eq!(
        seen, expected,
        "the {language} worker did not report one run per call and repeat"
    );
}

async fn start_workers(address: &str) -> Vec<Worker> {
    // The builds are slow (Maven, go build, tsc): all three at once.
    let node = tokio::task::spawn_blocking(|| build_node_tests("dist-xlang"));
    let go = tokio::task::spawn_blocking(|| build_go_program("xlangworker"));
    let java = tokio::task::spawn_blocking(|| {
        crate::java_client::java_test_program("dev.idemd.client.XlangWorker")
    });
    let node = node.await.expect("compile the Node worker");
    let go = go.await.expect("build the Go worker");
    let java = java.await.expect("compile the Java worker");

    let python_path = repository().join("clients/python");
    let mut python = Command::new("python3");
    python
        .arg(python_path.join("tests/xlang_worker.py"))
        // This checkout's client, whatever else is installed.
        .env("PYTHONPATH", &python_path);
    let mut node_worker = Command::new("node");
    node_worker.arg(node.join("test/xlang-worker.js"));

    let client = IdempotencyClient::connect(format!("http://{address}"))
        .await
        .expect("the Rust client's channel");
    vec![
        Worker {
            language: "python",
            runner: Runner::Process(ProcessWorker::start(python, address)),
        },
        Worker {
            language: "node",
            runner: Runner::Process(ProcessWorker::start(node_worker, address)),
        },
        Worker {
            language: "go",
            runner: Runner::Process(ProcessWorker::start(Command::new(go), address)),
        },
        Worker {
            language: "java",
            runner: Runner::Process(ProcessWorker::start(java, address)),
        },
        // Last: it starts the moment it is told to, the processes a moment after.
        Worker {
            language: "rust",
            runner: Runner::Rust(RustWorker {
                client,
                work_runs: Arc::new(AtomicU64::new(0)),
                prepared: None,
            }),
        },
    ]
}

/// Each worker's runs of one command, all workers at once: every worker is ready before any
/// starts. Each worker gets the calls in another order (rotated by its place), so each language
/// starts on keys the others reach last, and the race for a key is not always won by the
/// quickest client.
async fn run_everywhere(workers: &mut [Worker], command: &Value) -> Vec<(&'static str, Vec<Run>)> {
    let count = workers.len();
    for (place, worker) in workers.iter_mut().enumerate() {
        let mut rotated = command.clone();
        if let Some(calls) = rotated["calls"].as_array_mut() {
            let by = calls.len() * place / count;
            calls.rotate_left(by);
        }
        worker.prepare(&rotated).await;
    }
    join_all(workers.iter_mut().map(|worker| async move {
        let runs = worker.finish().await;
        (worker.language, runs)
    }))
    .await
}

#[derive(Debug, Deserialize)]
struct Vectors {
    vectors: Vec<Vector>,
}

#[derive(Debug, Deserialize)]
struct Vector {
    input: Value,
}

/// The requests of clients/fingerprint-vectors.json: nested objects, unicode keys and text,
/// floats of every shape JCS formats differently.
fn vector_requests() -> Vec<Value> {
    let path = repository().join("clients/fingerprint-vectors.json");
    let text = std::fs::read_to_string(&path).expect("read clients/fingerprint-vectors.json");
    let vectors: Vectors = serde_json::from_str(&text).expect("the fingerprint vectors");
    let requests: Vec<Value> = vectors.vectors.into_iter().map(|v| v.input).collect();
    let text_of_all = Value::Array(requests.clone()).to_string();
    for needed in ["5e-324", "💳", "世界", "\"c\":{"] {
        assert!(
            text_of_all.contains(needed),
            "the vectors lost what this test relies on: {needed}"
        );
    }
    requests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_languages_share_keys_exactly_once() {
    let database = TestDatabase::create().await;
    let idemd = IdemdProcess::start(&["--database-url", &database.url]);
    let address = idemd.addr.to_string();
    let mut workers = start_workers(&address).await;
    let namespace = format!("xlang-{}", uuid::Uuid::new_v4().simple());

    // 1. Every language hammers the same keys at once: each key's work runs once in all, and
    //    every caller of every language gets that one run's bytes.
    let calls: Vec<(String, Value)> = (0..KEYS)
        .map(|i| {
            let key = format!("order-{i}");
            let request = json!({"order": key, "amount": 1000 + i, "currency": "EUR"});
            (key, request)
        })
        .collect();
    let results = run_everywhere(&mut workers, &command(&namespace, REPEATS, &calls)).await;
    let mut by_key: BTreeMap<&str, Vec<(&str, &Run)>> = BTreeMap::new();
    for (language, runs) in &results {
        assert_every_run_reported(language, runs, &calls, REPEATS);
        for run in runs {
            assert!(run.error.is_none(), "{language}: {run:?}");
            by_key
                .entry(run.key.as_str())
                .or_default()
                .push((language, run));
        }
    }
    let mut ran_in: BTreeMap<String, usize> = BTreeMap::new();
    for (key, runs) in &by_key {
        let work_runs: u64 = runs.iter().map(|(_, run)| run.work_runs).sum();
        assert_eq!(work_runs, 1, "{key}'s work ran {work_runs} times: {runs:?}");
        let body = runs[0].1.body.clone();
        for (language, run) in runs {
            assert_eq!(
                run.body, body,
                "{language} got other bytes for {key}: {runs:?}"
            );
        }
        let body = body.unwrap_or_default();
        let runner = body.split(':').next().unwrap_or_default();
        assert!(
            body.starts_with(&format!("{runner}:{key}:")),
            "{key} has a body no work of this test made: {body}"
        );
        *ran_in.entry(runner.to_string()).or_default() += 1;
        let fresh = runs
            .iter()
            .filter(|(_, run)| run.replayed == Some(false))
            .count();
        assert_eq!(
            fresh, 1,
            "{key}: one caller ran the work, the others replayed: {runs:?}"
        );
    }
    assert_eq!(by_key.len(), KEYS);
    eprintln!("whose work ran, by language: {ran_in:?}");

    // 2. A request fingerprinted in one language replays in every other: each language in turn
    //    runs every vector's request first, then the four others send the same request.
    let requests = vector_requests();
    let mut every_fingerprinted = Vec::new();
    for first in 0..workers.len() {
        let origin = workers[first].language;
        let calls: Vec<(String, Value)> = requests
            .iter()
            .enumerate()
            .map(|(i, request)| (format!("vector-{origin}-{i}"), request.clone()))
            .collect();
        let command = command(&namespace, 1, &calls);
        let originals = workers[first].run(&command).await;
        assert_every_run_reported(origin, &originals, &calls, 1);
        let bodies: BTreeMap<String, Option<String>> = originals
            .iter()
            .map(|run| {
                assert!(
                    run.error.is_none() && run.work_runs == 1 && run.replayed == Some(false),
                    "{origin} on a fresh key: {run:?}"
                );
                (run.key.clone(), run.body.clone())
            })
            .collect();
        let others = join_all(
            workers
                .iter_mut()
                .filter(|worker| worker.language != origin)
                .map(|worker| async {
                    let runs = worker.run(&command).await;
                    (worker.language, runs)
                }),
        )
        .await;
        assert_eq!(others.len(), 4);
        for (language, runs) in others {
            assert_every_run_reported(language, &runs, &calls, 1);
            for run in runs {
                assert!(
                    run.error.is_none()
                        && run.work_runs == 0
                        && run.replayed == Some(true)
                        && run.body == bodies[&run.key],
                    "{language} did not replay what {origin} stored for {}: {run:?}",
                    run.key
                );
            }
        }
        every_fingerprinted.extend(calls);
    }

    // 3. The same keys with a changed request are refused in every language, with that
    //    language's fingerprint mismatch error, and no work runs.
    let changed: Vec<(String, Value)> = every_fingerprinted
        .into_iter()
        .map(|(key, request)| (key, json!({"changed": true, "request": request})))
        .collect();
    for (language, runs) in run_everywhere(&mut workers, &command(&namespace, 1, &changed)).await {
        assert_every_run_reported(language, &runs, &changed, 1);
        for run in runs {
            assert_eq!(
                (run.error.as_deref(), run.work_runs),
                (Some("fingerprint_mismatch"), 0),
                "{language} on a changed request: {run:?}"
            );
        }
    }
}
