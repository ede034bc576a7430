//! Authentication before the message is decoded. Who the caller is depends only on the request's
//! headers (a bearer token) and its connection (a client certificate), so a caller the policy does
//! not know is refused with UNAUTHENTICATED before tonic reads, bounds or decodes its message. A
//! known caller travels to `serve` in the request's extensions; with auth off nothing is done.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::future::{ready, Either, Ready};
use tonic::body::Body;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tonic::server::NamedService;
use tower::Service;

use super::serve::{audit, Call};
use super::status;
use crate::auth::{AuthState, Caller, Credentials, PeerIdentities, Policy, Rpc};
use crate::telemetry::metrics;

/// The caller `Authenticate` established, for `serve` to take.
#[derive(Clone)]
pub(super) struct Authenticated(pub(super) Arc<Caller>);

/// Wraps the idempotency service (see `IdempotencyApi::into_service`) or the admin service
/// (`AdminApi::into_service`).
#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    /// The access policy; `None` when auth is off.
    auth: Option<Arc<AuthState>>,
    metrics: Arc<metrics::RpcMetrics>,
}

impl<S> Authenticate<S> {
    pub(super) fn new(
        inner: S,
        auth: Option<Arc<AuthState>>,
        metrics: Arc<metrics::RpcMetrics>,
    ) -> Self {
        Self {
            inner,
            auth,
            metrics,
        }
    }
}

impl<S: NamedService> NamedService for Authenticate<S> {
    const NAME: &'static str = S::NAME;
}

/// The RPC of `service` a request's path names (`/idempotency.v1.IdempotencyService/Acquire`),
/// if any.
fn rpc_of(path: &str, service: &str) -> Option<Rpc> {
    Rpc::of_path(path).filter(|rpc| rpc.service() == service)
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The caller behind the credentials (a bearer token first, else the client certificate), or
/// what was wrong with them, for the audit log.
fn authenticate(
    policy: &Policy,
    headers: &HeaderMap,
    peer: Option<&PeerIdentities>,
) -> Result<Arc<Caller>, &'static str> {
    let names = peer.map(|peer| peer.0.as_slice());
    let (credentials, unknown) = match (bearer_token(headers), names) {
        (Some(token), _) => (Credentials::Bearer(token), "unknown bearer token"),
        (None, Some(names)) if !names.is_empty() => (
            Credentials::Certificate(names),
            "unknown client certificate",
        ),
        _ => (Credentials::None, "no credentials"),
    };
    policy.authenticate(credentials).ok_or(unknown)
}

impl<S, B> Service<Request<B>> for Authenticate<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible> + NamedService,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response<Body>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let Some(auth) = &self.auth else {
            return Either::Right(self.inner.call(request));
        };
        // A method the service does not have goes on, for tonic to answer UNIMPLEMENTED.
        let Some(rpc) = rpc_of(request.uri().path(), S::NAME) else {
            return Either::Right(self.inner.call(request));
        };
        let peer = request.extensions().get::<PeerIdentities>();
        match authenticate(&auth.policy(), request.headers(), peer) {
            Ok(caller) => {
                request.extensions_mut().insert(Authenticated(caller));
                Either::Right(self.inner.call(request))
            }
            Err(why) => {
                let call = Call::begin(rpc, request.headers(), &self.metrics);
                // Decided from the headers before the message is read: no namespace to name.
                audit("-", None, rpc, status::reason::UNAUTHENTICATED, why);
                metrics::auth_denied("unauthenticated");
                let refused = status::unauthenticated();
                let response = refused.clone().into_http();
                call.finish::<()>(&Err(refused));
                Either::Left(ready(Ok(response)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_rpcs() {
        let service = "idempotency.v1.IdempotencyService";
        assert_eq!(
            rpc_of("/idempotency.v1.IdempotencyService/Acquire", service),
            Some(Rpc::Acquire)
        );
        assert_eq!(
            rpc_of("/idempotency.v1.IdempotencyService/Wait", service),
            Some(Rpc::Wait)
        );
        assert_eq!(
            rpc_of(
                "/idempotency.admin.v1.AdminService/PurgeRecord",
                "idempotency.admin.v1.AdminService"
            ),
            Some(Rpc::PurgeRecord)
        );
        for other in [
            "/idempotency.v1.IdempotencyService/Nope",
            "/idempotency.v1.IdempotencyServiceX/Acquire",
            "/grpc.health.v1.Health/Check",
            "/idempotency.v1.IdempotencyService/ListRecords",
            "/idempotency.admin.v1.AdminService/ListRecords",
            "idempotency.v1.IdempotencyService/Acquire",
            "/",
        ] {
            assert_eq!(rpc_of(other, service), None, "{other}");
        }
    }

    #[test]
    fn bearer_tokens() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert("authorization", "Bearer  abc ".parse().expect("value"));
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert("authorization", "bearer xyz".parse().expect("value"));
        assert_eq!(bearer_token(&headers), Some("xyz"));
        headers.insert("authorization", "Basic xyz".parse().expect("value"));
        assert_eq!(bearer_token(&headers), None);
    }
}
