//! A bounded soak: one idemd process under steady load for `IDEMD_SOAK_SECS` (60 s by default,
//! the CI version; `scripts/reliability.sh` runs 600 s), with a fault every 10 s (the network to
//! PostgreSQL cut for a second, or every backend terminated). It must stay live: after each fault a
//! new Acquire+Complete+replay succeeds within `RECOVERY_LIMIT`, every retryable error falls within
//! a fault's window (from its injection until `SETTLE` after that recovery), and every worker makes
//! progress in every 10-second window. It must leak nothing: after the load, tasks, file descriptors
//! and pool connections return to their idle baseline, and resident memory at the end is within a
//! small allowance of memory after warm-up (a reading that cannot be taken fails the test). A
//! uniform sample of the acknowledged Completes of the whole run (`SAMPLE` of them, reservoir
//! sampling) is read back intact from PostgreSQL, through a store without a replay cache.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use idemd::proto::idempotency::v1 as pb;
use tonic::Code;

use crate::chaos::workload::Rng;
use crate::faults::{database_behind_proxy, Fault};
use crate::harness::*;
use crate::processes::{http_get, IdemdProcess};

const NAMESPACE: &str = "soak";
/// Growth of resident memory from warm-up to the end that still counts as flat.
const RSS_ALLOWANCE_KIB: u64 = 16 * 1024;
/// Clients, each starting an Acquire+Complete+replay pair every `PACE` (about 30 per second):
/// steady, not saturating.
const WORKERS: u64 = 16;
const PACE: Duration = Duration::from_millis(33);
/// Acknowledged Completes read back at the end, drawn uniformly from the whole run.
const SAMPLE: usize = 2000;
/// How soon after a fault is lifted a new pair must succeed: a connection attempt (1 s) and a
/// query (1 s) bound each step, twice over.
const RECOVERY_LIMIT: Duration = Duration::from_secs(5);
/// After the recovery probe succeeds, how long other calls may still meet a connection the fault
/// broke (a pooled connection is found dead when next used) and calls begun before it may still
/// end: the per-call timeout of a pair.
const SETTLE: Duration = Duration::from_secs(2);

/// A reading of the process: resident memory, open descriptors, threads, tasks, pool connections.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rss_kib: u64,
    fds: u64,
    threads: u64,
    tasks: u64,
    pool: u64,
}

/// The value of an unlabelled gauge in a Prometheus text exposition, if it is there.
fn gauge(metrics: &str, name: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
}

fn metrics(process: &IdemdProcess) -> String {
    let (status, body) = http_get(process.metrics_addr, "/metrics");
    assert_eq!(status, 200, "/metrics answered {status}: {body}");
    body
}

/// A reading of every figure the leak checks compare. A figure that cannot be read fails the test:
/// read as 0, a missing gauge would pass every "back to idle" comparison.
fn sample(process: &IdemdProcess) -> Sample {
    let pid = process.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|error| panic!("/proc/{pid}/status: {error}"));
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count() as u64)
        .unwrap_or_else(|error| panic!("/proc/{pid}/fd: {error}"));
    let metrics = metrics(process);
    let required = |name: &str| {
        gauge(&metrics, name).unwrap_or_else(|| panic!("{name} is missing from /metrics"))
    };
    Sample {
        rss_kib: field("VmRSS:"),
        fds,
        threads: field("Threads:"),
        tasks: required(idemd::telemetry::metrics::RUNTIME_TASKS),
        pool: required(idemd::telemetry::metrics::POOL_CONNECTIONS),
    }
}

/// A uniform sample of everything offered to it (reservoir sampling, Algorithm R): each of the
/// `seen` records is kept with probability `SAMPLE / seen`, whenever in the run it came.
struct Reservoir {
    seen: u64,
    kept: Vec<pb::Record>,
    rng: Rng,
}

