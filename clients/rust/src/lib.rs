//! idemd's Rust client: make any piece of work idempotent in a few lines.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idemd_client::proto::idempotency::v1::Result as StoredResult;
//! use idemd_client::{fingerprint, IdempotencyClient, Options, WorkError};
//!
//! let client = IdempotencyClient::connect("http://127.0.0.1:50051").await?;
//! let request = serde_json::json!({"order": 4711, "amount": 1250});
//! let outcome = client
//!     .idempotent("payments", "order-4711", fingerprint(&request)?, Options::default(), |lease| async move {
//!         // charge the card, guarding the write with lease.fencing_token
//!         Ok::<_, WorkError<std::io::Error>>(StoredResult { body: b"charged".to_vec(), code: 201, ..Default::default() })
//!     })
//!     .await?;
//! println!("replayed: {}", outcome.replayed);
//! # Ok(()) }
//! ```
//!
//! The behaviour is the same in every idemd client (Rust, Python, Node, Go, Java), as
//! clients/BEHAVIOUR.md specifies and its behaviour suite checks: Acquire → ACQUIRED: run the work
//! while the lease is renewed in the background, then Complete (or Release on a retryable
//! failure); IN_PROGRESS: Wait, then replay or try again; COMPLETED: return the stored result
//! without running the work. Acquire and Complete are retried with backoff and jitter when idemd
//! is unreachable, rate limited or overloaded. idemd unreachable after the retries: an error,
//! unless `fail_open` is set; every other refusal is an error of its own kind, never an
//! unprotected run.
//!
//! Traces: with the default `opentelemetry` feature, every call [`IdempotencyClient::idempotent`]
//! makes (Acquire, Wait, Renew, Complete, Release) carries the caller's current OpenTelemetry
//! context as W3C `traceparent`/`tracestate` metadata, so idemd's spans join the caller's trace.
//! The current context is `opentelemetry::Context::current()`: what a `tracing` span entered with
//! `tracing-opentelemetry` (context activation is its default) or an attached context sets.

use std::{future::Future, time::Duration};

use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::proto::idempotency::v1 as pb;
use crate::proto::idempotency::v1::idempotency_service_client::IdempotencyServiceClient;

#[cfg(feature = "http")]
pub mod http;

/// Client stubs and messages generated from the repository's `proto/` (by `build.rs`): the
/// [`IdempotencyClient`] is built on them, and they are there for calling an RPC directly.
pub mod proto {
    pub mod idempotency {
        pub mod v1 {
            #![allow(clippy::doc_lazy_continuation, clippy::doc_overindented_list_items)]
            tonic::include_proto!("idempotency.v1");
        }
        /// The operators' admin API (`idempotency.admin.v1.AdminService`), for scripts and tools.
        pub mod admin {
            pub mod v1 {
                #![allow(clippy::doc_lazy_continuation, clippy::doc_overindented_list_items)]
                tonic::include_proto!("idempotency.admin.v1");
            }
        }
    }
}

/// The canonical fingerprint of a request: SHA-256 of its RFC 8785 (JCS) canonical JSON. Every
/// idemd client computes the same bytes (see `clients/fingerprint-vectors.json`).
pub fn fingerprint<T: serde::Serialize>(request: &T) -> Result<Vec<u8>, serde_json::Error> {
    let canonical = serde_json_canonicalizer::to_vec(request)?;
    Ok(Sha256::digest(&canonical).to_vec())
}

