//! The Idempotency-Key middleware conformance suite (clients/HTTP-MIDDLEWARE.md §6, issue 19):
//! for each framework's example app, one idemd process on a fresh PostgreSQL database, the app
//! started twice — against that idemd and against an address where nothing listens — and the
//! language-neutral driver clients/conformance/http/driver.py run against both. The test fails
//! with the driver's output (every case, `ok` or `FAIL` with why) and the apps' stderr.
//!
//! A framework adds one `#[tokio::test]` below that describes its app (command, working
//! directory, extra environment) and calls [`run_conformance`], and one that calls
//! [`run_cross_framework`] with its app and the FastAPI app: on one idemd and one namespace, a
//! request served by either replays from the other.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::behaviour::repository;
use crate::harness::TestDatabase;
use crate::processes::{free_port, IdemdProcess};

/// The lease the apps ask for: short, so the slow-handler case (3 leases) proves renewal quickly,
/// yet long enough that a renewal (every third of it) running late on a loaded machine does not
/// lose the lease during the 1 s handler of the concurrent-duplicates case (at 1000 ms the Java app
/// ran that handler twice once, at a load average of 15).
const LEASE_MS: u64 = 2000;
/// How long an app may take to answer `GET /health` after it starts (a JVM or a first `go run`
/// is slow on a loaded machine); past it the test fails with the app's stderr.
const START_LIMIT: Duration = Duration::from_secs(120);
/// Far more than every case takes together; a hung driver fails the test.
const DRIVER_LIMIT: Duration = Duration::from_secs(600);

/// An example app following the contract of clients/HTTP-MIDDLEWARE.md §6.
pub(crate) struct ExampleApp {
    /// Names the app in failures.
    pub name: &'static str,
    /// The program and its arguments.
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Its working directory.
    pub dir: PathBuf,
    /// Environment besides the contract's (`PORT`, `IDEMD_ADDR`, …), e.g. `PYTHONPATH`.
    pub env: Vec<(String, String)>,
}

/// One running instance of an app; killed when dropped.
struct RunningApp {
    name: String,
    child: Child,
    addr: SocketAddr,
    stderr: tempfile::NamedTempFile,
}

