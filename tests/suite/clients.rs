//! The Python and Node clients' own test suites, run against this build's idemd binary on the
//! memory store and on PostgreSQL. (CI's .ci/run installs their dependencies first.) The Rust
//! client (clients/rust) is driven from this suite directly, in client.rs.

use std::process::Command;

fn run_client_suite(name: &str, mut command: Command) {
    let output = command
        .env("IDEMD_BINARY", env!("CARGO_BIN_EXE_idemd"))
        .output()
        .unwrap_or_else(|error| panic!("cannot run the {name} client's tests: {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the {name} client's tests failed:\n{stdout}\n{stderr}"
    );
}

#[test]
fn node_client_tests_pass() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/node");
    assert!(
        std::path::Path::new(dir).join("node_modules").exists(),
        "run `npm ci --prefix clients/node` first (CI's .ci/run does)"
    );
    let mut npm = Command::new("npm");
    npm.args(["test", "--prefix", dir]);
    run_client_suite("Node", npm);
}

#[test]
fn python_client_tests_pass() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python");
    let mut pytest = Command::new("python3");
    pytest.args(["-m", "pytest", "-q", "-p", "no:cacheprovider", dir]);
    run_client_suite("Python", pytest);
}
