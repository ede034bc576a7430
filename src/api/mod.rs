//! The gRPC service: admit the call, decode the request into a domain command, run it on the
//! store, encode the answer — and account for it (one span, metrics). Rules live in `domain`,
//! storage in `store`.

mod deadline;
mod decode;
mod encode;
pub mod status;

use std::{future::Future, sync::Arc};

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::{Code, Request, Response, Status};
use tracing::{field, Instrument, Span};

use crate::domain::{AcquireOutcome, Key, Limits, Namespace};
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
}

impl<S> IdempotencyApi<S> {
    pub fn new(store: Arc<S>, limits: Limits, max_concurrent_rpcs: usize) -> Self {
        Self {
            store,
            limits,
            admission: Arc::new(Semaphore::new(max_concurrent_rpcs.max(1))),
        }
    }
}

/// What one RPC carries through its life: its span, start time and deadline.
struct Call {
    method: &'static str,
    span: Span,
    started: Instant,
    deadline: Option<Instant>,
}

impl Call {
    fn begin<T>(method: &'static str, request: &Request<T>) -> Self {
        let started = Instant::now();
        let span = tracing::info_span!(
            "rpc",
            method,
            namespace = field::Empty,
            outcome = field::Empty,
            code = field::Empty,
            duration_ms = field::Empty,
        );
        Self {
            method,
            span,
            started,
            deadline: deadline::from_metadata(request.metadata(), started),
        }
    }

    /// What the RPC's work needs of the call.
    fn scope(&self) -> Scope {
        Scope {
            span: self.span.clone(),
            deadline: self.deadline,
        }
    }

    fn finish<T>(self, result: &Result<T, Status>) {
        let elapsed = self.started.elapsed();
        let code = match result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        let label = metrics::code_label(code);
        self.span.record("code", label);
        self.span
            .record("duration_ms", elapsed.as_secs_f64() * 1000.0);
        metrics::rpc_finished(self.method, code, elapsed);
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

/// The part of a call its work sees: the span to annotate and the caller's deadline.
struct Scope {
    span: Span,
    deadline: Option<Instant>,
}

impl Scope {
    /// Names the validated key in the span. Keys are logged at debug level only.
    fn target(&self, namespace: &Namespace, key: &Key) {
        self.span.record("namespace", namespace.as_str());
        tracing::debug!(parent: &self.span, key = key.as_str(), "request");
    }

    fn outcome(&self, outcome: &'static str) {
        self.span.record("outcome", outcome);
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
        call: Call,
        work: impl FnOnce(Scope) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        Fut: Future<Output = Result<T, Status>>,
    {
        let _in_flight = metrics::InFlight::start();
        let result = match self.admission.clone().try_acquire_owned() {
            Ok(_permit) => work(call.scope()).instrument(call.span.clone()).await,
            Err(_) => Err(status::overloaded()),
        };
        call.finish(&result);
        result.map(Response::new)
    }
}

#[tonic::async_trait]
impl<S: Store> IdempotencyService for IdempotencyApi<S> {
    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let call = Call::begin("Acquire", &request);
        self.serve(call, |call| async move {
            let command = decode::acquire(request.into_inner(), &self.limits)
                .map_err(status::invalid_argument)?;
            call.target(&command.namespace, &command.key);
            match self.store.acquire(command, call.deadline).await {
                Ok(outcome) => {
                    let label = acquire_outcome_label(&outcome);
                    call.outcome(label);
                    metrics::acquire_outcome(label);
                    Ok(encode::acquire(outcome))
                }
                Err(error) => {
                    if matches!(error, StoreError::FingerprintMismatch) {
                        call.outcome("fingerprint_mismatch");
                        metrics::acquire_outcome("fingerprint_mismatch");
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
        let call = Call::begin("Complete", &request);
        self.serve(call, |call| async move {
            let command = decode::complete(request.into_inner(), &self.limits)
                .map_err(status::invalid_argument)?;
            call.target(&command.namespace, &command.key);
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
        let call = Call::begin("Release", &request);
        self.serve(call, |call| async move {
            let command =
                decode::release(request.into_inner()).map_err(status::invalid_argument)?;
            call.target(&command.namespace, &command.key);
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
        let call = Call::begin("Renew", &request);
        self.serve(call, |call| async move {
            let command = decode::renew(request.into_inner(), &self.limits)
                .map_err(status::invalid_argument)?;
            call.target(&command.namespace, &command.key);
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

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let call = Call::begin("Get", &request);
        self.serve(call, |call| async move {
            let command = decode::get(request.into_inner()).map_err(status::invalid_argument)?;
            call.target(&command.namespace, &command.key);
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
