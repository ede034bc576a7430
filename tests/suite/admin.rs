//! The admin API (`idempotency.admin.v1`) over real gRPC: the same cases on both stores
//! (filters, stuck detection as time passes, paging while writers insert, purge and force-release
//! semantics, bulk purges, audit entries, counts), bad input, and on PostgreSQL the audit's
//! atomicity and the invalidation of another replica's replay cache. The authorisation matrix is
//! in `admin_auth`.

use std::collections::HashSet;
use std::sync::{
    atomic::{AtomicBool, AtomicUsize, Ordering},
    Arc,
};
use std::time::{Duration, SystemTime};

use idemd::proto::idempotency::admin::v1 as admin;
use idemd::proto::idempotency::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::harness::*;

pub fn list(namespace: &str) -> admin::ListRecordsRequest {
    admin::ListRecordsRequest {
        namespace: namespace.into(),
        ..Default::default()
    }
}

/// Every page of a listing, in order.
pub async fn list_all(
    admin_client: &mut AdminClient,
    mut request: admin::ListRecordsRequest,
) -> Vec<pb::Record> {
    let mut records = Vec::new();
    loop {
        let page = admin_client
            .list_records(request.clone())
            .await
            .expect("list records")
            .into_inner();
        records.extend(page.records);
        if page.next_page_token.is_empty() {
            return records;
        }
        request.page_token = page.next_page_token;
    }
}

fn keys(records: &[pb::Record]) -> Vec<String> {
    records.iter().map(|record| record.key.clone()).collect()
}

fn sorted(mut keys: Vec<String>) -> Vec<String> {
    keys.sort();
    keys
}

/// Acquires `key` with a lease of `lease_ms` for `holder`; returns the lease.
pub async fn acquire(
    client: &mut Client,
    namespace: &str,
    key: &str,
    lease_ms: u64,
    holder: &str,
) -> pb::Lease {
    let mut request = acquire_request(namespace, key, b"fp");
    request.lease_ttl = ms(lease_ms);
    request.holder = holder.into();
    let response = client.acquire(request).await.expect("acquire").into_inner();
    assert_eq!(response.outcome(), pb::Outcome::Acquired, "{response:?}");
    response.lease.expect("lease")
}

pub async fn complete(client: &mut Client, namespace: &str, key: &str, token: &str) -> pb::Record {
    client
        .complete(pb::CompleteRequest {
            namespace: namespace.into(),
            key: key.into(),
            lease_token: token.into(),
            result: Some(sample_result(key)),
            retention: None,
        })
        .await
        .expect("complete")
        .into_inner()
        .record
        .expect("record")
}

pub fn purge(namespace: &str, key: &str, reason: &str) -> admin::PurgeRecordRequest {
    admin::PurgeRecordRequest {
        namespace: namespace.into(),
        key: key.into(),
        reason: reason.into(),
        expected_fencing_token: 0,
    }
}

fn force_release(namespace: &str, key: &str, reason: &str) -> admin::ForceReleaseRequest {
    admin::ForceReleaseRequest {
        namespace: namespace.into(),
        key: key.into(),
        reason: reason.into(),
        expected_fencing_token: 0,
    }
}

fn stuck_only(namespace: &str) -> admin::ListRecordsRequest {
    admin::ListRecordsRequest {
        stuck_only: true,
        ..list(namespace)
    }
}

/// Filters: states, key prefix, holder, stuck, creation times; namespaces kept apart; newest
/// first.
pub async fn filters_select_records(server: &TestServer) {
    const NS: &str = "adm-filters";
    let mut client = server.client().await;
    let mut admin_client = server.admin().await;
    let done = acquire(&mut client, NS, "order-1", 60_000, "w1").await;
    complete(&mut client, NS, "order-1", &done.token).await;
    acquire(&mut client, NS, "order-2", 60_000, "w2").await;
    acquire(&mut client, NS, "refund-1", 60_000, "w1").await;
    let stuck = acquire(&mut client, NS, "order-3", 20, "w3").await;
    let released = acquire(&mut client, NS, "order-4", 60_000, "w4").await;
    client
        .release(pb::ReleaseRequest {
            namespace: NS.into(),
            key: "order-4".into(),
            lease_token: released.token,
        })
        .await
        .expect("release");
    acquire(&mut client, "adm-elsewhere", "order-1", 60_000, "w1").await;
    wait_past(to_system_time(&stuck.expires_at)).await;

    let all = list_all(&mut admin_client, list(NS)).await;
    assert_eq!(all.len(), 5, "{:?}", keys(&all));
    for pair in all.windows(2) {
        let (newer, older) = (&pair[0], &pair[1]);
        let (newer_at, older_at) = (
            to_system_time(&newer.created_at),
            to_system_time(&older.created_at),
        );
        assert!(
            newer_at > older_at || (newer_at == older_at && newer.key < older.key),
            "not newest first: {:?}",
            keys(&all)
        );
    }
    let completed = all
        .iter()
        .find(|record| record.key == "order-1")
        .expect("order-1");
    assert_eq!(
        completed.result.as_ref().map(|result| result.body.clone()),
        Some(sample_result("order-1").body),
        "auth off: bodies shown"
    );

    let select = |request: admin::ListRecordsRequest| {
        let mut admin_client = admin_client.clone();
        async move { sorted(keys(&list_all(&mut admin_client, request).await)) }
    };
    let states = |states: Vec<pb::RecordState>| admin::ListRecordsRequest {
        states: states.into_iter().map(|state| state as i32).collect(),
        ..list(NS)
    };
    assert_eq!(
        select(states(vec![pb::RecordState::Completed])).await,
        ["order-1"]
    );
    assert_eq!(
        select(states(vec![pb::RecordState::InProgress])).await,
        ["order-2", "order-3", "order-4", "refund-1"]
    );
    assert_eq!(
        select(admin::ListRecordsRequest {
            key_prefix: "order-".into(),
            ..list(NS)
        })
        .await,
        ["order-1", "order-2", "order-3", "order-4"]
    );
    assert_eq!(
        select(admin::ListRecordsRequest {
            holder: "w1".into(),
            ..list(NS)
        })
        .await,
        ["order-1", "refund-1"]
    );
    // Stuck: lease expired and not released (order-4 was given back: not stuck).
    assert_eq!(select(stuck_only(NS)).await, ["order-3"]);
    let created = |key: &str| {
        all.iter()
            .find(|record| record.key == key)
            .map(|record| record.created_at)
            .expect("listed")
    };
    let after_refund = select(admin::ListRecordsRequest {
        created_after: created("refund-1"),
        ..list(NS)
    })
    .await;
    assert_eq!(after_refund, ["order-3", "order-4"]);
    let before_refund = select(admin::ListRecordsRequest {
        created_before: created("refund-1"),
        ..list(NS)
    })
    .await;
    assert_eq!(before_refund, ["order-1", "order-2"]);
    let combined = select(admin::ListRecordsRequest {
        key_prefix: "order-".into(),
        holder: "w2".into(),
        states: vec![pb::RecordState::InProgress as i32],
        ..list(NS)
    })
    .await;
    assert_eq!(combined, ["order-2"]);
    assert_eq!(
        select(list("adm-elsewhere")).await,
        ["order-1"],
        "namespaces are apart"
    );
}

