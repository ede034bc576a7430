//! The `Idempotency-Key` middleware for tower services (axum, hyper), as
//! [clients/HTTP-MIDDLEWARE.md](https://github.com/idemd/idemd/blob/main/clients/HTTP-MIDDLEWARE.md)
//! specifies, the same in every language:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idemd_client::{http::IdempotencyLayer, IdempotencyClient};
//!
//! let client = IdempotencyClient::connect("http://127.0.0.1:50051").await?;
//! let layer = IdempotencyLayer::new(client, "orders-api")
//!     .scope(|parts| parts.headers.get("x-tenant").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned());
//! // axum: Router::new().route("/orders", post(create_order).layer(layer))
//! # let _ = layer; Ok(()) }
//! ```
//!
//! It is a thin layer over [`IdempotencyClient`]: its Acquire, Wait, Complete and Release calls
//! (with its token and trace context), its lease renewal and its [`fingerprint`](crate::fingerprint).
//! The request body is buffered up to `max_body` (to fingerprint it) and handed on as
//! `ReqB::from(bytes)`; the response body is buffered up to `max_stored` to store it.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use sha2::{Digest, Sha256};
use tower::{Layer, Service};

use crate::proto::idempotency::v1 as pb;
use crate::{
    duration, error_of, reason, with_deadline, with_retries, ClientError, IdempotencyClient,
    Options,
};

/// The error type of the middleware's response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The middleware's response body: the handler's (buffered or streamed on), a replay, or a
/// problem document.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// Where the `type` URIs of the problem documents point (anchors of clients/HTTP-MIDDLEWARE.md).
pub const PROBLEM_BASE: &str =
    "https://github.com/idemd/idemd/blob/main/clients/HTTP-MIDDLEWARE.md#";
/// The longest Idempotency-Key, in bytes.
pub const MAX_KEY_BYTES: usize = 255;
/// The response headers stored and replayed by default (`set-cookie` only when listed).
pub const DEFAULT_KEEP_HEADERS: [&str; 9] = [
    "content-type",
    "content-language",
    "content-encoding",
    "location",
    "etag",
    "last-modified",
    "cache-control",
    "link",
    "retry-after",
];

type ScopeFn = dyn Fn(&http::request::Parts) -> String + Send + Sync;
type StorableFn = dyn Fn(StatusCode) -> bool + Send + Sync;

/// Which parts of a JSON body and which headers go into the fingerprint.
#[derive(Debug, Clone, Default)]
pub struct FingerprintOptions {
    /// Top-level JSON fields left out.
    pub exclude: Vec<String>,
    /// When not empty: only these top-level JSON fields.
    pub include: Vec<String>,
    /// Request headers (lower case) added as `"headers": {name: value}`.
    pub headers: Vec<String>,
}

#[derive(Clone)]
struct Config {
    namespace: String,
    methods: Vec<Method>,
    required: bool,
    scope: Option<Arc<ScopeFn>>,
    lease_ttl: Option<Duration>,
    retention: Option<Duration>,
    wait: Option<Duration>,
    max_body: usize,
    max_stored: usize,
    idemd_timeout: Duration,
    fail_open: bool,
    fingerprint: FingerprintOptions,
    storable: Arc<StorableFn>,
    keep_headers: Vec<String>,
    holder: String,
}

/// The `Idempotency-Key` middleware as a tower [`Layer`]. Every setting has the default
/// clients/HTTP-MIDDLEWARE.md names; the namespace is required.
#[derive(Clone)]
pub struct IdempotencyLayer {
    client: IdempotencyClient,
    config: Config,
}

