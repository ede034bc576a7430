//! What each RPC is, as `serve` needs it: how its request becomes a domain command, which record
//! the command targets (authorised before anything runs), what it asks of the store and how the
//! answer goes back on the wire. A command reaches the store only through `Command::run`, and only
//! `serve` calls that, after authentication, admission and authorisation.

use std::future::Future;

use tokio::time::Instant;

use super::{decode, encode};
use crate::auth::Rpc;
use crate::domain::{
    AcquireCommand, AcquireOutcome, CompleteCommand, FieldViolation, GetCommand, Key, Limits,
    Namespace, ReleaseCommand, RenewCommand, WaitCommand, WaitOutcome,
};
use crate::proto::idempotency::v1 as pb;
use crate::store::{Store, StoreError};

/// One RPC of `idempotency.v1.IdempotencyService`.
pub(super) trait Command: Sized + Send {
    /// The RPC: its metrics, its log lines and the policy's grants name it.
    const RPC: Rpc;
    /// Whether each answer is counted by outcome (`idemd_acquire_outcomes_total`).
    const COUNTS_OUTCOMES: bool = false;

    type Request: Send;
    type Response;

    /// The request as a validated command, or every rule it breaks.
    fn decode(request: Self::Request, limits: &Limits) -> Result<Self, Vec<FieldViolation>>;

    /// The namespace the request names, not yet validated: for the audit line of a call refused
    /// before it is decoded.
    fn requested_namespace(request: &Self::Request) -> &str;

    /// The record the command acts on.
    fn target(&self) -> (&Namespace, &Key);

    /// Runs the command on the store: the answer, and its outcome for the span.
    fn run<S: Store>(
        self,
        store: &S,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<(Self::Response, &'static str), StoreError>> + Send;
}

impl Command for AcquireCommand {
    const RPC: Rpc = Rpc::Acquire;
    const COUNTS_OUTCOMES: bool = true;
    type Request = pb::AcquireRequest;
    type Response = pb::AcquireResponse;

    fn decode(request: Self::Request, limits: &Limits) -> Result<Self, Vec<FieldViolation>> {
        decode::acquire(request, limits)
    }

    fn requested_namespace(request: &Self::Request) -> &str {
        &request.namespace
    }

    fn target(&self) -> (&Namespace, &Key) {
        (&self.namespace, &self.key)
    }

    async fn run<S: Store>(
        self,
        store: &S,
        deadline: Option<Instant>,
    ) -> Result<(Self::Response, &'static str), StoreError> {
        let outcome = store.acquire(self, deadline).await?;
        let label = match &outcome {
            AcquireOutcome::Acquired {
                taken_over: false, ..
            } => "acquired",
            AcquireOutcome::Acquired {
                taken_over: true, ..
            } => "takeover",
            AcquireOutcome::InProgress { .. } => "in_progress",
            AcquireOutcome::Completed { .. } => "completed",
        };
        Ok((encode::acquire(outcome), label))
    }
}

impl Command for CompleteCommand {
    const RPC: Rpc = Rpc::Complete;
    type Request = pb::CompleteRequest;
    type Response = pb::CompleteResponse;

    fn decode(request: Self::Request, limits: &Limits) -> Result<Self, Vec<FieldViolation>> {
        decode::complete(request, limits)
    }

    fn requested_namespace(request: &Self::Request) -> &str {
        &request.namespace
    }

    fn target(&self) -> (&Namespace, &Key) {
        (&self.namespace, &self.key)
    }

    async fn run<S: Store>(
        self,
        store: &S,
        deadline: Option<Instant>,
    ) -> Result<(Self::Response, &'static str), StoreError> {
        let record = store.complete(self, deadline).await?;
        let response = pb::CompleteResponse {
            record: Some(encode::record(record)),
        };
        Ok((response, "completed"))
    }
}

impl Command for ReleaseCommand {
    const RPC: Rpc = Rpc::Release;
    type Request = pb::ReleaseRequest;
    type Response = pb::ReleaseResponse;

    fn decode(request: Self::Request, _limits: &Limits) -> Result<Self, Vec<FieldViolation>> {
        decode::release(request)
    }

    fn requested_namespace(request: &Self::Request) -> &str {
        &request.namespace
    }

    fn target(&self) -> (&Namespace, &Key) {
        (&self.namespace, &self.key)
    }

    async fn run<S: Store>(
        self,
        store: &S,
        deadline: Option<Instant>,
    ) -> Result<(Self::Response, &'static str), StoreError> {
        store.release(self, deadline).await?;
        Ok((pb::ReleaseResponse {}, "released"))
    }
}

impl Command for RenewCommand {
    const RPC: Rpc = Rpc::Renew;
    type Request = pb::RenewRequest;
    type Response = pb::RenewResponse;

    fn decode(request: Self::Request, limits: &Limits) -> Result<Self, Vec<FieldViolation>> {
        decode::renew(request, limits)
    }

    fn requested_namespace(request: &Self::Request) -> &str {
        &request.namespace
    }

    fn target(&self) -> (&Namespace, &Key) {
        (&self.namespace, &self.key)
    }

    async fn run<S: Store>(
        self,
        store: &S,
        deadline: Option<Instant>,
    ) -> Result<(Self::Response, &'static str), StoreError> {
        let lease = store.renew(self, deadline).await?;
        let response = pb::RenewResponse {
            lease: Some(encode::lease(&lease)),
        };
        Ok((response, "renewed"))
    }
}

impl Command for GetCommand {
    const RPC: Rpc = Rpc::Get;
    type Request = pb::GetRequest;
    type Response = pb::GetResponse;

    fn decode(request: Self::Request, _limits: &Limits) -> Result<Self, Vec<FieldViolation>> {
        decode::get(request)
    }

    fn requested_namespace(request: &Self::Request) -> &str {
        &request.namespace
    }

    fn target(&self) -> (&Namespace, &Key) {
        (&self.namespace, &self.key)
    }

    async fn run<S: Store>(
        self,
        store: &S,
        deadline: Option<Instant>,
    ) -> Result<(Self::Response, &'static str), StoreError> {
        let record = store.get(self, deadline).await?;
        let response = pb::GetResponse {
            record: Some(encode::record(record)),
        };
        Ok((response, "found"))
    }
}

impl Command for WaitCommand {
    const RPC: Rpc = Rpc::Wait;
    type Request = pb::WaitRequest;
    type Response = pb::WaitResponse;

    fn decode(request: Self::Request, limits: &Limits) -> Result<Self, Vec<FieldViolation>> {
        decode::wait(request, limits)
    }

    fn requested_namespace(request: &Self::Request) -> &str {
        &request.namespace
    }

    fn target(&self) -> (&Namespace, &Key) {
        (&self.namespace, &self.key)
    }

    async fn run<S: Store>(
        self,
        store: &S,
        deadline: Option<Instant>,
    ) -> Result<(Self::Response, &'static str), StoreError> {
        let outcome = store.wait(self, deadline).await?;
        let label = match &outcome {
            WaitOutcome::Completed { .. } => "completed",
            WaitOutcome::Free { .. } => "free",
            WaitOutcome::TimedOut { .. } => "timed_out",
        };
        Ok((encode::wait(outcome), label))
    }
}