impl Reservoir {
    fn offer(&mut self, record: pb::Record) {
        self.seen += 1;
        if self.kept.len() < SAMPLE {
            self.kept.push(record);
        } else {
            let slot = self.rng.below(self.seen) as usize;
            if slot < SAMPLE {
                self.kept[slot] = record;
            }
        }
    }
}

/// A fault, from injection to lifting, and when a pair first succeeded after it.
#[derive(Debug)]
struct FaultWindow {
    what: &'static str,
    injected: Instant,
    lifted: Instant,
    recovered: Instant,
    /// Retryable errors of pairs that overlapped the window.
    errors: u64,
}

/// Latencies of successful pairs, by 10-second window, in microseconds.
#[derive(Default)]
struct Latencies(Mutex<BTreeMap<u64, Vec<u32>>>);

impl Latencies {
    fn record(&self, window: u64, latency: Duration) {
        let micros = latency.as_micros().min(u32::MAX as u128) as u32;
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(window)
            .or_default()
            .push(micros);
    }

    /// (window, pairs, p50 ms, p99 ms, max ms)
    fn summary(&self) -> Vec<(u64, usize, f64, f64, f64)> {
        let windows = self.0.lock().unwrap_or_else(|p| p.into_inner());
        windows
            .iter()
            .map(|(window, values)| {
                let mut sorted = values.clone();
                sorted.sort_unstable();
                let at = |q: f64| {
                    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
                    sorted.get(index).copied().unwrap_or(0) as f64 / 1e3
                };
                (*window, sorted.len(), at(0.5), at(0.99), at(1.0))
            })
            .collect()
    }
}