impl IdempotencyLayer {
    /// Keys of `namespace`, through `client` (cloned for every call).
    pub fn new(client: IdempotencyClient, namespace: impl Into<String>) -> Self {
        Self {
            client,
            config: Config {
                namespace: namespace.into(),
                methods: vec![Method::POST, Method::PATCH],
                required: false,
                scope: None,
                lease_ttl: None,
                retention: None,
                wait: None,
                max_body: 1024 * 1024,
                max_stored: 1024 * 1024,
                idemd_timeout: Duration::from_secs(5),
                fail_open: false,
                fingerprint: FingerprintOptions::default(),
                storable: Arc::new(is_storable),
                keep_headers: DEFAULT_KEEP_HEADERS
                    .iter()
                    .map(|h| (*h).to_owned())
                    .collect(),
                holder: String::new(),
            },
        }
    }
    /// The methods covered (default POST and PATCH); others pass straight through.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.methods = methods.into_iter().collect();
        self
    }
    /// A covered request without the header gets 400 `missing-key` (default: it runs unprotected).
    pub fn required(mut self, required: bool) -> Self {
        self.config.required = required;
        self
    }
    /// The caller's identity (user, API key, tenant): the same key under two scopes is two
    /// records. Default: `""` for everyone.
    pub fn scope(
        mut self,
        scope: impl Fn(&http::request::Parts) -> String + Send + Sync + 'static,
    ) -> Self {
        self.config.scope = Some(Arc::new(scope));
        self
    }
    /// The lease asked for at Acquire and each Renew (default: idemd's); renewed every third.
    pub fn lease_ttl(mut self, lease_ttl: Duration) -> Self {
        self.config.lease_ttl = Some(lease_ttl);
        self
    }
    /// How long the response is kept (default: idemd's retention).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.config.retention = Some(retention);
        self
    }
    /// Wait up to `bound` for an in-flight duplicate instead of answering 409 at once.
    pub fn wait(mut self, bound: Duration) -> Self {
        self.config.wait = Some(bound);
        self
    }
    /// The largest request body read (default 1 MiB); a larger one gets 413.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.config.max_body = bytes;
        self
    }
    /// The largest response body stored (default 1 MiB, idemd's default limit).
    pub fn max_stored(mut self, bytes: usize) -> Self {
        self.config.max_stored = bytes;
        self
    }
    /// The deadline of each call to idemd (default 5 s); Complete is retried as the client's
    /// `idempotent` retries it, each call within this.
    pub fn idemd_timeout(mut self, timeout: Duration) -> Self {
        self.config.idemd_timeout = timeout;
        self
    }
    /// idemd unreachable: run the handler unprotected instead of 503 (never for
    /// RESOURCE_EXHAUSTED).
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.config.fail_open = fail_open;
        self
    }
    /// What goes into the fingerprint besides method, target and body.
    pub fn fingerprint(mut self, options: FingerprintOptions) -> Self {
        self.config.fingerprint = options;
        self
    }
    /// Which statuses are stored (default [`is_storable`]).
    pub fn storable(
        mut self,
        storable: impl Fn(StatusCode) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.config.storable = Arc::new(storable);
        self
    }
    /// The response headers stored and replayed (default [`DEFAULT_KEEP_HEADERS`]).
    pub fn keep_headers(mut self, names: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.config.keep_headers = names
            .into_iter()
            .map(|n| n.into().to_ascii_lowercase())
            .collect();
        self
    }
    /// Shown in idemd's record (default: `Options::default().holder`, as `idempotent` uses).
    pub fn holder(mut self, holder: impl Into<String>) -> Self {
        self.config.holder = holder.into();
        self
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            client: self.client.clone(),
            config: Arc::new(self.config.clone()),
        }
    }
}

/// The service [`IdempotencyLayer`] wraps around a handler.
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    client: IdempotencyClient,
    config: Arc<Config>,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Idempotency<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: HttpBody + From<Bytes> + Send + 'static,
    ReqB::Data: Send,
    ReqB::Error: Into<BoxError>,
    ResB: HttpBody<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        // The clone that was polled ready serves this call; `self` keeps a fresh one.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let call = Call {
            inner,
            client: self.client.clone(),
            config: self.config.clone(),
        };
        Box::pin(call.run(request))
    }
}

struct Call<S> {
    inner: S,
    client: IdempotencyClient,
    config: Arc<Config>,
}

fn boxed<B>(response: Response<B>) -> Response<ResponseBody>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    response.map(|body| body.map_err(Into::into).boxed_unsync())
}

fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

impl<S> Call<S> {
    async fn run<ReqB, ResB>(
        mut self,
        request: Request<ReqB>,
    ) -> Result<Response<ResponseBody>, S::Error>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqB: HttpBody + From<Bytes> + Send + 'static,
        ReqB::Data: Send,
        ReqB::Error: Into<BoxError>,
        ResB: HttpBody<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let config = self.config.clone();
        if !config.methods.contains(request.method()) {
            return self.inner.call(request).await.map(boxed);
        }
        let fields: Vec<&[u8]> = request
            .headers()
            .get_all("idempotency-key")
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        let key = match parse_idempotency_key(&fields) {
            ParsedKey::None if config.required => {
                return Ok(problem(
                    Problem::MissingKey,
                    "this route requires an Idempotency-Key header: a new unique value (a UUID) per operation",
                ))
            }
            ParsedKey::None => return self.inner.call(request).await.map(boxed),
            ParsedKey::Invalid(detail) => return Ok(problem(Problem::InvalidKey, &detail)),
            ParsedKey::Key(key) => key,
        };

