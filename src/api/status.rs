//! The one place where errors become gRPC statuses. Each status carries a
//! `google.rpc.ErrorInfo` whose `reason` clients branch on (listed in the proto's header).

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::Rpc;
use crate::domain::admin::AdminRejection;
use crate::domain::{FieldViolation, LeaseRejection, Namespace};
use crate::store::StoreError;
use crate::telemetry::metrics;

/// `ErrorInfo.domain` of every idemd error.
pub const ERROR_DOMAIN: &str = "idemd";

/// Machine-readable reasons, as documented in the proto.
pub mod reason {
    pub const INVALID_REQUEST: &str = "INVALID_REQUEST";
    pub const FINGERPRINT_MISMATCH: &str = "FINGERPRINT_MISMATCH";
    pub const LEASE_NOT_HELD: &str = "LEASE_NOT_HELD";
    pub const RECORD_COMPLETED: &str = "RECORD_COMPLETED";
    pub const RECORD_NOT_FOUND: &str = "RECORD_NOT_FOUND";
    pub const STALE_RECORD: &str = "STALE_RECORD";
    pub const STORE_UNAVAILABLE: &str = "STORE_UNAVAILABLE";
    pub const DEADLINE_EXCEEDED: &str = "DEADLINE_EXCEEDED";
    pub const OVERLOADED: &str = "OVERLOADED";
    pub const UNAUTHENTICATED: &str = "UNAUTHENTICATED";
    pub const PERMISSION_DENIED: &str = "PERMISSION_DENIED";
    pub const CALLER_LIMITED: &str = "CALLER_LIMITED";
    pub const TOO_MANY_WAITERS: &str = "TOO_MANY_WAITERS";
    pub const STORE_FULL: &str = "STORE_FULL";
    pub const INTERNAL: &str = "INTERNAL";
}

fn with_reason(code: Code, message: impl Into<String>, reason: &str) -> Status {
    let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, []);
    Status::with_error_details(code, message, details)
}

/// Most bytes of violation text (fields and descriptions) one INVALID_ARGUMENT lists. The status
/// travels in HTTP/2 trailers, which clients cap (16 KiB in hyper and tonic, 8 KiB by default in
/// gRPC C-core) after percent-encoding the message: unbounded, a request breaking a hundred rules
/// (a metadata map full of bad keys) got an h2 protocol error instead of its INVALID_ARGUMENT.
const MAX_VIOLATION_TEXT_BYTES: usize = 1024;

