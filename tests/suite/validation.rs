//! Bad input gets INVALID_ARGUMENT naming the field and the rule, and changes nothing.

use idemd::proto::idempotency::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::harness::*;

const NS: &str = "validation";

/// Breaks one field of a valid request.
type Mutation = Box<dyn Fn(&mut pb::AcquireRequest)>;

/// Asserts INVALID_ARGUMENT with reason INVALID_REQUEST and a BadRequest violation on `field`.
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, tonic::Status>, field: &str) {
    let status = assert_status(result, Code::InvalidArgument, "INVALID_REQUEST");
    let bad_request = status.get_details_bad_request().expect("BadRequest detail");
    assert!(
        bad_request
            .field_violations
            .iter()
            .any(|v| v.field == field),
        "no violation on {field}: {bad_request:?}"
    );
    assert!(
        status.message().contains(field),
        "message names the field: {}",
        status.message()
    );
}

fn acquire(key: &str) -> pb::AcquireRequest {
    acquire_request(NS, key, b"")
}

async fn assert_absent(client: &mut Client, namespace: &str, key: &str) {
    let result = client
        .get(pb::GetRequest {
            namespace: namespace.into(),
            key: key.into(),
        })
        .await;
    assert_status(result, Code::NotFound, "RECORD_NOT_FOUND");
}

async fn check_acquire_validation(server: &TestServer) {
    let mut client = server.client().await;
    let duration = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
    let cases: Vec<(&str, Mutation)> = vec![
        ("namespace", Box::new(|r| r.namespace = String::new())),
        ("namespace", Box::new(|r| r.namespace = "n".repeat(65))),
        ("namespace", Box::new(|r| r.namespace = "has space".into())),
        ("namespace", Box::new(|r| r.namespace = "ünïcode".into())),
        ("namespace", Box::new(|r| r.namespace = "slash/ns".into())),
        ("key", Box::new(|r| r.key = String::new())),
        ("key", Box::new(|r| r.key = "k".repeat(256))),
        ("key", Box::new(|r| r.key = "nul\u{0}key".into())),
        ("key", Box::new(|r| r.key = "tab\tkey".into())),
        ("key", Box::new(|r| r.key = "del\u{7f}key".into())),
        ("key", Box::new(|r| r.key = "c1\u{85}key".into())),
        ("fingerprint", Box::new(|r| r.fingerprint = vec![7; 65])),
        (
            "lease_ttl",
            Box::new(move |r| r.lease_ttl = duration(-1, 0)),
        ),
        (
            "lease_ttl",
            Box::new(move |r| r.lease_ttl = duration(0, -5)),
        ),
        (
            "lease_ttl",
            Box::new(move |r| r.lease_ttl = duration(0, 1_000_000_000)),
        ),
        (
            "lease_ttl",
            Box::new(move |r| r.lease_ttl = duration(0, 1_000)),
        ),
        (
            "lease_ttl",
            Box::new(move |r| r.lease_ttl = duration(3601, 0)),
        ),
        (
            "retention",
            Box::new(move |r| r.retention = duration(-3, 0)),
        ),
        (
            "retention",
            Box::new(move |r| r.retention = duration(31 * 24 * 3600, 0)),
        ),
        (
            "retention",
            Box::new(move |r| r.retention = duration(i64::MAX, 0)),
        ),
        ("holder", Box::new(|r| r.holder = "h".repeat(129))),
        ("holder", Box::new(|r| r.holder = "line\nbreak".into())),
    ];
    for (field, mutate) in cases {
        let key = unique_key("acq");
        let mut request = acquire(&key);
        mutate(&mut request);
        let namespace = request.namespace.clone();
        let stored_key = request.key.clone();
        assert_invalid(client.acquire(request).await, field);
        if namespace == NS && stored_key == key {
            assert_absent(&mut client, NS, &key).await;
        }
    }
    // Limits are inclusive, and zero durations mean the default.
    let mut request = acquire(&"k".repeat(255));
    request.namespace = "n".repeat(64);
    request.fingerprint = vec![1; 64];
    request.holder = "h".repeat(128);
    request.lease_ttl = duration(3600, 0);
    request.retention = duration(30 * 24 * 3600, 0);
    let response = client
        .acquire(request)
        .await
        .expect("limits are inclusive")
        .into_inner();
    assert_eq!(response.outcome(), pb::Outcome::Acquired);
    let mut request = acquire(&unique_key("zero"));
    request.lease_ttl = duration(0, 0);
    request.retention = duration(0, 0);
    let response = client
        .acquire(request)
        .await
        .expect("zero means default")
        .into_inner();
    let lease = response.lease.expect("lease");
    let record = response.record.expect("record");
    assert_eq!(
        to_system_time(&lease.expires_at)
            .duration_since(to_system_time(&record.created_at))
            .expect("order"),
        std::time::Duration::from_secs(30)
    );
    // Every broken field is reported at once.
    let mut request = acquire("");
    request.namespace = String::new();
    request.holder = "\u{1}".into();
    let status = client.acquire(request).await.expect_err("invalid");
    let violations = status
        .get_details_bad_request()
        .expect("BadRequest")
        .field_violations;
    let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(fields, ["namespace", "key", "holder"]);
}

