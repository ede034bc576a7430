//! The gRPC service: authenticate the caller before its message is decoded (`authenticate`), then
//! one path for every RPC (`serve`): admit the call, decode the request into a domain command,
//! authorise the record it targets, run it on the store, encode the answer — and account for it
//! (one span, metrics). What each RPC decodes, targets and runs is in `commands`; rules live in
//! `domain`, storage in `store`.

pub mod admin;
pub mod authenticate;
mod commands;
mod deadline;
pub mod decode;
mod encode;
mod page_token;
mod serve;
pub mod status;

use tonic::{Request, Response, Status};

pub use admin::AdminApi;
pub use serve::IdempotencyApi;

use crate::domain::{
    AcquireCommand, CompleteCommand, GetCommand, ReleaseCommand, RenewCommand, WaitCommand,
};
use crate::proto::idempotency::v1 as pb;
use crate::proto::idempotency::v1::idempotency_service_server::IdempotencyService;
use crate::store::Store;

/// Each RPC names its command; `serve` does the rest. The store is out of reach here: a new RPC
/// gets to it only through `serve`, so it cannot skip authentication or authorisation.
#[tonic::async_trait]
impl<S: Store> IdempotencyService for IdempotencyApi<S> {
    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        self.serve::<AcquireCommand>(request).await
    }

    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        self.serve::<CompleteCommand>(request).await
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        self.serve::<ReleaseCommand>(request).await
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        self.serve::<RenewCommand>(request).await
    }

    async fn wait(
        &self,
        request: Request<pb::WaitRequest>,
    ) -> Result<Response<pb::WaitResponse>, Status> {
        self.serve::<WaitCommand>(request).await
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        self.serve::<GetCommand>(request).await
    }
}
