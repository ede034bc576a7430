//! The Idempotency-Key middleware conformance suite (clients/HTTP-MIDDLEWARE.md §6, issue 19):
//! for each framework's example app, one idemd process on a fresh PostgreSQL database, the app
//! started twice — against that idemd and against an address where nothing listens — and the
//! language-neutral driver clients/conformance/http/driver.py run against both. The test fails
//! with the driver's output (every case, `ok` or `FAIL` with why) and the apps' stderr.
//!
//! A framework adds one `#[tokio::test]` below that describes its app (command, working
//! directory, extra environment) and calls [`run_conformance`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::behaviour::repository;
use crate::harness::TestDatabase;
use crate::processes::{free_port, IdemdProcess};

/// The lease the apps ask for: short, so the slow-handler case (3 leases) proves renewal quickly.
const LEASE_MS: u64 = 1000;
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
    fn start(app: &ExampleApp, label: &str, idemd_addr: &str, effects: &Path) -> Self {
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
            .env(
                "NAMESPACE",
                format!("http-{}", uuid::Uuid::new_v4().simple()),
            )
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

    let mut live = RunningApp::start(
        &app,
        "live idemd",
        &format!("http://{}", idemd.addr),
        &effects,
    );
    let mut down = RunningApp::start(&app, "idemd down", &dead, &dead_effects);
    let (live, down) = tokio::task::spawn_blocking(move || {
        live.await_health();
        down.await_health();
        (live, down)
    })
    .await
    .expect("the apps' start-up");

    let driver = repository().join("clients/conformance/http/driver.py");
    let mut command = Command::new("python3");
    command
        .arg(&driver)
        .args(["--app", &live.url(), "--effects"])
        .arg(&effects)
        .args(["--dead-app", &down.url(), "--dead-effects"])
        .arg(&dead_effects)
        .args(["--lease-ms", &LEASE_MS.to_string()]);
    let run = tokio::task::spawn_blocking(move || command.output());
    let output = tokio::time::timeout(DRIVER_LIMIT, run)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the driver did not finish within {DRIVER_LIMIT:?} against {}:\n{}",
                app.name,
                live.stderr()
            )
        })
        .expect("the driver's thread")
        .unwrap_or_else(|error| panic!("cannot run python3 {}: {error}", driver.display()));
    let report = String::from_utf8_lossy(&output.stdout);
    eprintln!("{}: {report}", app.name);
    assert!(
        output.status.success(),
        "the HTTP middleware conformance driver failed against {}:\n{report}\n{}\n\
         --- stderr of {}:\n{}\n--- stderr of {}:\n{}",
        app.name,
        String::from_utf8_lossy(&output.stderr),
        live.name,
        live.stderr(),
        down.name,
        down.stderr()
    );
    assert!(
        report.contains("ok first_request"),
        "the driver ran no case against {}:\n{report}",
        app.name
    );
    drop(idemd);
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

/// The Express app (clients/node/examples/express-app.js) on this checkout's Node client, compiled
/// into `clients/node/dist-http` (its own folder: the Node suite's `npm test` empties `dist/`).
/// The app imports `@idemd/client` and `@idemd/client/http`; a package.json in that folder naming
/// the package resolves both to this build (a package may import itself by name), and Express and
/// grpc-js from `clients/node/node_modules`.
fn express_app() -> ExampleApp {
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
    ExampleApp {
        name: "the Express app",
        program: PathBuf::from("node"),
        args: vec![app.to_string_lossy().into_owned()],
        dir: repository().join("clients/node"),
        env: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_middleware_express() {
    run_conformance(express_app()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_middleware_axum() {
    let program = tokio::task::spawn_blocking(|| crate::client::build_client_example("axum_app"))
        .await
        .expect("build the axum app");
    run_conformance(ExampleApp {
        name: "the axum app",
        program,
        args: vec![],
        dir: repository().join("clients/rust"),
        env: vec![],
    })
    .await;
}

/// clients/HTTP-MIDDLEWARE.md §3: the idemd key and the fingerprint are the same in every
/// language, so a request first served by one framework's app replays from another's when both
/// use the same namespace. The FastAPI, Express and axum apps share one idemd, one namespace and
/// one effects file; each serves a first request in turn, and the other two replay it (with the
/// JSON's keys reordered) without running their handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_middleware_apps_share_keys_across_languages() {
    let axum_app = tokio::task::spawn_blocking(|| crate::client::build_client_example("axum_app"))
        .await
        .expect("build the axum app");
    let apps = [
        python_app("the FastAPI app", "fastapi_app.py"),
        express_app(),
        ExampleApp {
            name: "the axum app",
            program: axum_app,
            args: vec![],
            dir: repository().join("clients/rust"),
            env: vec![],
        },
    ];
    let idemd = IdemdProcess::start(&[]);
    let scratch = tempfile::tempdir().expect("a directory for the effects file");
    let effects = scratch.path().join("effects");
    let namespace = format!("http-{}", uuid::Uuid::new_v4().simple());
    let mut running = Vec::new();
    for app in &apps {
        let port = free_port();
        let stderr = tempfile::NamedTempFile::new().expect("a file for the app's stderr");
        let child = Command::new(&app.program)
            .args(&app.args)
            .current_dir(&app.dir)
            .envs(app.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("PORT", port.to_string())
            .env("IDEMD_ADDR", format!("http://{}", idemd.addr))
            .env("NAMESPACE", &namespace)
            .env("LEASE_MS", LEASE_MS.to_string())
            .env("IDEMD_TIMEOUT_MS", "5000")
            .env("EFFECTS_FILE", &effects)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr.reopen().expect("reopen")))
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", app.name));
        running.push(RunningApp {
            name: app.name.to_string(),
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            stderr,
        });
    }
    let running = tokio::task::spawn_blocking(move || {
        for app in &mut running {
            app.await_health();
        }
        running
    })
    .await
    .expect("the apps' start-up");

    for first in 0..running.len() {
        let key = format!("xlang-{}", uuid::Uuid::new_v4().simple());
        let id = format!("order-{}", uuid::Uuid::new_v4().simple());
        let tenant = "X-Tenant: acme\r\n";
        let body = serde_json::json!({"id": id, "amount": 5, "items": [{"sku": "a", "n": 1}]});
        let served =
            crate::http_layer::post(running[first].addr, "/orders", &key, body, tenant).await;
        assert_eq!(
            served.status, 201,
            "{}: {}",
            running[first].name, served.body
        );
        for (other, app) in running.iter().enumerate().filter(|(i, _)| *i != first) {
            // The same JSON, keys in another order: the same canonical form everywhere.
            let reordered = format!(r#"{{"items":[{{"n":1,"sku":"a"}}],"amount":5,"id":"{id}"}}"#);
            let again = crate::http_layer::post(app.addr, "/orders", &key, reordered, tenant).await;
            assert_eq!(
                (again.status, again.body.as_str()),
                (201, served.body.as_str()),
                "{} did not replay what {} served",
                app.name,
                running[first].name
            );
            assert!(
                again.head.contains("idempotent-replayed: true"),
                "{} (after {}, app {other}): {}",
                app.name,
                running[first].name,
                again.head
            );
        }
        let effects = std::fs::read_to_string(&effects).expect("the effects file");
        let runs = effects
            .lines()
            .filter(|line| *line == format!("orders {id}"))
            .count();
        assert_eq!(
            runs, 1,
            "first served by {}:\n{effects}",
            running[first].name
        );
    }
    drop(idemd);
}