async fn check_lease_operation_validation(server: &TestServer) {
    let mut client = server.client().await;
    let key = unique_key("ops");
    let response = client
        .acquire(acquire(&key))
        .await
        .expect("acquire")
        .into_inner();
    let token = response.lease.expect("lease").token;
    let complete = |token: &str, result: Option<pb::Result>| pb::CompleteRequest {
        namespace: NS.into(),
        key: key.clone(),
        lease_token: token.into(),
        result,
        retention: None,
    };
    assert_invalid(
        client
            .complete(complete("", Some(pb::Result::default())))
            .await,
        "lease_token",
    );
    assert_invalid(
        client
            .complete(complete("not-a-token", Some(pb::Result::default())))
            .await,
        "lease_token",
    );
    assert_invalid(client.complete(complete(&token, None)).await, "result");
    let big = pb::Result {
        body: vec![0; 1024 * 1024 + 1],
        ..Default::default()
    };
    assert_invalid(
        client.complete(complete(&token, Some(big))).await,
        "result.body",
    );
    let crowded = pb::Result {
        metadata: (0..65)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect(),
        ..Default::default()
    };
    assert_invalid(
        client.complete(complete(&token, Some(crowded))).await,
        "result.metadata",
    );
    let nul = pb::Result {
        metadata: [("k".to_string(), "a\u{0}b".to_string())]
            .into_iter()
            .collect(),
        ..Default::default()
    };
    assert_invalid(
        client.complete(complete(&token, Some(nul))).await,
        "result.metadata",
    );
    let mut bad_retention = complete(&token, Some(pb::Result::default()));
    bad_retention.retention = ms(1);
    assert_invalid(client.complete(bad_retention).await, "retention");
    // Nothing was written by any of them: the lease still completes with the first real result.
    let exactly_max = pb::Result {
        body: vec![42; 1024 * 1024],
        code: -7,
        metadata: (0..64)
            .map(|i| (format!("k{i}"), "v".repeat(100)))
            .collect(),
    };
    let record = client
        .complete(complete(&token, Some(exactly_max.clone())))
        .await
        .expect("result at the limits")
        .into_inner()
        .record
        .expect("record");
    assert_eq!(record.result, Some(exactly_max));

    let release = |token: &str| pb::ReleaseRequest {
        namespace: NS.into(),
        key: key.clone(),
        lease_token: token.into(),
    };
    assert_invalid(client.release(release("")).await, "lease_token");
    assert_invalid(
        client.release(release(&"z".repeat(32))).await,
        "lease_token",
    );
    let renew = |token: &str, ttl| pb::RenewRequest {
        namespace: NS.into(),
        key: key.clone(),
        lease_token: token.into(),
        lease_ttl: ttl,
    };
    assert_invalid(client.renew(renew("", None)).await, "lease_token");
    assert_invalid(
        client.renew(renew(&token, ms(3_600_001))).await,
        "lease_ttl",
    );
    let get = pb::GetRequest {
        namespace: "bad ns".into(),
        key: String::new(),
    };
    assert_invalid(client.get(get.clone()).await, "namespace");
    assert_invalid(client.get(get).await, "key");
}