        let (parts, body) = request.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = match read_body(body, declared, config.max_body).await {
            BodyRead::Complete(body) => body,
            BodyRead::TooLarge { close } => {
                let mut response = problem(
                    Problem::RequestTooLarge,
                    &format!("the request body is larger than {} bytes", config.max_body),
                );
                if close {
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                return Ok(response);
            }
            BodyRead::Failed(error) => {
                tracing::debug!(%error, "could not read the request body");
                return Ok(bad_request("the request body could not be read"));
            }
        };

        let scope = config.scope.as_ref().map(|f| f(&parts)).unwrap_or_default();
        let idemd_key = idemd_key(&scope, &key);
        let target = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let form = fingerprint_form(
            parts.method.as_str(),
            target,
            content_type,
            &body,
            &parts.headers,
            &config.fingerprint,
        );
        let fingerprint = match crate::fingerprint(&form) {
            Ok(fingerprint) => fingerprint,
            // A serde_json::Value always serializes; were it not to, nothing was stored yet.
            Err(error) => {
                return Ok(bad_request(&format!(
                    "the request cannot be fingerprinted: {error}"
                )))
            }
        };
        let request = Request::from_parts(parts, ReqB::from(body));

        let wait_until = config.wait.map(|bound| Instant::now() + bound);
        let acquire = pb::AcquireRequest {
            namespace: config.namespace.clone(),
            key: idemd_key.clone(),
            fingerprint: fingerprint.clone(),
            lease_ttl: config.lease_ttl.and_then(duration),
            retention: None,
            holder: config.holder.clone(),
        };
        loop {
            let mut raw = self.client.raw();
            let acquired = with_deadline(
                config.idemd_timeout,
                raw.acquire(self.client.request(acquire.clone())),
            )
            .await;
            let acquired = match acquired {
                Ok(acquired) => acquired,
                Err(status) => {
                    return match idemd_failed(&config, status, true) {
                        Some(response) => Ok(response),
                        None => self.inner.call(request).await.map(boxed),
                    }
                }
            };
            match acquired.outcome() {
                pb::Outcome::Acquired => {
                    let lease = acquired.lease.unwrap_or_default();
                    return self.run_leased(request, &idemd_key, lease).await;
                }
                pb::Outcome::Completed => {
                    return Ok(replay(acquired.record.and_then(|r| r.result)));
                }
                _ => {
                    let remaining = wait_until
                        .map(|until| until.saturating_duration_since(Instant::now()))
                        .unwrap_or_default();
                    if remaining.is_zero() {
                        let retry_after = acquired
                            .retry_after
                            .and_then(|d| Duration::try_from(d).ok())
                            .unwrap_or(Duration::from_secs(1));
                        return Ok(in_progress(retry_after));
                    }
                    let wait = pb::WaitRequest {
                        namespace: config.namespace.clone(),
                        key: idemd_key.clone(),
                        timeout: duration(remaining),
                    };
                    let waited = with_deadline(
                        remaining + config.idemd_timeout,
                        raw.wait(self.client.request(wait)),
                    )
                    .await;
                    match waited {
                        Ok(waited) if waited.outcome() == pb::WaitOutcome::Completed => {
                            let record = waited.record.unwrap_or_default();
                            if record.fingerprint != fingerprint {
                                return Ok(key_reused());
                            }
                            return Ok(replay(record.result));
                        }
                        // FREE or TIMED_OUT: Acquire again (at the bound, that answers the 409).
                        Ok(_) => {}
                        Err(status) => {
                            return Ok(idemd_failed(&config, status, false)
                                .unwrap_or_else(|| in_progress(Duration::from_secs(1))))
                        }
                    }
                }
            }
        }
    }

    /// Runs the handler under the lease, buffers its response, stores it (or releases the key).
    async fn run_leased<ReqB, ResB>(
        mut self,
        request: Request<ReqB>,
        key: &str,
        lease: pb::Lease,
    ) -> Result<Response<ResponseBody>, S::Error>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqB: Send + 'static,
        ResB: HttpBody<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let config = self.config.clone();
        // Renew every third of the lease: the one asked for, else the one idemd granted.
        let every = config
            .lease_ttl
            .or_else(|| {
                let expires = lease.expires_at?;
                let expires = std::time::SystemTime::try_from(expires).ok()?;
                expires.duration_since(std::time::SystemTime::now()).ok()
            })
            .unwrap_or(Duration::from_secs(30))
            / 3;
        let renewer = self.client.keep_lease(
            &config.namespace,
            key,
            &lease.token,
            config.lease_ttl,
            every,
            config.idemd_timeout,
        );
        let held = HeldLease {
            renewer: Some(renewer),
            client: self.client.clone(),
            release: Some(pb::ReleaseRequest {
                namespace: config.namespace.clone(),
                key: key.to_owned(),
                lease_token: lease.token.clone(),
            }),
            timeout: config.idemd_timeout,
        };

        let response = match self.inner.call(request).await {
            Ok(response) => response,
            Err(error) => {
                held.release("the handler failed").await;
                return Err(error);
            }
        };
        let status = response.status();
        if !(config.storable)(status) {
            held.release("the status is not stored").await;
            return Ok(boxed(response));
        }
        let (parts, body) = response.into_parts();
        if body.size_hint().lower() > config.max_stored as u64 {
            tracing::error!(
                key,
                "the response is larger than max_stored: not stored, key released"
            );
            held.release("the response is too large").await;
            return Ok(boxed(Response::from_parts(parts, body)));
        }
        let mut body = Box::pin(body);
        let mut buffered = BytesMut::new();
        let mut failed: Option<BoxError> = None;
        let mut overflow = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        buffered.extend_from_slice(data);
                        if buffered.len() > config.max_stored {
                            overflow = true;
                            break;
                        }
                    }
                    // Trailers are not stored (idemd keeps status, headers and body).
                }
                Err(error) => {
                    failed = Some(error.into());
                    break;
                }
            }
        }
        if overflow || failed.is_some() {
            if overflow {
                tracing::error!(
                    key,
                    "the response is larger than max_stored: not stored, key released"
                );
            }
            held.release("the response was not stored").await;
            let rest = Prefixed {
                prefix: Some(buffered.freeze()),
                failed,
                rest: overflow.then_some(body),
            };
            return Ok(Response::from_parts(parts, rest.boxed_unsync()));
        }
        let body = buffered.freeze();
        let result = pb::Result {
            body: body.to_vec(),
            code: i32::from(status.as_u16()),
            metadata: kept_headers(&parts.headers, &config.keep_headers),
        };
        let complete = pb::CompleteRequest {
            namespace: config.namespace.clone(),
            key: key.to_owned(),
            lease_token: lease.token.clone(),
            result: Some(result),
            retention: config.retention.and_then(duration),
        };
        // The response goes out only once idemd knows: a retry sent right after it replays.
        // Complete is retried as the client retries it (safe with the same lease token).
        let retries = Options {
            rpc_timeout: config.idemd_timeout,
            ..Options::default()
        };
        let client = &self.client;
        let completed = with_retries(&retries, || {
            let mut raw = client.raw();
            let request = client.request(complete.clone());
            async move { raw.complete(request).await }
        })
        .await;
        // Stored, or not stored and not released: a failed Complete leaves the lease to expire,
        // as the client's `idempotent` does, rather than let a retry run the handler at once.
        held.settled();
        if let Err(status) = completed {
            tracing::error!(%status, key, "the handler ran but its response was not stored");
        }
        Ok(Response::from_parts(parts, full(body)))
    }
}

