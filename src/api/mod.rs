//! The gRPC service: admit the call, decode the request into a domain command, run it on the
//! store, encode the answer — and account for it (one span, metrics). Rules live in `domain`,
//! storage in `store`.

pub mod content_type;
mod deadline;
pub mod decode;
mod encode;
pub mod status;

use std::{future::Future, sync::Arc};

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::{Code, Request, Response, Status};
use tracing::{field, Instrument, Span};

use crate::auth::{AuthState, Caller, Credentials, PeerIdentities, Rpc, Throttled};
use crate::domain::{AcquireOutcome, Key, Limits, Namespace, WaitOutcome};
use crate::proto::idempotency::v1 as pb;
use crate::proto::idempotency::v1::idempotency_service_server::IdempotencyService;
use crate::store::{Store, StoreError};
use crate::telemetry::metrics;

/// `idempotency.v1.IdempotencyService` over any store.
pub struct IdempotencyApi<S> {
    store: Arc<S>,
    limits: Limits,
    /// Bounds the RPCs served at once; past it calls are shed with RESOURCE_EXHAUSTED at once,
    /// never queued.
    admission: Arc<Semaphore>,
    /// Bounds the Waits in progress (they are long, so they have their own budget and hold no
    /// database connection while waiting).
    waiters: Arc<Semaphore>,
    /// The access policy; `None` when auth is off (every caller may do everything).
    auth: Option<Arc<AuthState>>,
    metrics: metrics::RpcMetrics,
}

impl<S> IdempotencyApi<S> {
    pub fn new(
        store: Arc<S>,
        limits: Limits,
        max_concurrent_rpcs: usize,
        max_waiters: usize,
        auth: Option<Arc<AuthState>>,
    ) -> Self {
        Self {
            store,
            limits,
            admission: Arc::new(Semaphore::new(max_concurrent_rpcs.max(1))),
            waiters: Arc::new(Semaphore::new(max_waiters.max(1))),
            auth,
            metrics: metrics::RpcMetrics::new(&Rpc::ALL.map(Rpc::name)),
        }
    }
}

/// What one RPC carries through its life: its span, start time, deadline and credentials.
struct Call<'a> {
    rpc: Rpc,
    metrics: &'a metrics::RpcMetrics,
    span: Span,
    started: Instant,
    deadline: Option<Instant>,
    bearer: Option<String>,
    peer: Option<PeerIdentities>,
    /// Accounted for (by `finish`, or by `Drop` when tonic abandoned the call).
    finished: bool,
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer_token<T>(request: &Request<T>) -> Option<String> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

impl<'a> Call<'a> {
    fn begin<T>(rpc: Rpc, request: &Request<T>, metrics: &'a metrics::RpcMetrics) -> Self {
        let started = Instant::now();
        let span = tracing::info_span!(
            "rpc",
            method = rpc.name(),
            caller = field::Empty,
            namespace = field::Empty,
            outcome = field::Empty,
            code = field::Empty,
            duration_ms = field::Empty,
        );
        Self {
            rpc,
            metrics,
            span,
            started,
            deadline: deadline::from_metadata(request.metadata(), started),
            bearer: bearer_token(request),
            peer: request.extensions().get::<PeerIdentities>().cloned(),
            finished: false,
        }
    }

    /// The caller behind the request's credentials (a bearer token first, else the client
    /// certificate), or UNAUTHENTICATED.
    fn authenticate(&self, auth: &AuthState) -> Result<Arc<Caller>, Status> {
        let policy = auth.policy();
        let names = self.peer.as_ref().map(|peer| peer.0.as_slice());
        let (credentials, kind) = match (&self.bearer, names) {
            (Some(token), _) => (Credentials::Bearer(token), "unknown bearer token"),
            (None, Some(names)) if !names.is_empty() => (
                Credentials::Certificate(names),
                "unknown client certificate",
            ),
            _ => (Credentials::None, "no credentials"),
        };
        match policy.authenticate(credentials) {
            Some(caller) => {
                self.span.record("caller", caller.name.as_str());
                Ok(caller)
            }
            None => {
                audit("-", None, self.rpc, kind);
                metrics::auth_denied("unauthenticated");
                Err(status::unauthenticated())
            }
        }
    }

    /// What the RPC's work needs of the call.
    fn scope(&self, caller: Option<Arc<Caller>>) -> Scope {
        Scope {
            rpc: self.rpc,
            span: self.span.clone(),
            deadline: self.deadline,
            caller,
        }
    }

