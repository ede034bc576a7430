//! The gRPC service: decode the request into a domain command, run it on the store, encode the
//! answer. Nothing else happens here; rules live in `domain`, storage in `store`.

mod decode;
mod encode;
pub mod status;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::domain::Limits;
use crate::proto::idempotency::v1 as pb;
use crate::proto::idempotency::v1::idempotency_service_server::IdempotencyService;
use crate::store::Store;

/// `idempotency.v1.IdempotencyService` over any store.
pub struct IdempotencyApi<S> {
    store: Arc<S>,
    limits: Limits,
}

impl<S> IdempotencyApi<S> {
    pub fn new(store: Arc<S>, limits: Limits) -> Self {
        Self { store, limits }
    }
}

#[tonic::async_trait]
impl<S: Store> IdempotencyService for IdempotencyApi<S> {
    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let command = decode::acquire(request.into_inner(), &self.limits)
            .map_err(status::invalid_argument)?;
        let outcome = self
            .store
            .acquire(command)
            .await
            .map_err(status::from_store)?;
        Ok(Response::new(encode::acquire(outcome)))
    }

    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        let command = decode::complete(request.into_inner(), &self.limits)
            .map_err(status::invalid_argument)?;
        let record = self
            .store
            .complete(command)
            .await
            .map_err(status::from_store)?;
        Ok(Response::new(pb::CompleteResponse {
            record: Some(encode::record(record)),
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let command = decode::release(request.into_inner()).map_err(status::invalid_argument)?;
        self.store
            .release(command)
            .await
            .map_err(status::from_store)?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let command =
            decode::renew(request.into_inner(), &self.limits).map_err(status::invalid_argument)?;
        let lease = self
            .store
            .renew(command)
            .await
            .map_err(status::from_store)?;
        Ok(Response::new(pb::RenewResponse {
            lease: Some(encode::lease(&lease)),
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let command = decode::get(request.into_inner()).map_err(status::invalid_argument)?;
        let record = self.store.get(command).await.map_err(status::from_store)?;
        Ok(Response::new(pb::GetResponse {
            record: Some(encode::record(record)),
        }))
    }
}