enum BodyRead {
    Complete(Bytes),
    /// Over `max_body`; `close`: the rest was not read, so the connection cannot go on.
    TooLarge {
        close: bool,
    },
    Failed(BoxError),
}

/// Reads a request body of at most `max` bytes. Past `max`, the rest is read and thrown away, up
/// to 4 × `max` in all, so that a client that sends its whole body before reading (most do) gets
/// the 413 instead of a reset connection; past that (or a declared length past it) the
/// connection is closed.
async fn read_body<B>(body: B, declared: Option<u64>, max: usize) -> BodyRead
where
    B: HttpBody,
    B::Error: Into<BoxError>,
{
    use bytes::{Buf, BufMut};
    let max = max as u64;
    let drain_limit = max.saturating_mul(4);
    if declared.is_some_and(|n| n > drain_limit) {
        return BodyRead::TooLarge { close: true };
    }
    let mut over = declared.is_some_and(|n| n > max);
    let mut body = std::pin::pin!(body);
    let mut buffered = BytesMut::new();
    let mut read: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers
                };
                read = read.saturating_add(data.remaining() as u64);
                if over || read > max {
                    over = true;
                    buffered = BytesMut::new();
                    if read > drain_limit {
                        return BodyRead::TooLarge { close: true };
                    }
                } else {
                    buffered.put(data);
                }
            }
            Err(_) if over => return BodyRead::TooLarge { close: true },
            Err(error) => return BodyRead::Failed(error.into()),
        }
    }
    if over {
        BodyRead::TooLarge { close: false }
    } else {
        BodyRead::Complete(buffered.freeze())
    }
}

/// The lease a request holds while its handler runs: renewed in the background until settled or
/// released. Dropped while still held (the server dropped the request's future: the caller went
/// away), it releases the key in the background, so a retry need not wait for the lease to end.
struct HeldLease {
    renewer: Option<crate::AbortOnDrop>,
    client: IdempotencyClient,
    release: Option<pb::ReleaseRequest>,
    timeout: Duration,
}

impl HeldLease {
    /// Stops renewing and releases the key (best effort: a failed Release is logged, the lease
    /// expires by itself).
    async fn release(mut self, why: &'static str) {
        self.renewer = None;
        if let Some(request) = self.release.take() {
            release_key(self.client.clone(), request, self.timeout, why).await;
        }
    }

    /// Stops renewing; the key is not released.
    fn settled(mut self) {
        self.renewer = None;
        self.release = None;
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        self.renewer = None;
        if let Some(request) = self.release.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let client = self.client.clone();
                let timeout = self.timeout;
                runtime.spawn(release_key(
                    client,
                    request,
                    timeout,
                    "the request was dropped before its response",
                ));
            }
        }
    }
}

async fn release_key(
    client: IdempotencyClient,
    request: pb::ReleaseRequest,
    timeout: Duration,
    why: &'static str,
) {
    let key = request.key.clone();
    let request = client.request(request);
    if let Err(status) = with_deadline(timeout, client.raw().release(request)).await {
        tracing::error!(%status, key, why, "could not release the key; it expires with its lease");
    }
}

