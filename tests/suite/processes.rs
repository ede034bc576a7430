//! Real processes: the idemd binary, and throwaway PostgreSQL clusters that tests may crash.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("free port")
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
        .unwrap_or(false)
}

/// PostgreSQL refuses to run as root: as root, run its tools as the `postgres` OS user.
fn pg_command(tool: &str) -> Command {
    let path = Path::new(PG_BIN).join(tool);
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.arg("-u").arg("postgres").arg("--").arg(path);
        command
    } else {
        Command::new(path)
    }
}

#[track_caller]
fn run(mut command: Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{what}: {error}"));
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A PostgreSQL 15 cluster of a test's own, on a free port, that the test may crash and restart.
pub struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
    /// Extra `postgres -c` settings.
    options: String,
}

impl Cluster {
    pub fn start() -> Self {
        Self::start_with(|_| String::new())
    }

    /// A cluster that also accepts TLS, with this certificate and key (PEM).
    pub fn start_with_tls(cert: &str, key: &str) -> Self {
        let (cert, key) = (cert.to_string(), key.to_string());
        Self::start_with(move |dir| {
            let cert_path = dir.join("server.crt");
            let key_path = dir.join("server.key");
            std::fs::write(&cert_path, &cert).expect("write cert");
            std::fs::write(&key_path, &key).expect("write key");
            if running_as_root() {
                let mut chown = Command::new("chown");
                chown
                    .arg("postgres:postgres")
                    .arg(&cert_path)
                    .arg(&key_path);
                run(chown, "chown TLS files");
            }
            let mut chmod = Command::new("chmod");
            chmod.arg("600").arg(&key_path);
            run(chmod, "chmod key");
            format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert_path.display(),
                key_path.display()
            )
        })
    }

    fn start_with(options: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("idemd-pg-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        if running_as_root() {
            let mut chown = Command::new("chown");
            chown.arg("-R").arg("postgres:postgres").arg(dir.path());
            run(chown, "chown cluster dir");
        }
        let mut initdb = pg_command("initdb");
        initdb.arg("-D").arg(dir.path().join("data")).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        run(initdb, "initdb");
        let options = options(dir.path());
        let cluster = Self {
            dir,
            port: free_port(),
            options,
        };
        cluster.start_again();
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Where the server listens (TCP).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Starts (or restarts) the server on the same port and data, waiting until it accepts.
    pub fn start_again(&self) {
        let mut pg_ctl = pg_command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1{}",
                self.port,
                self.dir.path().display(),
                self.options
            ))
            .args(["-w", "-t", "60", "start"]);
        let output = pg_ctl.output().expect("pg_ctl start");
        if !output.status.success() {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!(
                "pg_ctl start failed: {}\n{}\nserver.log (last lines, newest first):\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                tail.join("\n")
            );
        }
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to the postmaster and all its children: with STOP,
    /// the database hangs like a black-holed network (connections open, no answers).
    pub fn signal_all(&self, signal: &str) {
        self.signal_all_pids(signal);
    }

    /// `signal_all`, returning the pids signalled.
    fn signal_all_pids(&self, signal: &str) -> Vec<String> {
        let pid_file =
            std::fs::read_to_string(self.data().join("postmaster.pid")).expect("postmaster.pid");
        let postmaster = pid_file
            .lines()
            .next()
            .expect("pid line")
            .trim()
            .to_string();
        let children = Command::new("pgrep")
            .args(["-P", &postmaster])
            .output()
            .expect("pgrep");
        let mut pids = vec![postmaster];
        pids.extend(
            String::from_utf8_lossy(&children.stdout)
                .split_whitespace()
                .map(str::to_string),
        );
        let output = Command::new("kill")
            .arg(format!("-{signal}"))
            .args(&pids)
            .output()
            .expect("kill");
        // kill signals every pid it can; a backend that exited between pgrep and kill (a
        // connection refused while the server starts up, say) is the only failure allowed.
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success()
                || stderr
                    .lines()
                    .all(|line| line.trim().is_empty() || line.contains("No such process")),
            "signal postgres processes failed: {stderr}"
        );
        pids
    }

    /// SIGKILL to the postmaster and every backend, then waits until all are dead: the harshest
    /// way PostgreSQL can die (no shutdown, no checkpoint, a stale pid file and shared memory).
    pub fn kill_all(&self) {
        let pids = self.signal_all_pids("KILL");
        let started = std::time::Instant::now();
        // Wait until they are gone from /proc: PostgreSQL refuses to start while the pid in its
        // lock file still exists, even as a zombie not yet reaped.
        while pids
            .iter()
            .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "postgres processes survived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the server the way a crash does: no checkpoint, no goodbye to clients.
    pub fn crash(&self) {
        let mut pg_ctl = pg_command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"]);
        run(pg_ctl, "pg_ctl stop -m immediate");
    }
}

