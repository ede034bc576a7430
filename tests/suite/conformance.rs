//! The conformance suite: one case per row of the README's semantics table, run against every
//! store over real gRPC. A difference between the stores is a bug.

use std::time::Duration;

use idemd::proto::idempotency::v1 as pb;
use tonic::Code;

use crate::harness::*;

const NS: &str = "conformance";

async fn acquired(client: &mut Client, request: pb::AcquireRequest) -> (pb::Lease, pb::Record) {
    let response = client.acquire(request).await.expect("acquire").into_inner();
    assert_eq!(response.outcome(), pb::Outcome::Acquired, "{response:?}");
    (
        response.lease.expect("lease on ACQUIRED"),
        response.record.expect("record"),
    )
}

fn complete_request(key: &str, token: &str, result: pb::Result) -> pb::CompleteRequest {
    pb::CompleteRequest {
        namespace: NS.into(),
        key: key.into(),
        lease_token: token.into(),
        result: Some(result),
        retention: None,
    }
}

fn release_request(key: &str, token: &str) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        namespace: NS.into(),
        key: key.into(),
        lease_token: token.into(),
    }
}

fn renew_request(key: &str, token: &str, ttl_ms: u64) -> pb::RenewRequest {
    pb::RenewRequest {
        namespace: NS.into(),
        key: key.into(),
        lease_token: token.into(),
        lease_ttl: ms(ttl_ms),
    }
}

fn get_request(key: &str) -> pb::GetRequest {
    pb::GetRequest {
        namespace: NS.into(),
        key: key.into(),
    }
}

