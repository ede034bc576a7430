//! Wire → domain: turns protobuf requests into validated commands, collecting every broken rule
//! so the caller can fix them all at once. Nothing reaches a store unless all fields are valid.

use std::time::Duration;

use crate::domain::{
    AcquireCommand, CompleteCommand, DurationPolicy, FieldViolation, Fingerprint, GetCommand,
    Holder, Key, LeaseToken, Limits, Namespace, ReleaseCommand, RenewCommand, StoredResult,
    WaitCommand,
};
use crate::proto::idempotency::v1 as pb;

/// Collects violations while fields are parsed one by one.
#[derive(Default)]
struct Violations(Vec<FieldViolation>);

impl Violations {
    fn check<T>(&mut self, field: &str, parsed: Result<T, String>) -> Option<T> {
        parsed
            .map_err(|description| self.0.push(FieldViolation::new(field, description)))
            .ok()
    }

    /// Ok when every field was valid (then every `Option` checked above is `Some`).
    fn finish(self) -> Result<(), Vec<FieldViolation>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

/// A protobuf Duration as "unset or zero" (`None`) or a positive duration.
fn duration(value: Option<prost_types::Duration>) -> Result<Option<Duration>, String> {
    let Some(value) = value else { return Ok(None) };
    if value.seconds < 0 || value.nanos < 0 {
        return Err(format!(
            "must not be negative, got {}s {}ns",
            value.seconds, value.nanos
        ));
    }
    if value.nanos > 999_999_999 {
        return Err(format!("nanos must be 0-999999999, got {}", value.nanos));
    }
    let seconds = u64::try_from(value.seconds).unwrap_or_default();
    let nanos = u32::try_from(value.nanos).unwrap_or_default();
    let value = Duration::new(seconds, nanos);
    Ok((!value.is_zero()).then_some(value))
}

fn bounded(
    value: Option<prost_types::Duration>,
    policy: &DurationPolicy,
) -> Result<Duration, String> {
    policy.resolve(duration(value)?)
}

/// Every field left `None` by `check` has a violation recorded, so `finish` fails first.
macro_rules! all_valid {
    ($violations:ident; $($field:ident),+) => {
        match ($violations.finish(), $($field),+) {
            (Ok(()), $(Some($field)),+) => ($($field),+),
            (Err(violations), ..) => return Err(violations),
            _ => return Err(vec![FieldViolation::new("request", "invalid request")]),
        }
    };
}

pub fn acquire(
    request: pb::AcquireRequest,
    limits: &Limits,
) -> Result<AcquireCommand, Vec<FieldViolation>> {
    let mut v = Violations::default();
    let namespace = v.check("namespace", Namespace::parse(request.namespace));
    let key = v.check("key", Key::parse(request.key));
    let fingerprint = v.check("fingerprint", Fingerprint::parse(request.fingerprint));
    let lease_ttl = v.check("lease_ttl", bounded(request.lease_ttl, &limits.lease_ttl));
    let retention = v.check("retention", bounded(request.retention, &limits.retention));
    let holder = v.check("holder", Holder::parse(request.holder));
    let (namespace, key, fingerprint, lease_ttl, retention, holder) =
        all_valid!(v; namespace, key, fingerprint, lease_ttl, retention, holder);
    Ok(AcquireCommand {
        namespace,
        key,
        fingerprint,
        lease_ttl,
        retention,
        holder,
    })
}

pub fn complete(
    request: pb::CompleteRequest,
    limits: &Limits,
) -> Result<CompleteCommand, Vec<FieldViolation>> {
    let mut v = Violations::default();
    let namespace = v.check("namespace", Namespace::parse(request.namespace));
    let key = v.check("key", Key::parse(request.key));
    let lease_token = v.check("lease_token", LeaseToken::parse(&request.lease_token));
    let retention = v.check(
        "retention",
        duration(request.retention).and_then(|requested| match requested {
            None => Ok(None),
            some => limits.retention.resolve(some).map(Some),
        }),
    );
    let result = match request.result {
        None => {
            v.0.push(FieldViolation::new(
                "result",
                "is required: the result to store and replay (it may be empty inside)",
            ));
            None
        }
        Some(result) => match StoredResult::parse(
            result.body,
            result.code,
            result.metadata,
            limits.max_result_body_bytes,
        ) {
            Ok(result) => Some(result),
            Err(mut violations) => {
                v.0.append(&mut violations);
                None
            }
        },
    };
    let (namespace, key, lease_token, retention, result) =
        all_valid!(v; namespace, key, lease_token, retention, result);
    Ok(CompleteCommand {
        namespace,
        key,
        lease_token,
        result,
        retention,
    })
}

pub fn release(request: pb::ReleaseRequest) -> Result<ReleaseCommand, Vec<FieldViolation>> {
    let mut v = Violations::default();
    let namespace = v.check("namespace", Namespace::parse(request.namespace));
    let key = v.check("key", Key::parse(request.key));
    let lease_token = v.check("lease_token", LeaseToken::parse(&request.lease_token));
    let (namespace, key, lease_token) = all_valid!(v; namespace, key, lease_token);
    Ok(ReleaseCommand {
        namespace,
        key,
        lease_token,
    })
}

pub fn renew(
    request: pb::RenewRequest,
    limits: &Limits,
) -> Result<RenewCommand, Vec<FieldViolation>> {
    let mut v = Violations::default();
    let namespace = v.check("namespace", Namespace::parse(request.namespace));
    let key = v.check("key", Key::parse(request.key));
    let lease_token = v.check("lease_token", LeaseToken::parse(&request.lease_token));
    let lease_ttl = v.check("lease_ttl", bounded(request.lease_ttl, &limits.lease_ttl));
    let (namespace, key, lease_token, lease_ttl) =
        all_valid!(v; namespace, key, lease_token, lease_ttl);
    Ok(RenewCommand {
        namespace,
        key,
        lease_token,
        lease_ttl,
    })
}

pub fn get(request: pb::GetRequest) -> Result<GetCommand, Vec<FieldViolation>> {
    let mut v = Violations::default();
    let namespace = v.check("namespace", Namespace::parse(request.namespace));
    let key = v.check("key", Key::parse(request.key));
    let (namespace, key) = all_valid!(v; namespace, key);
    Ok(GetCommand { namespace, key })
}

pub fn wait(request: pb::WaitRequest, limits: &Limits) -> Result<WaitCommand, Vec<FieldViolation>> {
    let mut v = Violations::default();
    let namespace = v.check("namespace", Namespace::parse(request.namespace));
    let key = v.check("key", Key::parse(request.key));
    let timeout = v.check("timeout", bounded(request.timeout, &limits.wait_timeout));
    let (namespace, key, timeout) = all_valid!(v; namespace, key, timeout);
    Ok(WaitCommand {
        namespace,
        key,
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb_duration(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
        Some(prost_types::Duration { seconds, nanos })
    }

    #[test]
    fn durations() {
        assert_eq!(duration(None), Ok(None));
        assert_eq!(duration(pb_duration(0, 0)), Ok(None));
        assert_eq!(duration(pb_duration(2, 5)), Ok(Some(Duration::new(2, 5))));
        assert!(duration(pb_duration(-1, 0)).is_err());
        assert!(duration(pb_duration(0, -1)).is_err());
        assert!(duration(pb_duration(0, 1_000_000_000)).is_err());
        assert!(duration(pb_duration(i64::MAX, 999_999_999)).is_ok());
    }

    #[test]
    fn acquire_reports_every_violation() {
        let request = pb::AcquireRequest {
            namespace: "bad space".into(),
            key: String::new(),
            fingerprint: vec![0; 65],
            lease_ttl: pb_duration(-5, 0),
            retention: pb_duration(i64::MAX, 0),
            holder: "h\n".into(),
        };
        let violations = acquire(request, &Limits::default()).expect_err("invalid");
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "namespace",
                "key",
                "fingerprint",
                "lease_ttl",
                "retention",
                "holder"
            ]
        );
    }
}
