//! One input of the request-decoding fuzzers, checked in one place: the cargo-fuzz target
//! `fuzz/fuzz_targets/decode_requests.rs` and the CI proptests in `tests/suite/fuzzing.rs` both
//! include this file by path, so the two cannot drift. It needs only std, prost, tonic,
//! tonic-types and idemd.
//!
//! An input is a selector byte and a protobuf body. The selector's low seven bits pick the request
//! type (modulo 6: Acquire, Complete, Release, Renew, Get, Wait), its high bit the limits (the
//! server's defaults, or tight ones with odd bounds). A body that prost decodes goes through
//! idemd's own validation (`idemd::api::decode`), and a refusal through the status the server
//! answers with (`idemd::api::status::invalid_argument`). Nothing may panic, and:
//!
//! - validation accepts exactly what the contract allows (the rules of the proto's comments,
//!   restated here independently of `src/domain/values.rs`), and names exactly the broken fields;
//! - an accepted request keeps its values: namespace, key, fingerprint, holder, lease token and
//!   result are the input's, results are within the size limits, durations resolve as the limits
//!   say (unset or zero: the default);
//! - a refusal is INVALID_ARGUMENT with reason INVALID_REQUEST; its violations are short and free of
//!   control characters, the status lists a prefix of them (and counts the rest), and its HTTP/2
//!   trailers fit in 8 KiB, under every client's header limit.

use std::time::Duration;

use idemd::api::{decode, status};
use idemd::domain::{DurationPolicy, FieldViolation, Limits};
use idemd::proto::idempotency::v1 as pb;
use prost::Message;
use tonic_types::StatusExt;

/// The request types, in selector order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Acquire,
    Complete,
    Release,
    Renew,
    Get,
    Wait,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Acquire,
        Kind::Complete,
        Kind::Release,
        Kind::Renew,
        Kind::Get,
        Kind::Wait,
    ];
}

/// What became of one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Empty, or not a protobuf message of the selected type.
    Undecodable,
    Accepted,
    Refused,
}

/// Selector bit for the tight limits.
pub const TIGHT: u8 = 0x80;

/// Most bytes of one violation's field name plus description.
pub const MAX_VIOLATION_BYTES: usize = 512;

/// Most bytes an INVALID_ARGUMENT may add to HTTP/2 trailers, counted as HTTP/2 counts a header
/// list (name + value + 32 per field). gRPC C-core clients refuse more than 8 KiB by default,
/// hyper (tonic) clients more than 16 KiB.
pub const MAX_TRAILER_BYTES: usize = 8 * 1024;

/// Limits with bounds that are not round numbers, to catch off-by-one and rounding mistakes.
pub fn tight_limits() -> Limits {
    Limits {
        lease_ttl: DurationPolicy {
            default: Duration::from_secs(2),
            min: Duration::new(1, 500_000_001),
            max: Duration::new(3, 7),
        },
        retention: DurationPolicy {
            default: Duration::from_secs(10),
            min: Duration::from_nanos(999),
            max: Duration::new(10, 1),
        },
        max_result_body_bytes: 16,
        wait_timeout: DurationPolicy {
            default: Duration::from_millis(5),
            min: Duration::from_millis(5),
            max: Duration::from_millis(5),
        },
    }
}

/// An input for `check`: the selector byte, then the encoded message.
pub fn input(kind: Kind, tight: bool, message: &impl Message) -> Vec<u8> {
    let mut data = vec![kind as u8 | if tight { TIGHT } else { 0 }];
    data.extend(message.encode_to_vec());
    data
}

