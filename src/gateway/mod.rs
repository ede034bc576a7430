//! HTTP/JSON on the gRPC listener. A request whose content type is not `application/grpc*` is
//! routed here (`GatewayLayer`, in front of tonic's routes); its route (`routes`, from the service
//! configs next to the protos) names an RPC. The gateway turns path, query and JSON body into
//! that RPC's request message (the proto3 JSON mapping, by prost-reflect), frames it as a gRPC
//! call and sends it through the very service stack a gRPC client reaches — the same
//! authentication from the same headers and client certificate, limits, authorisation, store,
//! metrics, spans and audit — then writes the answer, or the status, as JSON. There is no second
//! implementation of any RPC: the gateway only translates.
//!
//! `GET /openapi.json` serves the OpenAPI 3 document generated from the same routes and
//! descriptors (`openapi`), without authentication (it holds nothing but the contract).

mod errors;
mod openapi;
mod routes;

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use prost::bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, Kind, MessageDescriptor, SerializeOptions,
};
use tonic::body::Body;
use tonic::codegen::http::{
    self, header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version,
};
use tonic::{Code, Status};
use tower::{Layer, Service};

pub use errors::http_status;
use errors::{invalid_json, reason, refusal};
use routes::{PathMatch, Route};

/// Why the gateway could not be built (a defect of the shipped descriptors or configs).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("descriptors: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    #[error("descriptors: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error(transparent)]
    Routes(#[from] routes::RouteError),
    #[error("OpenAPI document: {0}")]
    OpenApi(#[from] serde_json::Error),
}

/// idemd's descriptors with google.rpc's (for the error details' JSON).
pub(crate) fn descriptor_pool() -> Result<DescriptorPool, GatewayError> {
    let mut pool = DescriptorPool::decode(crate::server::FILE_DESCRIPTOR_SET)?;
    // Both sets hold google/protobuf/duration.proto: add only the files the pool lacks.
    let rpc = prost_types::FileDescriptorSet::decode(tonic_types::pb::FILE_DESCRIPTOR_SET)?;
    let missing: Vec<_> = rpc
        .file
        .into_iter()
        .filter(|file| pool.get_file_by_name(file.name()).is_none())
        .collect();
    pool.add_file_descriptor_protos(missing)?;
    Ok(pool)
}

/// The routes, the descriptors and the limits; shared by every connection.
pub struct Gateway {
    pool: DescriptorPool,
    routes: Vec<Route>,
    openapi: Bytes,
    /// Largest encoded request message, as for gRPC (`--max-message-bytes`).
    max_message_bytes: usize,
    /// Largest JSON body: base64 and field names make JSON larger than the message it encodes,
    /// so four times the message limit; the message it makes must still fit that limit.
    max_body_bytes: usize,
}

impl Gateway {
    pub fn new(max_message_bytes: usize) -> Result<Self, GatewayError> {
        let pool = descriptor_pool()?;
        let routes = routes::load(&pool)?;
        let openapi = Bytes::from(serde_json::to_vec_pretty(&openapi::document(
            &pool, &routes,
        ))?);
        Ok(Self {
            pool,
            routes,
            openapi,
            max_message_bytes,
            max_body_bytes: max_message_bytes.saturating_mul(4),
        })
    }

    /// The OpenAPI 3 document served at `/openapi.json`.
    pub fn openapi_json(&self) -> &[u8] {
        &self.openapi
    }

    async fn handle<S>(&self, request: Request<Body>, inner: S) -> Result<Response<Body>, S::Error>
    where
        S: Service<Request<Body>, Response = Response<Body>>,
    {
        let path = request.uri().path();
        if path == "/openapi.json" {
            return Ok(if request.method() == Method::GET {
                let mut response = Response::new(Body::new(Full::new(self.openapi.clone())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                response
            } else {
                self.refuse_method(&[Method::GET])
            });
        }
        let mut allowed = Vec::new();
        let mut found = None;
        for route in &self.routes {
            if let PathMatch::Fits(bound) = route.match_path(path) {
                if route.http_method == request.method() {
                    found = Some((route, bound));
                    break;
                }
                allowed.push(route.http_method.clone());
            }
        }
        let Some((route, bound)) = found else {
            if !allowed.is_empty() {
                return Ok(self.refuse_method(&allowed));
            }
            let status = refusal(
                Code::NotFound,
                reason::NO_SUCH_ROUTE,
                format!("no route for {path}: see /openapi.json"),
            );
            return Ok(errors::response(&self.pool, &status, None));
        };
        let (parts, body) = request.into_parts();
        let message = match self.decode(route, bound, &parts, body).await {
            Ok(message) => message,
            Err((status, http)) => return Ok(errors::response(&self.pool, &status, http)),
        };
        let call = grpc_request(route, parts, &message);
        let answer = call_when_ready(inner, call).await?;
        Ok(self.encode(route, answer).await)
    }

    fn refuse_method(&self, allowed: &[Method]) -> Response<Body> {
        let names: Vec<&str> = allowed.iter().map(Method::as_str).collect();
        let status = refusal(
            Code::Unimplemented,
            reason::METHOD_NOT_ALLOWED,
            format!("this path takes {}", names.join(", ")),
        );
        let mut response =
            errors::response(&self.pool, &status, Some(StatusCode::METHOD_NOT_ALLOWED));
        if let Ok(allow) = HeaderValue::from_str(&names.join(", ")) {
            response.headers_mut().insert(header::ALLOW, allow);
        }
        response
    }

    /// The RPC's request from the path's segments, the query and the JSON body.
    async fn decode(
        &self,
        route: &Route,
        bound: Vec<(prost_reflect::FieldDescriptor, String)>,
        parts: &http::request::Parts,
        body: Body,
    ) -> Result<DynamicMessage, (Status, Option<StatusCode>)> {
        let descriptor = route.method.input();
        let mut fields = serde_json::Map::new();
        if route.body {
            if let Some(query) = parts.uri.query().filter(|query| !query.is_empty()) {
                return Err((
                    invalid_json(
                        "query",
                        format!("this route takes its fields in the JSON body, not `?{query}`"),
                    ),
                    None,
                ));
            }
            let bytes = self.read_body(&parts.headers, body).await?;
            if !bytes.is_empty() {
                fields = serde_json::from_slice(&bytes)
                    .map_err(|error| (invalid_json("body", error.to_string()), None))?;
            }
        } else if let Some(query) = parts.uri.query() {
            fields = query_fields(&descriptor, query).map_err(|status| (status, None))?;
        }
        for (field, _) in &bound {
            if fields.contains_key(field.name()) || fields.contains_key(field.json_name()) {
                return Err((
                    invalid_json(
                        field.json_name(),
                        "given by the path; leave it out of the body and the query",
                    ),
                    None,
                ));
            }
        }
        let mut message = DynamicMessage::deserialize_with_options(
            descriptor,
            serde_json::Value::Object(fields),
            &DeserializeOptions::new().deny_unknown_fields(true),
        )
        .map_err(|error| (invalid_json("body", error.to_string()), None))?;
        for (field, raw) in bound {
            let value = percent_encoding::percent_decode_str(&raw)
                .decode_utf8()
                .map_err(|_| {
                    (
                        invalid_json(
                            field.json_name(),
                            "the path segment is not UTF-8 once percent-decoded",
                        ),
                        None,
                    )
                })?;
            message.set_field(&field, prost_reflect::Value::String(value.into_owned()));
        }
        if message.encoded_len() > self.max_message_bytes {
            return Err((
                refusal(
                    Code::InvalidArgument,
                    reason::REQUEST_TOO_LARGE,
                    format!(
                        "the request is larger than this server's {} bytes",
                        self.max_message_bytes
                    ),
                ),
                Some(StatusCode::PAYLOAD_TOO_LARGE),
            ));
        }
        Ok(message)
    }

    async fn read_body(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Bytes, (Status, Option<StatusCode>)> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("");
        let media_type = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let too_large = || {
            (
                refusal(
                    Code::InvalidArgument,
                    reason::REQUEST_TOO_LARGE,
                    format!(
                        "the body is larger than this server's {} bytes",
                        self.max_body_bytes
                    ),
                ),
                Some(StatusCode::PAYLOAD_TOO_LARGE),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max_body_bytes as u64) {
            return Err(too_large());
        }
        let bytes = Limited::new(body, self.max_body_bytes)
            .collect()
            .await
            .map_err(|error| {
                if error.is::<http_body_util::LengthLimitError>() {
                    too_large()
                } else {
                    (
                        invalid_json("body", format!("could not be read: {error}")),
                        None,
                    )
                }
            })?
            .to_bytes();
        // An empty body (no content type needed) is an empty message; anything else is JSON.
        if !bytes.is_empty() && media_type != "application/json" {
            return Err((
                refusal(
                    Code::InvalidArgument,
                    reason::UNSUPPORTED_MEDIA_TYPE,
                    format!("the body must be application/json, not {content_type:?}"),
                ),
                Some(StatusCode::UNSUPPORTED_MEDIA_TYPE),
            ));
        }
        Ok(bytes)
    }

    /// The RPC's answer as JSON, or its status as an HTTP error.
    async fn encode(&self, route: &Route, answer: Response<Body>) -> Response<Body> {
        let (parts, body) = answer.into_parts();
        let collected = match body.collect().await {
            Ok(collected) => collected,
            Err(status) => return errors::response(&self.pool, &status, None),
        };
        let status = collected
            .trailers()
            .and_then(Status::from_header_map)
            .or_else(|| Status::from_header_map(&parts.headers));
        match status {
            Some(status) if status.code() == Code::Ok => {}
            Some(status) => return errors::response(&self.pool, &status, None),
            None => {
                tracing::error!(http = %parts.status, "the gRPC service answered without a status");
                let status = Status::internal("internal error in idemd; see its logs");
                return errors::response(&self.pool, &status, None);
            }
        }
        let data = collected.to_bytes();
        let decoded = unframe(&data)
            .ok_or("not one uncompressed gRPC message")
            .and_then(|payload| {
                DynamicMessage::decode(route.method.output(), payload)
                    .map_err(|_| "undecodable message")
            })
            .and_then(|message| to_json(&message).map_err(|_| "unserialisable message"));
        match decoded {
            Ok(json) => json_response(StatusCode::OK, json),
            Err(why) => {
                tracing::error!(
                    rpc = route.method.full_name(),
                    why,
                    "bad answer from the gRPC service"
                );
                let status = Status::internal("internal error in idemd; see its logs");
                errors::response(&self.pool, &status, None)
            }
        }
    }
}

/// Query parameters as the JSON object of the fields they name: `?states=A&states=B&pageSize=5`
/// → `{"states": ["A", "B"], "pageSize": "5"}`. Values stay strings (the JSON mapping accepts
/// numbers, durations and timestamps as strings) except booleans; the JSON parser then checks
/// names and values as for a body.
fn query_fields(
    descriptor: &MessageDescriptor,
    query: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, Status> {
    use serde_json::Value;
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|error| invalid_json("query", error.to_string()))?;
    let mut fields = serde_json::Map::new();
    for (name, value) in pairs {
        let field = descriptor
            .get_field_by_name(&name)
            .or_else(|| descriptor.get_field_by_json_name(&name));
        let value = match (&field, value.as_str()) {
            (Some(field), "true") if field.kind() == Kind::Bool => Value::Bool(true),
            (Some(field), "false") if field.kind() == Kind::Bool => Value::Bool(false),
            _ => Value::String(value),
        };
        let repeated = field.as_ref().is_some_and(|field| field.is_list());
        match fields.get_mut(&name) {
            Some(Value::Array(values)) if repeated => values.push(value),
            Some(_) => return Err(invalid_json(&name, "given more than once")),
            None if repeated => {
                fields.insert(name, Value::Array(vec![value]));
            }
            None => {
                fields.insert(name, value);
            }
        }
    }
    Ok(fields)
}

/// The gRPC call for `message`: the HTTP request's headers (credentials, trace context) and
/// extensions (the connection's client certificate), a gRPC path, content type and frame.
fn grpc_request(
    route: &Route,
    parts: http::request::Parts,
    message: &DynamicMessage,
) -> Request<Body> {
    let payload = message.encode_to_vec();
    let mut frame = BytesMut::with_capacity(payload.len() + 5);
    frame.put_u8(0);
    frame.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    frame.put_slice(&payload);
    let mut request = Request::new(Body::new(Full::new(frame.freeze())));
    *request.method_mut() = Method::POST;
    *request.version_mut() = Version::HTTP_2;
    *request.uri_mut() = route.grpc_uri.clone();
    *request.extensions_mut() = parts.extensions;
    let headers = request.headers_mut();
    for (name, value) in &parts.headers {
        let skipped = matches!(
            name.as_str(),
            "content-type"
                | "content-length"
                | "content-encoding"
                | "transfer-encoding"
                | "connection"
                | "keep-alive"
                | "upgrade"
                | "te"
                | "host"
                | "accept-encoding"
                | "grpc-encoding"
                | "grpc-accept-encoding"
        );
        if !skipped {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    request
}

/// The message of a single uncompressed gRPC frame.
fn unframe(data: &[u8]) -> Option<&[u8]> {
    let (header, payload) = data.split_first_chunk::<5>()?;
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    (header[0] == 0 && payload.len() == length).then_some(payload)
}

/// The proto3 JSON mapping: lowerCamelCase names, 64-bit integers as strings, enums by name,
/// bytes as base64, Duration and Timestamp as strings; fields at their defaults left out.
pub(crate) fn to_json(message: &DynamicMessage) -> Result<Vec<u8>, serde_json::Error> {
    let mut json = Vec::new();
    let mut serializer = serde_json::Serializer::new(&mut json);
    message.serialize_with_options(&mut serializer, &SerializeOptions::new())?;
    Ok(json)
}

fn json_response(status: StatusCode, json: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Body::new(Full::new(Bytes::from(json))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// One call on a service that was ready (tower's `oneshot`, without its bounds on the error).
async fn call_when_ready<S: Service<R>, R>(
    mut service: S,
    request: R,
) -> Result<S::Response, S::Error> {
    std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
    service.call(request).await
}

/// gRPC requests go to tonic's routes; every other request to the gateway.
#[derive(Clone)]
pub struct GatewayLayer {
    gateway: Arc<Gateway>,
}

impl GatewayLayer {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

impl<S> Layer<S> for GatewayLayer {
    type Service = GatewayService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GatewayService {
            inner,
            gateway: self.gateway.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GatewayService<S> {
    inner: S,
    gateway: Arc<Gateway>,
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

impl<S> Service<Request<Body>> for GatewayService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if is_grpc(request.headers()) {
            return Box::pin(self.inner.call(request));
        }
        // The ready service serves this request; a fresh clone takes its place (tower's rule
        // for services called from inside a future).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let gateway = self.gateway.clone();
        Box::pin(async move { gateway.handle(request, inner).await })
    }
}
