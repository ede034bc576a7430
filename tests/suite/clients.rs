//! The Python and Node clients' own test suites (the Java client's are in java_client.rs), run against this build's idemd binary on the
//! memory store and on PostgreSQL. (CI's .ci/run installs their dependencies first.) The Rust
//! client (clients/rust) is driven from this suite directly, in client.rs.
//!
//! A suite passes only if it ran tests and every one of them passed: a skipped test (pytest
//! older than 8.4 skips async tests with a warning when pytest-asyncio is missing) fails it, as
//! does one marked todo or expected to fail.

use std::collections::BTreeMap;
use std::process::Command;

/// Runs a client suite and returns what it printed, failing unless it exited 0.
pub(crate) fn run_client_suite(name: &str, mut command: Command) -> String {
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
    format!("{stdout}\n{stderr}")
}

/// The counts of pytest's summary line ("57 passed, 2 skipped, 1 warning in 3.21s"), by word.
fn pytest_summary(output: &str) -> Option<BTreeMap<String, u64>> {
    output.lines().rev().find_map(|line| {
        let line = line.trim().trim_matches('=').trim();
        let (counts, _duration) = line.rsplit_once(" in ")?;
        let mut summary = BTreeMap::new();
        for part in counts.split(", ") {
            let (count, word) = part.split_once(' ')?;
            summary.insert(word.to_string(), count.parse().ok()?);
        }
        Some(summary)
    })
}

/// The counts of `node --test`'s closing summary ("# pass 40" in TAP, "ℹ pass 40" in spec).
fn node_summary(output: &str) -> BTreeMap<String, u64> {
    output
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line
                .strip_prefix("# ")
                .or_else(|| line.strip_prefix("ℹ "))?;
            let (word, count) = rest.split_once(' ')?;
            Some((word.to_string(), count.trim().parse().ok()?))
        })
        .collect()
}

/// Fails unless `counts` says tests passed and none was anything but passed.
#[track_caller]
pub(crate) fn assert_all_passed(
    name: &str,
    counts: &BTreeMap<String, u64>,
    passed: &str,
    output: &str,
) {
    let ran = counts.get(passed).copied().unwrap_or(0);
    assert!(
        ran > 0,
        "the {name} client's suite passed no test:\n{output}"
    );
    for (word, count) in counts {
        let harmless = word == passed
            || word.starts_with("warning")
            || ["tests", "suites", "duration_ms"].contains(&word.as_str());
        assert!(
            harmless || *count == 0,
            "the {name} client's suite reports {count} {word} (every test must run and pass):\n{output}"
        );
    }
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
    let output = run_client_suite("Node", npm);
    let counts = node_summary(&output);
    assert_all_passed("Node", &counts, "pass", &output);
    assert_eq!(
        counts.get("tests"),
        counts.get("pass"),
        "not every Node test passed:\n{output}"
    );
}

#[test]
fn python_client_tests_pass() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python");
    let mut pytest = Command::new("python3");
    // -rsxX lists the reason of any skip or xfail, should one happen.
    pytest.args(["-m", "pytest", "-q", "-rsxX", "-p", "no:cacheprovider", dir]);
    let output = run_client_suite("Python", pytest);
    let counts =
        pytest_summary(&output).unwrap_or_else(|| panic!("no pytest summary line in:\n{output}"));
    assert_all_passed("Python", &counts, "passed", &output);
}

#[test]
fn summaries_are_read_and_skips_fail() {
    let pytest =
        pytest_summary("....\n57 passed, 2 skipped, 1 warning in 3.21s\n").expect("summary");
    assert_eq!(pytest.get("passed"), Some(&57));
    assert_eq!(pytest.get("skipped"), Some(&2));
    let pytest = pytest_summary("===== 12 passed in 0.50s =====\n").expect("summary");
    assert_eq!(pytest.get("passed"), Some(&12));
    let node = node_summary("ok 1 - a\n# tests 3\n# suites 1\n# pass 2\n# fail 0\n# skipped 1\n");
    assert_eq!(node.get("tests"), Some(&3));
    assert_eq!(node.get("skipped"), Some(&1));
    let spec = node_summary("ℹ tests 3\nℹ pass 3\nℹ todo 0\n");
    assert_eq!(spec.get("pass"), Some(&3));
    for (counts, passed) in [
        (
            pytest_summary("5 passed, 1 skipped in 1s").expect("summary"),
            "passed",
        ),
        (node, "pass"),
    ] {
        let refused = std::panic::catch_unwind(|| assert_all_passed("t", &counts, passed, ""));
        assert!(refused.is_err(), "a skip was let through: {counts:?}");
    }
}