fn soak_duration() -> Duration {
    let secs = std::env::var("IDEMD_SOAK_SECS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_under_steady_load_with_periodic_faults() {
    let duration = soak_duration();
    let database = TestDatabase::create().await;
    let (proxy, url) = database_behind_proxy(&database).await;
    let name = database
        .url
        .rsplit('/')
        .next()
        .expect("db name")
        .to_string();
    let process = tokio::task::spawn_blocking(move || {
        IdemdProcess::start(&[
            "--database-url",
            &url,
            "--pool-size",
            "8",
            "--db-connect-timeout",
            "1s",
            "--db-query-timeout",
            "1s",
            "--metrics-interval",
            "500ms",
            // A small replay cache, full within the warm-up: memory after it must stay flat.
            "--replay-cache-bytes",
            "1048576",
        ])
    })
    .await
    .expect("start idemd");
    let process = Arc::new(process);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", process.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let client = Client::new(channel);

    // Idle baseline, with the client's connection open.
    let mut first = client.clone();
    first
        .get(pb::GetRequest {
            namespace: NAMESPACE.into(),
            key: "baseline".into(),
        })
        .await
        .expect_err("no such record");
    // The gauges are refreshed every 500 ms: wait until the pool gauge shows the connection the
    // Get opened.
    eventually(
        Duration::from_secs(10),
        "the pool gauge shows a connection",
        || {
            let process = process.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    gauge(
                        &metrics(&process),
                        idemd::telemetry::metrics::POOL_CONNECTIONS,
                    )
                    .is_some_and(|pool| pool >= 1)
                })
                .await
                .expect("read metrics")
            }
        },
    )
    .await;
    let idle = sample(&process);

    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Latencies::default());
    let pairs = Arc::new(AtomicU64::new(0));
    let retryable_errors = Arc::new(AtomicU64::new(0));
    // (began, ended) of every pair that failed retryably.
    let error_times: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    // Per 10-second window, the workers that completed a pair in it.
    let progress: Arc<Mutex<BTreeMap<u64, Vec<u64>>>> = Arc::default();
    let acknowledged = Arc::new(Mutex::new(Reservoir {
        seen: 0,
        kept: Vec::with_capacity(SAMPLE),
        rng: Rng::new(0x50a4),
    }));
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let (client, stop, latencies, pairs, errors, acknowledged) = (
            client.clone(),
            stop.clone(),
            latencies.clone(),
            pairs.clone(),
            retryable_errors.clone(),
            acknowledged.clone(),
        );
        let (error_times, progress) = (error_times.clone(), progress.clone());
        workers.push(tokio::spawn(async move {
            // About 30 pairs per second per worker: steady, not saturating.
            let mut pace = tokio::time::interval(PACE);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                n += 1;
                let key = format!("w{worker}-{n}");
                let began = Instant::now();
                match pair(client.clone(), &key).await {
                    Ok(record) => {
                        let window = began.duration_since(started).as_secs() / 10;
                        latencies.record(window, began.elapsed());
                        pairs.fetch_add(1, Ordering::Relaxed);
                        let mut progress = progress.lock().unwrap_or_else(|p| p.into_inner());
                        let workers = progress.entry(window).or_default();
                        if !workers.contains(&worker) {
                            workers.push(worker);
                        }
                        drop(progress);
                        acknowledged
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .offer(record);
                    }
                    Err(status)
                        if matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded) =>
                    {
                        errors.fetch_add(1, Ordering::Relaxed);
                        error_times
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((began, Instant::now()));
                    }
                    Err(status) => panic!("a non-retryable error during the soak: {status:?}"),
                }
            }
        }));
    }

    // Warm-up, then the memory reading the end is compared with.
    tokio::time::sleep(Duration::from_secs(5).min(duration / 4)).await;
    let warm = {
        let process = process.clone();
        tokio::task::spawn_blocking(move || sample(&process))
            .await
            .expect("sample")
    };
    let (admin, connection) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls)
        .await
        .expect("admin connection");
    tokio::spawn(connection);
    let mut samples = vec![warm];
    let mut faults = 0;
    let mut fault_windows: Vec<FaultWindow> = Vec::new();
    let mut next_fault = Instant::now() + Duration::from_secs(10);
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let process = process.clone();
        samples.push(
            tokio::task::spawn_blocking(move || sample(&process))
                .await
                .expect("sample"),
        );
        if Instant::now() >= next_fault && started.elapsed() + Duration::from_secs(5) < duration {
            faults += 1;
            let injected = Instant::now();
            let what = if faults % 2 == 1 {
                proxy.set(Fault::Cut);
                tokio::time::sleep(Duration::from_secs(1)).await;
                proxy.set(Fault::Pass);
                "network cut for 1 s"
            } else {
                admin
                    .execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = $1 AND pid <> pg_backend_pid()",
                        &[&name],
                    )
                    .await
                    .expect("terminate backends");
                "every backend terminated"
            };
            let lifted = Instant::now();
            // Recovery: a new pair succeeds within the limit.
            let mut attempt = 0;
            let recovered = loop {
                attempt += 1;
                if pair(client.clone(), &format!("probe-{faults}-{attempt}"))
                    .await
                    .is_ok()
                {
                    break Instant::now();
                }
                assert!(
                    lifted.elapsed() < RECOVERY_LIMIT,
                    "no pair succeeded within {RECOVERY_LIMIT:?} after fault {faults} \
                     ({what}) was lifted"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            fault_windows.push(FaultWindow {
                what,
                injected,
                lifted,
                recovered,
                errors: 0,
            });
            next_fault = Instant::now() + Duration::from_secs(10);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let load_ended = started.elapsed();
    for worker in workers {
        worker.await.expect("worker panicked");
    }
    assert!(faults > 0, "the soak ran too short to inject a fault");

    // Liveness. Every retryable error belongs to a pair that overlapped a fault's window, from
    // its injection until SETTLE after the recovery probe succeeded; outside them, nothing fails.
    let error_times = error_times
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut unexplained = Vec::new();
    for &(began, ended) in &error_times {
        match fault_windows
            .iter_mut()
            .find(|window| ended >= window.injected && began <= window.recovered + SETTLE)
        {
            Some(window) => window.errors += 1,
            None => {
                unexplained.push((began.duration_since(started), ended.duration_since(started)))
            }
        }
    }
    assert!(
        unexplained.is_empty(),
        "{} retryable error(s) outside every fault window (began, ended since the start): {:?}; \
         windows: {fault_windows:?}",
        unexplained.len(),
        unexplained.iter().take(10).collect::<Vec<_>>()
    );
    // Within a window, at most one failed pair per worker per tick of its pace: a failure is
    // never retried in a tight loop, and the window itself is bounded (RECOVERY_LIMIT + SETTLE
    // past the fault).
    for window in &fault_windows {
        let span = window.recovered + SETTLE - window.injected;
        let bound = WORKERS * (span.as_millis() / PACE.as_millis() + 1) as u64;
        assert!(
            window.errors <= bound,
            "{} retryable errors in the window of {window:?}, more than {bound}",
            window.errors
        );
    }
    // And every worker completed pairs in every whole 10-second window of the load.
    let progress = progress.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for window in 0..load_ended.as_secs() / 10 {
        let workers = progress.get(&window).map_or(0, Vec::len);
        assert_eq!(
            workers as u64,
            WORKERS,
            "only {workers} of {WORKERS} workers completed a pair in {}–{} s",
            window * 10,
            window * 10 + 10
        );
    }
    let end = {
        let process = process.clone();
        tokio::task::spawn_blocking(move || sample(&process))
            .await
            .expect("sample")
    };
    let peak_rss = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);

    // Nothing leaked: tasks, descriptors and pool settle back once the load is gone.
    let settled_by = Instant::now() + Duration::from_secs(30);
    let settled = loop {
        let now = {
            let process = process.clone();
            tokio::task::spawn_blocking(move || sample(&process))
                .await
                .expect("sample")
        };
        // Each pooled connection has a socket and a task driving it; beyond those, nothing.
        let beyond_pool =
            |s: Sample| (s.tasks.saturating_sub(s.pool), s.fds.saturating_sub(s.pool));
        let (tasks, fds) = beyond_pool(now);
        let (idle_tasks, idle_fds) = beyond_pool(idle);
        if tasks <= idle_tasks + 2 && fds <= idle_fds + 2 && now.pool <= 8 {
            break now;
        }
        assert!(
            Instant::now() < settled_by,
            "tasks, descriptors or pool connections did not return to idle within 30 s: \
             idle {idle:?}, now {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        end.rss_kib <= warm.rss_kib + RSS_ALLOWANCE_KIB,
        "resident memory grew from {} KiB after warm-up to {} KiB at the end",
        warm.rss_kib,
        end.rss_kib
    );

    // The sample of acknowledged Completes is intact in PostgreSQL: read through a store
    // without a replay cache, straight to the database (not through the proxy).
    let (acknowledged, offered) = {
        let reservoir = acknowledged.lock().unwrap_or_else(|p| p.into_inner());
        (reservoir.kept.clone(), reservoir.seen)
    };
    let pairs = pairs.load(Ordering::Relaxed);
    assert_eq!(
        offered, pairs,
        "every acknowledged pair was offered to the sample"
    );
    assert_eq!(acknowledged.len() as u64, offered.min(SAMPLE as u64));
    let reader = TestServer::uncached(&database.url).await;
    let mut direct = reader.client().await;
    for record in &acknowledged {
        let stored = direct
            .get(pb::GetRequest {
                namespace: NAMESPACE.into(),
                key: record.key.clone(),
            })
            .await
            .unwrap_or_else(|status| {
                panic!("acknowledged Complete {} is gone: {status:?}", record.key)
            })
            .into_inner()
            .record;
        assert_eq!(
            stored.as_ref(),
            Some(record),
            "an acknowledged Complete changed"
        );
    }
    reader.stop().await;

    let windows = latencies.summary();
    let table: Vec<String> = windows
        .iter()
        .map(|(window, n, p50, p99, max)| {
            format!(
                "| {}–{} s | {n} | {p50:.2} | {p99:.2} | {max:.1} |",
                window * 10,
                window * 10 + 10
            )
        })
        .collect();
    let fault_table: Vec<String> = fault_windows
        .iter()
        .map(|window| {
            format!(
                "| {:.0} s | {} | {} | {:.0} ms |",
                window.injected.duration_since(started).as_secs_f64(),
                window.what,
                window.errors,
                window.recovered.duration_since(window.lifted).as_secs_f64() * 1e3
            )
        })
        .collect();
    let report = format!(
        "Soak: {:.0} s, {pairs} Acquire+Complete pairs, {} retryable errors, {faults} faults, \
         {} Completes (a uniform sample of the run) read back intact from PostgreSQL.\n\n\
         | fault at | fault | retryable errors in its window | first success after it |\n\
         |---|---|---|---|\n{}\n\n\
         | | idle | after warm-up | end of load | settled | peak |\n|---|---|---|---|---|---|\n\
         | resident memory (KiB) | {} | {} | {} | {} | {peak_rss} |\n\
         | tokio tasks | {} | {} | {} | {} | |\n\
         | open descriptors | {} | {} | {} | {} | |\n\
         | threads | {} | {} | {} | {} | |\n\
         | pool connections | {} | {} | {} | {} | |\n\n\
         | window | pairs | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|\n{}\n",
        duration.as_secs_f64(),
        retryable_errors.load(Ordering::Relaxed),
        acknowledged.len(),
        fault_table.join("\n"),
        idle.rss_kib,
        warm.rss_kib,
        end.rss_kib,
        settled.rss_kib,
        idle.tasks,
        warm.tasks,
        end.tasks,
        settled.tasks,
        idle.fds,
        warm.fds,
        end.fds,
        settled.fds,
        idle.threads,
        warm.threads,
        end.threads,
        settled.threads,
        idle.pool,
        warm.pool,
        end.pool,
        settled.pool,
        table.join("\n")
    );
    eprintln!("{report}");
    if let Some(dir) = std::env::var_os("IDEMD_RELIABILITY_DIR") {
        std::fs::create_dir_all(&dir).expect("report dir");
        std::fs::write(std::path::Path::new(&dir).join("soak.md"), report).expect("write report");
    }
}

/// Acquire a fresh key, complete it, and replay it once; retried calls are not retried here (the
/// soak counts them).
async fn pair(mut client: Client, key: &str) -> Result<pb::Record, tonic::Status> {
    let mut acquire = tonic::Request::new(acquire_request(NAMESPACE, key, b"fp"));
    acquire.set_timeout(Duration::from_secs(2));
    let lease = client
        .acquire(acquire)
        .await?
        .into_inner()
        .lease
        .ok_or_else(|| tonic::Status::internal("fresh key not acquired"))?;
    let mut complete = tonic::Request::new(pb::CompleteRequest {
        namespace: NAMESPACE.into(),
        key: key.into(),
        lease_token: lease.token,
        result: Some(sample_result(key)),
        retention: None,
    });
    complete.set_timeout(Duration::from_secs(2));
    let record = client
        .complete(complete)
        .await?
        .into_inner()
        .record
        .ok_or_else(|| tonic::Status::internal("Complete without a record"))?;
    let mut replay = tonic::Request::new(acquire_request(NAMESPACE, key, b"fp"));
    replay.set_timeout(Duration::from_secs(2));
    let replayed = client.acquire(replay).await?.into_inner();
    if replayed.outcome != pb::Outcome::Completed as i32
        || replayed.record.as_ref() != Some(&record)
    {
        return Err(tonic::Status::internal(format!(
            "replay of {key} did not return the stored record: {replayed:?}"
        )));
    }
    Ok(record)
}