/// The answer to a failed Acquire or Wait; `None`: run the handler unprotected (fail open).
fn idemd_failed(
    config: &Config,
    status: tonic::Status,
    may_fail_open: bool,
) -> Option<Response<ResponseBody>> {
    let code = status.code();
    let why = reason(&status);
    match error_of::<std::convert::Infallible>(status) {
        ClientError::FingerprintMismatch => Some(key_reused()),
        ClientError::Unavailable(status) if may_fail_open && config.fail_open => {
            tracing::warn!(%status, "idemd unreachable: running the handler UNPROTECTED (fail_open)");
            None
        }
        ClientError::Unavailable(_)
        | ClientError::RateLimited(_)
        | ClientError::Overloaded(_)
        | ClientError::StoreFull(_) => {
            let mut response = problem(
                Problem::IdemdUnavailable,
                &format!("idemd could not take the request ({code:?} {why}); retry later"),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            Some(response)
        }
        other => Some(problem(
            Problem::IdemdRejected,
            &format!("idemd refused the middleware's call: {code:?} {why}: {other}"),
        )),
    }
}

fn key_reused() -> Response<ResponseBody> {
    problem(
        Problem::KeyReused,
        "this Idempotency-Key was used for a different request (method, target or body)",
    )
}

fn in_progress(retry_after: Duration) -> Response<ResponseBody> {
    let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    let mut response = problem(
        Problem::RequestInProgress,
        "a request with this Idempotency-Key is still being processed",
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    response
}

fn bad_request(detail: &str) -> Response<ResponseBody> {
    let document = serde_json::json!({
        "type": "about:blank", "title": "Bad Request", "status": 400, "detail": detail,
    });
    problem_response(StatusCode::BAD_REQUEST, &document)
}

/// The stored response, with `Idempotent-Replayed: true`.
fn replay(result: Option<pb::Result>) -> Response<ResponseBody> {
    let result = result.unwrap_or_default();
    let status = u16::try_from(result.code)
        .ok()
        .and_then(|code| StatusCode::from_u16(code).ok());
    let Some(status) = status else {
        return problem(
            Problem::IdemdRejected,
            &format!(
                "the stored result has no HTTP status (code {}): the namespace holds records of another kind",
                result.code
            ),
        );
    };
    let mut response = Response::new(full(result.body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for (name, value) in &result.metadata {
        let Ok(header_name) = http::HeaderName::from_bytes(name.as_bytes()) else {
            tracing::error!(name, "a stored header name cannot be sent");
            continue;
        };
        let values: Vec<&str> = if name == "set-cookie" {
            value.split('\n').collect()
        } else {
            vec![value.as_str()]
        };
        for value in values {
            match HeaderValue::from_str(value) {
                Ok(value) => {
                    headers.append(header_name.clone(), value);
                }
                Err(_) => tracing::error!(name, "a stored header value cannot be sent"),
            }
        }
    }
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

/// A response body: bytes already read, then the error reading stopped at or the rest.
struct Prefixed<B> {
    prefix: Option<Bytes>,
    failed: Option<BoxError>,
    rest: Option<Pin<Box<B>>>,
}

impl<B> HttpBody for Prefixed<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(prefix) = self.prefix.take() {
            if !prefix.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(prefix))));
            }
        }
        if let Some(error) = self.failed.take() {
            return Poll::Ready(Some(Err(error)));
        }
        match self.rest.as_mut() {
            Some(rest) => rest.as_mut().poll_frame(cx).map_err(Into::into),
            None => Poll::Ready(None),
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The pieces: header, key, fingerprint form, storable statuses, kept headers, problems.
// ---------------------------------------------------------------------------------------------

/// What a request's `Idempotency-Key` fields hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedKey {
    /// No field.
    None,
    /// A usable key.
    Key(String),
    /// Not a usable key (400 `invalid-key`); the detail names the broken rule.
    Invalid(String),
}

/// Parses the `Idempotency-Key` field values (one per field line): a Structured Field string
/// (RFC 8941 §3.3.3) or a bare value, as clients/HTTP-MIDDLEWARE.md §2 says.
pub fn parse_idempotency_key(fields: &[&[u8]]) -> ParsedKey {
    let value = match fields {
        [] => return ParsedKey::None,
        [value] => *value,
        _ => return ParsedKey::Invalid("the Idempotency-Key field appears more than once".into()),
    };
    let start = value
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |i| i + 1);
    let value = &value[start..end];
    let mut key = Vec::with_capacity(value.len());
    if let Some(quoted) = value.strip_prefix(b"\"") {
        let mut bytes = quoted.iter();
        let mut closed = false;
        while let Some(&byte) = bytes.next() {
            match byte {
                b'\\' => match bytes.next() {
                    Some(&escaped @ (b'"' | b'\\')) => key.push(escaped),
                    _ => {
                        return ParsedKey::Invalid(
                            "the quoted Idempotency-Key has an escape other than \\\" or \\\\"
                                .into(),
                        )
                    }
                },
                b'"' => {
                    closed = true;
                    break;
                }
                _ => {
                    if let Some(bad) = bad_byte(byte) {
                        return ParsedKey::Invalid(bad);
                    }
                    key.push(byte);
                }
            }
        }
        if !closed {
            return ParsedKey::Invalid("the quoted Idempotency-Key has no closing quote".into());
        }
        if bytes.next().is_some() {
            return ParsedKey::Invalid(
                "the Idempotency-Key has text after its closing quote".into(),
            );
        }
    } else {
        for &byte in value {
            if let Some(bad) = bad_byte(byte) {
                return ParsedKey::Invalid(bad);
            }
            key.push(byte);
        }
        // Servers and proxies join repeated fields with ", ": a bare key with a comma reads as
        // two.
        if value.contains(&b',') {
            return ParsedKey::Invalid(
                "a bare Idempotency-Key must not contain ',' (it reads as two fields joined); quote it"
                    .into(),
            );
        }
    }
    if key.is_empty() {
        return ParsedKey::Invalid("the Idempotency-Key is empty".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return ParsedKey::Invalid(format!(
            "the Idempotency-Key is longer than {MAX_KEY_BYTES} bytes"
        ));
    }
    // Only 0x20–0x7E got here.
    match String::from_utf8(key) {
        Ok(key) => ParsedKey::Key(key),
        Err(_) => ParsedKey::Invalid("the Idempotency-Key is not ASCII".into()),
    }
}

fn bad_byte(byte: u8) -> Option<String> {
    match byte {
        0x00..=0x1f | 0x7f => Some(format!(
            "the Idempotency-Key contains a control character (0x{byte:02x})"
        )),
        0x80..=0xff => Some("the Idempotency-Key contains a byte outside printable ASCII".into()),
        _ => None,
    }
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The idemd key of an Idempotency-Key under a scope: `tag:key`, or `tag#sha256(key)` when that
/// would pass 255 bytes (`tag`: the first 32 hex digits of SHA-256 of the scope).
pub fn idemd_key(scope: &str, key: &str) -> String {
    let mut tag = sha256_hex(scope.as_bytes());
    tag.truncate(32);
    let plain = format!("{tag}:{key}");
    if plain.len() <= MAX_KEY_BYTES {
        plain
    } else {
        format!("{tag}#{}", sha256_hex(key.as_bytes()))
    }
}

/// Whether a content type is JSON: `application/json` or any `type/subtype+json`.
pub fn is_json_content_type(content_type: &str) -> bool {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media == "application/json" {
        return true;
    }
    match media.split_once('/') {
        Some((kind, subtype)) => {
            !kind.is_empty()
                && subtype.len() > "+json".len()
                && subtype.ends_with("+json")
                && !subtype.contains('/')
                && !media.contains(char::is_whitespace)
        }
        None => false,
    }
}

/// The value whose [`fingerprint`](crate::fingerprint) is the request's fingerprint:
/// `{"method", "target", "json"}` or `{"method", "target", "bytes"}`, plus `"headers"` when
/// configured (clients/HTTP-MIDDLEWARE.md §3).
pub fn fingerprint_form(
    method: &str,
    target: &str,
    content_type: Option<&str>,
    body: &[u8],
    headers: &HeaderMap,
    options: &FingerprintOptions,
) -> serde_json::Value {
    let mut form = serde_json::Map::new();
    form.insert("method".into(), method.to_ascii_uppercase().into());
    form.insert("target".into(), target.into());
    let json = content_type
        .filter(|ct| is_json_content_type(ct))
        .and_then(|_| serde_json::from_slice::<serde_json::Value>(body).ok());
    match json {
        Some(mut value) => {
            if let serde_json::Value::Object(fields) = &mut value {
                if !options.include.is_empty() {
                    fields.retain(|name, _| options.include.iter().any(|i| i == name));
                } else if !options.exclude.is_empty() {
                    fields.retain(|name, _| !options.exclude.iter().any(|e| e == name));
                }
            }
            form.insert("json".into(), value);
        }
        None => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(body);
            form.insert("bytes".into(), encoded.into());
        }
    }
    if !options.headers.is_empty() {
        let mut chosen = serde_json::Map::new();
        for name in &options.headers {
            let name = name.to_ascii_lowercase();
            let values: Vec<String> = headers
                .get_all(name.as_str())
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            if !values.is_empty() {
                chosen.insert(name, values.join(", ").into());
            }
        }
        form.insert("headers".into(), chosen.into());
    }
    serde_json::Value::Object(form)
}

/// The default storable statuses: 200–499 except 408, 409, 425 and 429.
pub fn is_storable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 200..=499) && !matches!(status.as_u16(), 408 | 409 | 425 | 429)
}