/// Row: Acquire, no live record → ACQUIRED with a new lease.
pub async fn acquire_new_key_grants_lease(server: &TestServer) {
    let mut client = server.client().await;
    let key = unique_key("new");
    let mut request = acquire_request(NS, &key, b"fp-1");
    request.lease_ttl = ms(5_000);
    let (lease, record) = acquired(&mut client, request).await;
    assert_eq!(lease.token.len(), 32);
    assert!(lease.token.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(lease.fencing_token > 0);
    assert_eq!(record.state(), pb::RecordState::InProgress);
    assert_eq!(record.attempts, 1);
    assert_eq!(record.holder, "test-holder");
    assert_eq!(record.fingerprint, b"fp-1");
    assert_eq!(record.fencing_token, lease.fencing_token);
    assert!(record.result.is_none());
    let created = to_system_time(&record.created_at);
    let expires = to_system_time(&lease.expires_at);
    assert_eq!(
        expires
            .duration_since(created)
            .expect("expiry after creation"),
        Duration::from_secs(5)
    );
    assert_eq!(record.lease_expires_at, lease.expires_at);
    // Unfinished record lives lease + default retention (24 h).
    let record_expiry = to_system_time(&record.expires_at);
    assert_eq!(
        record_expiry.duration_since(expires).expect("after lease"),
        Duration::from_secs(24 * 3600)
    );
    // Two leases on two keys never share a token or a fencing token.
    let (other, _) = acquired(&mut client, acquire_request(NS, &unique_key("new"), b"")).await;
    assert_ne!(other.token, lease.token);
    assert!(other.fencing_token > lease.fencing_token);
}

/// Row: Acquire while another lease is live → IN_PROGRESS, no lease, retry_after = time left.
pub async fn acquire_during_live_lease_is_in_progress(server: &TestServer) {
    let mut client = server.client().await;
    let key = unique_key("busy");
    let mut request = acquire_request(NS, &key, b"fp");
    request.lease_ttl = ms(10_000);
    let (lease, _) = acquired(&mut client, request.clone()).await;
    let response = client.acquire(request).await.expect("acquire").into_inner();
    assert_eq!(response.outcome(), pb::Outcome::InProgress);
    assert!(response.lease.is_none());
    let retry_after = to_duration(&response.retry_after);
    assert!(
        retry_after > Duration::from_secs(5) && retry_after <= Duration::from_secs(10),
        "{retry_after:?}"
    );
    let record = response.record.expect("record");
    assert_eq!(record.state(), pb::RecordState::InProgress);
    assert_eq!(record.fencing_token, lease.fencing_token);
    assert_eq!(record.attempts, 1);
}

/// Row: Acquire on a COMPLETED record → COMPLETED with the result exactly as stored.
pub async fn acquire_completed_replays_result(server: &TestServer) {
    let mut client = server.client().await;
    let key = unique_key("done");
    let (lease, _) = acquired(&mut client, acquire_request(NS, &key, b"fp")).await;
    let stored = sample_result("replay");
    let completed = client
        .complete(complete_request(&key, &lease.token, stored.clone()))
        .await
        .expect("complete")
        .into_inner()
        .record
        .expect("record");
    assert_eq!(completed.state(), pb::RecordState::Completed);
    assert_eq!(completed.result.as_ref(), Some(&stored));
    assert!(completed.completed_at.is_some());
    assert!(completed.lease_expires_at.is_none());
    for _ in 0..2 {
        let response = client
            .acquire(acquire_request(NS, &key, b"fp"))
            .await
            .expect("acquire")
            .into_inner();
        assert_eq!(response.outcome(), pb::Outcome::Completed);
        assert!(response.lease.is_none());
        assert!(response.retry_after.is_none());
        let record = response.record.expect("record");
        assert_eq!(record.result, Some(stored.clone()));
        assert_eq!(record.fencing_token, lease.fencing_token);
    }
    // An empty result is a result too.
    let key = unique_key("empty-result");
    let (lease, _) = acquired(&mut client, acquire_request(NS, &key, b"")).await;
    client
        .complete(complete_request(&key, &lease.token, pb::Result::default()))
        .await
        .expect("complete empty");
    let replay = client
        .acquire(acquire_request(NS, &key, b""))
        .await
        .expect("acquire")
        .into_inner();
    assert_eq!(replay.outcome(), pb::Outcome::Completed);
    assert_eq!(
        replay.record.expect("record").result,
        Some(pb::Result::default())
    );
}

/// Row: Acquire on IN_PROGRESS whose lease expired → take over: new token, larger fencing
/// token, attempts + 1; the old token is dead.
pub async fn acquire_after_lease_expiry_takes_over(server: &TestServer) {
    let mut client = server.client().await;
    let key = unique_key("takeover");
    let mut request = acquire_request(NS, &key, b"fp");
    request.lease_ttl = ms(150);
    let (old, _) = acquired(&mut client, request.clone()).await;
    wait_past(to_system_time(&old.expires_at)).await;
    request.holder = "second".into();
    request.lease_ttl = ms(10_000);
    let (new, record) = acquired(&mut client, request.clone()).await;
    assert_ne!(new.token, old.token);
    assert!(new.fencing_token > old.fencing_token);
    assert_eq!(record.attempts, 2);
    assert_eq!(record.holder, "second");
    // The old token is dead for every lease operation.
    assert_status(
        client
            .complete(complete_request(&key, &old.token, sample_result("late")))
            .await,
        Code::FailedPrecondition,
        "LEASE_NOT_HELD",
    );
    assert_status(
        client.renew(renew_request(&key, &old.token, 1_000)).await,
        Code::FailedPrecondition,
        "LEASE_NOT_HELD",
    );
    assert_status(
        client.release(release_request(&key, &old.token)).await,
        Code::FailedPrecondition,
        "LEASE_NOT_HELD",
    );
    // The new holder is unaffected.
    let response = client.acquire(request).await.expect("acquire").into_inner();
    assert_eq!(response.outcome(), pb::Outcome::InProgress);
    client
        .complete(complete_request(&key, &new.token, sample_result("new")))
        .await
        .expect("new holder completes");
}

/// Row: a record with a different fingerprint → FAILED_PRECONDITION / FINGERPRINT_MISMATCH in
/// every state; empty equals only empty.
pub async fn fingerprint_mismatch_in_every_state(server: &TestServer) {
    let mut client = server.client().await;
    let mismatch = |client: &mut Client, key: String, fingerprint: &'static [u8]| {
        let mut client = client.clone();
        async move {
            assert_status(
                client.acquire(acquire_request(NS, &key, fingerprint)).await,
                Code::FailedPrecondition,
                "FINGERPRINT_MISMATCH",
            );
        }
    };
    // In progress, live lease; and empty vs non-empty both ways.
    let key = unique_key("fp-live");
    acquired(&mut client, acquire_request(NS, &key, b"")).await;
    mismatch(&mut client, key.clone(), b"x").await;
    let key = unique_key("fp-live2");
    acquired(&mut client, acquire_request(NS, &key, b"x")).await;
    mismatch(&mut client, key.clone(), b"").await;
    mismatch(&mut client, key.clone(), b"y").await;
    // Completed.
    let key = unique_key("fp-done");
    let (lease, _) = acquired(&mut client, acquire_request(NS, &key, b"a")).await;
    client
        .complete(complete_request(&key, &lease.token, sample_result("a")))
        .await
        .expect("complete");
    mismatch(&mut client, key.clone(), b"b").await;
    // Released.
    let key = unique_key("fp-released");
    let (lease, _) = acquired(&mut client, acquire_request(NS, &key, b"a")).await;
    client
        .release(release_request(&key, &lease.token))
        .await
        .expect("release");
    mismatch(&mut client, key.clone(), b"b").await;
    // Expired lease.
    let key = unique_key("fp-expired");
    let mut request = acquire_request(NS, &key, b"a");
    request.lease_ttl = ms(100);
    let (lease, _) = acquired(&mut client, request).await;
    wait_past(to_system_time(&lease.expires_at)).await;
    mismatch(&mut client, key.clone(), b"b").await;
    // The mismatch changed nothing: the original holder can still complete.
    let record = client
        .complete(complete_request(&key, &lease.token, sample_result("a")))
        .await
        .expect("complete after mismatch")
        .into_inner()
        .record
        .expect("record");
    assert_eq!(record.fingerprint, b"a");
    assert_eq!(record.attempts, 1);
}