/// Copies `from` into `to` (made), following no symlinks and skipping `skip` names at any depth.
fn copy_tree(from: &std::path::Path, to: &std::path::Path, skip: &[&str]) {
    std::fs::create_dir_all(to).expect("make a directory");
    for entry in std::fs::read_dir(from).expect("read a directory") {
        let entry = entry.expect("directory entry");
        let name = entry.file_name();
        if skip.iter().any(|skipped| name == *skipped) {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target, skip);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

/// Runs `command`, failing with its output unless it exits 0; returns its stdout.
fn run_ok(what: &str, command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {what}: {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The Node client as an application depends on it (clients/node/README.md, "Installing"):
/// `npm pack` makes a tarball, a fresh project `npm install`s it, and both `require` and
/// `import` load it (and its `@idemd/client/http` middleware, which needs no Express at run time)
/// and construct a client, which reads the proto the tarball ships (there is no
/// repository around the project). The package is packed from a copy, so `prepack`'s clean of
/// `dist/` cannot race the Node suite running from it.
#[test]
fn node_client_installs_from_its_packed_tarball() {
    let repository = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let node_modules = repository.join("clients/node/node_modules");
    assert!(
        node_modules.exists(),
        "run `npm ci --prefix clients/node` first (CI's .ci/run does)"
    );
    let scratch = tempfile::tempdir().expect("temporary directory");
    let copy = scratch.path().join("repository");
    copy_tree(&repository.join("proto"), &copy.join("proto"), &[]);
    let package = copy.join("clients/node");
    copy_tree(
        &repository.join("clients/node"),
        &package,
        &["node_modules", "dist", "dist-behaviour", "proto"],
    );
    std::os::unix::fs::symlink(&node_modules, package.join("node_modules"))
        .expect("link node_modules");
    let packs = scratch.path().join("packs");
    std::fs::create_dir_all(&packs).expect("packs directory");
    let packed = run_ok(
        "npm pack",
        Command::new("npm")
            .current_dir(&package)
            .args(["pack", "--silent", "--pack-destination"])
            .arg(&packs),
    );
    let tarball = packs.join(
        packed
            .lines()
            .last()
            .expect("npm pack names its tarball")
            .trim(),
    );
    assert!(tarball.is_file(), "no tarball at {}", tarball.display());

    let app = scratch.path().join("app");
    std::fs::create_dir_all(&app).expect("app directory");
    std::fs::write(
        app.join("package.json"),
        r#"{ "name": "app", "version": "1.0.0", "private": true }"#,
    )
    .expect("write package.json");
    run_ok(
        "npm install of the tarball",
        Command::new("npm")
            .current_dir(&app)
            .args([
                "install",
                "--prefer-offline",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
            ])
            .arg(&tarball),
    );
    let installed = app.join("node_modules/@idemd/client");
    assert!(
        installed
            .join("proto/idempotency/v1/idempotency.proto")
            .is_file(),
        "the tarball does not ship the proto"
    );
    for imported in ["google/api/annotations.proto", "google/api/http.proto"] {
        assert!(
            installed.join("proto").join(imported).is_file(),
            "the tarball does not ship {imported}, which the proto imports"
        );
    }
    let check = "const client = new idemd.IdempotencyClient('127.0.0.1:1'); client.close();
        if (typeof idemd.RateLimitedError !== 'function') throw new Error('no RateLimitedError');
        if (idemd.fingerprint({ a: 1 }).length !== 32) throw new Error('bad fingerprint');
        if (typeof http.idempotency !== 'function') throw new Error('no idempotency middleware');
        if (http.idemdKey('', 'abc') !== 'e3b0c44298fc1c149afbf4c8996fb924:abc') throw new Error('bad idemdKey');
        console.log('loaded');";
    for (flavour, script) in [
        (
            "require",
            format!(
                "const idemd = require('@idemd/client'); \
                 const http = require('@idemd/client/http'); {check}"
            ),
        ),
        (
            "import",
            format!(
                "const idemd = await import('@idemd/client'); \
                 const http = await import('@idemd/client/http'); {check}"
            ),
        ),
    ] {
        let mut node = Command::new("node");
        node.current_dir(&app);
        if flavour == "import" {
            node.arg("--input-type=module");
        }
        // No IDEMD_PROTO_PATH: the client must find the proto inside the package.
        node.env_remove("IDEMD_PROTO_PATH").args(["-e", &script]);
        let out = run_ok(&format!("node ({flavour} of @idemd/client)"), &mut node);
        assert!(out.contains("loaded"), "{flavour}: {out}");
    }
}
