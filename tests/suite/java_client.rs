//! The Java client's own test suite (clients/java, JUnit 5 under Maven Surefire), run against
//! this build's idemd binary: the suite starts idemd itself from IDEMD_BINARY, on a throwaway
//! PostgreSQL cluster it may stop and start, and restarts both. CI's .ci/run warms the Maven
//! cache first, so this run downloads nothing.
//!
//! The suite passes only if Surefire ran tests and every one of them passed: a skipped test (an
//! assumption that failed, a @Disabled) fails it.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::OnceLock;

use crate::clients::{assert_all_passed, run_client_suite};
use crate::processes::IdemdProcess;

const JAVA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/java");

/// The counts of Surefire's closing summary ("Tests run: 12, Failures: 0, Errors: 0, Skipped: 1"),
/// the last such line of the run, with "passed" = run - failures - errors - skipped.
fn surefire_summary(output: &str) -> Option<BTreeMap<String, u64>> {
    let line = output
        .lines()
        .rev()
        .find_map(|line| line.find("Tests run: ").map(|start| &line[start..]))?;
    let mut counts = BTreeMap::new();
    for part in line.split(", ") {
        let Some((word, count)) = part.split_once(": ") else {
            continue;
        };
        let word = word.trim().trim_start_matches("Tests ").to_lowercase();
        if ["run", "failures", "errors", "skipped"].contains(&word.as_str()) {
            counts.insert(word, count.trim().parse().ok()?);
        }
    }
    let run = counts.remove("run")?;
    let not_passed: u64 = counts.values().sum();
    counts.insert("passed".to_string(), run.checked_sub(not_passed)?);
    Some(counts)
}

#[test]
fn java_client_tests_pass() {
    let mut maven = Command::new("mvn");
    // -T1 and Surefire's single fork: the machine's cores are shared with the rest of the suite.
    maven
        .current_dir(JAVA_DIR)
        .args(["-B", "--no-transfer-progress", "-T1", "test"]);
    let output = run_client_suite("Java", maven);
    let counts =
        surefire_summary(&output).unwrap_or_else(|| panic!("no Surefire summary in:\n{output}"));
    assert_all_passed("Java", &counts, "passed", &output);
}

/// The Java runner of the client behaviour suite (clients/BEHAVIOUR.md, "Running the suite"):
/// `java dev.idemd.client.BehaviourRunner`, to which the caller appends `ADDRESS CASES_FILE
/// CASE_NAME`.
pub(crate) fn java_behaviour_runner() -> Command {
    java_test_program("dev.idemd.client.BehaviourRunner")
}

/// `java MAIN_CLASS` for a class of the Java client's tests (the behaviour runner, the
/// cross-language worker, the Servlet example app): see [`java_test_classpath`]. Every program
/// costs one JVM start, not one Maven run.
pub(crate) fn java_test_program(main_class: &str) -> Command {
    let mut java = Command::new("java");
    java.args(java_test_program_args(main_class));
    java
}

/// The arguments of `java` that start `main_class` from the Java client's tests.
pub(crate) fn java_test_program_args(main_class: &str) -> Vec<String> {
    // A short-lived JVM: the quick compiler tier and the serial collector start fastest.
    vec![
        "-XX:TieredStopAtLevel=1".to_string(),
        "-XX:+UseSerialGC".to_string(),
        "-cp".to_string(),
        java_test_classpath().to_string(),
        main_class.to_string(),
    ]
}

/// The classpath of the Java client's classes, its tests and the Servlet example app (which
/// compiles with the tests). The first call compiles them with Maven into a build directory of
/// its own under Cargo's test temp dir (so it never races `java_client_tests_pass`, whose `mvn
/// test` writes clients/java/target at the same time).
pub(crate) fn java_test_classpath() -> &'static str {
    static CLASSPATH: OnceLock<String> = OnceLock::new();
    CLASSPATH.get_or_init(|| {
        let build = concat!(env!("CARGO_TARGET_TMPDIR"), "/java-behaviour-runner");
        let output = Command::new("mvn")
            .current_dir(JAVA_DIR)
            .args(["-B", "-q", "--no-transfer-progress", "-T1"])
            .arg(format!("-Didemd.build.directory={build}"))
            .arg("test-compile")
            .output()
            .expect("run mvn test-compile for the Java behaviour runner");
        assert!(
            output.status.success(),
            "mvn test-compile failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let libraries = std::fs::read_to_string(format!("{build}/test-classpath.txt"))
            .expect("Maven wrote test-classpath.txt");
        format!("{build}/test-classes:{build}/classes:{}", libraries.trim())
    })
}

