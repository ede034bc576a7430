//! A bounded soak: one idemd process under steady load for `IDEMD_SOAK_SECS` (60 s by default,
//! the CI version; `scripts/reliability.sh` runs 600 s), with a fault every 10 s (the network to
//! PostgreSQL cut for a second, or every backend terminated). It must leak nothing: after the load,
//! tasks, file descriptors and pool connections return to their idle baseline, and resident memory
//! at the end is within a small allowance of memory after warm-up. Every acknowledged Complete is
//! read back intact.

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

use crate::faults::{database_behind_proxy, Fault};
use crate::harness::*;
use crate::processes::{http_get, IdemdProcess};

const NAMESPACE: &str = "soak";
/// Growth of resident memory from warm-up to the end that still counts as flat.
const RSS_ALLOWANCE_KIB: u64 = 16 * 1024;

/// A reading of the process: resident memory, open descriptors, threads, tasks, pool connections.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rss_kib: u64,
    fds: u64,
    threads: u64,
    tasks: u64,
    pool: u64,
}

fn sample(process: &IdemdProcess) -> Sample {
    let pid = process.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count() as u64)
        .unwrap_or(0);
    let (_, metrics) = http_get(process.metrics_addr, "/metrics");
    let gauge = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    Sample {
        rss_kib: field("VmRSS:"),
        fds,
        threads: field("Threads:"),
        tasks: gauge("idemd_runtime_alive_tasks"),
        pool: gauge("idemd_db_pool_connections"),
    }
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
    // The pool gauge is refreshed every 500 ms: let it see the connection the Get opened.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = sample(&process);

    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Latencies::default());
    let pairs = Arc::new(AtomicU64::new(0));
    let retryable_errors = Arc::new(AtomicU64::new(0));
    let acknowledged: Arc<Mutex<Vec<pb::Record>>> = Arc::default();
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..16u64 {
        let (client, stop, latencies, pairs, errors, acknowledged) = (
            client.clone(),
            stop.clone(),
            latencies.clone(),
            pairs.clone(),
            retryable_errors.clone(),
            acknowledged.clone(),
        );
        workers.push(tokio::spawn(async move {
            // About 30 pairs per second per worker: steady, not saturating.
            let mut pace = tokio::time::interval(Duration::from_millis(33));
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                n += 1;
                let key = format!("w{worker}-{n}");
                let began = Instant::now();
                match pair(client.clone(), &key).await {
                    Ok(record) => {
                        latencies.record(started.elapsed().as_secs() / 10, began.elapsed());
                        pairs.fetch_add(1, Ordering::Relaxed);
                        let mut acknowledged =
                            acknowledged.lock().unwrap_or_else(|p| p.into_inner());
                        // Keep a bounded sample to read back at the end.
                        if acknowledged.len() < 2000 && n.is_multiple_of(4) {
                            acknowledged.push(record);
                        }
                    }
                    Err(status)
                        if matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded) =>
                    {
                        errors.fetch_add(1, Ordering::Relaxed);
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
            if faults % 2 == 1 {
                proxy.set(Fault::Cut);
                tokio::time::sleep(Duration::from_secs(1)).await;
                proxy.set(Fault::Pass);
            } else {
                admin
                    .execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = $1 AND pid <> pg_backend_pid()",
                        &[&name],
                    )
                    .await
                    .expect("terminate backends");
            }
            next_fault = Instant::now() + Duration::from_secs(10);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("worker panicked");
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

    // Every acknowledged Complete is intact.
    let acknowledged = acknowledged
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut reader = client.clone();
    for record in &acknowledged {
        let stored = get_record(&mut reader, NAMESPACE, &record.key).await;
        assert_eq!(
            &stored, record,
            "an acknowledged Complete changed or vanished"
        );
    }
    let pairs = pairs.load(Ordering::Relaxed);
    assert!(pairs > 0, "no work was done");

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
    let report = format!(
        "Soak: {:.0} s, {pairs} Acquire+Complete pairs, {} retryable errors, {faults} faults, \
         {} Completes read back intact.\n\n\
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
