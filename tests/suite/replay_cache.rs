//! The replica's cache of completed records: replays are answered without the database (proved
//! by making the database unreachable), with the same answers it would give, and never past the
//! record's retention.

use std::time::Duration;

use idemd::proto::idempotency::v1 as pb;
use tonic::Code;

use crate::faults::{server_behind_proxy, Fault};
use crate::harness::*;

const NAMESPACE: &str = "cache";

fn timed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_secs(10));
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_come_from_the_cache_and_respect_retention() {
    let database = TestDatabase::create().await;
    let (proxy, server) = server_behind_proxy(&database, Duration::from_secs(1)).await;
    let mut client = server.client().await;

    // Two completed keys: one kept for a day, one for 2.5 s.
    let mut completed = Vec::new();
    for (key, retention) in [("long", 24 * 3600 * 1000), ("short", 2500)] {
        let lease = client
            .acquire(timed(acquire_request(NAMESPACE, key, b"fp")))
            .await
            .expect("acquire")
            .into_inner()
            .lease
            .expect("lease");
        let record = client
            .complete(timed(pb::CompleteRequest {
                namespace: NAMESPACE.into(),
                key: key.into(),
                lease_token: lease.token,
                result: Some(sample_result(key)),
                retention: ms(retention),
            }))
            .await
            .expect("complete")
            .into_inner()
            .record
            .expect("record");
        // A first replay through the database: it also tells the replica the database's clock.
        let replay = client
            .acquire(timed(acquire_request(NAMESPACE, key, b"fp")))
            .await
            .expect("replay")
            .into_inner();
        assert_eq!(replay.record.as_ref(), Some(&record));
        completed.push(record);
    }

    // The database is unreachable; replays and Gets of completed keys are still answered, with
    // exactly the stored record, and a different fingerprint is still refused.
    proxy.set(Fault::BlackHole);
    for record in &completed {
        let replay = client
            .acquire(timed(acquire_request(NAMESPACE, &record.key, b"fp")))
            .await
            .expect("replay while the database is unreachable")
            .into_inner();
        assert_eq!(replay.outcome(), pb::Outcome::Completed);
        assert_eq!(replay.record.as_ref(), Some(record));
        let got = client
            .get(timed(pb::GetRequest {
                namespace: NAMESPACE.into(),
                key: record.key.clone(),
            }))
            .await
            .expect("get while the database is unreachable")
            .into_inner()
            .record;
        assert_eq!(got.as_ref(), Some(record));
        assert_status(
            client
                .acquire(timed(acquire_request(NAMESPACE, &record.key, b"other")))
                .await,
            Code::FailedPrecondition,
            "FINGERPRINT_MISMATCH",
        );
    }
    // Anything else needs the database.
    assert_status(
        client
            .acquire(timed(acquire_request(NAMESPACE, "fresh", b"fp")))
            .await,
        Code::Unavailable,
        "STORE_UNAVAILABLE",
    );

    // Past its retention (by the database's clock, which the test shares), the short record is
    // not answered from the cache: with the database unreachable, that is UNAVAILABLE.
    wait_past(to_system_time(&completed[1].expires_at)).await;
    assert_status(
        client
            .acquire(timed(acquire_request(NAMESPACE, "short", b"fp")))
            .await,
        Code::Unavailable,
        "STORE_UNAVAILABLE",
    );
    proxy.set(Fault::Pass);
    let back_by = std::time::Instant::now() + Duration::from_secs(30);
    let outcome = loop {
        assert!(
            std::time::Instant::now() < back_by,
            "the database did not come back"
        );
        match client
            .acquire(timed(acquire_request(NAMESPACE, "short", b"fp")))
            .await
        {
            Ok(response) => break response.into_inner().outcome(),
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A new record (IN_PROGRESS only if an earlier attempt got through unanswered).
    assert!(
        matches!(outcome, pb::Outcome::Acquired | pb::Outcome::InProgress),
        "an expired record was replayed: {outcome:?}"
    );
    // The long one still replays.
    let replay = client
        .acquire(timed(acquire_request(NAMESPACE, "long", b"fp")))
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(replay.record.as_ref(), Some(&completed[0]));
    server.stop().await;
}

/// The cache never vouches for a Complete the database did not commit. A deferred constraint
/// trigger refuses the commit of one key's Complete with a serialization failure, after the UPDATE
/// has already returned the completed row: the moment at which a cache filled from the row, rather
/// than from the confirmed commit, would hold a record PostgreSQL does not have. The replica must
/// answer that key from the database (IN_PROGRESS), and with the database unreachable it must not
/// answer it at all, while it still answers a committed key from the cache.
///
/// What the cache cannot know about: a record the database loses after acknowledging its commit
/// (a restore from backup, a failover to a standby that missed the commit, a row deleted by hand)
/// is still answered by each replica that cached it until the record expires or the replica
/// restarts; README.md says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_whose_commit_failed_is_never_answered_from_the_cache() {
    let database = TestDatabase::create().await;
    let (proxy, server) = server_behind_proxy(&database, Duration::from_secs(1)).await;
    let mut client = server.client().await;

    let complete = |client: &mut Client, key: &'static str, token: String| {
        let mut client = client.clone();
        async move {
            client
                .complete(timed(pb::CompleteRequest {
                    namespace: NAMESPACE.into(),
                    key: key.into(),
                    lease_token: token,
                    result: Some(sample_result(key)),
                    retention: None,
                }))
                .await
        }
    };
    let acquire = |client: &mut Client, key: &'static str| {
        let mut client = client.clone();
        async move {
            client
                .acquire(timed(acquire_request(NAMESPACE, key, b"fp")))
                .await
                .expect("acquire")
                .into_inner()
                .lease
                .expect("lease")
        }
    };
    let get = |client: &mut Client, key: &'static str| {
        let mut client = client.clone();
        async move {
            client
                .get(timed(pb::GetRequest {
                    namespace: NAMESPACE.into(),
                    key: key.into(),
                }))
                .await
        }
    };

    // A committed record, read once through the database: the replica now knows the
    // database's clock, so its cache answers from here on.
    let lease = acquire(&mut client, "kept").await;
    let kept = complete(&mut client, "kept", lease.token)
        .await
        .expect("complete")
        .into_inner()
        .record
        .expect("record");
    let read = get(&mut client, "kept").await.expect("get").into_inner();
    assert_eq!(read.record.as_ref(), Some(&kept));

    let admin = database.connect().await;
    admin
        .batch_execute(
            "CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 RAISE EXCEPTION 'commit refused by the test' USING ERRCODE = 'serialization_failure';
             END $$;
             CREATE CONSTRAINT TRIGGER refuse_commit AFTER UPDATE ON idemd_records
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
             WHEN (NEW.key = 'lost' AND NEW.state = 2) EXECUTE FUNCTION refuse_commit();",
        )
        .await
        .expect("install the trigger");

    let lease = acquire(&mut client, "lost").await;
    let refused = complete(&mut client, "lost", lease.token).await;
    let status = refused.expect_err("the database refused the commit");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let state: i16 = admin
        .query_one("SELECT state FROM idemd_records WHERE key = 'lost'", &[])
        .await
        .expect("read the row")
        .get(0);
    assert_eq!(state, 1, "the refused Complete was committed after all");

    // The replica answers from the database: the key is still in progress.
    let read = get(&mut client, "lost")
        .await
        .expect("get")
        .into_inner()
        .record
        .expect("record");
    assert_eq!(
        read.state(),
        pb::RecordState::InProgress,
        "the replica vouched for a Complete the database did not commit: {read:?}"
    );
    let replay = client
        .acquire(timed(acquire_request(NAMESPACE, "lost", b"fp")))
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(replay.outcome(), pb::Outcome::InProgress, "{replay:?}");

    // With the database unreachable, the cache still answers the committed key, and nothing for
    // the other.
    proxy.set(Fault::BlackHole);
    let read = get(&mut client, "kept")
        .await
        .expect("the committed record, from the cache")
        .into_inner();
    assert_eq!(read.record.as_ref(), Some(&kept));
    assert_status(
        get(&mut client, "lost").await,
        Code::Unavailable,
        "STORE_UNAVAILABLE",
    );
    assert_status(
        client
            .acquire(timed(acquire_request(NAMESPACE, "lost", b"fp")))
            .await,
        Code::Unavailable,
        "STORE_UNAVAILABLE",
    );
    proxy.set(Fault::Pass);
    server.stop().await;
}