/// Row: Complete retried with the same token returns the stored record; the first result stands.
pub async fn complete_retry_returns_first_result(server: &TestServer) {
    let mut client = server.client().await;
    let key = unique_key("retry");
    let (lease, _) = acquired(&mut client, acquire_request(NS, &key, b"")).await;
    let first = client
        .complete(complete_request(&key, &lease.token, sample_result("first")))
        .await
        .expect("complete")
        .into_inner()
        .record
        .expect("record");
    let again = client
        .complete(complete_request(
            &key,
            &lease.token,
            sample_result("second"),
        ))
        .await
        .expect("retried complete")
        .into_inner()
        .record
        .expect("record");
    assert_eq!(again.result, Some(sample_result("first")));
    assert_eq!(again, first);
}

/// Row: Complete after the lease expired is accepted while nobody took the key over.
pub async fn complete_after_expiry_without_takeover(server: &TestServer) {
    let mut client = server.client().await;
    let key = unique_key("late-complete");
    let mut request = acquire_request(NS, &key, b"");
    request.lease_ttl = ms(100);
    let (lease, _) = acquired(&mut client, request).await;
    wait_past(to_system_time(&lease.expires_at)).await;
    let record = client
        .complete(complete_request(&key, &lease.token, sample_result("late")))
        .await
        .expect("late complete")
        .into_inner()
        .record
        .expect("record");
    assert_eq!(record.state(), pb::RecordState::Completed);
    assert_eq!(record.result, Some(sample_result("late")));
}

/// Row: Complete with a token that is not current → LEASE_NOT_HELD; no record → NOT_FOUND.
pub async fn complete_refusals(server: &TestServer) {
    let mut client = server.client().await;
    let key = unique_key("refuse");
    acquired(&mut client, acquire_request(NS, &key, b"")).await;
    let forged = "0123456789abcdef0123456789abcdef";
    assert_status(
        client
            .complete(complete_request(&key, forged, sample_result("x")))
            .await,
        Code::FailedPrecondition,
        "LEASE_NOT_HELD",
    );
    assert_status(
        client
            .complete(complete_request(
                &unique_key("absent"),
                forged,
                sample_result("x"),
            ))
            .await,
        Code::NotFound,
        "RECORD_NOT_FOUND",
    );
    // The refused Complete stored nothing.
    let record = client
        .get(get_request(&key))
        .await
        .expect("get")
        .into_inner()
        .record
        .expect("record");
    assert_eq!(record.state(), pb::RecordState::InProgress);
    assert!(record.result.is_none());
}