/// How a standby follows its primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replication {
    /// The primary's commits wait until the standby has flushed them (`synchronous_commit = on`
    /// with the standby named in `synchronous_standby_names`).
    Synchronous,
    /// The primary commits without waiting: a failover loses what the standby had not received.
    Asynchronous,
}

/// The standby's name, as the primary's `synchronous_standby_names` expects it.
const STANDBY_NAME: &str = "idemd_standby";

impl Cluster {
    /// A primary that a standby made by `standby` follows, synchronously or not.
    pub fn primary(replication: Replication) -> Self {
        let cluster = Self::start();
        if replication == Replication::Synchronous {
            cluster.configure(&[
                &format!("synchronous_standby_names = '{STANDBY_NAME}'"),
                "synchronous_commit = on",
            ]);
            let mut reload = pg_command("pg_ctl");
            reload.arg("-D").arg(cluster.data()).arg("reload");
            run(reload, "pg_ctl reload");
        }
        cluster
    }

    /// A streaming standby of this cluster, made by `pg_basebackup` and started on a port of its
    /// own; returns once it runs (not necessarily streaming yet).
    pub fn standby(&self) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("idemd-pg-standby-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        if running_as_root() {
            let mut chown = Command::new("chown");
            chown.arg("-R").arg("postgres:postgres").arg(dir.path());
            run(chown, "chown standby dir");
        }
        let mut backup = pg_command("pg_basebackup");
        backup
            .arg("-D")
            .arg(dir.path().join("data"))
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "--no-sync",
                "-c",
                "fast",
            ])
            .arg("-p")
            .arg(self.port.to_string());
        run(backup, "pg_basebackup");
        let standby = Self {
            dir,
            port: free_port(),
            options: String::new(),
        };
        // The walreceiver reports cluster_name as its application_name. The primary's
        // synchronous_standby_names came along in the copy: once promoted, this server has no
        // standby of its own, and would wait for one forever at every commit (an HA manager
        // clears it on promotion; pg_auto_failover's wait_primary state).
        standby.configure(&[
            &format!("cluster_name = '{STANDBY_NAME}'"),
            "synchronous_standby_names = ''",
        ]);
        standby.start_again();
        standby
    }

    /// Turns this (dead) former primary into a streaming standby of `primary`, on the same port:
    /// what an HA manager does with the old primary after a failover (pg_auto_failover with
    /// pg_rewind; a fresh base backup here, which ends in the same state).
    pub fn rejoin_as_standby_of(&self, primary: &Cluster) {
        let data = self.data();
        std::fs::remove_dir_all(&data).expect("remove the old data directory");
        let mut backup = pg_command("pg_basebackup");
        backup
            .arg("-D")
            .arg(&data)
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "--no-sync",
                "-c",
                "fast",
            ])
            .arg("-p")
            .arg(primary.port.to_string());
        run(backup, "pg_basebackup of the new primary");
        self.configure(&[
            &format!("cluster_name = '{STANDBY_NAME}'"),
            "synchronous_standby_names = ''",
        ]);
        self.start_again();
    }

    /// Appends settings to the cluster's postgresql.conf (they apply at the next start or reload).
    fn configure(&self, lines: &[&str]) {
        use std::io::Write;
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data().join("postgresql.conf"))
            .expect("open postgresql.conf");
        for line in lines {
            writeln!(conf, "{line}").expect("write postgresql.conf");
        }
    }

    /// Promotes this standby to a primary, waiting until it takes writes.
    pub fn promote(&self) {
        let mut pg_ctl = pg_command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "60", "promote"]);
        run(pg_ctl, "pg_ctl promote");
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut pg_ctl = pg_command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = pg_ctl.status();
    }
}