/// A record becomes stuck when its lease runs out, and stops being stuck when renewed.
pub async fn stuck_detection_follows_time(server: &TestServer) {
    const NS: &str = "adm-stuck";
    let mut client = server.client().await;
    let mut admin_client = server.admin().await;
    let lease = acquire(&mut client, NS, "slow", 400, "worker-7").await;
    let stuck_keys = |admin_client: &mut AdminClient| {
        let mut admin_client = admin_client.clone();
        async move { keys(&list_all(&mut admin_client, stuck_only(NS)).await) }
    };
    let summary = |admin_client: &mut AdminClient| {
        let mut admin_client = admin_client.clone();
        async move {
            admin_client
                .list_namespaces(admin::ListNamespacesRequest {})
                .await
                .expect("namespaces")
                .into_inner()
                .namespaces
                .into_iter()
                .find(|summary| summary.namespace == NS)
                .expect("summary")
        }
    };
    // The lease is live for a while yet: not stuck.
    if SystemTime::now() + Duration::from_millis(100) < to_system_time(&lease.expires_at) {
        assert!(stuck_keys(&mut admin_client).await.is_empty());
    }
    eventually(Duration::from_secs(10), "the record turns stuck", || {
        let mut admin_client = admin_client.clone();
        async move { stuck_keys(&mut admin_client).await == ["slow"] }
    })
    .await;
    let stuck = summary(&mut admin_client).await;
    assert_eq!((stuck.in_progress, stuck.stuck), (1, 1), "{stuck:?}");
    // Its holder comes back and renews: no longer stuck.
    client
        .renew(pb::RenewRequest {
            namespace: NS.into(),
            key: "slow".into(),
            lease_token: lease.token,
            lease_ttl: ms(60_000),
        })
        .await
        .expect("renew");
    assert!(stuck_keys(&mut admin_client).await.is_empty());
    assert_eq!(summary(&mut admin_client).await.stuck, 0);
}