    fn finish<T>(mut self, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        self.account(code);
    }

    fn account(&mut self, code: Code) {
        self.finished = true;
        let elapsed = self.started.elapsed();
        let label = metrics::code_label(code);
        self.span.record("code", label);
        self.span
            .record("duration_ms", elapsed.as_secs_f64() * 1000.0);
        self.metrics.finished(self.rpc.name(), code, elapsed);
        let _entered = self.span.enter();
        match code {
            Code::Ok => tracing::debug!("rpc finished"),
            Code::Internal | Code::Unknown | Code::DataLoss => tracing::error!("rpc failed"),
            Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded => {
                tracing::warn!("rpc failed")
            }
            _ => tracing::info!("rpc refused"),
        }
    }
}

/// Logs a refused call for the audit trail: who, where, what, why. Never tokens or bodies.
fn audit(caller: &str, namespace: Option<&Namespace>, rpc: Rpc, reason: &str) {
    tracing::warn!(
        target: "idemd::audit",
        caller,
        namespace = namespace.map(Namespace::as_str).unwrap_or("-"),
        rpc = rpc.name(),
        reason,
        "call denied"
    );
}

/// The part of a call its work sees: the span to annotate, the caller's deadline, and who the
/// caller is (`None` when auth is off).
struct Scope {
    rpc: Rpc,
    span: Span,
    deadline: Option<Instant>,
    caller: Option<Arc<Caller>>,
}

impl Scope {
    /// PERMISSION_DENIED unless the caller may call this RPC in `namespace`. Checked before the
    /// store is asked anything, so a refusal reveals nothing about the key.
    fn authorize(&self, namespace: &Namespace) -> Result<(), Status> {
        match &self.caller {
            Some(caller) if !caller.allows(self.rpc, namespace) => {
                audit(&caller.name, Some(namespace), self.rpc, "not granted");
                metrics::auth_denied("permission_denied");
                Err(status::permission_denied(&caller.name, self.rpc, namespace))
            }
            _ => Ok(()),
        }
    }

    /// Names the validated key in the span. Keys are logged at debug level only.
    fn target(&self, namespace: &Namespace, key: &Key) {
        self.span.record("namespace", namespace.as_str());
        tracing::debug!(parent: &self.span, key = key.as_str(), "request");
    }

    fn outcome(&self, outcome: &'static str) {
        self.span.record("outcome", outcome);
    }
}

/// A call whose future was dropped (tonic gave up at the client's deadline, or the client went
/// away) is still counted and logged, as CANCELLED.
impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.account(Code::Cancelled);
        }
    }
}

fn acquire_outcome_label(outcome: &AcquireOutcome) -> &'static str {
    match outcome {
        AcquireOutcome::Acquired {
            taken_over: false, ..
        } => "acquired",
        AcquireOutcome::Acquired {
            taken_over: true, ..
        } => "takeover",
        AcquireOutcome::InProgress { .. } => "in_progress",
        AcquireOutcome::Completed { .. } => "completed",
    }
}