/// How `idempotent` behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Lease length; renewed every third of it while the work runs.
    pub lease_ttl: Duration,
    /// How long the result is kept; `None`: the server's default.
    pub retention: Option<Duration>,
    /// Shown in the record, for debugging.
    pub holder: String,
    /// How many times to wait for an in-flight duplicate before giving up.
    pub max_waits: u32,
    /// Longest single Wait.
    pub wait_timeout: Duration,
    /// Run the work unprotected when idemd cannot be reached (default: fail closed). Never
    /// applies when idemd answered (rate limited, overloaded, full, refused…): see
    /// clients/BEHAVIOUR.md.
    pub fail_open: bool,
    /// The deadline of each call (a Wait's is its wait timeout plus this). A call without an
    /// answer by then counts as idemd being unreachable.
    pub rpc_timeout: Duration,
    /// How Acquire and Complete are retried when idemd is unreachable, rate limited or
    /// overloaded.
    pub retry: RetryPolicy,
}

/// Retries with exponential backoff and full jitter: before retry `n` (1, 2, …) the helper sleeps
/// a random time in `[0, min(max_backoff, initial_backoff · 2^(n-1))]`, so that a fleet's retries
/// spread out instead of hitting a recovering idemd at the same instant.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Calls of one RPC in all, the first included (at least 1).
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// The sleep before retry `retry` (1 for the first retry).
    fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1)))
            .min(self.max_backoff);
        jitter(ceiling)
    }
}

/// A uniformly random duration in `[0, ceiling]` ("full jitter"). The randomness is std's
/// per-process random hash keys, mixed with a counter: enough to spread retries, no extra crate.
fn jitter(ceiling: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(hasher.finish() % nanos.saturating_add(1))
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(30),
            retention: None,
            holder: format!(
                "{}:{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "rust-client".into()),
                std::process::id()
            ),
            max_waits: 10,
            wait_timeout: Duration::from_secs(30),
            fail_open: false,
            rpc_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
        }
    }
}

/// What the work sees of its lease.
#[derive(Debug, Clone)]
pub struct Lease {
    /// Strictly increasing per grant: pass it to downstream writes so they can refuse a caller
    /// whose lease was taken over.
    pub fencing_token: u64,
    /// The lease's secret token.
    pub token: String,
}

/// How the work failed.
#[derive(Debug)]
pub enum WorkError<E> {
    /// Try again later: the key is released, so the next attempt runs the work again.
    Retryable(E),
    /// Final: with `result`, that result is stored and replayed to every retry; without, the key
    /// is released.
    Terminal {
        error: E,
        result: Option<pb::Result>,
    },
}

/// What `idempotent` returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub result: pb::Result,
    /// The work did not run here: this is the stored result of an earlier run.
    pub replayed: bool,
    /// False only when `fail_open` ran the work without idemd.
    pub protected: bool,
}

/// Why `idempotent` failed. Each variant is a kind of clients/BEHAVIOUR.md, the same in every
/// idemd client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError<E: std::fmt::Debug> {
    /// idemd could not be reached (UNAVAILABLE, a connection that failed or broke, no answer in
    /// time), after the retries. The only error `fail_open` turns into an unprotected run.
    #[error("idemd is unreachable: {0}")]
    Unavailable(Status),
    /// RESOURCE_EXHAUSTED `CALLER_LIMITED`: this caller is over its limit, after the retries.
    #[error("idemd rate-limits this caller: {0}")]
    RateLimited(Status),
    /// RESOURCE_EXHAUSTED `OVERLOADED` (or without a reason): idemd is at its limit, after the
    /// retries.
    #[error("idemd is overloaded: {0}")]
    Overloaded(Status),
    /// RESOURCE_EXHAUSTED `STORE_FULL`: new keys are refused until records expire.
    #[error("the idempotency store is full: {0}")]
    StoreFull(Status),
    #[error("idemd does not know these credentials: {0}")]
    Unauthenticated(Status),
    #[error("idemd's policy refuses this call: {0}")]
    PermissionDenied(Status),
    /// INVALID_ARGUMENT `INVALID_REQUEST`: the status details name each broken field.
    #[error("idemd refused the request as invalid: {0}")]
    InvalidRequest(Status),
    #[error("the key was used before with a different request (fingerprint mismatch)")]
    FingerprintMismatch,
    /// The lease was taken over or the record vanished before Complete: the work ran, its result
    /// was not stored.
    #[error("the lease was lost before Complete; the work ran but its result was not stored: {0}")]
    LeaseLost(Status),
    #[error("another caller is still working on the key after {0} waits")]
    InProgress(u32),
    #[error("idemd failed internally: {0}")]
    Internal(Status),
    #[error("the work failed: {0:?}")]
    Work(E),
    /// Any other status (one idemd does not send).
    #[error("idemd refused: {0}")]
    Rpc(Status),
}