/// INVALID_ARGUMENT naming every broken field and rule (as many as fit; the message counts the
/// rest).
pub fn invalid_argument(mut violations: Vec<FieldViolation>) -> Status {
    let total = violations.len();
    let mut text = 0;
    let listed = violations
        .iter()
        .position(|violation| {
            text += violation.field.len() + violation.description.len();
            text > MAX_VIOLATION_TEXT_BYTES
        })
        .map_or(total, |first_left_out| first_left_out.max(1));
    violations.truncate(listed);
    let mut message = format!(
        "invalid request: {}",
        violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    );
    if listed < total {
        message.push_str(&format!("; and {} more violations", total - listed));
    }
    let mut details = ErrorDetails::with_error_info(reason::INVALID_REQUEST, ERROR_DOMAIN, []);
    for violation in violations {
        details.add_bad_request_violation(violation.field, violation.description);
    }
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// A store error as a status. Unavailable and internal errors are logged here with their cause;
/// the caller gets a message without database internals.
pub fn from_store(error: StoreError) -> Status {
    match error {
        StoreError::FingerprintMismatch => with_reason(
            Code::FailedPrecondition,
            "the key was already used with a different fingerprint: use a new key for a different request",
            reason::FINGERPRINT_MISMATCH,
        ),
        StoreError::Rejected(rejection) => {
            let (code, reason) = match rejection {
                LeaseRejection::NotFound => (Code::NotFound, reason::RECORD_NOT_FOUND),
                LeaseRejection::LeaseNotHeld => (Code::FailedPrecondition, reason::LEASE_NOT_HELD),
                LeaseRejection::RecordCompleted => {
                    (Code::FailedPrecondition, reason::RECORD_COMPLETED)
                }
            };
            with_reason(code, error.to_string(), reason)
        }
        StoreError::AdminRejected(rejection) => {
            let (code, reason) = match rejection {
                AdminRejection::NotFound => (Code::NotFound, reason::RECORD_NOT_FOUND),
                AdminRejection::StaleRecord => (Code::FailedPrecondition, reason::STALE_RECORD),
                AdminRejection::RecordCompleted => {
                    (Code::FailedPrecondition, reason::RECORD_COMPLETED)
                }
            };
            with_reason(code, error.to_string(), reason)
        }
        StoreError::Full(max_records) => {
            metrics::store_error("full");
            tracing::debug!(max_records, "store full: refusing a new key");
            with_reason(
                Code::ResourceExhausted,
                format!(
                    "the idempotency store is full ({max_records} records, none expired): new keys are refused until records expire; existing keys still work"
                ),
                reason::STORE_FULL,
            )
        }
        StoreError::DeadlineExceeded => {
            metrics::store_error("deadline");
            with_reason(
                Code::DeadlineExceeded,
                "the call's deadline passed before the store answered; its database work was cancelled",
                reason::DEADLINE_EXCEEDED,
            )
        }
        StoreError::Unavailable(cause) => {
            metrics::store_error("unavailable");
            tracing::warn!(%cause, "store unavailable");
            with_reason(
                Code::Unavailable,
                "the idempotency store is unavailable; retry with backoff",
                reason::STORE_UNAVAILABLE,
            )
        }
        StoreError::Internal(cause) => {
            metrics::store_error("internal");
            tracing::error!(%cause, "internal error");
            with_reason(
                Code::Internal,
                "internal error in idemd; see its logs",
                reason::INTERNAL,
            )
        }
    }
}

/// RESOURCE_EXHAUSTED: the server is at its concurrency limit.
pub fn overloaded() -> Status {
    with_reason(
        Code::ResourceExhausted,
        "idemd is at its limit of concurrent RPCs; retry with backoff",
        reason::OVERLOADED,
    )
}

/// UNAUTHENTICATED: no credentials, or ones the policy does not know.
pub fn unauthenticated() -> Status {
    with_reason(
        Code::Unauthenticated,
        "missing or unknown credentials: send `authorization: Bearer <token>` or a client certificate the policy knows",
        reason::UNAUTHENTICATED,
    )
}

/// PERMISSION_DENIED: a known caller outside its grants.
pub fn permission_denied(caller: &str, rpc: Rpc, namespace: &Namespace) -> Status {
    with_reason(
        Code::PermissionDenied,
        format!(
            "caller {caller:?} may not call {} in namespace {:?}",
            rpc.name(),
            namespace.as_str()
        ),
        reason::PERMISSION_DENIED,
    )
}

/// PERMISSION_DENIED: a known caller without the admin grant an RPC needs anywhere.
pub fn admin_denied(caller: &str, rpc: Rpc) -> Status {
    with_reason(
        Code::PermissionDenied,
        format!("caller {caller:?} has no admin grant for {}", rpc.name()),
        reason::PERMISSION_DENIED,
    )
}

/// RESOURCE_EXHAUSTED: the caller is over its own limit.
pub fn caller_limited(caller: &str, limit: &str) -> Status {
    with_reason(
        Code::ResourceExhausted,
        format!("caller {caller:?} is over its {limit}; retry with backoff"),
        reason::CALLER_LIMITED,
    )
}

/// RESOURCE_EXHAUSTED: the server is at its limit of concurrent Waits.
pub fn too_many_waiters() -> Status {
    with_reason(
        Code::ResourceExhausted,
        "idemd is at its limit of concurrent Waits; retry Acquire after a backoff instead",
        reason::TOO_MANY_WAITERS,
    )
}