/// An `idemd` process.
pub struct IdemdProcess {
    child: Child,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

/// The address in a line like "... serving gRPC on 127.0.0.1:1234 ...".
pub fn address_after(line: &str, marker: &str) -> Option<String> {
    let (_, rest) = line.split_once(marker)?;
    let addr = rest.split(|c: char| c.is_whitespace() || c == '"').next()?;
    Some(addr.to_string())
}

impl IdemdProcess {
    /// Starts `idemd serve` on free ports with `args` and waits until it announces its gRPC and
    /// metrics addresses.
    pub fn start(args: &[&str]) -> Self {
        Self::spawn("127.0.0.1:0", args, &[])
    }

    /// Starts `idemd serve` with gRPC on `listen` (so a restarted replica keeps its address),
    /// extra environment variables `env`, and `args`.
    pub fn spawn(listen: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_idemd"));
        // Only what the test passes configures idemd: an IDEMD_* setting in the environment of
        // the test run (say IDEMD_MIN_LEASE_TTL) would otherwise change what a test checks, and
        // so would an OTEL_* one (where traces go).
        for (name, _) in std::env::vars_os() {
            let name_text = name.to_string_lossy();
            if name_text.starts_with("IDEMD_") || name_text.starts_with("OTEL_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            .arg("serve")
            .args(["--listen", listen, "--metrics-listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn idemd");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (found, addresses) = mpsc::channel();
        let collected = logs.clone();
        // Keep draining stderr for the life of the process, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let (mut grpc, mut metrics) = (None, None);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("TEST_LOG").is_some() {
                    eprintln!("[idemd] {line}");
                }
                if let Some(addr) = address_after(&line, "serving gRPC on ") {
                    grpc = Some(addr);
                }
                if let Some(addr) = address_after(&line, "serving metrics on ") {
                    metrics = Some(addr);
                }
                if let (Some(grpc), Some(metrics)) = (&grpc, &metrics) {
                    let _ = found.send((grpc.clone(), metrics.clone()));
                }
                collected
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(line);
            }
        });
        let (grpc, metrics) = addresses
            .recv_timeout(Duration::from_secs(60))
            .expect("idemd announced its addresses");
        Self {
            child,
            addr: grpc.parse().expect("gRPC address"),
            metrics_addr: metrics.parse().expect("metrics address"),
            logs,
        }
    }

    /// Log lines printed so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The address of the plaintext health listener (started with `--health-listen`), once
    /// idemd has announced it.
    pub async fn health_addr(&self) -> String {
        let mut health_addr = None;
        crate::harness::eventually(Duration::from_secs(10), "health listener announced", || {
            health_addr = self
                .logs()
                .iter()
                .find_map(|line| address_after(line, "serving plaintext gRPC health on "));
            let found = health_addr.is_some();
            async move { found }
        })
        .await;
        health_addr.expect("health address")
    }

    /// The address of the web console (started with `--console-listen`), once idemd has
    /// announced it.
    pub async fn console_addr(&self) -> SocketAddr {
        let mut console_addr = None;
        crate::harness::eventually(
            Duration::from_secs(10),
            "console listener announced",
            || {
                console_addr = self
                    .logs()
                    .iter()
                    .find_map(|line| address_after(line, "serving the web console on "));
                let found = console_addr.is_some();
                async move { found }
            },
        )
        .await;
        console_addr
            .expect("console address")
            .parse()
            .expect("console address parses")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM, as Kubernetes does.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit, for at most `limit`; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                started.elapsed() < limit,
                "idemd did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(mut self) {
        self.child.kill().expect("kill idemd");
        self.child.wait().expect("reap idemd");
    }
}

