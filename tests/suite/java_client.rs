//! The Java client's own test suite (clients/java, JUnit 5 under Maven Surefire), run against
//! this build's idemd binary: the suite starts idemd itself from IDEMD_BINARY, on a throwaway
//! PostgreSQL cluster it may stop and start, and restarts both. CI's .ci/run warms the Maven
//! cache first, so this run downloads nothing.
//!
//! The suite passes only if Surefire ran tests and every one of them passed: a skipped test (an
//! assumption that failed, a @Disabled) fails it.

use std::collections::BTreeMap;
use std::process::Command;

use crate::clients::{assert_all_passed, run_client_suite};

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
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/java");
    let mut maven = Command::new("mvn");
    // -T1 and Surefire's single fork: the machine's cores are shared with the rest of the suite.
    maven
        .current_dir(dir)
        .args(["-B", "--no-transfer-progress", "-T1", "test"]);
    let output = run_client_suite("Java", maven);
    let counts =
        surefire_summary(&output).unwrap_or_else(|| panic!("no Surefire summary in:\n{output}"));
    assert_all_passed("Java", &counts, "passed", &output);
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