/// The runner's one line of JSON for `case` of `cases_file`, against `address`.
fn run_java_case(address: &str, cases_file: &std::path::Path, case: &str) -> serde_json::Value {
    let output = java_behaviour_runner()
        .arg(address)
        .arg(cases_file)
        .arg(case)
        .output()
        .expect("start the Java behaviour runner");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the Java runner failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|error| panic!("the Java runner printed no JSON line ({error}): {stdout}"))
}

/// The runner against the real idemd: a fresh key runs the work, the same case again replays.
/// (The behaviour suite runs it against the scripted fake; this keeps it honest on its own.)
#[test]
fn java_behaviour_runner_speaks_the_runner_protocol() {
    let idemd = IdemdProcess::start(&[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let cases = dir.path().join("cases.json");
    let case = format!("java-runner-{}", uuid::Uuid::new_v4().simple());
    let file = serde_json::json!({
        "defaults": {
            "fail_open": false, "max_attempts": 3, "backoff_initial_ms": 1, "backoff_max_ms": 5,
            "rpc_timeout_ms": 2000, "max_waits": 3, "wait_timeout_ms": 1000, "lease_ttl_ms": 30000
        },
        "default_work": { "returns": "fresh" },
        "cases": [{ "name": case, "why": "the runner protocol", "script": {}, "expect": {} }],
    });
    std::fs::write(&cases, file.to_string()).expect("write cases");
    let address = idemd.addr.to_string();
    let first = run_java_case(&address, &cases, &case);
    assert_eq!(
        first,
        serde_json::json!({"error": null, "work_runs": 1, "body": "fresh", "replayed": false, "protected": true})
    );
    let second = run_java_case(&address, &cases, &case);
    assert_eq!(
        second,
        serde_json::json!({"error": null, "work_runs": 0, "body": "fresh", "replayed": true, "protected": true})
    );
    // Nothing listens on a closed port: three Acquires, then fail closed.
    let closed = format!("127.0.0.1:{}", crate::processes::free_port());
    let refused = run_java_case(&closed, &cases, &case);
    assert_eq!(refused["error"], "unavailable", "{refused}");
    assert_eq!(refused["work_runs"], 0, "{refused}");
}

#[test]
fn surefire_summaries_are_read_and_skips_fail() {
    let output = "[INFO] Tests run: 3, Failures: 0, Errors: 0, Skipped: 0, Time elapsed: 1.1 s -- in dev.idemd.client.FingerprintTest\n\
                  [INFO] Results:\n[INFO] \n[WARNING] Tests run: 12, Failures: 0, Errors: 0, Skipped: 2\n";
    let counts = surefire_summary(output).expect("summary");
    assert_eq!(counts.get("passed"), Some(&10));
    assert_eq!(counts.get("skipped"), Some(&2));
    let refused = std::panic::catch_unwind(|| assert_all_passed("t", &counts, "passed", ""));
    assert!(refused.is_err(), "a skip was let through: {counts:?}");

    let clean = surefire_summary("[INFO] Tests run: 7, Failures: 0, Errors: 0, Skipped: 0\n")
        .expect("summary");
    assert_eq!(clean.get("passed"), Some(&7));
    assert_all_passed("t", &clean, "passed", "");

    let none = surefire_summary("[INFO] Tests run: 0, Failures: 0, Errors: 0, Skipped: 0\n")
        .expect("summary");
    let refused = std::panic::catch_unwind(|| assert_all_passed("t", &none, "passed", ""));
    assert!(refused.is_err(), "a run of no test was let through");
    assert!(surefire_summary("BUILD SUCCESS\n").is_none());
}
