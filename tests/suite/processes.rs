//! Real processes: the idemd binary, and throwaway PostgreSQL clusters that tests may crash.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn free_port() -> u16 {
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
}

impl Cluster {
    pub fn start() -> Self {
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
        let cluster = Self {
            dir,
            port: free_port(),
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
                "-p {} -k {} -c listen_addresses=127.0.0.1",
                self.port,
                self.dir.path().display()
            ))
            .args(["-w", "-t", "60", "start"]);
        run(pg_ctl, "pg_ctl start");
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to the postmaster and all its children: with STOP,
    /// the database hangs like a black-holed network (connections open, no answers).
    pub fn signal_all(&self, signal: &str) {
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
        let mut kill = Command::new("kill");
        kill.arg(format!("-{signal}")).args(&pids);
        run(kill, "signal postgres processes");
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
}

impl IdemdProcess {
    /// Starts `idemd serve --listen 127.0.0.1:0 <args>` and waits for its "serving gRPC on" line.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_idemd"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--log-format", "text"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn idemd");
        let stderr = child.stderr.take().expect("stderr");
        let (found, address) = mpsc::channel();
        // Keep draining stderr for the life of the process, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut found = Some(found);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("TEST_LOG").is_some() {
                    eprintln!("[idemd] {line}");
                }
                if let Some((_, addr)) = line.split_once("serving gRPC on ") {
                    if let Some(sender) = found.take() {
                        let addr = addr.split_whitespace().next().unwrap_or_default();
                        let _ = sender.send(addr.to_string());
                    }
                }
            }
        });
        let addr = address
            .recv_timeout(Duration::from_secs(60))
            .expect("idemd announced its address")
            .parse()
            .expect("socket address");
        Self { child, addr }
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
