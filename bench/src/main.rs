//! idemd-bench: a load generator for idemd, over real gRPC.
//!
//!   idemd-bench --target http://127.0.0.1:50051 --workload fresh --clients 64 --duration 10s
//!
//! Workloads: `fresh` (Acquire + Complete on new keys; one operation = the pair), `replay` (90 %
//! Acquires of completed keys, 10 % fresh pairs; one operation = one request), `contended` (all
//! clients on a few hot keys that change every 200 ms: Acquire, then Complete if acquired or
//! Wait if in progress; one operation = one request seen through), `echo` (the standard health
//! Check, which never touches a store: the gRPC ceiling of the same server), `admin-list`
//! (ListRecords pages of 50 of `--namespace`, each client walking the listing from its newest
//! record and starting over at its end; one operation = one page), `admin-stats`
//! (GetNamespaceStats of `--namespace` over `--stats-window`) and `admin-namespaces`
//! (ListNamespaces); `bench/admin.sh` runs the admin
//! workloads on a namespace of a million records. Prints one line:
//! throughput, latency percentiles, errors, its own CPU seconds, and, with --server-pid, the
//! server's CPU seconds and peak RSS from /proc.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use idemd_client::proto::idempotency::admin::v1 as admin;
use idemd_client::proto::idempotency::admin::v1::admin_service_client::AdminServiceClient;
use idemd_client::proto::idempotency::v1 as pb;
use idemd_client::proto::idempotency::v1::idempotency_service_client::IdempotencyServiceClient;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    Fresh,
    Replay,
    Contended,
    Echo,
    AdminList,
    AdminStats,
    AdminNamespaces,
}

#[derive(Debug, Parser)]
#[command(about = "Load generator for idemd")]
struct Args {
    /// idemd's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    #[arg(long, value_enum, default_value = "fresh")]
    workload: Workload,
    /// Concurrent clients (each one request at a time).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// HTTP/2 connections the clients share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Run exactly this many operations (shared by all clients) instead of for `--duration`: a
    /// fixed workload, for comparing CPU or instruction counts per operation between builds.
    #[arg(long)]
    operations: Option<u64>,
    /// Completed keys the replay workload reads.
    #[arg(long, default_value_t = 10_000)]
    keyspace: usize,
    /// Bytes in each stored result body.
    #[arg(long, default_value_t = 128)]
    result_size: usize,
    /// Hot keys at a time in the contended workload.
    #[arg(long, default_value_t = 8)]
    hot_keys: u64,
    /// Namespace of the admin workloads.
    #[arg(long, default_value = "bench-admin")]
    namespace: String,
    /// Window of the admin-stats workload.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    stats_window: Duration,
    /// Server process to read CPU time and peak RSS of.
    #[arg(long)]
    server_pid: Option<u32>,
}

struct Shared {
    stop: AtomicBool,
    /// Operations claimed so far, in the fixed-count mode.
    claimed: AtomicU64,
    /// `--operations`, or unbounded.
    limit: u64,
    errors: AtomicU64,
    run: String,
}

fn acquire(namespace: &str, key: String) -> pb::AcquireRequest {
    pb::AcquireRequest {
        namespace: namespace.into(),
        key,
        fingerprint: b"bench".to_vec(),
        lease_ttl: None,
        retention: None,
        holder: "idemd-bench".into(),
    }
}

async fn pair(client: &mut IdempotencyServiceClient<Channel>, key: String, body: &[u8]) -> bool {
    let Ok(response) = client.acquire(acquire("bench", key.clone())).await else {
        return false;
    };
    let Some(lease) = response.into_inner().lease else {
        return false;
    };
    client
        .complete(complete(key, lease.token, body))
        .await
        .is_ok()
}

fn complete(key: String, lease_token: String, body: &[u8]) -> pb::CompleteRequest {
    pb::CompleteRequest {
        namespace: "bench".into(),
        key,
        lease_token,
        result: Some(pb::Result {
            body: body.to_vec(),
            code: 200,
            metadata: Default::default(),
        }),
        retention: None,
    }
}

/// One request on a hot key, seen through: do the work if acquired, else wait for whoever has it.
async fn contended(
    client: &mut IdempotencyServiceClient<Channel>,
    key: String,
    body: &[u8],
) -> bool {
    let Ok(response) = client.acquire(acquire("bench", key.clone())).await else {
        return false;
    };
    let response = response.into_inner();
    match response.outcome() {
        pb::Outcome::Completed => true,
        pb::Outcome::Acquired => match response.lease {
            Some(lease) => client
                .complete(complete(key, lease.token, body))
                .await
                .is_ok(),
            None => false,
        },
        pb::Outcome::InProgress => client
            .wait(pb::WaitRequest {
                namespace: "bench".into(),
                key,
                timeout: prost_types::Duration::try_from(Duration::from_secs(2)).ok(),
            })
            .await
            .is_ok(),
        pb::Outcome::Unspecified => false,
    }
}