/// Row: CompleteRequest.retention unset → the retention given at Acquire; set → that one.
pub async fn complete_retention(server: &TestServer) {
    let mut client = server.client().await;
    let key = unique_key("ret-default");
    let mut request = acquire_request(NS, &key, b"");
    request.retention = ms(3_600_000);
    let (lease, _) = acquired(&mut client, request).await;
    let record = client
        .complete(complete_request(&key, &lease.token, sample_result("r")))
        .await
        .expect("complete")
        .into_inner()
        .record
        .expect("record");
    let kept = to_system_time(&record.expires_at)
        .duration_since(to_system_time(&record.completed_at))
        .expect("expiry after completion");
    assert_eq!(kept, Duration::from_secs(3600));

    let key = unique_key("ret-explicit");
    let (lease, _) = acquired(&mut client, acquire_request(NS, &key, b"")).await;
    let mut complete = complete_request(&key, &lease.token, sample_result("r"));
    complete.retention = ms(7_200_000);
    let record = client
        .complete(complete)
        .await
        .expect("complete")
        .into_inner()
        .record
        .expect("record");
    let kept = to_system_time(&record.expires_at)
        .duration_since(to_system_time(&record.completed_at))
        .expect("expiry after completion");
    assert_eq!(kept, Duration::from_secs(7200));
}

/// Row: Release with the current token frees the key; retried Release → OK; stale token →
/// FAILED_PRECONDITION; released lease can neither complete nor renew.
pub async fn release_frees_key(server: &TestServer) {
    let mut client = server.client().await;
    let key = unique_key("release");
    let (first, _) = acquired(&mut client, acquire_request(NS, &key, b"")).await;
    client
        .release(release_request(&key, &first.token))
        .await
        .expect("release");
    client
        .release(release_request(&key, &first.token))
        .await
        .expect("retried release is OK");
    let record = client
        .get(get_request(&key))
        .await
        .expect("get")
        .into_inner()
        .record
        .expect("record");
    assert_eq!(record.state(), pb::RecordState::InProgress);
    assert!(to_system_time(&record.lease_expires_at) <= std::time::SystemTime::now());
    assert_status(
        client
            .complete(complete_request(&key, &first.token, sample_result("x")))
            .await,
        Code::FailedPrecondition,
        "LEASE_NOT_HELD",
    );
    assert_status(
        client.renew(renew_request(&key, &first.token, 1_000)).await,
        Code::FailedPrecondition,
        "LEASE_NOT_HELD",
    );
    let (second, record) = acquired(&mut client, acquire_request(NS, &key, b"")).await;
    assert!(second.fencing_token > first.fencing_token);
    assert_eq!(record.attempts, 2);
    assert_status(
        client.release(release_request(&key, &first.token)).await,
        Code::FailedPrecondition,
        "LEASE_NOT_HELD",
    );
    client
        .complete(complete_request(&key, &second.token, sample_result("x")))
        .await
        .expect("complete");
    assert_status(
        client.release(release_request(&key, &second.token)).await,
        Code::FailedPrecondition,
        "RECORD_COMPLETED",
    );
    assert_status(
        client.release(release_request(&key, &first.token)).await,
        Code::FailedPrecondition,
        "LEASE_NOT_HELD",
    );
    // Releasing a key that does not exist is a retried Release of a gone record: OK.
    client
        .release(release_request(&unique_key("never"), &second.token))
        .await
        .expect("release of absent key");
}