/// The stored metadata of a response's headers: kept names in lower case, repeated fields joined
/// by ", " (`set-cookie` by "\n").
pub fn kept_headers(headers: &HeaderMap, keep: &[String]) -> BTreeMap<String, String> {
    let mut kept = BTreeMap::new();
    for name in keep {
        let name = name.to_ascii_lowercase();
        let values: Vec<String> = headers
            .get_all(name.as_str())
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        if !values.is_empty() {
            let separator = if name == "set-cookie" { "\n" } else { ", " };
            kept.insert(name, values.join(separator));
        }
    }
    kept
}

/// The middleware's own answers (clients/HTTP-MIDDLEWARE.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    MissingKey,
    InvalidKey,
    RequestInProgress,
    RequestTooLarge,
    KeyReused,
    IdemdRejected,
    IdemdUnavailable,
}

impl Problem {
    /// The anchor of its `type` URI.
    pub fn slug(self) -> &'static str {
        match self {
            Problem::MissingKey => "missing-key",
            Problem::InvalidKey => "invalid-key",
            Problem::RequestInProgress => "request-in-progress",
            Problem::RequestTooLarge => "request-too-large",
            Problem::KeyReused => "key-reused",
            Problem::IdemdRejected => "idemd-rejected",
            Problem::IdemdUnavailable => "idemd-unavailable",
        }
    }
    pub fn status(self) -> StatusCode {
        match self {
            Problem::MissingKey | Problem::InvalidKey => StatusCode::BAD_REQUEST,
            Problem::RequestInProgress => StatusCode::CONFLICT,
            Problem::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Problem::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Problem::IdemdRejected => StatusCode::INTERNAL_SERVER_ERROR,
            Problem::IdemdUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
    pub fn title(self) -> &'static str {
        match self {
            Problem::MissingKey => "Idempotency-Key required",
            Problem::InvalidKey => "Invalid Idempotency-Key",
            Problem::RequestInProgress => "Request in progress",
            Problem::RequestTooLarge => "Request too large",
            Problem::KeyReused => "Idempotency-Key reused",
            Problem::IdemdRejected => "idemd rejected the request",
            Problem::IdemdUnavailable => "idemd unavailable",
        }
    }
    /// The RFC 9457 problem document.
    pub fn document(self, detail: &str) -> serde_json::Value {
        serde_json::json!({
            "type": format!("{PROBLEM_BASE}{}", self.slug()),
            "title": self.title(),
            "status": self.status().as_u16(),
            "detail": detail,
        })
    }
}