/// Checks one input; panics on any broken invariant.
pub fn check(data: &[u8]) -> Verdict {
    let Some((&selector, body)) = data.split_first() else {
        return Verdict::Undecodable;
    };
    let limits = if selector & TIGHT == 0 {
        // What the server runs with unless configured: `ServerSettings::default()` and the CLI's
        // defaults.
        Limits::default()
    } else {
        tight_limits()
    };
    let kind = Kind::ALL[usize::from(selector & !TIGHT) % Kind::ALL.len()];
    let outcome = match kind {
        Kind::Acquire => pb::AcquireRequest::decode(body)
            .ok()
            .map(|request| check_acquire(request, &limits)),
        Kind::Complete => pb::CompleteRequest::decode(body)
            .ok()
            .map(|request| check_complete(request, &limits)),
        Kind::Release => pb::ReleaseRequest::decode(body).ok().map(check_release),
        Kind::Renew => pb::RenewRequest::decode(body)
            .ok()
            .map(|request| check_renew(request, &limits)),
        Kind::Get => pb::GetRequest::decode(body).ok().map(check_get),
        Kind::Wait => pb::WaitRequest::decode(body)
            .ok()
            .map(|request| check_wait(request, &limits)),
    };
    match outcome {
        None => Verdict::Undecodable,
        Some(Ok(())) => Verdict::Accepted,
        Some(Err((violations, expected))) => {
            check_refusal(violations, &expected);
            Verdict::Refused
        }
    }
}

