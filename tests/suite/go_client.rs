//! The Go client (clients/go): its own test suite, run with `go test` against this build's idemd
//! on a fresh PostgreSQL database; and a Go program that keeps calling `Idempotent` while idemd is
//! SIGKILLed and restarted and while PostgreSQL crashes and restarts under it.
//!
//! Go downloads the client's modules (pinned by clients/go/go.sum) into its module cache; CI's
//! .ci/run installs protoc and the pinned protoc plugins that the stubs' regeneration test needs.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::harness::TestDatabase;
use crate::processes::{free_port, Cluster, IdemdProcess};

const GO_CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/go");

/// `go` with the client's folder as working directory and only what this suite passes in
/// IDEMD_* variables.
fn go(args: &[&str]) -> Command {
    let mut command = Command::new("go");
    command.current_dir(GO_CLIENT).args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("IDEMD_") {
            command.env_remove(name);
        }
    }
    command
}

/// What `go test -v` reported: top-level tests started, and results by word (PASS, FAIL, SKIP).
#[derive(Debug, Default, PartialEq)]
struct GoTestCounts {
    started: u64,
    results: BTreeMap<String, u64>,
}

fn go_test_counts(output: &str) -> GoTestCounts {
    let mut counts = GoTestCounts::default();
    for line in output.lines() {
        // Subtests are indented and named Parent/child; count top-level tests only.
        if let Some(name) = line.strip_prefix("=== RUN   ") {
            if !name.contains('/') {
                counts.started += 1;
            }
        } else if let Some(rest) = line.strip_prefix("--- ") {
            if let Some((word, name)) = rest.split_once(": ") {
                if !name.contains('/') {
                    *counts.results.entry(word.to_string()).or_default() += 1;
                }
            }
        }
    }
    counts
}

/// Fails unless tests ran and every one that started passed (none skipped, none failed).
#[track_caller]
fn assert_every_go_test_passed(counts: &GoTestCounts, output: &str) {
    let passed = counts.results.get("PASS").copied().unwrap_or(0);
    assert!(
        passed > 0,
        "the Go client's suite passed no test:\n{output}"
    );
    for (word, count) in &counts.results {
        assert!(
            word == "PASS" || *count == 0,
            "the Go client's suite reports {count} {word} (every test must run and pass):\n{output}"
        );
    }
    assert_eq!(
        counts.started, passed,
        "not every Go test that started passed:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn go_client_tests_pass() {
    let database = TestDatabase::create().await;
    let url = database.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        go(&["test", "-count=1", "-v", "./..."])
            .env("IDEMD_BINARY", env!("CARGO_BIN_EXE_idemd"))
            .env("IDEMD_TEST_DATABASE_URL", url)
            .output()
            .expect("run `go test` (is Go installed?)")
    })
    .await
    .expect("go test thread");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "the Go client's tests failed:\n{text}"
    );
    assert_every_go_test_passed(&go_test_counts(&text), &text);
}

#[test]
fn go_test_output_is_read_and_skips_fail() {
    let output = "=== RUN   TestA\n--- PASS: TestA (0.00s)\n=== RUN   TestB\n=== RUN   TestB/sub\n    --- PASS: TestB/sub (0.00s)\n--- SKIP: TestB (0.00s)\nok  \tpkg\t0.1s\n";
    let counts = go_test_counts(output);
    assert_eq!(counts.started, 2);
    assert_eq!(counts.results.get("PASS"), Some(&1));
    assert_eq!(counts.results.get("SKIP"), Some(&1));
    let refused = std::panic::catch_unwind(|| assert_every_go_test_passed(&counts, output));
    assert!(refused.is_err(), "a skip was let through: {counts:?}");
    let none = go_test_counts("ok  \tpkg\t0.1s\n");
    let refused = std::panic::catch_unwind(|| assert_every_go_test_passed(&none, ""));
    assert!(refused.is_err(), "a run of no test was let through");
    let passing =
        go_test_counts("=== RUN   TestA\n--- PASS: TestA (0.00s)\nPASS\nok  \tpkg\t0.1s\n");
    assert_every_go_test_passed(&passing, "");
}

/// Lines the Go program prints, read on a thread of their own.
struct Lines {
    receiver: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    /// Waits for a line starting with `prefix`, at most `limit`; returns it.
    fn wait_for(&mut self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.receiver.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(error) => panic!(
                    "no line starting with {prefix:?} within {limit:?} ({error}); the program printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits until `count` more keys are done.
    fn wait_for_done(&mut self, count: usize, limit: Duration) {
        for _ in 0..count {
            self.wait_for("done ", limit);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn go_client_keeps_working_across_idemd_and_postgres_restarts() {
    let cluster = Cluster::start();
    let database = TestDatabase::create_on(&cluster.admin_url()).await;
    let url = database.url.clone();
    let listen = format!("127.0.0.1:{}", free_port());
    tokio::task::spawn_blocking(move || {
        let mut idemd = IdemdProcess::spawn(&listen, &["--database-url", &url], &[]);
        let build = tempfile::tempdir().expect("temp dir");
        let program = build.path().join("restartcheck");
        let program_path = program.to_str().expect("UTF-8 temp path");
        let built = go(&["build", "-o", program_path, "./internal/restartcheck"])
            .output()
            .expect("run `go build`");
        assert!(
            built.status.success(),
            "go build: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        let mut worker = Command::new(&program)
            .args([
                &listen,
                &format!("restart-{}", uuid::Uuid::new_v4().simple()),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the Go program");
        let stdout = worker.stdout.take().expect("stdout");
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Lines {
            receiver,
            seen: Vec::new(),
        };
        let limit = Duration::from_secs(60);
        lines.wait_for_done(5, limit);

        // idemd dies without a goodbye; the program must see the outage, then go on once a new
        // idemd listens on the same address.
        idemd.kill();
        lines.wait_for("outage ", limit);
        idemd = IdemdProcess::spawn(&listen, &["--database-url", &url], &[]);
        lines.wait_for_done(5, limit);

        // PostgreSQL crashes (no checkpoint): idemd answers UNAVAILABLE until it is back.
        cluster.crash();
        lines.wait_for("outage ", limit);
        cluster.start_again();
        lines.wait_for_done(5, limit);

        drop(worker.stdin.take()); // ends the loop: the program replays every key and sums up
        let summary = lines.wait_for("summary ", Duration::from_secs(120));
        let status = worker.wait().expect("wait for the Go program");
        let mut stderr = String::new();
        if let Some(mut pipe) = worker.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        assert!(
            status.success(),
            "the Go program failed: {stderr}\n{}",
            lines.seen.join("\n")
        );
        let outages = lines
            .seen
            .iter()
            .filter(|line| line.starts_with("outage "))
            .count();
        eprintln!("{summary}; {outages} RPCs found idemd unreachable during the restarts");
        let numbers: BTreeMap<&str, u64> = summary
            .trim_start_matches("summary ")
            .split(' ')
            .filter_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                Some((name, value.parse().ok()?))
            })
            .collect();
        let keys = numbers.get("keys").copied().unwrap_or(0);
        assert!(keys >= 15, "{summary}");
        // Every key's work ran exactly once, through both restarts, and every key replays.
        assert_eq!(numbers.get("runs"), Some(&keys), "{summary}");
        assert_eq!(numbers.get("replays"), Some(&keys), "{summary}");
        drop(idemd);
        drop(database); // before its cluster stops
    })
    .await
    .expect("restart test thread");
}