impl Drop for IdemdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` over plain HTTP/1.1; returns (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    (code, body.to_string())
}

/// Where Debian's `pg-auto-failover-cli` installs `pg_autoctl`.
const PG_AUTOCTL: &str = "/usr/bin/pg_autoctl";

/// The monitor's health checks, tightened so that a dead primary is noticed within about a
/// second and its standby promoted without waiting 30 s for a demotion that cannot come. The
/// defaults (health check every 20 s, unhealthy after 20 s, demote timeout 30 s) suit a WAN,
/// not a test.
const MONITOR_SETTINGS: &[(&str, &str)] = &[
    ("pgautofailover.health_check_period", "500"),
    ("pgautofailover.health_check_timeout", "500"),
    ("pgautofailover.health_check_max_retries", "1"),
    ("pgautofailover.health_check_retry_delay", "100"),
    ("pgautofailover.node_considered_unhealthy_timeout", "1000"),
    ("pgautofailover.primary_demote_timeout", "1000"),
];

/// A pg_auto_failover formation of our own: a monitor and two data nodes on free loopback ports,
/// each `pg_autoctl` service in its own process group, so that one SIGKILL takes a node's keeper
/// and its PostgreSQL together, as a lost machine would.
pub struct Formation {
    dir: tempfile::TempDir,
    monitor_port: u16,
    node_ports: [u16; 2],
    /// The `pg_autoctl` service of the monitor, then of each node (`None`: killed).
    services: Mutex<Vec<Option<Child>>>,
}

impl Formation {
    /// Creates the monitor, then node 0 (which becomes the primary), then node 1 (its
    /// synchronous standby); returns once the monitor reports `primary` and `secondary`.
    /// Panics, never skips, without `pg_autoctl`: CI installs it (.ci/run).
    pub fn start() -> Self {
        assert!(
            Path::new(PG_AUTOCTL).exists(),
            "{PG_AUTOCTL} is missing: install postgresql-15-auto-failover and \
             pg-auto-failover-cli (.ci/run does)"
        );
        let dir = tempfile::Builder::new()
            .prefix("idemd-paf-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        if running_as_root() {
            let mut chown = Command::new("chown");
            chown.arg("-R").arg("postgres:postgres").arg(dir.path());
            run(chown, "chown formation dir");
        }
        let formation = Self {
            dir,
            monitor_port: free_port(),
            node_ports: [free_port(), free_port()],
            services: Mutex::new(Vec::new()),
        };
        let pg_ctl = Path::new(PG_BIN).join("pg_ctl").display().to_string();
        let monitor = formation.autoctl(&[
            "create",
            "monitor",
            "--pgdata",
            &formation.pgdata("monitor"),
            "--pgport",
            &formation.monitor_port.to_string(),
            "--hostname",
            "127.0.0.1",
            "--auth",
            "trust",
            "--no-ssl",
            "--pgctl",
            &pg_ctl,
            "--run",
        ]);
        formation.push_service(monitor);
        formation.wait_for("the monitor accepting connections", |formation| {
            formation.monitor_query("SELECT 1").is_some()
        });
        let mut settings: Vec<String> = MONITOR_SETTINGS
            .iter()
            .map(|(name, value)| format!("ALTER SYSTEM SET {name} = {value}"))
            .collect();
        settings.push("SELECT pg_reload_conf()".into());
        for statement in &settings {
            formation
                .monitor_query(statement)
                .unwrap_or_else(|| panic!("monitor setting failed: {statement}"));
        }
        for node in 0..2 {
            let service = formation.autoctl(&[
                "create",
                "postgres",
                "--pgdata",
                &formation.pgdata(&format!("node{node}")),
                "--pgport",
                &formation.node_ports[node].to_string(),
                "--hostname",
                "127.0.0.1",
                // Loopback only (pg_autoctl's default is every address); the monitor has no
                // such option and listens on every address.
                "--listen",
                "127.0.0.1",
                "--name",
                &format!("node{node}"),
                "--auth",
                "trust",
                "--no-ssl",
                "--monitor",
                &formation.monitor_url(),
                "--pgctl",
                &pg_ctl,
                "--run",
            ]);
            formation.push_service(service);
            let wanted = if node == 0 {
                "single"
            } else {
                "primary,secondary"
            };
            formation.wait_for(&format!("the monitor reporting {wanted}"), |formation| {
                formation.states().as_deref() == Some(wanted)
            });
        }
        formation
    }

    fn pgdata(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn monitor_url(&self) -> String {
        format!(
            "postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover?sslmode=disable",
            self.monitor_port
        )
    }

    /// Spawns `pg_autoctl args` (as the postgres OS user when root) in a process group of its
    /// own, its configuration and state kept in the formation's directory.
    fn autoctl(&self, args: &[&str]) -> Child {
        use std::os::unix::process::CommandExt;
        let root = self.dir.path().display().to_string();
        let mut command = if running_as_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--", "env"]);
            command
        } else {
            Command::new("env")
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("autoctl.log"))
            .expect("open autoctl.log");
        command
            .arg(format!("XDG_CONFIG_HOME={root}/config"))
            .arg(format!("XDG_DATA_HOME={root}/share"))
            .arg(format!("PG_CONFIG={PG_BIN}/pg_config"))
            .arg(PG_AUTOCTL)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn pg_autoctl")
    }

    fn push_service(&self, child: Child) {
        self.services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Some(child));
    }

    /// Runs one statement on the monitor's database; the first column of the first row, or
    /// `None` when it could not run.
    fn monitor_query(&self, sql: &str) -> Option<String> {
        let output = Command::new(Path::new(PG_BIN).join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "pg_auto_failover",
            ])
            .args(["-p", &self.monitor_port.to_string()])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// The nodes' reported states in node order, e.g. "primary,secondary".
    pub fn states(&self) -> Option<String> {
        self.monitor_query(
            "SELECT string_agg(reportedstate::text, ',' ORDER BY nodename) \
             FROM pgautofailover.node",
        )
    }

    /// Waits (at most 90 s) until `done`, failing with the log's tail otherwise.
    pub fn wait_for(&self, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let started = std::time::Instant::now();
        while !done(self) {
            if started.elapsed() > Duration::from_secs(90) {
                let log = std::fs::read_to_string(self.dir.path().join("autoctl.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "pg_auto_failover: no {what} after 90 s (states {:?}); autoctl.log, \
                     newest first:\n{}",
                    self.states(),
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The data nodes' ports, node 0 first.
    pub fn node_ports(&self) -> [u16; 2] {
        self.node_ports
    }

    /// SIGKILL to node `node`'s whole process group (its keeper, its PostgreSQL and every
    /// backend), then waits until none is left.
    pub fn kill_node(&self, node: usize) {
        let child = self.services.lock().unwrap_or_else(|p| p.into_inner())[node + 1].take();
        let Some(mut child) = child else { return };
        assert!(
            kill_group(&mut child),
            "processes of node {node} survived SIGKILL"
        );
    }

    /// Starts node `node`'s keeper again (`pg_autoctl run`): it asks the monitor what to be.
    pub fn restart_node(&self, node: usize) {
        let child = self.autoctl_run(node);
        self.services.lock().unwrap_or_else(|p| p.into_inner())[node + 1] = Some(child);
    }

    fn autoctl_run(&self, node: usize) -> Child {
        self.autoctl(&["run", "--pgdata", &self.pgdata(&format!("node{node}"))])
    }
}

/// SIGKILL to the process group `child` leads, then waits (at most 30 s) until no process of it
/// is left; returns whether none is.
fn kill_group(child: &mut Child) -> bool {
    let group = child.id().to_string();
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .status();
    let _ = child.wait();
    let started = std::time::Instant::now();
    loop {
        let left = Command::new("pgrep")
            .args(["-g", &group])
            .output()
            .map(|output| !output.stdout.is_empty())
            .unwrap_or(false);
        if !left {
            return true;
        }
        if started.elapsed() > Duration::from_secs(30) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Formation {
    fn drop(&mut self) {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        for child in services.iter_mut().filter_map(Option::take) {
            let mut child = child;
            // Nothing to do here about a survivor: the test has ended either way.
            let _ = kill_group(&mut child);
        }
    }
}