impl RunningApp {
    fn start(
        app: &ExampleApp,
        label: &str,
        idemd_addr: &str,
        namespace: &str,
        effects: &Path,
    ) -> Self {
        let name = format!("{} ({label})", app.name);
        let port = free_port();
        let stderr = tempfile::NamedTempFile::new().expect("a file for the app's stderr");
        let mut command = Command::new(&app.program);
        // Only the contract's variables configure the app, whatever the test run's environment.
        for (variable, _) in std::env::vars_os() {
            if variable.to_string_lossy().starts_with("IDEMD_") {
                command.env_remove(variable);
            }
        }
        command
            .args(&app.args)
            .current_dir(&app.dir)
            .envs(app.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("PORT", port.to_string())
            .env("IDEMD_ADDR", idemd_addr)
            .env("NAMESPACE", namespace)
            .env("LEASE_MS", LEASE_MS.to_string())
            .env("IDEMD_TIMEOUT_MS", "5000")
            .env("EFFECTS_FILE", effects)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                stderr.reopen().expect("reopen the app's stderr file"),
            ));
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name} ({command:?}): {error}"));
        Self {
            name,
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Polls `GET /health` until it answers 200; fails with the app's stderr if the app exits
    /// or does not answer within [`START_LIMIT`].
    fn await_health(&mut self) {
        let started = Instant::now();
        loop {
            if health_ok(self.addr) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before answering GET /health:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            assert!(
                started.elapsed() < START_LIMIT,
                "{} did not answer GET /health on {} within {START_LIMIT:?}:\n{}",
                self.name,
                self.addr,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RunningApp {
    fn drop(&mut self) {
        // Ending already is fine: this only makes sure no app outlives the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `GET /health` on `addr` answers 200 (any failure to connect or read is a no).
fn health_ok(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .is_err()
    {
        return false;
    }
    let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200")
}

/// Runs every conformance case against `app`: a fresh database, this build's idemd on it, the
/// app twice (live idemd; an address where nothing listens), and the driver. Fails with the
/// driver's report and the apps' stderr unless every case passed.
pub(crate) async fn run_conformance(app: ExampleApp) {
    let database = TestDatabase::create().await;
    let idemd = IdemdProcess::start(&["--database-url", &database.url]);
    // A port nothing listens on: bound for a moment to get it, then let go.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let scratch = tempfile::tempdir().expect("a directory for the effects files");
    let effects = scratch.path().join("effects-live");
    let dead_effects = scratch.path().join("effects-dead");

    let namespace = format!("http-{}", uuid::Uuid::new_v4().simple());
    let idemd_addr = format!("http://{}", idemd.addr);
    let mut live = RunningApp::start(&app, "live idemd", &idemd_addr, &namespace, &effects);
    let mut down = RunningApp::start(&app, "idemd down", &dead, &namespace, &dead_effects);
    let (live, down) = tokio::task::spawn_blocking(move || {
        live.await_health();
        down.await_health();
        (live, down)
    })
    .await
    .expect("the apps' start-up");

    let args = vec![
        "--app".to_string(),
        live.url(),
        "--effects".to_string(),
        effects.to_string_lossy().into_owned(),
        "--dead-app".to_string(),
        down.url(),
        "--dead-effects".to_string(),
        dead_effects.to_string_lossy().into_owned(),
    ];
    run_driver(app.name, args, &[&live, &down]).await;
    drop(idemd);
}

/// Runs the driver's cross-framework cases for every ordered pair of `apps`: all of them on one
/// idemd and one namespace, a request served by one replays from the other, so every framework
/// derives the same idemd key and fingerprint (clients/HTTP-MIDDLEWARE.md §3).
pub(crate) async fn run_cross_framework(apps: Vec<ExampleApp>) {
    let database = TestDatabase::create().await;
    let idemd = IdemdProcess::start(&["--database-url", &database.url]);
    let namespace = format!("http-{}", uuid::Uuid::new_v4().simple());
    let idemd_addr = format!("http://{}", idemd.addr);
    let scratch = tempfile::tempdir().expect("a directory for the effects files");
    let running: Vec<(RunningApp, PathBuf)> = apps
        .iter()
        .enumerate()
        .map(|(place, app)| {
            let effects = scratch.path().join(format!("effects-{place}"));
            let running =
                RunningApp::start(app, "shared namespace", &idemd_addr, &namespace, &effects);
            (running, effects)
        })
        .collect();
    let running = tokio::task::spawn_blocking(move || {
        let mut running = running;
        for (app, _) in &mut running {
            app.await_health();
        }
        running
    })
    .await
    .expect("the apps' start-up");
    for (first, (app, effects)) in running.iter().enumerate() {
        for (second, (peer, peer_effects)) in running.iter().enumerate() {
            if first == second {
                continue;
            }
            let args = vec![
                "--app".to_string(),
                app.url(),
                "--effects".to_string(),
                effects.to_string_lossy().into_owned(),
                "--peer-app".to_string(),
                peer.url(),
                "--peer-effects".to_string(),
                peer_effects.to_string_lossy().into_owned(),
            ];
            let what = format!("{} then {}", apps[first].name, apps[second].name);
            run_driver(&what, args, &[app, peer]).await;
        }
    }
    drop(idemd);
}

/// Runs the driver with `args`; fails with its report and the apps' stderr unless every case
/// passed.
async fn run_driver(what: &str, args: Vec<String>, apps: &[&RunningApp]) {
    let driver = repository().join("clients/conformance/http/driver.py");
    let mut command = Command::new("python3");
    command
        .arg(&driver)
        .args(&args)
        .args(["--lease-ms", &LEASE_MS.to_string()]);
    let run = tokio::task::spawn_blocking(move || command.output());
    let stderr_of_apps = || {
        apps.iter()
            .map(|app| format!("--- stderr of {}:\n{}", app.name, app.stderr()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let output = tokio::time::timeout(DRIVER_LIMIT, run)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the driver did not finish within {DRIVER_LIMIT:?} against {what}:\n{}",
                stderr_of_apps()
            )
        })
        .expect("the driver's thread")
        .unwrap_or_else(|error| panic!("cannot run python3 {}: {error}", driver.display()));
    let report = String::from_utf8_lossy(&output.stdout);
    eprintln!("{what}:\n{report}");
    assert!(
        output.status.success(),
        "the HTTP middleware conformance driver failed against {what}:\n{report}\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        stderr_of_apps()
    );
    assert!(
        report.lines().any(|line| line.starts_with("ok ")),
        "the driver ran no case against {what}:\n{report}"
    );
}

/// A Python example app of clients/python/examples/http, on this checkout's client.
fn python_app(name: &'static str, file: &str) -> ExampleApp {
    let client = repository().join("clients/python");
    ExampleApp {
        name,
        program: PathBuf::from("python3"),
        args: vec![client
            .join("examples/http")
            .join(file)
            .to_string_lossy()
            .into_owned()],
        dir: client.clone(),
        env: vec![(
            "PYTHONPATH".to_string(),
            client.to_string_lossy().into_owned(),
        )],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_middleware_fastapi() {
    run_conformance(python_app("the FastAPI app", "fastapi_app.py")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_middleware_flask() {
    run_conformance(python_app("the Flask app", "flask_app.py")).await;
}

/// The two Python middlewares agree on keys and fingerprints: a request stored through one
/// replays through the other. Another framework adds a test like this one, pairing its app with
/// the FastAPI app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_middleware_fastapi_and_flask_share_keys() {
    run_cross_framework(vec![
        python_app("the FastAPI app", "fastapi_app.py"),
        python_app("the Flask app", "flask_app.py"),
    ])
    .await;
}

/// The Go example app (clients/go/examples/nethttp), built by `go build` into `binary` under
/// Cargo's test scratch directory (a name of each test's own, so tests never build over each
/// other's running binary).
fn go_app(binary: &str) -> ExampleApp {
    let client = repository().join("clients/go");
    let program = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(binary);
    let built = Command::new("go")
        .current_dir(&client)
        .args(["build", "-o"])
        .arg(&program)
        .arg("./examples/nethttp")
        .output()
        .unwrap_or_else(|error| panic!("cannot run `go build` (is Go installed?): {error}"));
    assert!(
        built.status.success(),
        "go build ./examples/nethttp failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    ExampleApp {
        name: "the net/http app",
        program,
        args: Vec::new(),
        dir: client,
        env: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_middleware_go() {
    let app = tokio::task::spawn_blocking(|| go_app("nethttp-conformance"))
        .await
        .expect("go build thread");
    run_conformance(app).await;
}

/// The Go middleware derives the same keys and fingerprints as the Python one: a request stored
/// through either replays through the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_middleware_go_and_fastapi_share_keys() {
    let app = tokio::task::spawn_blocking(|| go_app("nethttp-cross"))
        .await
        .expect("go build thread");
    run_cross_framework(vec![app, python_app("the FastAPI app", "fastapi_app.py")]).await;
}

/// The Express app (clients/node/examples/express-app.js) on this checkout's Node client, compiled
/// into `clients/node/dist-http` (its own folder: the Node suite's `npm test` empties `dist/`).
/// The app imports `@idemd/client` and `@idemd/client/http`; a package.json in that folder naming
/// the package resolves both to this build (a package may import itself by name), and Express and
/// grpc-js from `clients/node/node_modules`. Compiled once per test run.
fn express_app() -> ExampleApp {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let app = BUILT.get_or_init(|| {
        let out = crate::behaviour::build_node_tests("dist-http");
        std::fs::write(
            out.join("package.json"),
            r#"{ "name": "@idemd/client", "type": "module",
  "exports": { ".": "./src/index.js", "./http": "./src/http.js" } }"#,
        )
        .expect("write dist-http/package.json");
        std::fs::create_dir_all(out.join("examples")).expect("dist-http/examples");
        let app = out.join("examples/express-app.js");
        std::fs::copy(
            repository().join("clients/node/examples/express-app.js"),
            &app,
        )
        .expect("copy the Express app");
        app
    });
    ExampleApp {
        name: "the Express app",
        program: PathBuf::from("node"),
        args: vec![app.to_string_lossy().into_owned()],
        dir: repository().join("clients/node"),
        env: vec![],
    }
}

/// The axum app (clients/rust/examples/axum_app.rs), built by cargo like the orders example.
fn axum_app() -> ExampleApp {
    ExampleApp {
        name: "the axum app",
        program: crate::client::build_client_example("axum_app"),
        args: vec![],
        dir: repository().join("clients/rust"),
        env: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_middleware_express() {
    let app = tokio::task::spawn_blocking(express_app)
        .await
        .expect("tsc thread");
    run_conformance(app).await;
}

/// The Node middleware derives the same keys and fingerprints as the Python one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_middleware_express_and_fastapi_share_keys() {
    let app = tokio::task::spawn_blocking(express_app)
        .await
        .expect("tsc thread");
    run_cross_framework(vec![app, python_app("the FastAPI app", "fastapi_app.py")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_middleware_axum() {
    let app = tokio::task::spawn_blocking(axum_app)
        .await
        .expect("cargo build thread");
    run_conformance(app).await;
}

/// The Rust layer derives the same keys and fingerprints as the Python one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_middleware_axum_and_fastapi_share_keys() {
    let app = tokio::task::spawn_blocking(axum_app)
        .await
        .expect("cargo build thread");
    run_cross_framework(vec![app, python_app("the FastAPI app", "fastapi_app.py")]).await;
}

/// The Java Servlet filter's example app (clients/java/examples/servlet) on embedded Jetty 12:
/// compiled once with the Java client's tests, started with plain `java`.
fn servlet_app() -> ExampleApp {
    ExampleApp {
        name: "the Java Servlet app",
        program: PathBuf::from("java"),
        args: crate::java_client::java_test_program_args("dev.idemd.examples.servlet.ServletApp"),
        dir: repository().join("clients/java"),
        env: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_middleware_java() {
    // The first call compiles the Java client and the app with Maven: off the async threads.
    let app = tokio::task::spawn_blocking(servlet_app)
        .await
        .expect("compile the Java Servlet app");
    run_conformance(app).await;
}

/// The Servlet filter derives the same keys and fingerprints as the Python middleware: a request
/// stored through either replays through the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_middleware_java_and_fastapi_share_keys() {
    let app = tokio::task::spawn_blocking(servlet_app)
        .await
        .expect("compile the Java Servlet app");
    run_cross_framework(vec![app, python_app("the FastAPI app", "fastapi_app.py")]).await;
}