/// Row: Renew with the current token → expires_at = now + lease_ttl, also on an expired lease
/// nobody took over; refusals as for Complete.
pub async fn renew_extends_lease(server: &TestServer) {
    let mut client = server.client().await;
    let key = unique_key("renew");
    let mut request = acquire_request(NS, &key, b"");
    request.lease_ttl = ms(100);
    let (lease, _) = acquired(&mut client, request.clone()).await;
    wait_past(to_system_time(&lease.expires_at)).await;
    let renewed = client
        .renew(renew_request(&key, &lease.token, 20_000))
        .await
        .expect("renew expired lease")
        .into_inner()
        .lease
        .expect("lease");
    assert_eq!(renewed.token, lease.token);
    assert_eq!(renewed.fencing_token, lease.fencing_token);
    let left = to_system_time(&renewed.expires_at)
        .duration_since(std::time::SystemTime::now())
        .expect("renewed lease in the future");
    assert!(left > Duration::from_secs(15), "{left:?}");
    // Renewed: others see it in progress again.
    let response = client.acquire(request).await.expect("acquire").into_inner();
    assert_eq!(response.outcome(), pb::Outcome::InProgress);
    let record = response.record.expect("record");
    assert_eq!(record.lease_expires_at, renewed.expires_at);
    assert_status(
        client
            .renew(renew_request(
                &key,
                "ffffffffffffffffffffffffffffffff",
                1_000,
            ))
            .await,
        Code::FailedPrecondition,
        "LEASE_NOT_HELD",
    );
    assert_status(
        client
            .renew(renew_request(&unique_key("absent"), &lease.token, 1_000))
            .await,
        Code::NotFound,
        "RECORD_NOT_FOUND",
    );
    client
        .complete(complete_request(&key, &lease.token, sample_result("x")))
        .await
        .expect("complete");
    assert_status(
        client.renew(renew_request(&key, &lease.token, 1_000)).await,
        Code::FailedPrecondition,
        "RECORD_COMPLETED",
    );
}

/// Row: Get returns the record (never a lease token), or NOT_FOUND.
pub async fn get_reads_record(server: &TestServer) {
    let mut client = server.client().await;
    let key = unique_key("get");
    assert_status(
        client.get(get_request(&key)).await,
        Code::NotFound,
        "RECORD_NOT_FOUND",
    );
    let (lease, acquired_record) = acquired(&mut client, acquire_request(NS, &key, b"fp")).await;
    let record = client
        .get(get_request(&key))
        .await
        .expect("get")
        .into_inner()
        .record
        .expect("record");
    assert_eq!(record, acquired_record);
    let encoded = prost::Message::encode_to_vec(&record);
    assert!(
        !encoded
            .windows(lease.token.len())
            .any(|w| w == lease.token.as_bytes()),
        "Get must not reveal the lease token"
    );
    client
        .complete(complete_request(&key, &lease.token, sample_result("g")))
        .await
        .expect("complete");
    let record = client
        .get(get_request(&key))
        .await
        .expect("get")
        .into_inner()
        .record
        .expect("record");
    assert_eq!(record.state(), pb::RecordState::Completed);
    assert_eq!(record.result, Some(sample_result("g")));
}

/// Row: a completed record lives `retention` after completion; then it is absent at once: Get →
/// NOT_FOUND, Acquire → a fresh record (any fingerprint), Complete → NOT_FOUND.
pub async fn completed_record_expires_after_retention(server: &TestServer) {
    let mut client = server.client().await;
    let key = unique_key("retention");
    let mut request = acquire_request(NS, &key, b"old");
    request.retention = ms(200);
    let (lease, _) = acquired(&mut client, request).await;
    let record = client
        .complete(complete_request(&key, &lease.token, sample_result("old")))
        .await
        .expect("complete")
        .into_inner()
        .record
        .expect("record");
    wait_past(to_system_time(&record.expires_at)).await;
    assert_status(
        client.get(get_request(&key)).await,
        Code::NotFound,
        "RECORD_NOT_FOUND",
    );
    assert_status(
        client
            .complete(complete_request(&key, &lease.token, sample_result("x")))
            .await,
        Code::NotFound,
        "RECORD_NOT_FOUND",
    );
    let (fresh, record) = acquired(&mut client, acquire_request(NS, &key, b"new")).await;
    assert!(fresh.fencing_token > lease.fencing_token);
    assert_eq!(record.attempts, 1);
    assert_eq!(record.fingerprint, b"new");
    assert!(record.result.is_none());
}

