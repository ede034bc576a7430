//! Prometheus metrics: names, recording helpers, and the `/metrics` HTTP listener.
//!
//! Labels are bounded: method, gRPC code, outcome, state, error kind. Never a namespace or a key.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::OnceLock, time::Duration};

use http_body_util::Full;
use hyper::{
    body::Bytes, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

pub const RPC_REQUESTS: &str = "idemd_rpc_requests_total";
pub const RPC_DURATION: &str = "idemd_rpc_duration_seconds";
pub const RPC_IN_FLIGHT: &str = "idemd_rpc_in_flight";
pub const ACQUIRE_OUTCOMES: &str = "idemd_acquire_outcomes_total";
pub const STORE_ERRORS: &str = "idemd_store_errors_total";
pub const ACQUIRE_INSERT_RACES: &str = "idemd_acquire_insert_races_total";
pub const POOL_CONNECTIONS: &str = "idemd_db_pool_connections";
pub const POOL_IDLE: &str = "idemd_db_pool_idle_connections";
pub const POOL_MAX: &str = "idemd_db_pool_max_connections";
pub const POOL_WAITERS: &str = "idemd_db_pool_waiters";
pub const REAPER_DELETED: &str = "idemd_reaper_deleted_total";
pub const RECORDS: &str = "idemd_records";
pub const STORE_READY: &str = "idemd_store_ready";
pub const BUILD_INFO: &str = "idemd_build_info";
pub const AUTH_DENIED: &str = "idemd_auth_denied_total";
pub const AUTH_RELOADS: &str = "idemd_auth_policy_reloads_total";
pub const RUNTIME_TASKS: &str = "idemd_runtime_alive_tasks";
pub const REPLAY_CACHE_HITS: &str = "idemd_replay_cache_hits_total";
pub const DB_BATCH_SIZE: &str = "idemd_db_batch_size";

/// Latency buckets in seconds: 250 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Batch size buckets.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 1000.0];

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn install() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .map_err(|error| error.to_string())?
                .set_buckets_for_metric(Matcher::Full(DB_BATCH_SIZE.into()), BATCH_BUCKETS)
                .map_err(|error| error.to_string())?
                .install_recorder()
                .map_err(|error| format!("cannot install the metrics recorder: {error}"))?;
            describe();
            Ok(handle)
        })
        .clone()
}