pub(crate) fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// Whether idemd could not be reached or did not answer: the call may be retried. A connection
/// that breaks under a call (a replica restarting) reaches us as UNKNOWN "transport error" or
/// CANCELLED "operation was canceled", with the transport error as the source. The helper never
/// cancels its own calls, so any CANCELLED without a reason is the other side giving up (a tonic
/// server answers CANCELLED "Timeout expired" when a call's grpc-timeout passes).
fn unreachable_status(status: &Status) -> bool {
    use std::error::Error;
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
        || (matches!(status.code(), Code::Unknown | Code::Cancelled) && reason(status).is_empty())
        || status
            .source()
            .is_some_and(|source| source.is::<tonic::transport::Error>())
}

/// Whether Acquire or Complete is tried again after `status` (within the retry budget):
/// unreachable, rate limited or overloaded; a full store clears in minutes, not milliseconds.
fn retryable_status(status: &Status) -> bool {
    unreachable_status(status)
        || (status.code() == Code::ResourceExhausted && reason(status) != "STORE_FULL")
}

/// The error of a status, as clients/BEHAVIOUR.md's table says.
pub(crate) fn error_of<E: std::fmt::Debug>(status: Status) -> ClientError<E> {
    if unreachable_status(&status) {
        return ClientError::Unavailable(status);
    }
    match (status.code(), reason(&status).as_str()) {
        (Code::ResourceExhausted, "CALLER_LIMITED") => ClientError::RateLimited(status),
        (Code::ResourceExhausted, "STORE_FULL") => ClientError::StoreFull(status),
        (Code::ResourceExhausted, _) => ClientError::Overloaded(status),
        (Code::Unauthenticated, _) => ClientError::Unauthenticated(status),
        (Code::PermissionDenied, _) => ClientError::PermissionDenied(status),
        (Code::InvalidArgument, _) => ClientError::InvalidRequest(status),
        (_, "FINGERPRINT_MISMATCH") => ClientError::FingerprintMismatch,
        (Code::Internal, _) => ClientError::Internal(status),
        _ => ClientError::Rpc(status),
    }
}

/// The error of a failed Complete: a lease that is no longer ours is `LeaseLost`.
fn complete_error_of<E: std::fmt::Debug>(status: Status) -> ClientError<E> {
    match reason(&status).as_str() {
        "LEASE_NOT_HELD" | "RECORD_NOT_FOUND" | "RECORD_COMPLETED" => {
            ClientError::LeaseLost(status)
        }
        _ => error_of(status),
    }
}

/// One call with a deadline: no answer in `timeout` is DEADLINE_EXCEEDED, as from the transport.
pub(crate) async fn with_deadline<R>(
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<R>, Status>>,
) -> Result<R, Status> {
    match tokio::time::timeout(timeout, call).await {
        Ok(answer) => answer.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "idemd did not answer within {timeout:?}"
        ))),
    }
}

/// Calls `call` until it succeeds, fails for good, or the retry budget is spent (backoff with
/// full jitter between attempts); the last status otherwise.
pub(crate) async fn with_retries<R, F, Fut>(options: &Options, mut call: F) -> Result<R, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<R>, Status>>,
{
    let mut attempt = 1;
    loop {
        match with_deadline(options.rpc_timeout, call()).await {
            Err(status) if retryable_status(&status) && attempt < options.retry.max_attempts => {
                tracing::debug!(%status, attempt, "idemd call failed; retrying after a backoff");
                tokio::time::sleep(options.retry.backoff(attempt)).await;
                attempt += 1;
            }
            answer => return answer,
        }
    }
}

