//! Requests that are not gRPC get HTTP 415, as the gRPC over HTTP/2 spec asks: "If Content-Type
//! does not begin with application/grpc, gRPC servers SHOULD respond with HTTP status 415". A
//! plain HTTP/2 client (a JSON request sent to the wrong port) then sees a failure, not a 200.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::codegen::http::{header::CONTENT_TYPE, Request, Response, StatusCode};
use tower::{Layer, Service};

/// Wraps the gRPC routes with the content-type check.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequireGrpcLayer;

impl<S> Layer<S> for RequireGrpcLayer {
    type Service = RequireGrpc<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireGrpc { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RequireGrpc<S> {
    inner: S,
}

fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

impl<S, B> Service<Request<B>> for RequireGrpc<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if is_grpc(&request) {
            return Box::pin(self.inner.call(request));
        }
        let mut response = Response::new(tonic::body::Body::empty());
        *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        Box::pin(std::future::ready(Ok(response)))
    }
}
