//! gRPC statuses as HTTP answers: one table from code to HTTP status, and the body in the JSON
//! form of `google.rpc.Status` — the code, the message and the details the status carries
//! (`ErrorInfo` with its reason, `BadRequest`, …), as `{"@type": ..., ...}` objects.

use prost_reflect::{DescriptorPool, DynamicMessage, Value};
use tonic::codegen::http::{header, HeaderValue, Response, StatusCode};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::json_response;
use crate::api::status::ERROR_DOMAIN;

/// Reasons of refusals the gateway makes itself, before a request becomes an RPC.
pub mod reason {
    /// The body is not JSON, not an object, names an unknown field or a value of the wrong type,
    /// or a query parameter is unknown or malformed (400).
    pub const INVALID_JSON: &str = "INVALID_JSON";
    /// The body is larger than the server takes (413).
    pub const REQUEST_TOO_LARGE: &str = "REQUEST_TOO_LARGE";
    /// A body that is not `application/json` (415).
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "UNSUPPORTED_MEDIA_TYPE";
    /// No route has this path (404).
    pub const NO_SUCH_ROUTE: &str = "NO_SUCH_ROUTE";
    /// A route has this path, but not with this method (405, with `Allow`).
    pub const METHOD_NOT_ALLOWED: &str = "METHOD_NOT_ALLOWED";
}

/// The HTTP status for a gRPC code. FAILED_PRECONDITION is 409, not 400: it always means that the
/// record's state refuses the call (fingerprint mismatch, lease not held, record completed,
/// stale record), a conflict with the resource that retrying the same request cannot fix, while
/// 400 stays for requests that are wrong in themselves (INVALID_ARGUMENT).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        // 499, "client closed request", as gRPC-gateway and Google's APIs answer CANCELLED.
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Internal | Code::Unknown | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A refusal of the gateway's own, in the same form as the API's: `code` and an ErrorInfo.
pub fn refusal(code: Code, reason: &str, message: impl Into<String>) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, []),
    )
}

/// INVALID_ARGUMENT / INVALID_JSON naming the field (or `body`) and what is wrong with it.
pub fn invalid_json(field: &str, description: impl Into<String>) -> Status {
    let description = description.into();
    let mut details = ErrorDetails::with_error_info(reason::INVALID_JSON, ERROR_DOMAIN, []);
    details.add_bad_request_violation(field, description.clone());
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: {field}: {description}"),
        details,
    )
}

/// The HTTP answer for `status`: `http` if given (413, 415, 405 have no gRPC code of their own),
/// else the table's; a `Retry-After` when the status carries a `google.rpc.RetryInfo`.
pub fn response(
    pool: &DescriptorPool,
    status: &Status,
    http: Option<StatusCode>,
) -> Response<tonic::body::Body> {
    let mut response = json_response(
        http.unwrap_or_else(|| http_status(status.code())),
        status_json(pool, status),
    );
    let retry_after = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .map(|delay| delay.as_secs() + u64::from(delay.subsec_nanos() > 0));
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// The status as `google.rpc.Status` JSON. The details tonic-types put on the status are that
/// message already; a status without them (or with undecodable ones) gets code and message.
fn status_json(pool: &DescriptorPool, status: &Status) -> Vec<u8> {
    let Some(descriptor) = pool.get_message_by_name("google.rpc.Status") else {
        return fallback_json(status);
    };
    let from_details = (!status.details().is_empty())
        .then(|| DynamicMessage::decode(descriptor.clone(), status.details()).ok())
        .flatten();
    let message = from_details.unwrap_or_else(|| {
        let mut message = DynamicMessage::new(descriptor);
        message.set_field_by_name("code", Value::I32(status.code() as i32));
        message.set_field_by_name("message", Value::String(status.message().to_string()));
        message
    });
    super::to_json(&message).unwrap_or_else(|_| fallback_json(status))
}

/// Only if the descriptors of google.rpc are missing or a detail's type is unknown to them.
fn fallback_json(status: &Status) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "code": status.code() as i32,
        "message": status.message(),
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn statuses_become_status_json_with_retry_after() {
        let pool = super::super::descriptor_pool().expect("pool");
        let mut details = ErrorDetails::with_error_info("OVERLOADED", ERROR_DOMAIN, []);
        details.set_retry_info(Some(Duration::from_millis(1500)));
        let status = Status::with_error_details(Code::ResourceExhausted, "busy", details);
        let answer = response(&pool, &status, None);
        assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            answer.headers().get(header::RETRY_AFTER),
            Some(&HeaderValue::from(2u64))
        );
        let body = answer.into_body().collect().await.expect("body").to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(json["code"], 8);
        assert_eq!(json["message"], "busy");
        let detail = |name: &str| {
            json["details"]
                .as_array()
                .and_then(|details| {
                    details.iter().find(|detail| {
                        detail["@type"] == format!("type.googleapis.com/google.rpc.{name}")
                    })
                })
                .cloned()
                .unwrap_or_else(|| panic!("no {name}: {json}"))
        };
        assert_eq!(detail("ErrorInfo")["reason"], "OVERLOADED");
        assert_eq!(detail("RetryInfo")["retryDelay"], "1.500s");
        // Without details: code and message; no Retry-After.
        let plain = response(&pool, &Status::unavailable("down"), None);
        assert_eq!(plain.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(plain.headers().get(header::RETRY_AFTER).is_none());
        let body = plain.into_body().collect().await.expect("body").to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(json, serde_json::json!({"code": 14, "message": "down"}));
    }

    #[test]
    fn the_status_table() {
        for (code, http) in [
            (Code::InvalidArgument, 400),
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::NotFound, 404),
            (Code::FailedPrecondition, 409),
            (Code::AlreadyExists, 409),
            (Code::Aborted, 409),
            (Code::ResourceExhausted, 429),
            (Code::Internal, 500),
            (Code::Unimplemented, 501),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
        ] {
            assert_eq!(http_status(code).as_u16(), http, "{code:?}");
        }
    }
}