/// A refusal, with the fields the contract says are broken.
type Refusal = (Vec<FieldViolation>, Vec<&'static str>);

// The contract's rules, from the proto's comments.

fn is_control(c: char) -> bool {
    matches!(u32::from(c), 0..=0x1f | 0x7f..=0x9f)
}

fn namespace_ok(namespace: &str) -> bool {
    (1..=64).contains(&namespace.len())
        && namespace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn key_ok(key: &str) -> bool {
    (1..=255).contains(&key.len()) && !key.chars().any(is_control)
}

fn holder_ok(holder: &str) -> bool {
    holder.len() <= 128 && !holder.chars().any(is_control)
}

fn token_ok(token: &str) -> bool {
    token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A wire duration as `(seconds, nanos)`: `Ok(None)` when unset or zero, its length in
/// nanoseconds when positive, `Err` when negative or malformed.
fn requested(duration: Option<(i64, i32)>) -> Result<Option<u128>, ()> {
    let Some((seconds, nanos)) = duration else {
        return Ok(None);
    };
    if seconds < 0 || !(0..=999_999_999).contains(&nanos) {
        return Err(());
    }
    let total = seconds as u128 * 1_000_000_000 + nanos as u128;
    Ok((total > 0).then_some(total))
}

fn within(nanos: u128, policy: &DurationPolicy) -> Result<Duration, ()> {
    if nanos < policy.min.as_nanos() || nanos > policy.max.as_nanos() {
        return Err(());
    }
    Ok(Duration::new(
        (nanos / 1_000_000_000) as u64,
        (nanos % 1_000_000_000) as u32,
    ))
}

/// What a duration field resolves to: unset or zero means the default.
fn resolved(duration: Option<(i64, i32)>, policy: &DurationPolicy) -> Result<Duration, ()> {
    match requested(duration)? {
        None => Ok(policy.default),
        Some(nanos) => within(nanos, policy),
    }
}

/// The broken fields of a result, in the order validation reports them.
fn result_problems(result: &Option<pb::Result>, limits: &Limits) -> Vec<&'static str> {
    let Some(result) = result else {
        return vec!["result"];
    };
    let mut fields = Vec::new();
    if result.body.len() > limits.max_result_body_bytes {
        fields.push("result.body");
    }
    let entry_ok = |(name, value): (&String, &String)| {
        (1..=256).contains(&name.len())
            && !name.chars().any(is_control)
            && value.len() <= 16 * 1024
            && !value.contains('\0')
    };
    if result.metadata.len() > 64 || !result.metadata.iter().all(entry_ok) {
        fields.push("result.metadata");
    }
    fields
}

/// The fields whose check failed, in order.
fn broken(checks: &[(&'static str, bool)]) -> Vec<&'static str> {
    checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(field, _)| *field)
        .collect()
}

fn check_acquire(request: pb::AcquireRequest, limits: &Limits) -> Result<(), Refusal> {
    let lease_ttl = resolved(
        request.lease_ttl.as_ref().map(|d| (d.seconds, d.nanos)),
        &limits.lease_ttl,
    );
    let retention = resolved(
        request.retention.as_ref().map(|d| (d.seconds, d.nanos)),
        &limits.retention,
    );
    let expected = broken(&[
        ("namespace", namespace_ok(&request.namespace)),
        ("key", key_ok(&request.key)),
        ("fingerprint", request.fingerprint.len() <= 64),
        ("lease_ttl", lease_ttl.is_ok()),
        ("retention", retention.is_ok()),
        ("holder", holder_ok(&request.holder)),
    ]);
    match decode::acquire(request.clone(), limits) {
        Err(violations) => Err((violations, expected)),
        Ok(command) => {
            assert!(
                expected.is_empty(),
                "accepted {request:?}, broken: {expected:?}"
            );
            assert_eq!(command.namespace.as_str(), request.namespace);
            assert_eq!(command.key.as_str(), request.key);
            assert_eq!(command.fingerprint.as_bytes(), request.fingerprint);
            assert_eq!(command.holder.as_str(), request.holder);
            assert_eq!(Ok(command.lease_ttl), lease_ttl, "{request:?}");
            assert_eq!(Ok(command.retention), retention, "{request:?}");
            Ok(())
        }
    }
}

fn check_complete(request: pb::CompleteRequest, limits: &Limits) -> Result<(), Refusal> {
    let retention =
        requested(request.retention.as_ref().map(|d| (d.seconds, d.nanos))).and_then(|nanos| {
            nanos
                .map(|nanos| within(nanos, &limits.retention))
                .transpose()
        });
    let mut expected = broken(&[
        ("namespace", namespace_ok(&request.namespace)),
        ("key", key_ok(&request.key)),
        ("lease_token", token_ok(&request.lease_token)),
        ("retention", retention.is_ok()),
    ]);
    expected.extend(result_problems(&request.result, limits));
    match decode::complete(request.clone(), limits) {
        Err(violations) => Err((violations, expected)),
        Ok(command) => {
            assert!(
                expected.is_empty(),
                "accepted {request:?}, broken: {expected:?}"
            );
            assert_eq!(command.namespace.as_str(), request.namespace);
            assert_eq!(command.key.as_str(), request.key);
            assert_eq!(
                command.lease_token.to_hex(),
                request.lease_token.to_ascii_lowercase()
            );
            assert_eq!(Ok(command.retention), retention, "{request:?}");
            let result = request.result.as_ref().expect("accepted with a result");
            assert_eq!(command.result.body, result.body);
            assert_eq!(command.result.code, result.code);
            assert_eq!(command.result.metadata, result.metadata);
            assert!(command.result.body.len() <= limits.max_result_body_bytes);
            assert!(command.result.metadata.len() <= 64);
            Ok(())
        }
    }
}

fn check_release(request: pb::ReleaseRequest) -> Result<(), Refusal> {
    let expected = broken(&[
        ("namespace", namespace_ok(&request.namespace)),
        ("key", key_ok(&request.key)),
        ("lease_token", token_ok(&request.lease_token)),
    ]);
    match decode::release(request.clone()) {
        Err(violations) => Err((violations, expected)),
        Ok(command) => {
            assert!(
                expected.is_empty(),
                "accepted {request:?}, broken: {expected:?}"
            );
            assert_eq!(command.namespace.as_str(), request.namespace);
            assert_eq!(command.key.as_str(), request.key);
            assert_eq!(
                command.lease_token.to_hex(),
                request.lease_token.to_ascii_lowercase()
            );
            Ok(())
        }
    }
}

fn check_renew(request: pb::RenewRequest, limits: &Limits) -> Result<(), Refusal> {
    let lease_ttl = resolved(
        request.lease_ttl.as_ref().map(|d| (d.seconds, d.nanos)),
        &limits.lease_ttl,
    );
    let expected = broken(&[
        ("namespace", namespace_ok(&request.namespace)),
        ("key", key_ok(&request.key)),
        ("lease_token", token_ok(&request.lease_token)),
        ("lease_ttl", lease_ttl.is_ok()),
    ]);
    match decode::renew(request.clone(), limits) {
        Err(violations) => Err((violations, expected)),
        Ok(command) => {
            assert!(
                expected.is_empty(),
                "accepted {request:?}, broken: {expected:?}"
            );
            assert_eq!(command.namespace.as_str(), request.namespace);
            assert_eq!(command.key.as_str(), request.key);
            assert_eq!(
                command.lease_token.to_hex(),
                request.lease_token.to_ascii_lowercase()
            );
            assert_eq!(Ok(command.lease_ttl), lease_ttl, "{request:?}");
            Ok(())
        }
    }
}

fn check_get(request: pb::GetRequest) -> Result<(), Refusal> {
    let expected = broken(&[
        ("namespace", namespace_ok(&request.namespace)),
        ("key", key_ok(&request.key)),
    ]);
    match decode::get(request.clone()) {
        Err(violations) => Err((violations, expected)),
        Ok(command) => {
            assert!(
                expected.is_empty(),
                "accepted {request:?}, broken: {expected:?}"
            );
            assert_eq!(command.namespace.as_str(), request.namespace);
            assert_eq!(command.key.as_str(), request.key);
            Ok(())
        }
    }
}

fn check_wait(request: pb::WaitRequest, limits: &Limits) -> Result<(), Refusal> {
    let timeout = resolved(
        request.timeout.as_ref().map(|d| (d.seconds, d.nanos)),
        &limits.wait_timeout,
    );
    let expected = broken(&[
        ("namespace", namespace_ok(&request.namespace)),
        ("key", key_ok(&request.key)),
        ("timeout", timeout.is_ok()),
    ]);
    match decode::wait(request.clone(), limits) {
        Err(violations) => Err((violations, expected)),
        Ok(command) => {
            assert!(
                expected.is_empty(),
                "accepted {request:?}, broken: {expected:?}"
            );
            assert_eq!(command.namespace.as_str(), request.namespace);
            assert_eq!(command.key.as_str(), request.key);
            assert_eq!(Ok(command.timeout), timeout, "{request:?}");
            Ok(())
        }
    }
}

/// A refused request: the right fields, short clean descriptions, and a status that reaches the
/// caller.
fn check_refusal(violations: Vec<FieldViolation>, expected: &[&'static str]) {
    let mut fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
    fields.dedup();
    assert_eq!(fields, expected, "{violations:?}");
    for violation in &violations {
        assert!(!violation.description.is_empty(), "{violation:?}");
        assert!(
            violation.field.len() + violation.description.len() <= MAX_VIOLATION_BYTES,
            "{violation:?}"
        );
        assert!(
            !violation.description.chars().any(is_control),
            "{violation:?}"
        );
    }

    let status = status::invalid_argument(violations.clone());
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("invalid request: "),
        "{}",
        status.message()
    );
    assert!(!status.message().chars().any(is_control));
    let info = status.get_details_error_info().expect("ErrorInfo detail");
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        ("INVALID_REQUEST", "idemd")
    );
    let listed = status
        .get_details_bad_request()
        .expect("BadRequest detail")
        .field_violations;
    assert!(!listed.is_empty() && listed.len() <= violations.len());
    for (listed, violation) in listed.iter().zip(&violations) {
        assert_eq!(
            (listed.field.as_str(), listed.description.as_str()),
            (violation.field.as_str(), violation.description.as_str())
        );
        assert!(status.message().contains(&violation.to_string()));
    }
    if listed.len() < violations.len() {
        let more = format!("and {} more violations", violations.len() - listed.len());
        assert!(status.message().ends_with(&more), "{}", status.message());
    }
    let mut trailers = Default::default();
    status
        .add_header(&mut trailers)
        .expect("the status encodes as trailers");
    let size: usize = trailers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum();
    assert!(
        size <= MAX_TRAILER_BYTES,
        "{size} bytes of trailers for {} violations",
        violations.len()
    );
}