#[tokio::test]
async fn acquire_validation_memory() {
    check_acquire_validation(&TestServer::memory().await).await;
}

#[tokio::test]
async fn acquire_validation_postgres() {
    check_acquire_validation(&TestServer::postgres().await).await;
}

#[tokio::test]
async fn lease_operation_validation_memory() {
    check_lease_operation_validation(&TestServer::memory().await).await;
}

#[tokio::test]
async fn lease_operation_validation_postgres() {
    check_lease_operation_validation(&TestServer::postgres().await).await;
}

/// The shipped bounds, end to end: a real `idemd serve` with no bound flags (every other API test
/// lowers the minimums to 10 ms so leases can run out quickly). README: lease 30 s / 1 s / 1 h,
/// retention 24 h / 1 s / 30 d (default / min / max).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_lease_and_retention_bounds_hold_end_to_end() {
    use std::time::Duration;

    let server = crate::processes::IdemdProcess::start(&[]);
    let mut client = Client::connect(format!("http://{}", server.addr))
        .await
        .expect("connect");
    let duration =
        |millis: u64| prost_types::Duration::try_from(Duration::from_millis(millis)).ok();
    // (lease_ttl, retention) in ms; 0 = unset.
    let acquire_with = |lease_ms: u64, retention_ms: u64| {
        let mut request = acquire(&unique_key("bounds"));
        request.lease_ttl = if lease_ms == 0 {
            None
        } else {
            duration(lease_ms)
        };
        request.retention = if retention_ms == 0 {
            None
        } else {
            duration(retention_ms)
        };
        request
    };
    const HOUR: u64 = 3600 * 1000;
    const DAY: u64 = 24 * HOUR;

    // Just below the minimums and just above the maximums: refused, naming the field.
    assert_invalid(client.acquire(acquire_with(999, 0)).await, "lease_ttl");
    assert_invalid(client.acquire(acquire_with(HOUR + 1, 0)).await, "lease_ttl");
    assert_invalid(client.acquire(acquire_with(0, 999)).await, "retention");
    assert_invalid(
        client.acquire(acquire_with(0, 30 * DAY + 1)).await,
        "retention",
    );

    // At the bounds, and unset (the defaults): granted for exactly what was asked.
    for (lease_ms, retention_ms, expected_lease, expected_retention) in [
        (1000, 1000, 1000, 1000),
        (HOUR, 30 * DAY, HOUR, 30 * DAY),
        (0, 0, 30 * 1000, DAY),
    ] {
        let response = client
            .acquire(acquire_with(lease_ms, retention_ms))
            .await
            .unwrap_or_else(|status| {
                panic!("lease {lease_ms} ms, retention {retention_ms} ms: {status:?}")
            })
            .into_inner();
        assert_eq!(response.outcome(), pb::Outcome::Acquired);
        let record = response.record.expect("record");
        let lease_expires = to_system_time(&record.lease_expires_at);
        let granted_lease = lease_expires
            .duration_since(to_system_time(&record.created_at))
            .expect("lease ends after creation");
        let granted_retention = to_system_time(&record.expires_at)
            .duration_since(lease_expires)
            .expect("record outlives its lease");
        assert_eq!(
            (granted_lease, granted_retention),
            (
                Duration::from_millis(expected_lease),
                Duration::from_millis(expected_retention)
            ),
            "asked lease {lease_ms} ms, retention {retention_ms} ms (0 = default)"
        );
    }

    // Renew has the same lease bounds.
    let key = unique_key("renew-bounds");
    let token = client
        .acquire(acquire(&key))
        .await
        .expect("acquire")
        .into_inner()
        .lease
        .expect("lease")
        .token;
    let renew = |millis| pb::RenewRequest {
        namespace: NS.into(),
        key: key.clone(),
        lease_token: token.clone(),
        lease_ttl: duration(millis),
    };
    assert_invalid(client.renew(renew(999)).await, "lease_ttl");
    client.renew(renew(1000)).await.expect("a 1 s renewal");
}