impl<S: Store> IdempotencyApi<S> {
    /// Admits, runs and accounts for one RPC.
    async fn serve<T, Fut>(
        &self,
        call: Call<'_>,
        work: impl FnOnce(Scope) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        Fut: Future<Output = Result<T, Status>>,
    {
        let _in_flight = self.metrics.in_flight();
        let result = self.admit_and_run(&call, work).await;
        call.finish(&result);
        result.map(Response::new)
    }

    /// Authentication, the caller's own limits, then the server's, then the work.
    async fn admit_and_run<T, Fut>(
        &self,
        call: &Call<'_>,
        work: impl FnOnce(Scope) -> Fut,
    ) -> Result<T, Status>
    where
        Fut: Future<Output = Result<T, Status>>,
    {
        let (caller, _caller_permit) = match &self.auth {
            None => (None, None),
            Some(auth) => {
                let caller = call.authenticate(auth)?;
                match auth.limiter.admit(&caller.name, caller.limits) {
                    Ok(permit) => (Some(caller), Some(permit)),
                    Err(throttled) => {
                        let why = match throttled {
                            Throttled::Rate => "rate limit",
                            Throttled::Concurrency => "concurrency limit",
                        };
                        audit(&caller.name, None, call.rpc, why);
                        metrics::auth_denied("caller_limited");
                        return Err(status::caller_limited(&caller.name, why));
                    }
                }
            }
        };
        let admitted = if call.rpc == Rpc::Wait {
            self.waiters
                .clone()
                .try_acquire_owned()
                .map_err(|_| status::too_many_waiters())
        } else {
            self.admission
                .clone()
                .try_acquire_owned()
                .map_err(|_| status::overloaded())
        };
        let _permit = admitted?;
        work(call.scope(caller)).instrument(call.span.clone()).await
    }
}

#[tonic::async_trait]
impl<S: Store> IdempotencyService for IdempotencyApi<S> {
    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let call = Call::begin(Rpc::Acquire, &request, &self.metrics);
        self.serve(call, |call| async move {
            let command = decode::acquire(request.into_inner(), &self.limits)
                .map_err(status::invalid_argument)?;
            call.target(&command.namespace, &command.key);
            call.authorize(&command.namespace)?;
            match self.store.acquire(command, call.deadline).await {
                Ok(outcome) => {
                    let label = acquire_outcome_label(&outcome);
                    call.outcome(label);
                    self.metrics.acquire_outcome(label);
                    Ok(encode::acquire(outcome))
                }
                Err(error) => {
                    if matches!(error, StoreError::FingerprintMismatch) {
                        call.outcome("fingerprint_mismatch");
                        self.metrics.acquire_outcome("fingerprint_mismatch");
                    }
                    Err(status::from_store(error))
                }
            }
        })
        .await
    }

    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        let call = Call::begin(Rpc::Complete, &request, &self.metrics);
        self.serve(call, |call| async move {
            let command = decode::complete(request.into_inner(), &self.limits)
                .map_err(status::invalid_argument)?;
            call.target(&command.namespace, &command.key);
            call.authorize(&command.namespace)?;
            let record = self
                .store
                .complete(command, call.deadline)
                .await
                .map_err(status::from_store)?;
            call.outcome("completed");
            Ok(pb::CompleteResponse {
                record: Some(encode::record(record)),
            })
        })
        .await
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let call = Call::begin(Rpc::Release, &request, &self.metrics);
        self.serve(call, |call| async move {
            let command =
                decode::release(request.into_inner()).map_err(status::invalid_argument)?;
            call.target(&command.namespace, &command.key);
            call.authorize(&command.namespace)?;
            self.store
                .release(command, call.deadline)
                .await
                .map_err(status::from_store)?;
            call.outcome("released");
            Ok(pb::ReleaseResponse {})
        })
        .await
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let call = Call::begin(Rpc::Renew, &request, &self.metrics);
        self.serve(call, |call| async move {
            let command = decode::renew(request.into_inner(), &self.limits)
                .map_err(status::invalid_argument)?;
            call.target(&command.namespace, &command.key);
            call.authorize(&command.namespace)?;
            let lease = self
                .store
                .renew(command, call.deadline)
                .await
                .map_err(status::from_store)?;
            call.outcome("renewed");
            Ok(pb::RenewResponse {
                lease: Some(encode::lease(&lease)),
            })
        })
        .await
    }

    async fn wait(
        &self,
        request: Request<pb::WaitRequest>,
    ) -> Result<Response<pb::WaitResponse>, Status> {
        let call = Call::begin(Rpc::Wait, &request, &self.metrics);
        self.serve(call, |call| async move {
            let command = decode::wait(request.into_inner(), &self.limits)
                .map_err(status::invalid_argument)?;
            call.target(&command.namespace, &command.key);
            call.authorize(&command.namespace)?;
            let outcome = self
                .store
                .wait(command, call.deadline)
                .await
                .map_err(status::from_store)?;
            call.outcome(match &outcome {
                WaitOutcome::Completed { .. } => "completed",
                WaitOutcome::Free { .. } => "free",
                WaitOutcome::TimedOut { .. } => "timed_out",
            });
            Ok(encode::wait(outcome))
        })
        .await
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let call = Call::begin(Rpc::Get, &request, &self.metrics);
        self.serve(call, |call| async move {
            let command = decode::get(request.into_inner()).map_err(status::invalid_argument)?;
            call.target(&command.namespace, &command.key);
            call.authorize(&command.namespace)?;
            let record = self
                .store
                .get(command, call.deadline)
                .await
                .map_err(status::from_store)?;
            call.outcome("found");
            Ok(pb::GetResponse {
                record: Some(encode::record(record)),
            })
        })
        .await
    }
}