/// (CPU seconds user+system, peak RSS in KiB) of a process.
fn process_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let peak = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks / 100.0, peak))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(
            Endpoint::from_shared(args.target.clone())?
                .connect()
                .await?,
        );
    }
    let body = vec![b'x'; args.result_size];
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        claimed: AtomicU64::new(0),
        limit: args.operations.unwrap_or(u64::MAX),
        errors: AtomicU64::new(0),
        run: format!(
            "{:x}",
            Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id())
        ),
    });
    let run_id = format!("{}-{}", shared.run, std::process::id());

    // The replay workload reads keys completed beforehand.
    if args.workload == Workload::Replay {
        let mut client = IdempotencyServiceClient::new(channels[0].clone());
        for index in 0..args.keyspace {
            pair(&mut client, format!("{run_id}-seed-{index}"), &body).await;
        }
    }

    let before = args.server_pid.and_then(process_usage);
    let own_before = process_usage(std::process::id());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..args.clients {
        let mut client = IdempotencyServiceClient::new(channels[worker % channels.len()].clone());
        let (shared, body, run_id) = (shared.clone(), body.clone(), run_id.clone());
        let (workload, keyspace, hot_keys) = (args.workload, args.keyspace, args.hot_keys.max(1));
        let mut health = tonic_health::pb::health_client::HealthClient::new(
            channels[worker % channels.len()].clone(),
        );
        let mut admin_client = AdminServiceClient::new(channels[worker % channels.len()].clone());
        let namespace = args.namespace.clone();
        let stats_window = prost_types::Duration::try_from(args.stats_window).ok();
        let mut page_token = String::new();
        tasks.push(tokio::spawn(async move {
            let mut histogram =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut sequence = 0u64;
            while !shared.stop.load(Ordering::Relaxed)
                && shared.claimed.fetch_add(1, Ordering::Relaxed) < shared.limit
            {
                sequence += 1;
                let begun = Instant::now();
                let ok = match workload {
                    Workload::Replay if !sequence.is_multiple_of(10) => {
                        let index =
                            (sequence.wrapping_mul(2654435761) ^ worker as u64) as usize % keyspace;
                        client
                            .acquire(acquire("bench", format!("{run_id}-seed-{index}")))
                            .await
                            .map(|r| r.into_inner().outcome() == pb::Outcome::Completed)
                            .unwrap_or(false)
                    }
                    Workload::Contended => {
                        let generation = started.elapsed().as_millis() / 200;
                        let hot = (sequence.wrapping_mul(2654435761) ^ worker as u64) % hot_keys;
                        contended(
                            &mut client,
                            format!("{run_id}-hot-{generation}-{hot}"),
                            &body,
                        )
                        .await
                    }
                    Workload::AdminList => match admin_client
                        .list_records(admin::ListRecordsRequest {
                            namespace: namespace.clone(),
                            page_size: 50,
                            page_token: std::mem::take(&mut page_token),
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(page) => {
                            page_token = page.into_inner().next_page_token;
                            true
                        }
                        Err(_) => false,
                    },
                    Workload::AdminStats => admin_client
                        .get_namespace_stats(admin::GetNamespaceStatsRequest {
                            namespace: namespace.clone(),
                            window: stats_window,
                        })
                        .await
                        .is_ok(),
                    Workload::AdminNamespaces => admin_client
                        .list_namespaces(admin::ListNamespacesRequest {})
                        .await
                        .is_ok(),
                    Workload::Echo => health
                        .check(tonic_health::pb::HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .is_ok(),
                    _ => pair(&mut client, format!("{run_id}-{worker}-{sequence}"), &body).await,
                };
                if ok {
                    let micros = begun.elapsed().as_micros().min(60_000_000) as u64;
                    let _ = histogram.record(micros.max(1));
                } else {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            histogram
        }));
    }
    if args.operations.is_none() {
        tokio::time::sleep(args.duration).await;
        shared.stop.store(true, Ordering::Relaxed);
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for task in tasks {
        total.add(task.await?)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = args.server_pid.and_then(process_usage);
    let own = match (own_before, process_usage(std::process::id())) {
        (Some((cpu0, _)), Some((cpu1, _))) => format!(" client_cpu_s={:.1}", cpu1 - cpu0),
        _ => String::new(),
    };
    let ms = |q: f64| total.value_at_quantile(q) as f64 / 1000.0;
    let server = match (before, after) {
        (Some((cpu0, _)), Some((cpu1, peak))) => {
            format!(
                " server_cpu_s={:.2} server_cpu_us_per_op={:.1} server_peak_rss_mib={:.1}",
                cpu1 - cpu0,
                (cpu1 - cpu0) * 1e6 / (total.len() as f64).max(1.0),
                peak as f64 / 1024.0
            )
        }
        _ => String::new(),
    };
    println!(
        "workload={:?} clients={} ops={} ops_per_s={:.0} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} p999_ms={:.2} errors={}{}{}",
        args.workload,
        args.clients,
        total.len(),
        total.len() as f64 / elapsed,
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        shared.errors.load(Ordering::Relaxed),
        server,
        own
    );
    Ok(())
}