/// The problem answer `problem` with `detail`, as `application/problem+json`.
pub fn problem(problem: Problem, detail: &str) -> Response<ResponseBody> {
    problem_response(problem.status(), &problem.document(detail))
}

fn problem_response(status: StatusCode, document: &serde_json::Value) -> Response<ResponseBody> {
    let mut response = Response::new(full(document.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(fields: &[&str]) -> ParsedKey {
        let fields: Vec<&[u8]> = fields.iter().map(|f| f.as_bytes()).collect();
        parse_idempotency_key(&fields)
    }

    #[test]
    fn quoted_and_bare_forms_are_one_key() {
        assert_eq!(parse(&["\"abc\""]), ParsedKey::Key("abc".into()));
        assert_eq!(parse(&["abc"]), ParsedKey::Key("abc".into()));
        assert_eq!(parse(&[" \t\"abc\"\t "]), ParsedKey::Key("abc".into()));
        assert_eq!(parse(&["a b"]), ParsedKey::Key("a b".into()));
        // A comma is fine inside a quoted key (only a bare one reads as two joined fields).
        assert_eq!(parse(&["\"k1, k2\""]), ParsedKey::Key("k1, k2".into()));
        assert_eq!(parse(&[r#""a\"b\\c""#]), ParsedKey::Key(r#"a"b\c"#.into()));
        assert_eq!(parse(&[]), ParsedKey::None);
        let long = "a".repeat(255);
        assert_eq!(parse(&[&long]), ParsedKey::Key(long.clone()));
    }

    #[test]
    fn malformed_keys_are_invalid_and_say_why() {
        let long = "a".repeat(256);
        let quoted_long = format!("\"{long}\"");
        let cases: [(&[&[u8]], &str); 17] = [
            (&[b"\"\""], "empty"),
            (&[b""], "empty"),
            (&[b"   "], "empty"),
            (&[long.as_bytes()], "longer than 255"),
            (&[quoted_long.as_bytes()], "longer than 255"),
            (&[b"a\x01b"], "control character (0x01)"),
            (&[b"a\tb"], "control character (0x09)"),
            (&[b"a\x7fb"], "control character (0x7f)"),
            (&[b"\"a\x00\""], "control character (0x00)"),
            (&[b"a\xc3\xa9b"], "outside printable ASCII"),
            (&[b"\"abc"], "no closing quote"),
            (&[b"\"ab\"c"], "after its closing quote"),
            (&[br#""a\nb""#], "escape"),
            (&[b"\"a\\"], "escape"),
            (&[b"a", b"b"], "more than once"),
            (&[b"k1, k2"], "must not contain ','"),
            (&[b"k1,k2"], "must not contain ','"),
        ];
        for (fields, why) in cases {
            match parse_idempotency_key(fields) {
                ParsedKey::Invalid(detail) => assert!(detail.contains(why), "{fields:?}: {detail}"),
                other => panic!("{fields:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn key_derivation_vectors() {
        assert_eq!(idemd_key("", "abc"), "e3b0c44298fc1c149afbf4c8996fb924:abc");
        let tag = &sha256_hex(b"tenant-a")[..32];
        assert_eq!(idemd_key("tenant-a", "abc"), format!("{tag}:abc"));
        assert_ne!(idemd_key("tenant-a", "abc"), idemd_key("tenant-b", "abc"));
        let k222 = "k".repeat(222);
        assert_eq!(
            idemd_key("", &k222),
            format!("e3b0c44298fc1c149afbf4c8996fb924:{k222}")
        );
        assert_eq!(idemd_key("", &k222).len(), 255);
        let k223 = "k".repeat(223);
        assert_eq!(
            idemd_key("", &k223),
            format!(
                "e3b0c44298fc1c149afbf4c8996fb924#{}",
                sha256_hex(k223.as_bytes())
            )
        );
        assert_eq!(
            idemd_key("ü", "x"),
            format!("{}:x", &sha256_hex("ü".as_bytes())[..32])
        );
    }

    #[test]
    fn fingerprint_form_canonical_json_or_base64() {
        let none = HeaderMap::new();
        let options = FingerprintOptions::default();
        let form = fingerprint_form(
            "post",
            "/orders?b=2&a=%20",
            Some("application/json; charset=utf-8"),
            br#"{ "b": 1, "a": [2, {"y": 1, "x": 0}] }"#,
            &none,
            &options,
        );
        let canonical = r#"{"json":{"a":[2,{"x":0,"y":1}],"b":1},"method":"POST","target":"/orders?b=2&a=%20"}"#;
        assert_eq!(
            crate::fingerprint(&form).expect("fingerprint"),
            Sha256::digest(canonical.as_bytes()).to_vec()
        );
        let text = fingerprint_form("PATCH", "/x", Some("text/plain"), b"hi", &none, &options);
        assert_eq!(
            text,
            serde_json::json!({"method": "PATCH", "target": "/x", "bytes": "aGk="})
        );
        let empty = fingerprint_form("POST", "/x", None, b"", &none, &options);
        assert_eq!(
            empty,
            serde_json::json!({"method": "POST", "target": "/x", "bytes": ""})
        );
        let broken = fingerprint_form(
            "POST",
            "/x",
            Some("application/json"),
            b"{",
            &none,
            &options,
        );
        assert_eq!(
            broken,
            serde_json::json!({"method": "POST", "target": "/x", "bytes": "ew=="})
        );
        let not_utf8 = fingerprint_form(
            "POST",
            "/x",
            Some("application/json"),
            b"\"\xff\"",
            &none,
            &options,
        );
        assert_eq!(not_utf8["bytes"], "Iv8i");
        assert!(is_json_content_type("application/problem+json"));
        assert!(is_json_content_type("Application/JSON ; charset=utf-8"));
        assert!(!is_json_content_type("application/jsonx"));
        assert!(!is_json_content_type("text/plain"));
    }

    #[test]
    fn fingerprint_form_include_exclude_headers() {
        let mut headers = HeaderMap::new();
        headers.append("x-account", HeaderValue::from_static("a"));
        headers.append("x-account", HeaderValue::from_static("b"));
        let body = br#"{"amount":5,"ts":"2026-12-02","note":"x"}"#;
        let form = |options: FingerprintOptions| {
            fingerprint_form(
                "POST",
                "/o",
                Some("application/json"),
                body,
                &headers,
                &options,
            )
        };
        let exclude = form(FingerprintOptions {
            exclude: vec!["ts".into()],
            ..Default::default()
        });
        assert_eq!(
            exclude["json"],
            serde_json::json!({"amount": 5, "note": "x"})
        );
        let include = form(FingerprintOptions {
            include: vec!["amount".into()],
            ..Default::default()
        });
        assert_eq!(include["json"], serde_json::json!({"amount": 5}));
        let with_headers = form(FingerprintOptions {
            headers: vec!["X-Account".into(), "x-missing".into()],
            ..Default::default()
        });
        assert_eq!(
            with_headers["headers"],
            serde_json::json!({"x-account": "a, b"})
        );
        assert!(form(FingerprintOptions::default()).get("headers").is_none());
    }

    #[test]
    fn storable_statuses() {
        for code in [200, 201, 204, 303, 400, 404, 422, 499] {
            assert!(
                is_storable(StatusCode::from_u16(code).expect("status")),
                "{code}"
            );
        }
        for code in [100, 199, 408, 409, 425, 429, 500, 503] {
            assert!(
                !is_storable(StatusCode::from_u16(code).expect("status")),
                "{code}"
            );
        }
    }

    #[test]
    fn kept_headers_lower_case_joined() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("location", HeaderValue::from_static("/orders/1"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        headers.append("link", HeaderValue::from_static("<a>"));
        headers.append("link", HeaderValue::from_static("<b>"));
        headers.insert("x-run", HeaderValue::from_static("r"));
        let keep: Vec<String> = DEFAULT_KEEP_HEADERS
            .iter()
            .map(|h| (*h).to_owned())
            .collect();
        let kept = kept_headers(&headers, &keep);
        let expected: BTreeMap<String, String> = [
            ("content-type", "application/json"),
            ("link", "<a>, <b>"),
            ("location", "/orders/1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(kept, expected);
        let cookies = kept_headers(&headers, &["Set-Cookie".to_owned()]);
        assert_eq!(
            cookies.get("set-cookie").map(String::as_str),
            Some("a=1\nb=2")
        );
    }

    #[test]
    fn problem_documents() {
        let all = [
            (Problem::MissingKey, 400),
            (Problem::InvalidKey, 400),
            (Problem::RequestInProgress, 409),
            (Problem::RequestTooLarge, 413),
            (Problem::KeyReused, 422),
            (Problem::IdemdRejected, 500),
            (Problem::IdemdUnavailable, 503),
        ];
        for (kind, status) in all {
            let document = kind.document("why");
            assert_eq!(
                document["type"],
                format!(
                    "https://github.com/idemd/idemd/blob/main/clients/HTTP-MIDDLEWARE.md#{}",
                    kind.slug()
                )
            );
            assert_eq!(document["status"], status);
            assert_eq!(document["detail"], "why");
            assert!(!kind.title().is_empty());
            let response = problem(kind, "why");
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(
                response.headers()[header::CONTENT_TYPE],
                "application/problem+json"
            );
        }
        let replayed = replay(Some(pb::Result {
            body: b"{}".to_vec(),
            code: 201,
            metadata: [
                ("content-type".to_owned(), "application/json".to_owned()),
                ("set-cookie".to_owned(), "a=1\nb=2".to_owned()),
            ]
            .into_iter()
            .collect(),
        }));
        assert_eq!(replayed.status(), StatusCode::CREATED);
        assert_eq!(replayed.headers()["idempotent-replayed"], "true");
        assert_eq!(replayed.headers().get_all("set-cookie").iter().count(), 2);
        let foreign = replay(Some(pb::Result {
            code: 0,
            ..Default::default()
        }));
        assert_eq!(foreign.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn retry_after_is_whole_seconds_at_least_one() {
        for (retry_after, expected) in [(0, "1"), (300, "1"), (1000, "1"), (1001, "2"), (2500, "3")]
        {
            let response = in_progress(Duration::from_millis(retry_after));
            assert_eq!(
                response.headers()[header::RETRY_AFTER],
                expected,
                "{retry_after} ms"
            );
        }
    }
}
