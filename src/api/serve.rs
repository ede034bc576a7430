//! The one path every RPC takes: account for the call (span, metrics), take the caller that
//! `authenticate` established before the message was decoded, apply the caller's limits and the
//! server's, decode, authorise the command's target, and only then run it on the store. The store
//! is a private field of this module: an RPC has no other way to it.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::{Code, Request, Response, Status};
use tracing::{field, Instrument, Span};

use super::commands::Command;
use super::{authenticate, deadline, status};
use crate::auth::{AuthState, Caller, Rpc, Throttled};
use crate::domain::{Key, Limits, Namespace};
use crate::proto::idempotency::v1::idempotency_service_server::IdempotencyServiceServer;
use crate::store::{Store, StoreError};
use crate::telemetry::{metrics, traces};

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
    metrics: Arc<metrics::RpcMetrics>,
}

impl<S: Store> IdempotencyApi<S> {
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
            metrics: Arc::new(metrics::RpcMetrics::new(&Rpc::ALL.map(Rpc::name))),
        }
    }

    /// The service as a server mounts it: callers are authenticated from the request's headers
    /// and peer certificate before their message is decoded, then messages up to
    /// `max_message_bytes` are decoded and served.
    pub fn into_service(
        self,
        max_message_bytes: usize,
    ) -> authenticate::Authenticate<IdempotencyServiceServer<Self>> {
        let auth = self.auth.clone();
        let metrics = self.metrics.clone();
        let server =
            IdempotencyServiceServer::new(self).max_decoding_message_size(max_message_bytes);
        authenticate::Authenticate::new(server, auth, metrics)
    }

    /// Admits, runs and accounts for one RPC.
    pub(super) async fn serve<C: Command>(
        &self,
        request: Request<C::Request>,
    ) -> Result<Response<C::Response>, Status> {
        let call = Call::begin(C::RPC, request.metadata().as_ref(), &self.metrics);
        let _in_flight = self.metrics.in_flight();
        let result = self
            .admit_and_run::<C>(&call, request)
            .instrument(call.span.clone())
            .await;
        call.finish(&result);
        result.map(Response::new)
    }

    /// The caller's limits, then the server's, then decoding, authorisation and the work.
    async fn admit_and_run<C: Command>(
        &self,
        call: &Call<'_>,
        mut request: Request<C::Request>,
    ) -> Result<C::Response, Status> {
        let (caller, _caller_permit) = match &self.auth {
            None => (None, None),
            Some(auth) => {
                let Some(authenticate::Authenticated(caller)) = request.extensions_mut().remove()
                else {
                    // Only a service mounted without `into_service` gets here: refuse.
                    tracing::error!("the API is mounted without authentication; refusing");
                    return Err(status::unauthenticated());
                };
                call.span.record("caller", caller.name.as_str());
                match auth.limiter.admit(&caller.name, caller.limits) {
                    Ok(permit) => (Some(caller), Some(permit)),
                    Err(throttled) => {
                        let why = match throttled {
                            Throttled::Rate => "rate limit",
                            Throttled::Concurrency => "concurrency limit",
                        };
                        // Refused before decoding: the namespace the request names, if valid
                        // (the log never carries one that breaks the rules).
                        let namespace =
                            Namespace::parse(C::requested_namespace(request.get_ref()).to_owned())
                                .ok();
                        audit(
                            &caller.name,
                            namespace.as_ref(),
                            call.rpc,
                            status::reason::CALLER_LIMITED,
                            why,
                        );
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
        let command =
            C::decode(request.into_inner(), &self.limits).map_err(status::invalid_argument)?;
        let (namespace, key) = command.target();
        call.target(namespace, key);
        call.authorize(caller.as_deref(), namespace)?;
        match command.run(self.store.as_ref(), call.deadline).await {
            Ok((response, outcome)) => {
                call.outcome(outcome);
                if C::COUNTS_OUTCOMES {
                    self.metrics.acquire_outcome(outcome);
                }
                Ok(response)
            }
            Err(error) => {
                if C::COUNTS_OUTCOMES && matches!(error, StoreError::FingerprintMismatch) {
                    call.outcome("fingerprint_mismatch");
                    self.metrics.acquire_outcome("fingerprint_mismatch");
                }
                Err(status::from_store(error))
            }
        }
    }
}

/// What one RPC carries through its life: its span, start time and deadline.
pub(super) struct Call<'a> {
    rpc: Rpc,
    metrics: &'a metrics::RpcMetrics,
    span: Span,
    started: Instant,
    deadline: Option<Instant>,
    /// Accounted for (by `finish`, or by `Drop` when tonic abandoned the call).
    finished: bool,
}

impl<'a> Call<'a> {
    pub(super) fn begin(
        rpc: Rpc,
        headers: &tonic::codegen::http::HeaderMap,
        metrics: &'a metrics::RpcMetrics,
    ) -> Self {
        let started = Instant::now();
        let span = tracing::info_span!(
            "rpc",
            method = rpc.name(),
            caller = field::Empty,
            namespace = field::Empty,
            outcome = field::Empty,
            code = field::Empty,
            duration_ms = field::Empty,
            trace_id = field::Empty,
            // Read by the trace layer (the OTel span's name and kind); never set without it.
            otel.name = field::Empty,
            otel.kind = field::Empty,
        );
        if traces::enabled() {
            traces::begin_rpc(&span, rpc, headers);
        }
        Self {
            rpc,
            metrics,
            span,
            started,
            deadline: deadline::from_headers(headers, started),
            finished: false,
        }
    }

    /// PERMISSION_DENIED unless the caller (`None` when auth is off) may call this RPC in
    /// `namespace`. Checked before the store is asked anything, so a refusal reveals nothing
    /// about the key.
    fn authorize(&self, caller: Option<&Caller>, namespace: &Namespace) -> Result<(), Status> {
        match caller {
            Some(caller) if !caller.allows(self.rpc, namespace) => {
                audit(
                    &caller.name,
                    Some(namespace),
                    self.rpc,
                    status::reason::PERMISSION_DENIED,
                    "not granted",
                );
                metrics::auth_denied("permission_denied");
                Err(status::permission_denied(&caller.name, self.rpc, namespace))
            }
            _ => Ok(()),
        }
    }

    /// Names the validated key in the span. Keys are logged at debug level only.
    fn target(&self, namespace: &Namespace, key: &Key) {
        self.span.record("namespace", namespace.as_str());
        if traces::enabled() {
            traces::rpc_target(&self.span, namespace.as_str(), key.as_str());
        }
        tracing::debug!(parent: &self.span, key = key.as_str(), "request");
    }

    fn outcome(&self, outcome: &'static str) {
        self.span.record("outcome", outcome);
        if traces::enabled() {
            traces::rpc_outcome(&self.span, outcome);
        }
    }

    /// The call's span, to record fields in and run its work under.
    pub(super) fn span(&self) -> &Span {
        &self.span
    }

    pub(super) fn finish<T>(mut self, result: &Result<T, Status>) {
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
        if traces::enabled() {
            traces::finish_rpc(&self.span, code, label);
        }
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

/// A call whose future was dropped (tonic gave up at the client's deadline, or the client went
/// away) is still counted and logged, as CANCELLED.
impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.account(Code::Cancelled);
        }
    }
}

/// Logs a refused call for the audit trail: who, where, what, why. `reason` is the ErrorInfo
/// reason the caller got (docs/SECURITY.md, "Answers"), `detail` what exactly was wrong; the
/// namespace is "-" when none was read. Never tokens or bodies.
pub(super) fn audit(
    caller: &str,
    namespace: Option<&Namespace>,
    rpc: Rpc,
    reason: &str,
    detail: &str,
) {
    tracing::warn!(
        target: "idemd::audit",
        caller,
        namespace = namespace.map(Namespace::as_str).unwrap_or("-"),
        rpc = rpc.name(),
        reason,
        detail,
        "call denied"
    );
}