fn describe() {
    describe_counter!(
        RPC_REQUESTS,
        "RPCs finished, by method and gRPC status code."
    );
    describe_histogram!(RPC_DURATION, Unit::Seconds, "RPC latency, by method.");
    describe_gauge!(RPC_IN_FLIGHT, "RPCs being served right now.");
    describe_counter!(
        ACQUIRE_OUTCOMES,
        "Acquire decisions: acquired (new record), takeover (expired or released lease), \
         in_progress, completed (replay), fingerprint_mismatch."
    );
    describe_counter!(
        STORE_ERRORS,
        "Store failures, by kind: unavailable, deadline, internal."
    );
    describe_counter!(
        ACQUIRE_INSERT_RACES,
        "Acquires whose insert raced with a concurrent insert of the same key and decided again."
    );
    describe_counter!(
        REPLAY_CACHE_HITS,
        "Replayed Acquires and Gets answered from the replica's cache of completed records."
    );
    describe_histogram!(
        DB_BATCH_SIZE,
        "Commands per batched PostgreSQL statement, by command (acquire, complete); 1 when a \
         command that queued behind busy batch slots went alone."
    );
    describe_gauge!(
        RUNTIME_TASKS,
        "Tokio tasks alive in the server (connections, RPCs, background work); a leak shows here."
    );
    describe_gauge!(POOL_CONNECTIONS, "Open PostgreSQL connections in the pool.");
    describe_gauge!(POOL_IDLE, "Idle PostgreSQL connections in the pool.");
    describe_gauge!(POOL_MAX, "Most PostgreSQL connections the pool opens.");
    describe_gauge!(POOL_WAITERS, "Requests waiting for a pooled connection.");
    describe_counter!(
        REAPER_DELETED,
        "Expired records deleted by this replica's reaper."
    );
    describe_gauge!(
        RECORDS,
        "Live records by state (PostgreSQL: the planner's estimate, refreshed by ANALYZE)."
    );
    describe_gauge!(
        STORE_READY,
        "1 while the store is reachable and its schema current."
    );
    describe_gauge!(BUILD_INFO, "Always 1; labelled with the idemd version.");
    describe_counter!(
        AUTH_DENIED,
        "Calls refused by auth, by reason: unauthenticated, permission_denied, caller_limited."
    );
    describe_counter!(
        AUTH_RELOADS,
        "Auth policy and TLS reloads, by kind and result (applied, rejected)."
    );
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// One batch of `size` commands went to PostgreSQL.
pub fn store_batch(command: &'static str, size: usize) {
    // Batches hold at most 1,000 commands: exact in an f64.
    histogram!(DB_BATCH_SIZE, "command" => command).record(size as f64);
}

/// The outcomes `idemd_acquire_outcomes_total` counts.
pub const ACQUIRE_OUTCOME_LABELS: [&str; 5] = [
    "acquired",
    "takeover",
    "in_progress",
    "completed",
    "fingerprint_mismatch",
];

/// Handles of the metrics every RPC records, registered once. A `counter!` with labels hashes
/// its name and labels and looks them up in the registry under a lock each time; these are paid
/// for at start-up instead. Build it after [`install`], or it records into the void.
pub struct RpcMetrics {
    in_flight: Gauge,
    /// Per method (in the order given to `new`): its latency histogram and its `OK` counter.
    methods: Vec<(&'static str, Histogram, Counter)>,
    outcomes: [Counter; 5],
}

impl RpcMetrics {
    pub fn new(methods: &[&'static str]) -> Self {
        Self {
            in_flight: gauge!(RPC_IN_FLIGHT),
            methods: methods
                .iter()
                .map(|&method| {
                    (
                        method,
                        histogram!(RPC_DURATION, "method" => method),
                        counter!(RPC_REQUESTS, "method" => method, "code" => "OK"),
                    )
                })
                .collect(),
            outcomes: ACQUIRE_OUTCOME_LABELS
                .map(|outcome| counter!(ACQUIRE_OUTCOMES, "outcome" => outcome)),
        }
    }

    /// Counts an RPC in flight for as long as the guard lives.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.increment(1.0);
        InFlight(&self.in_flight)
    }

    /// One finished RPC. Codes other than OK are rare and looked up by name.
    pub fn finished(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        let cached = self.methods.iter().find(|(name, ..)| *name == method);
        match cached {
            Some((_, duration, _)) => duration.record(elapsed.as_secs_f64()),
            None => histogram!(RPC_DURATION, "method" => method).record(elapsed.as_secs_f64()),
        }
        match cached {
            Some((.., ok)) if code == tonic::Code::Ok => ok.increment(1),
            _ => {
                counter!(RPC_REQUESTS, "method" => method, "code" => code_label(code)).increment(1)
            }
        }
    }

    /// One Acquire decision, by a label of [`ACQUIRE_OUTCOME_LABELS`].
    pub fn acquire_outcome(&self, outcome: &'static str) {
        match ACQUIRE_OUTCOME_LABELS
            .iter()
            .position(|label| *label == outcome)
        {
            Some(index) => self.outcomes[index].increment(1),
            None => counter!(ACQUIRE_OUTCOMES, "outcome" => outcome).increment(1),
        }
    }
}

/// An RPC in flight, counted by `idemd_rpc_in_flight` until dropped.
pub struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

pub fn store_error(kind: &'static str) {
    counter!(STORE_ERRORS, "kind" => kind).increment(1);
}

pub fn replay_cache_hit() {
    counter!(REPLAY_CACHE_HITS).increment(1);
}

pub fn acquire_insert_race() {
    counter!(ACQUIRE_INSERT_RACES).increment(1);
}

pub fn pool(max: usize, size: usize, idle: usize, waiters: usize) {
    gauge!(POOL_MAX).set(max as f64);
    gauge!(POOL_CONNECTIONS).set(size as f64);
    gauge!(POOL_IDLE).set(idle as f64);
    gauge!(POOL_WAITERS).set(waiters as f64);
}

pub fn reaped(deleted: u64) {
    counter!(REAPER_DELETED).increment(deleted);
}

pub fn records(in_progress: f64, completed: f64) {
    gauge!(RECORDS, "state" => "in_progress").set(in_progress);
    gauge!(RECORDS, "state" => "completed").set(completed);
}

pub fn auth_denied(reason: &'static str) {
    counter!(AUTH_DENIED, "reason" => reason).increment(1);
}

pub fn reloaded(kind: &'static str, result: &'static str) {
    counter!(AUTH_RELOADS, "kind" => kind, "result" => result).increment(1);
}

pub fn store_ready(ready: bool) {
    gauge!(STORE_READY).set(if ready { 1.0 } else { 0.0 });
}

/// The gRPC code's canonical name, e.g. `OK`, `INVALID_ARGUMENT`.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `GET /metrics` in the Prometheus text format on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, _) = match accepted {
            Ok(connection) => connection,
            Err(error) => {
                tracing::debug!(%error, "metrics listener accept failed");
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(respond(&handle, &request)) }
            });
            let connection = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                tracing::debug!(%error, "metrics connection failed");
            }
        });
    }
}

fn respond<B>(handle: &PrometheusHandle, request: &Request<B>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                gauge!(RUNTIME_TASKS).set(runtime.metrics().num_alive_tasks() as f64);
            }
            (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                handle.render(),
            )
        }
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "use GET\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "metrics are at /metrics\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Binds the metrics listener; a separate port from gRPC so scrapes never compete with RPCs.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