/// Row: an abandoned in-progress record lives `retention` after its lease expiry: until then a
/// late Complete still finds it and any Acquire takes it over; after that it is absent.
pub async fn abandoned_record_expires_after_lease_plus_retention(server: &TestServer) {
    let mut client = server.client().await;
    let key = unique_key("abandoned");
    let mut request = acquire_request(NS, &key, b"fp");
    request.lease_ttl = ms(100);
    request.retention = ms(200);
    let (lease, record) = acquired(&mut client, request).await;
    assert_eq!(
        to_system_time(&record.expires_at)
            .duration_since(to_system_time(&lease.expires_at))
            .expect("record outlives lease"),
        Duration::from_millis(200)
    );
    wait_past(to_system_time(&record.expires_at)).await;
    assert_status(
        client.get(get_request(&key)).await,
        Code::NotFound,
        "RECORD_NOT_FOUND",
    );
    assert_status(
        client
            .complete(complete_request(&key, &lease.token, sample_result("x")))
            .await,
        Code::NotFound,
        "RECORD_NOT_FOUND",
    );
    client
        .release(release_request(&key, &lease.token))
        .await
        .expect("release of a gone record is OK");
    let (_, record) = acquired(&mut client, acquire_request(NS, &key, b"other")).await;
    assert_eq!(record.attempts, 1);
}

/// Fencing tokens strictly increase across every grant on a key: create, release, takeover,
/// and re-creation after expiry.
pub async fn fencing_tokens_strictly_increase(server: &TestServer) {
    let mut client = server.client().await;
    let key = unique_key("fencing");
    let mut last = 0;
    for round in 0..6 {
        let mut request = acquire_request(NS, &key, b"");
        request.lease_ttl = ms(50);
        request.retention = ms(50);
        let (lease, _) = acquired(&mut client, request).await;
        assert!(
            lease.fencing_token > last,
            "round {round}: {} <= {last}",
            lease.fencing_token
        );
        last = lease.fencing_token;
        match round % 3 {
            0 => {
                client
                    .release(release_request(&key, &lease.token))
                    .await
                    .expect("release");
            }
            1 => wait_past(to_system_time(&lease.expires_at)).await,
            _ => {
                // Let the whole record expire (lease + retention).
                wait_past(to_system_time(&lease.expires_at) + Duration::from_millis(60)).await;
            }
        }
    }
}

/// Records are kept per namespace: the same key in two namespaces is two records.
pub async fn namespaces_are_separate(server: &TestServer) {
    let mut client = server.client().await;
    let key = unique_key("shared-key");
    let (a, _) = acquired(&mut client, acquire_request("tenant-a", &key, b"a")).await;
    let (b, _) = acquired(&mut client, acquire_request("tenant-b", &key, b"b")).await;
    assert_ne!(a.token, b.token);
    let mut complete = complete_request(&key, &a.token, sample_result("a"));
    complete.namespace = "tenant-b".into();
    assert_status(
        client.complete(complete).await,
        Code::FailedPrecondition,
        "LEASE_NOT_HELD",
    );
}

macro_rules! conformance_suite {
    ($store:ident, $server:expr) => {
        mod $store {
            use crate::harness::TestServer;

            conformance_suite!(@cases $server;
                acquire_new_key_grants_lease,
                acquire_during_live_lease_is_in_progress,
                acquire_completed_replays_result,
                acquire_after_lease_expiry_takes_over,
                fingerprint_mismatch_in_every_state,
                complete_retry_returns_first_result,
                complete_after_expiry_without_takeover,
                complete_refusals,
                complete_retention,
                release_frees_key,
                renew_extends_lease,
                get_reads_record,
                completed_record_expires_after_retention,
                abandoned_record_expires_after_lease_plus_retention,
                fencing_tokens_strictly_increase,
                namespaces_are_separate,
            );
        }
    };
    (@cases $server:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let server: TestServer = $server.await;
                super::$case(&server).await;
                server.stop().await;
            }
        )+
    };
}

conformance_suite!(memory, TestServer::memory());
conformance_suite!(postgres, TestServer::postgres());