/// Pages neither repeat nor skip a record that exists for the whole listing while 8 writers
/// insert.
pub async fn paging_while_writers_insert(server: &TestServer) {
    const NS: &str = "adm-paging";
    let mut client = server.client().await;
    let mut existing = HashSet::new();
    for index in 0..150 {
        let key = format!("before-{index:03}");
        let lease = acquire(&mut client, NS, &key, 60_000, "w").await;
        if index % 3 == 0 {
            complete(&mut client, NS, &key, &lease.token).await;
        }
        existing.insert(key);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let inserted = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for writer in 0..8 {
        let mut client = server.client().await;
        let (stop, inserted) = (stop.clone(), inserted.clone());
        writers.push(tokio::spawn(async move {
            let mut index = 0;
            while !stop.load(Ordering::Relaxed) {
                acquire(
                    &mut client,
                    NS,
                    &format!("during-{writer}-{index}"),
                    60_000,
                    "w",
                )
                .await;
                inserted.fetch_add(1, Ordering::Relaxed);
                index += 1;
            }
        }));
    }
    // Wait until the writers are running, so that every page is read while they insert.
    eventually(Duration::from_secs(10), "writers insert", || {
        let inserted = inserted.clone();
        async move { inserted.load(Ordering::Relaxed) >= 8 }
    })
    .await;
    let mut admin_client = server.admin().await;
    let mut request = admin::ListRecordsRequest {
        page_size: 7,
        ..list(NS)
    };
    let mut seen = Vec::new();
    let mut pages = 0;
    let inserted_before = inserted.load(Ordering::Relaxed);
    loop {
        let page = admin_client
            .list_records(request.clone())
            .await
            .expect("page")
            .into_inner();
        assert!(page.records.len() <= 7);
        seen.extend(keys(&page.records));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    let inserted_during = inserted.load(Ordering::Relaxed) - inserted_before;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("writer");
    }
    assert!(
        inserted_during > 0,
        "the writers inserted nothing while {pages} pages were read"
    );
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a record was listed twice");
    let missing: Vec<&String> = existing
        .iter()
        .filter(|key| !unique.contains(key))
        .collect();
    assert!(missing.is_empty(), "records skipped: {missing:?}");
    assert!(pages >= 150 / 7, "{pages} pages");
}

/// PurgeRecord: the key then behaves as never seen; a stale expected token or a missing record
/// changes nothing.
pub async fn purge_makes_the_key_new(server: &TestServer) {
    const NS: &str = "adm-purge";
    let mut client = server.client().await;
    let mut admin_client = server.admin().await;
    let lease = acquire(&mut client, NS, "paid", 60_000, "w").await;
    let record = complete(&mut client, NS, "paid", &lease.token).await;

    let stale = admin::PurgeRecordRequest {
        expected_fencing_token: record.fencing_token + 1,
        ..purge(NS, "paid", "support case 1")
    };
    assert_status(
        admin_client.purge_record(stale).await,
        Code::FailedPrecondition,
        "STALE_RECORD",
    );
    assert_eq!(get_record(&mut client, NS, "paid").await, record);

    let purged = admin_client
        .purge_record(admin::PurgeRecordRequest {
            expected_fencing_token: record.fencing_token,
            ..purge(NS, "paid", "support case 1")
        })
        .await
        .expect("purge")
        .into_inner()
        .record
        .expect("record");
    assert_eq!(purged, record, "the purge returns what it deleted");
    assert_status(
        client
            .get(pb::GetRequest {
                namespace: NS.into(),
                key: "paid".into(),
            })
            .await,
        Code::NotFound,
        "RECORD_NOT_FOUND",
    );
    let again = client
        .acquire(acquire_request(NS, "paid", b"another request"))
        .await
        .expect("acquire")
        .into_inner();
    assert_eq!(again.outcome(), pb::Outcome::Acquired, "{again:?}");
    let again_record = again.record.expect("record");
    assert_eq!(again_record.attempts, 1, "a new record, not a takeover");
    assert!(again_record.fencing_token > record.fencing_token);

    assert_status(
        admin_client
            .purge_record(purge(NS, "never-seen", "why not"))
            .await,
        Code::NotFound,
        "RECORD_NOT_FOUND",
    );
    // Purging an in-progress record: its holder's Complete finds nothing.
    let holder = acquire(&mut client, NS, "running", 60_000, "w").await;
    admin_client
        .purge_record(purge(NS, "running", "poisoned input"))
        .await
        .expect("purge in progress");
    assert_status(
        client
            .complete(pb::CompleteRequest {
                namespace: NS.into(),
                key: "running".into(),
                lease_token: holder.token,
                result: Some(sample_result("late")),
                retention: None,
            })
            .await,
        Code::NotFound,
        "RECORD_NOT_FOUND",
    );
}

/// ForceRelease: the holder's Complete and Renew fail with LEASE_NOT_HELD, the next Acquire
/// takes over with a strictly higher fencing token; completed records are refused.
pub async fn force_release_ends_the_lease(server: &TestServer) {
    const NS: &str = "adm-release";
    let mut client = server.client().await;
    let mut admin_client = server.admin().await;
    let lease = acquire(&mut client, NS, "held", 3_600_000, "stuck-worker").await;
    assert_status(
        admin_client
            .force_release(admin::ForceReleaseRequest {
                expected_fencing_token: lease.fencing_token + 1,
                ..force_release(NS, "held", "worker hung")
            })
            .await,
        Code::FailedPrecondition,
        "STALE_RECORD",
    );
    let released = admin_client
        .force_release(admin::ForceReleaseRequest {
            expected_fencing_token: lease.fencing_token,
            ..force_release(NS, "held", "worker hung")
        })
        .await
        .expect("force release")
        .into_inner()
        .record
        .expect("record");
    assert_eq!(released.state(), pb::RecordState::InProgress);
    assert!(
        to_system_time(&released.lease_expires_at) <= SystemTime::now() + Duration::from_secs(1)
    );
    assert_status(
        client
            .complete(pb::CompleteRequest {
                namespace: NS.into(),
                key: "held".into(),
                lease_token: lease.token.clone(),
                result: Some(sample_result("late")),
                retention: None,
            })
            .await,
        Code::FailedPrecondition,
        "LEASE_NOT_HELD",
    );
    assert_status(
        client
            .renew(pb::RenewRequest {
                namespace: NS.into(),
                key: "held".into(),
                lease_token: lease.token.clone(),
                lease_ttl: ms(60_000),
            })
            .await,
        Code::FailedPrecondition,
        "LEASE_NOT_HELD",
    );
    let next = client
        .acquire(acquire_request(NS, "held", b"fp"))
        .await
        .expect("acquire")
        .into_inner();
    assert_eq!(next.outcome(), pb::Outcome::Acquired, "{next:?}");
    let next_lease = next.lease.expect("lease");
    assert!(next_lease.fencing_token > lease.fencing_token);
    assert_eq!(next.record.expect("record").attempts, 2, "a takeover");

    complete(&mut client, NS, "held", &next_lease.token).await;
    assert_status(
        admin_client
            .force_release(force_release(NS, "held", "too late"))
            .await,
        Code::FailedPrecondition,
        "RECORD_COMPLETED",
    );
    assert_status(
        admin_client
            .force_release(force_release(NS, "nobody", "nothing"))
            .await,
        Code::NotFound,
        "RECORD_NOT_FOUND",
    );
}

/// PurgeRecords: a dry run counts (up to the limit) and changes nothing; a real run deletes at
/// most `limit` matching records and nothing else.
pub async fn bulk_purge_counts_then_deletes(server: &TestServer) {
    const NS: &str = "adm-bulk";
    let mut client = server.client().await;
    let mut admin_client = server.admin().await;
    for index in 0..5 {
        let key = format!("bulk-{index}");
        let lease = acquire(&mut client, NS, &key, 60_000, "w").await;
        complete(&mut client, NS, &key, &lease.token).await;
    }
    acquire(&mut client, NS, "bulk-running", 60_000, "w").await;
    let keep = acquire(&mut client, NS, "keep-1", 60_000, "w").await;
    complete(&mut client, NS, "keep-1", &keep.token).await;
    let bulk = |dry_run: bool, limit: i32| admin::PurgeRecordsRequest {
        namespace: NS.into(),
        states: vec![pb::RecordState::Completed as i32],
        key_prefix: "bulk-".into(),
        reason: "test data".into(),
        dry_run,
        limit,
        ..Default::default()
    };
    let counter = admin_client.clone();
    let count = |request| {
        let mut admin_client = counter.clone();
        async move {
            admin_client
                .purge_records(request)
                .await
                .expect("purge records")
                .into_inner()
                .count
        }
    };
    assert_eq!(count(bulk(true, 100)).await, 5);
    assert_eq!(count(bulk(true, 3)).await, 3);
    assert_eq!(
        list_all(&mut admin_client, list(NS)).await.len(),
        7,
        "a dry run changes nothing"
    );
    assert_eq!(count(bulk(false, 3)).await, 3);
    assert_eq!(count(bulk(true, 100)).await, 2);
    assert_eq!(count(bulk(false, 100)).await, 2);
    assert_eq!(count(bulk(false, 100)).await, 0);
    assert_eq!(
        sorted(keys(&list_all(&mut admin_client, list(NS)).await)),
        ["bulk-running", "keep-1"]
    );
    // A purged key is new again.
    let again = client
        .acquire(acquire_request(NS, "bulk-0", b"fp"))
        .await
        .expect("acquire")
        .into_inner();
    assert_eq!(again.outcome(), pb::Outcome::Acquired);
}

/// Each change has its audit entry (a dry run none), newest first, paged.
pub async fn audit_entries_record_every_change(server: &TestServer) {
    const NS: &str = "adm-audit";
    let mut client = server.client().await;
    let mut admin_client = server.admin().await;
    let done = acquire(&mut client, NS, "done", 60_000, "w").await;
    let done_record = complete(&mut client, NS, "done", &done.token).await;
    let held = acquire(&mut client, NS, "held", 60_000, "w").await;
    admin_client
        .purge_record(purge(NS, "done", "ticket 1"))
        .await
        .expect("purge");
    admin_client
        .force_release(force_release(NS, "held", "ticket 2"))
        .await
        .expect("release");
    let bulk = admin::PurgeRecordsRequest {
        namespace: NS.into(),
        key_prefix: "h".into(),
        reason: "ticket 3".into(),
        limit: 10,
        ..Default::default()
    };
    admin_client
        .purge_records(admin::PurgeRecordsRequest {
            dry_run: true,
            ..bulk.clone()
        })
        .await
        .expect("dry run");
    admin_client.purge_records(bulk).await.expect("bulk");
    // Another namespace's entry is not listed here.
    acquire(&mut client, "adm-audit-other", "x", 60_000, "w").await;
    admin_client
        .purge_record(purge("adm-audit-other", "x", "elsewhere"))
        .await
        .expect("purge elsewhere");

    let mut request = admin::ListAuditEntriesRequest {
        namespace: NS.into(),
        page_size: 1,
        page_token: String::new(),
    };
    let mut entries = Vec::new();
    loop {
        let page = admin_client
            .list_audit_entries(request.clone())
            .await
            .expect("audit")
            .into_inner();
        assert!(page.entries.len() <= 1);
        entries.extend(page.entries);
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    let actions: Vec<_> = entries.iter().map(|entry| entry.action()).collect();
    assert_eq!(
        actions,
        [
            admin::AuditAction::PurgeRecords,
            admin::AuditAction::ForceRelease,
            admin::AuditAction::PurgeRecord
        ],
        "{entries:?}"
    );
    let (bulk_entry, release_entry, purge_entry) = (&entries[0], &entries[1], &entries[2]);
    assert_eq!(
        (
            bulk_entry.count,
            bulk_entry.key.as_str(),
            bulk_entry.reason.as_str()
        ),
        (1, "", "ticket 3")
    );
    assert!(bulk_entry.filter.contains("key_prefix"), "{bulk_entry:?}");
    assert_eq!(release_entry.key, "held");
    assert_eq!(release_entry.state_before(), pb::RecordState::InProgress);
    assert_eq!(release_entry.fencing_token_before, held.fencing_token);
    assert_eq!(purge_entry.key, "done");
    assert_eq!(purge_entry.reason, "ticket 1");
    assert_eq!(purge_entry.state_before(), pb::RecordState::Completed);
    assert_eq!(purge_entry.fencing_token_before, done_record.fencing_token);
    assert_eq!(purge_entry.caller, "-", "auth off");
    assert!(entries.windows(2).all(|pair| pair[0].id > pair[1].id));
    assert!(entries
        .iter()
        .all(|entry| entry.namespace == NS && entry.time.is_some()));
}

/// The totals of a namespace's per-minute counts over the last ten minutes: (created, completed,
/// taken over), after checking the minutes are consecutive and span the window.
pub async fn stats_totals(admin_client: &mut AdminClient, namespace: &str) -> (u64, u64, u64) {
    let minutes = admin_client
        .get_namespace_stats(admin::GetNamespaceStatsRequest {
            namespace: namespace.into(),
            window: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
        })
        .await
        .expect("stats")
        .into_inner()
        .minutes;
    assert!(
        (10..=11).contains(&minutes.len()),
        "{} minutes",
        minutes.len()
    );
    assert!(minutes
        .windows(2)
        .all(|pair| to_system_time(&pair[1].minute)
            == to_system_time(&pair[0].minute) + Duration::from_secs(60)));
    let total = |pick: fn(&admin::MinuteCounts) -> u64| minutes.iter().map(pick).sum::<u64>();
    (
        total(|m| m.created),
        total(|m| m.completed),
        total(|m| m.taken_over),
    )
}

/// ListNamespaces counts live records by state; GetNamespaceStats counts events per minute:
/// records created, results stored (a retried Complete does not count again), takeovers (of an
/// expired lease, or after a ForceRelease); a purge lowers no count.
pub async fn namespaces_and_stats_count(server: &TestServer) {
    let mut client = server.client().await;
    let mut admin_client = server.admin().await;
    for index in 0..3 {
        let key = format!("c-{index}");
        let lease = acquire(&mut client, "adm-count-a", &key, 60_000, "w").await;
        complete(&mut client, "adm-count-a", &key, &lease.token).await;
        if index == 0 {
            // A retry of the same Complete answers the stored record and stores nothing.
            complete(&mut client, "adm-count-a", &key, &lease.token).await;
        }
    }
    let first = acquire(&mut client, "adm-count-a", "running", 60_000, "w").await;
    let taken = acquire(&mut client, "adm-count-b", "taken", 20, "w").await;
    wait_past(to_system_time(&taken.expires_at)).await;
    let takeover = client
        .acquire(acquire_request("adm-count-b", "taken", b"fp"))
        .await
        .expect("takeover")
        .into_inner();
    assert_eq!(takeover.outcome(), pb::Outcome::Acquired);
    let namespaces = admin_client
        .list_namespaces(admin::ListNamespacesRequest {})
        .await
        .expect("namespaces")
        .into_inner()
        .namespaces;
    let names: Vec<&str> = namespaces.iter().map(|n| n.namespace.as_str()).collect();
    assert_eq!(names, ["adm-count-a", "adm-count-b"]);
    let a = &namespaces[0];
    assert_eq!((a.in_progress, a.completed, a.stuck), (1, 3, 0));
    let first_record = get_record(&mut client, "adm-count-a", "running").await;
    assert_eq!(a.oldest_in_progress, first_record.created_at);
    assert!(first.fencing_token > 0);

    assert_eq!(
        stats_totals(&mut admin_client, "adm-count-a").await,
        (4, 3, 0)
    );
    assert_eq!(
        stats_totals(&mut admin_client, "adm-count-b").await,
        (1, 0, 1)
    );

    // Counts are of events: purging records lowers none of them.
    admin_client
        .purge_record(purge("adm-count-a", "c-0", "support case"))
        .await
        .expect("purge");
    admin_client
        .purge_records(admin::PurgeRecordsRequest {
            namespace: "adm-count-a".into(),
            reason: "clean up".into(),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("bulk purge");
    assert_eq!(
        stats_totals(&mut admin_client, "adm-count-a").await,
        (4, 3, 0)
    );
    // A ForceRelease ends the lease; the next Acquire takes the record over.
    admin_client
        .force_release(force_release("adm-count-b", "taken", "stuck worker"))
        .await
        .expect("force release");
    let after_release = client
        .acquire(acquire_request("adm-count-b", "taken", b"fp"))
        .await
        .expect("acquire after force release")
        .into_inner();
    assert_eq!(after_release.outcome(), pb::Outcome::Acquired);
    assert_eq!(
        stats_totals(&mut admin_client, "adm-count-b").await,
        (1, 0, 2)
    );
}

macro_rules! admin_suite {
    ($store:ident, $server:expr) => {
        mod $store {
            use crate::harness::TestServer;

            admin_suite!(@cases $server;
                filters_select_records,
                stuck_detection_follows_time,
                paging_while_writers_insert,
                purge_makes_the_key_new,
                force_release_ends_the_lease,
                bulk_purge_counts_then_deletes,
                audit_entries_record_every_change,
                namespaces_and_stats_count,
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

admin_suite!(memory, TestServer::memory());
admin_suite!(postgres, TestServer::postgres());

/// The fields a status's `BadRequest` names.
fn violated_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|bad| {
            bad.field_violations
                .into_iter()
                .map(|violation| violation.field)
                .collect()
        })
        .unwrap_or_default()
}

#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, tonic::Status>, field: &str) {
    let status = assert_status(result, Code::InvalidArgument, "INVALID_REQUEST");
    assert!(
        violated_fields(&status).iter().any(|f| f == field),
        "expected a violation of {field}: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_input_names_each_field() {
    let server = TestServer::memory().await;
    let mut client = server.client().await;
    let mut admin_client = server.admin().await;
    for index in 0..3 {
        acquire(&mut client, "adm-bad", &format!("k{index}"), 60_000, "w").await;
    }
    let first = admin_client
        .list_records(admin::ListRecordsRequest {
            page_size: 1,
            ..list("adm-bad")
        })
        .await
        .expect("page")
        .into_inner();
    let token = first.next_page_token;
    assert!(!token.is_empty());
    let with_token =
        |page_token: String, request: admin::ListRecordsRequest| admin::ListRecordsRequest {
            page_token,
            page_size: 1,
            ..request
        };
    // The token works for its own listing...
    admin_client
        .list_records(with_token(token.clone(), list("adm-bad")))
        .await
        .expect("own token");
    // ...and not for another namespace, other filters, or when altered or made up.
    let mut altered = token.clone().into_bytes();
    let last = altered.len() - 1;
    altered[last] = if altered[last] == b'0' { b'1' } else { b'0' };
    for (page_token, request) in [
        (token.clone(), list("adm-other")),
        (token.clone(), stuck_only("adm-bad")),
        (
            token.clone(),
            admin::ListRecordsRequest {
                holder: "w".into(),
                ..list("adm-bad")
            },
        ),
        (String::from_utf8(altered).expect("ascii"), list("adm-bad")),
        ("not a token".into(), list("adm-bad")),
        ("00".repeat(40), list("adm-bad")),
    ] {
        assert_invalid(
            admin_client
                .list_records(with_token(page_token, request))
                .await,
            "page_token",
        );
    }
    let audit_token_elsewhere = admin_client
        .list_audit_entries(admin::ListAuditEntriesRequest {
            namespace: "adm-bad".into(),
            page_size: 1,
            page_token: token.clone(),
        })
        .await;
    assert_invalid(audit_token_elsewhere, "page_token");
    for page_size in [-1, 501, i32::MAX] {
        assert_invalid(
            admin_client
                .list_records(admin::ListRecordsRequest {
                    page_size,
                    ..list("adm-bad")
                })
                .await,
            "page_size",
        );
        assert_invalid(
            admin_client
                .list_audit_entries(admin::ListAuditEntriesRequest {
                    namespace: "adm-bad".into(),
                    page_size,
                    page_token: String::new(),
                })
                .await,
            "page_size",
        );
    }
    for states in [vec![0], vec![7], vec![1, -3]] {
        assert_invalid(
            admin_client
                .list_records(admin::ListRecordsRequest {
                    states,
                    ..list("adm-bad")
                })
                .await,
            "states",
        );
    }
    assert_invalid(admin_client.list_records(list("")).await, "namespace");
    assert_invalid(
        admin_client
            .list_records(admin::ListRecordsRequest {
                key_prefix: "a\u{0}b".into(),
                ..list("adm-bad")
            })
            .await,
        "key_prefix",
    );
    assert_invalid(
        admin_client
            .list_records(admin::ListRecordsRequest {
                created_after: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..list("adm-bad")
            })
            .await,
        "created_after",
    );
    for reason in [
        "".to_string(),
        "   ".into(),
        "x".repeat(501),
        "tab\there".into(),
    ] {
        assert_invalid(
            admin_client
                .purge_record(purge("adm-bad", "k0", &reason))
                .await,
            "reason",
        );
        assert_invalid(
            admin_client
                .force_release(force_release("adm-bad", "k0", &reason))
                .await,
            "reason",
        );
        assert_invalid(
            admin_client
                .purge_records(admin::PurgeRecordsRequest {
                    namespace: "adm-bad".into(),
                    reason,
                    limit: 1,
                    dry_run: true,
                    ..Default::default()
                })
                .await,
            "reason",
        );
    }
    // 500 characters (not bytes) is the bound.
    assert_status(
        admin_client
            .purge_record(purge("adm-bad", "missing", &"é".repeat(500)))
            .await,
        Code::NotFound,
        "RECORD_NOT_FOUND",
    );
    assert_invalid(
        admin_client.purge_record(purge("adm-bad", "", "why")).await,
        "key",
    );
    for limit in [0, -1, 10_001] {
        assert_invalid(
            admin_client
                .purge_records(admin::PurgeRecordsRequest {
                    namespace: "adm-bad".into(),
                    reason: "why".into(),
                    limit,
                    ..Default::default()
                })
                .await,
            "limit",
        );
    }
    for window in [
        prost_types::Duration {
            seconds: 24 * 3600 + 1,
            nanos: 0,
        },
        prost_types::Duration {
            seconds: -60,
            nanos: 0,
        },
    ] {
        assert_invalid(
            admin_client
                .get_namespace_stats(admin::GetNamespaceStatsRequest {
                    namespace: "adm-bad".into(),
                    window: Some(window),
                })
                .await,
            "window",
        );
    }
    // Every broken field at once.
    let status = admin_client
        .purge_records(admin::PurgeRecordsRequest {
            namespace: "bad namespace".into(),
            reason: String::new(),
            limit: 0,
            states: vec![9],
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    let mut fields = violated_fields(&status);
    fields.sort();
    assert_eq!(
        fields,
        ["limit", "namespace", "reason", "states"],
        "{status:?}"
    );
    // Nothing was changed by any of it.
    assert_eq!(list_all(&mut admin_client, list("adm-bad")).await.len(), 3);
    server.stop().await;
}

/// On PostgreSQL, a change whose audit entry cannot be written does not happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_without_its_audit_entry_is_impossible() {
    const NS: &str = "adm-atomic";
    let database = TestDatabase::create().await;
    let server = TestServer::on_database(&database, test_settings()).await;
    let mut client = server.client().await;
    let mut admin_client = server.admin().await;
    let lease = acquire(&mut client, NS, "done", 60_000, "w").await;
    let record = complete(&mut client, NS, "done", &lease.token).await;
    let held = acquire(&mut client, NS, "held", 60_000, "w").await;
    // The audit table refuses every insert from now on.
    let sql = database.connect().await;
    sql.batch_execute(
        "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'audit refused by the test'; END $$;
         CREATE TRIGGER refuse_audit BEFORE INSERT ON idemd_audit
             FOR EACH ROW EXECUTE FUNCTION refuse_audit();",
    )
    .await
    .expect("trigger");
    assert_status(
        admin_client.purge_record(purge(NS, "done", "try")).await,
        Code::Internal,
        "INTERNAL",
    );
    assert_status(
        admin_client
            .force_release(force_release(NS, "held", "try"))
            .await,
        Code::Internal,
        "INTERNAL",
    );
    assert_status(
        admin_client
            .purge_records(admin::PurgeRecordsRequest {
                namespace: NS.into(),
                reason: "try".into(),
                limit: 100,
                ..Default::default()
            })
            .await,
        Code::Internal,
        "INTERNAL",
    );
    // Nothing changed: both records are there as they were, and the holder still holds its lease.
    let rows = sql
        .query(
            "SELECT key, released, revision FROM idemd_records WHERE namespace = $1 ORDER BY key",
            &[&NS],
        )
        .await
        .expect("rows");
    let found: Vec<(String, bool)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    assert_eq!(
        found,
        [("done".to_string(), false), ("held".to_string(), false)]
    );
    assert_eq!(get_record(&mut client, NS, "done").await, record);
    client
        .renew(pb::RenewRequest {
            namespace: NS.into(),
            key: "held".into(),
            lease_token: held.token,
            lease_ttl: ms(60_000),
        })
        .await
        .expect("the lease is still held");
    let entries: i64 = sql
        .query_one("SELECT count(*) FROM idemd_audit", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(entries, 0);
    // With the audit table writable again, the same purge goes through with its entry.
    sql.batch_execute("DROP TRIGGER refuse_audit ON idemd_audit")
        .await
        .expect("drop trigger");
    admin_client
        .purge_record(purge(NS, "done", "now"))
        .await
        .expect("purge");
    let entries: i64 = sql
        .query_one("SELECT count(*) FROM idemd_audit WHERE key = 'done'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(entries, 1);
    server.stop().await;
}

/// Two replicas on one database: B has a completed record in its replay cache, A purges it, and
/// an Acquire on B right after A's answer gets ACQUIRED (not B's cached COMPLETED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_on_one_replica_empties_the_others_cache() {
    const NS: &str = "adm-replicas";
    let database = TestDatabase::create().await;
    let replica_a = TestServer::on_database(&database, test_settings()).await;
    let replica_b = TestServer::on_database(&database, test_settings()).await;
    let mut client_b = replica_b.client().await;
    let mut admin_a = replica_a.admin().await;
    // Both replicas' listeners are up (they start with the store when its cache is on).
    let sql = database.connect().await;
    eventually(Duration::from_secs(10), "two listeners", || {
        let sql = &sql;
        async move {
            sql.query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'idemd-listener'",
                &[],
            )
            .await
            .expect("count")
            .get::<_, i64>(0)
                == 2
        }
    })
    .await;
    // Twenty rounds: a purge that returned before B applied the NOTIFY (no acknowledgement
    // wait) fails here in most runs within a few rounds.
    for round in 0..20 {
        let key = format!("paid-{round}");
        let lease = acquire(&mut client_b, NS, &key, 60_000, "w").await;
        let record = complete(&mut client_b, NS, &key, &lease.token).await;
        // A Get on B reads the database's clock and keeps the record in B's cache.
        assert_eq!(get_record(&mut client_b, NS, &key).await, record);
        // B answers the replay from its cache: proved by deleting the row behind its back
        // (not through the admin API, so no invalidation), then putting it back.
        sql.execute(
            "CREATE TEMP TABLE IF NOT EXISTS saved AS SELECT * FROM idemd_records LIMIT 0",
            &[],
        )
        .await
        .expect("temp");
        sql.execute(
            "WITH gone AS (DELETE FROM idemd_records WHERE namespace = $1 AND key = $2 RETURNING *)
             INSERT INTO saved SELECT * FROM gone",
            &[&NS, &key],
        )
        .await
        .expect("hide row");
        let cached = client_b
            .acquire(acquire_request(NS, &key, b"fp"))
            .await
            .expect("replay")
            .into_inner();
        assert_eq!(
            cached.outcome(),
            pb::Outcome::Completed,
            "B did not answer from its cache: the test would prove nothing"
        );
        sql.execute(
            "WITH back AS (DELETE FROM saved RETURNING *) INSERT INTO idemd_records SELECT * FROM back",
            &[],
        )
        .await
        .expect("restore row");

        admin_a
            .purge_record(purge(NS, &key, "support case"))
            .await
            .expect("purge on A");
        let after = client_b
            .acquire(acquire_request(NS, &key, b"fp"))
            .await
            .expect("acquire on B")
            .into_inner();
        assert_eq!(
            after.outcome(),
            pb::Outcome::Acquired,
            "round {round}: B answered from its cache after A's purge returned: {after:?}"
        );
    }
    replica_a.stop().await;
    replica_b.stop().await;
}

/// A listener session that never acknowledges (a hung replica) does not hold a purge forever:
/// after `ACK_LIMIT` its session is ended, so its replica stops answering from a cache that
/// missed the invalidation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_listener_is_cut_off_after_the_ack_limit() {
    const NS: &str = "adm-silent";
    let database = TestDatabase::create().await;
    let server = TestServer::on_database(&database, test_settings()).await;
    let mut client = server.client().await;
    let mut admin_client = server.admin().await;
    // A session that looks like a replica's listener but never answers invalidations.
    let silent = database.connect().await;
    silent
        .batch_execute("SET application_name = 'idemd-listener'")
        .await
        .expect("pose as a listener");
    let lease = acquire(&mut client, NS, "paid", 60_000, "w").await;
    complete(&mut client, NS, "paid", &lease.token).await;
    let started = std::time::Instant::now();
    admin_client
        .purge_record(purge(NS, "paid", "support case"))
        .await
        .expect("the purge completes");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(10),
        "the purge should wait out the 2 s acknowledgement limit, took {took:?}"
    );
    let error = silent
        .simple_query("SELECT 1")
        .await
        .expect_err("the silent session was terminated");
    assert!(error.is_closed() || error.code().is_some(), "{error}");
    // The server's own listener answered: a second purge needs no wait.
    let lease = acquire(&mut client, NS, "paid-2", 60_000, "w").await;
    complete(&mut client, NS, "paid-2", &lease.token).await;
    let started = std::time::Instant::now();
    admin_client
        .purge_record(purge(NS, "paid-2", "support case"))
        .await
        .expect("purge");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    server.stop().await;
}

/// ForceRelease wakes the key's Waits on every replica at once (not at their next re-read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_release_wakes_waits_on_another_replica() {
    const NS: &str = "adm-wake";
    let database = TestDatabase::create().await;
    let replica_a = TestServer::on_database(&database, test_settings()).await;
    let replica_b = TestServer::on_database(&database, test_settings()).await;
    let mut client = replica_a.client().await;
    acquire(&mut client, NS, "held", 3_600_000, "stuck-worker").await;
    let mut waiter = replica_b.client().await;
    let wait = tokio::spawn(async move {
        let outcome = waiter
            .wait(pb::WaitRequest {
                namespace: NS.into(),
                key: "held".into(),
                timeout: ms(30_000),
            })
            .await
            .expect("wait")
            .into_inner()
            .outcome();
        (outcome, std::time::Instant::now())
    });
    // The Wait is waiting once it marked the record.
    let sql = database.connect().await;
    eventually(Duration::from_secs(10), "the Wait marks the record", || {
        let sql = &sql;
        async move {
            sql.query_one(
                "SELECT has_waiters FROM idemd_records WHERE namespace = $1 AND key = 'held'",
                &[&NS],
            )
            .await
            .expect("row")
            .get::<_, bool>(0)
        }
    })
    .await;
    let mut admin_client = replica_a.admin().await;
    admin_client
        .force_release(force_release(NS, "held", "worker hung"))
        .await
        .expect("force release");
    let released_at = std::time::Instant::now();
    let (outcome, woken_at) = wait.await.expect("wait task");
    assert_eq!(outcome, pb::WaitOutcome::Free);
    // Woken by the release's NOTIFY, not by the Wait's re-read every 2 s.
    let delay = woken_at.saturating_duration_since(released_at);
    assert!(
        delay < Duration::from_millis(1000),
        "woken {delay:?} after the release"
    );
    replica_a.stop().await;
    replica_b.stop().await;
}

/// Every admin change is logged on the `idemd::audit` target too, with caller, action, namespace,
/// target and reason, and without result bodies or lease tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_are_logged_on_the_audit_target() {
    const NS: &str = "adm-log";
    let server = crate::processes::IdemdProcess::start(&["--log-format", "json"]);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut client = Client::new(channel.clone());
    let mut admin_client = AdminClient::new(channel);
    let lease = acquire(&mut client, NS, "logged", 60_000, "w").await;
    complete(&mut client, NS, "logged", &lease.token).await;
    admin_client
        .purge_record(purge(NS, "logged", "ticket 77 for the log"))
        .await
        .expect("purge");
    let mut lines = Vec::new();
    eventually(Duration::from_secs(10), "the audit log line", || {
        lines = server.logs();
        let found = lines.iter().any(|line| line.contains("admin change"));
        async move { found }
    })
    .await;
    let line = lines
        .iter()
        .find(|line| line.contains("admin change"))
        .expect("line");
    let entry: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
    assert_eq!(entry["target"], "idemd::audit", "{line}");
    let fields = &entry["fields"];
    assert_eq!(fields["action"], "PurgeRecord", "{line}");
    assert_eq!(fields["namespace"], NS, "{line}");
    assert_eq!(fields["target_records"], "logged", "{line}");
    assert_eq!(fields["reason"], "ticket 77 for the log", "{line}");
    assert_eq!(fields["caller"], "-", "{line}");
    for line in &lines {
        assert!(!line.contains(&lease.token), "lease token logged: {line}");
    }
}

/// A replica whose listener is not running yet (its replay cache is off, so nothing started it)
/// starts it and waits for it before its first purge: it hears the other replicas acknowledge,
/// instead of missing every acknowledgement and cutting their listeners off as silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_purge_listens_before_it_waits_for_acknowledgements() {
    const NS: &str = "adm-first";
    let database = TestDatabase::create().await;
    let cached = TestServer::on_database(&database, test_settings()).await;
    let uncached = TestServer::uncached(&database.url).await;
    let sql = database.connect().await;
    let listeners = || {
        let sql = &sql;
        async move {
            let rows = sql
                .query(
                    "SELECT pid FROM pg_stat_activity
                     WHERE datname = current_database() AND application_name = 'idemd-listener'",
                    &[],
                )
                .await
                .expect("listeners");
            rows.iter()
                .map(|row| row.get::<_, i32>(0))
                .collect::<Vec<_>>()
        }
    };
    eventually(
        Duration::from_secs(10),
        "the cached replica listens",
        || async { listeners().await.len() == 1 },
    )
    .await;
    let cached_listener = listeners().await[0];
    let mut client = cached.client().await;
    let lease = acquire(&mut client, NS, "paid", 60_000, "w").await;
    complete(&mut client, NS, "paid", &lease.token).await;
    let mut admin_client = uncached.admin().await;
    let started = std::time::Instant::now();
    admin_client
        .purge_record(purge(NS, "paid", "first purge"))
        .await
        .expect("purge");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "the purge waited out the acknowledgement limit: {took:?}"
    );
    assert!(
        listeners().await.contains(&cached_listener),
        "the other replica's listener was cut off"
    );
    cached.stop().await;
    uncached.stop().await;
}