pub(crate) fn duration(value: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(value).ok()
}

/// Puts the current OpenTelemetry context into `metadata` as W3C trace context, which is what
/// idemd reads. Written out here rather than through the global propagator: that is a no-op until
/// the application installs one, and idemd understands W3C only.
#[cfg(feature = "opentelemetry")]
fn inject_trace_context(metadata: &mut tonic::metadata::MetadataMap) {
    use opentelemetry::trace::TraceContextExt;
    let context = opentelemetry::Context::current();
    let span = context.span();
    let span_context = span.span_context();
    if !span_context.is_valid() {
        return;
    }
    let traceparent = format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    );
    if let Ok(value) = traceparent.parse() {
        metadata.insert("traceparent", value);
    }
    let tracestate = span_context.trace_state().header();
    if !tracestate.is_empty() {
        // A trace state that is not valid metadata is left out; the parent link still holds.
        if let Ok(value) = tracestate.parse() {
            metadata.insert("tracestate", value);
        }
    }
}

/// Aborts a background task when dropped.
pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connection to idemd.
#[derive(Clone)]
pub struct IdempotencyClient {
    inner: IdempotencyServiceClient<Channel>,
    token: Option<MetadataValue<Ascii>>,
}

impl IdempotencyClient {
    /// Connects lazily: an unreachable idemd surfaces on the first call.
    pub async fn connect(target: impl Into<String>) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::from_shared(target.into())?
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        Ok(Self::new(channel))
    }

    pub fn new(channel: Channel) -> Self {
        Self {
            inner: IdempotencyServiceClient::new(channel),
            token: None,
        }
    }

    /// Sends `authorization: Bearer <token>` with every call.
    pub fn with_token(
        mut self,
        token: &str,
    ) -> Result<Self, tonic::metadata::errors::InvalidMetadataValue> {
        self.token = Some(format!("Bearer {token}").parse()?);
        Ok(self)
    }

    pub(crate) fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        #[cfg(feature = "opentelemetry")]
        inject_trace_context(request.metadata_mut());
        request
    }

    /// The raw gRPC client, for the other RPCs.
    pub fn raw(&self) -> IdempotencyServiceClient<Channel> {
        self.inner.clone()
    }

    /// Renews a lease every `every` (at least 10 ms) in the background, asking for `lease_ttl`
    /// (`None`: idemd's default), until the returned guard is dropped. A failure is retried at the
    /// next tick; a lost lease shows at Complete. [`Self::idempotent`] keeps its leases with this;
    /// so does the HTTP middleware.
    pub(crate) fn keep_lease(
        &self,
        namespace: &str,
        key: &str,
        lease_token: &str,
        lease_ttl: Option<Duration>,
        every: Duration,
        rpc_timeout: Duration,
    ) -> AbortOnDrop {
        let mut client = self.inner.clone();
        let renew = self.request(pb::RenewRequest {
            namespace: namespace.into(),
            key: key.into(),
            lease_token: lease_token.into(),
            lease_ttl: lease_ttl.and_then(duration),
        });
        let (metadata, _, message) = renew.into_parts();
        let every = every.max(Duration::from_millis(10));
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                let request =
                    Request::from_parts(metadata.clone(), Default::default(), message.clone());
                if let Err(status) = with_deadline(rpc_timeout, client.renew(request)).await {
                    tracing::warn!(%status, "could not renew the lease");
                }
            }
        }))
    }

    /// Runs `work` at most once for (namespace, key) — see the module documentation and
    /// clients/BEHAVIOUR.md for every answer and failure.
    pub async fn idempotent<F, Fut, E>(
        &self,
        namespace: &str,
        key: &str,
        fingerprint: Vec<u8>,
        options: Options,
        work: F,
    ) -> Result<Outcome, ClientError<E>>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<pb::Result, WorkError<E>>>,
        E: std::fmt::Debug,
    {
        let acquire = pb::AcquireRequest {
            namespace: namespace.into(),
            key: key.into(),
            fingerprint: fingerprint.clone(),
            lease_ttl: duration(options.lease_ttl),
            retention: options.retention.and_then(duration),
            holder: options.holder.clone(),
        };
        let mut waits = 0;
        loop {
            let acquired = with_retries(&options, || {
                let mut client = self.inner.clone();
                let request = self.request(acquire.clone());
                async move { client.acquire(request).await }
            })
            .await;
            let response = match acquired.map_err(error_of::<E>) {
                Ok(response) => response,
                // Only an unreachable idemd may be bypassed: one that answered (rate limited,
                // overloaded, full, refused) said no, and running anyway would ignore it.
                Err(ClientError::Unavailable(status)) if options.fail_open => {
                    tracing::warn!(%status, namespace, key, "idemd unreachable: running the work UNPROTECTED (fail_open)");
                    let lease = Lease {
                        fencing_token: 0,
                        token: String::new(),
                    };
                    return match work(lease).await {
                        Ok(result) => Ok(Outcome {
                            result,
                            replayed: false,
                            protected: false,
                        }),
                        Err(WorkError::Retryable(error) | WorkError::Terminal { error, .. }) => {
                            Err(ClientError::Work(error))
                        }
                    };
                }
                Err(error) => return Err(error),
            };
            match response.outcome() {
                pb::Outcome::Completed => {
                    let result = response.record.and_then(|r| r.result).unwrap_or_default();
                    return Ok(Outcome {
                        result,
                        replayed: true,
                        protected: true,
                    });
                }
                pb::Outcome::Acquired => {
                    let lease = response.lease.unwrap_or_default();
                    return self.run_leased(namespace, key, lease, &options, work).await;
                }
                _ => {
                    if waits >= options.max_waits {
                        return Err(ClientError::InProgress(waits));
                    }
                    waits += 1;
                    let retry_after = response
                        .retry_after
                        .and_then(|d| Duration::try_from(d).ok())
                        .unwrap_or(options.wait_timeout);
                    let timeout = retry_after
                        .min(options.wait_timeout)
                        .max(Duration::from_millis(1));
                    let wait = pb::WaitRequest {
                        namespace: namespace.into(),
                        key: key.into(),
                        timeout: duration(timeout),
                    };
                    let mut client = self.inner.clone();
                    let waited = with_deadline(
                        timeout + options.rpc_timeout,
                        client.wait(self.request(wait)),
                    )
                    .await;
                    match waited {
                        Ok(waited) => {
                            if waited.outcome() == pb::WaitOutcome::Completed {
                                let record = waited.record.unwrap_or_default();
                                if record.fingerprint != fingerprint {
                                    return Err(ClientError::FingerprintMismatch);
                                }
                                return Ok(Outcome {
                                    result: record.result.unwrap_or_default(),
                                    replayed: true,
                                    protected: true,
                                });
                            }
                            // FREE or TIMED_OUT: try to acquire again.
                        }
                        // A Wait that ran out of time is a TIMED_OUT.
                        Err(status) if status.code() == Code::DeadlineExceeded => {}
                        // Too many waiters, or idemd unreachable: back off, and let Acquire (with
                        // its retries) decide.
                        Err(status)
                            if unreachable_status(&status)
                                || status.code() == Code::ResourceExhausted =>
                        {
                            tracing::debug!(%status, "Wait failed; acquiring again after a backoff");
                            tokio::time::sleep(jitter(timeout.min(Duration::from_secs(1)))).await;
                        }
                        Err(status) => return Err(error_of(status)),
                    }
                }
            }
        }
    }

    async fn run_leased<F, Fut, E>(
        &self,
        namespace: &str,
        key: &str,
        lease: pb::Lease,
        options: &Options,
        work: F,
    ) -> Result<Outcome, ClientError<E>>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<pb::Result, WorkError<E>>>,
        E: std::fmt::Debug,
    {
        // Keep the lease alive while the work runs: renew every third of its length. Stops
        // renewing when the work ends, and also if this future is dropped mid-work.
        let renewer = self.keep_lease(
            namespace,
            key,
            &lease.token,
            Some(options.lease_ttl),
            options.lease_ttl / 3,
            options.rpc_timeout,
        );
        let outcome = work(Lease {
            fencing_token: lease.fencing_token,
            token: lease.token.clone(),
        })
        .await;
        drop(renewer);
        let release = || async {
            let mut client = self.inner.clone();
            let request = self.request(pb::ReleaseRequest {
                namespace: namespace.into(),
                key: key.into(),
                lease_token: lease.token.clone(),
            });
            // Best effort and not retried: an unreleased lease expires by itself.
            if let Err(status) = with_deadline(options.rpc_timeout, client.release(request)).await {
                tracing::warn!(%status, "could not release the lease; it expires by itself");
            }
        };
        // Complete is safe to repeat with the same lease token (the first stored result stands).
        let complete = |result: pb::Result| {
            let request = pb::CompleteRequest {
                namespace: namespace.into(),
                key: key.into(),
                lease_token: lease.token.clone(),
                result: Some(result),
                retention: options.retention.and_then(duration),
            };
            with_retries(options, move || {
                let mut client = self.inner.clone();
                let request = self.request(request.clone());
                async move { client.complete(request).await }
            })
        };
        match outcome {
            Ok(result) => {
                let record = complete(result)
                    .await
                    .map_err(complete_error_of)?
                    .record
                    .unwrap_or_default();
                Ok(Outcome {
                    result: record.result.unwrap_or_default(),
                    replayed: false,
                    protected: true,
                })
            }
            Err(WorkError::Retryable(error)) => {
                release().await;
                Err(ClientError::Work(error))
            }
            Err(WorkError::Terminal {
                error,
                result: Some(result),
            }) => {
                if let Err(status) = complete(result).await {
                    tracing::warn!(%status, "could not store the result of a terminal failure");
                }
                Err(ClientError::Work(error))
            }
            Err(WorkError::Terminal {
                error,
                result: None,
            }) => {
                release().await;
                Err(ClientError::Work(error))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "opentelemetry")]
    #[tokio::test]
    async fn calls_carry_the_current_trace_context() {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        let client =
            IdempotencyClient::new(Channel::from_static("http://127.0.0.1:1").connect_lazy());
        assert!(
            client.request(()).metadata().get("traceparent").is_none(),
            "no context, no traceparent"
        );
        let parent = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id"),
            SpanId::from_hex("00f067aa0ba902b7").expect("span id"),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "opaque")]).expect("trace state"),
        );
        let _attached = opentelemetry::Context::new()
            .with_remote_span_context(parent)
            .attach();
        let request = client.request(());
        assert_eq!(
            request
                .metadata()
                .get("traceparent")
                .and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(
            request
                .metadata()
                .get("tracestate")
                .and_then(|v| v.to_str().ok()),
            Some("vendor=opaque")
        );
    }

    #[test]
    fn fingerprints_match_the_shared_vectors() {
        let text = include_str!("../../fingerprint-vectors.json");
        let document: serde_json::Value = serde_json::from_str(text).expect("vectors");
        let vectors = document["vectors"].as_array().expect("vector list");
        assert!(vectors.len() >= 10);
        for vector in vectors {
            let canonical =
                serde_json_canonicalizer::to_string(&vector["input"]).expect("canonical");
            assert_eq!(
                canonical,
                vector["canonical"].as_str().expect("string"),
                "{vector}"
            );
            let hex: String = fingerprint(&vector["input"])
                .expect("fingerprint")
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(hex, vector["sha256"].as_str().expect("string"));
        }
    }
}
