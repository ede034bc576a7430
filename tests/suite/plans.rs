//! The data plane reaches a record by its primary key, whatever the table held when a connection
//! planned its statements. Each pooled connection keeps a generic plan of every prepared statement
//! (and of `idemd_complete_batch`'s UPDATE) until the table is next analysed; a plan made on a new,
//! empty table once went through the admin API's ListRecords index (namespace alone, the key as a
//! filter), so that every Complete, Get and Acquire read every record of its namespace until
//! autovacuum came by: a new database served fresh pairs 40 % slower for its first seconds.
//! PostgreSQL's own index statistics show which index each statement used.

use std::time::Duration;

use idemd::proto::idempotency::v1 as pb;

use crate::harness::*;

const NAMESPACE: &str = "plans";

/// Scans of each index on the records table so far, by index name.
async fn index_scans(database: &TestDatabase) -> Vec<(String, i64)> {
    let client = database.connect().await;
    client
        .query(
            "SELECT indexrelname::text, idx_scan FROM pg_stat_user_indexes
             WHERE relname = 'idemd_records' ORDER BY 1",
            &[],
        )
        .await
        .expect("index statistics")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Acquire, Complete, Get, and a replay of one new key.
async fn pair(client: &mut Client, key: String) {
    let lease = client
        .acquire(acquire_request(NAMESPACE, &key, b"fp"))
        .await
        .expect("acquire")
        .into_inner()
        .lease
        .expect("a new key is acquired");
    client
        .complete(pb::CompleteRequest {
            namespace: NAMESPACE.into(),
            key: key.clone(),
            lease_token: lease.token,
            result: Some(sample_result(&key)),
            retention: None,
        })
        .await
        .expect("complete");
    get_record(client, NAMESPACE, &key).await;
    let replay = client
        .acquire(acquire_request(NAMESPACE, &key, b"fp"))
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(replay.outcome(), pb::Outcome::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_plane_statements_planned_on_a_new_table_use_the_primary_key() {
    let database = TestDatabase::create().await;
    let server = TestServer::on_database(&database, test_settings()).await;
    let mut client = server.client().await;

    // Enough of every statement on every pooled connection for PostgreSQL to switch to the
    // generic plans it then keeps (after five executions), all while the table is tiny.
    for round in 0..40 {
        pair(&mut client, format!("one-{round}")).await;
        let lease = client
            .acquire(acquire_request(
                NAMESPACE,
                &format!("renewed-{round}"),
                b"fp",
            ))
            .await
            .expect("acquire")
            .into_inner()
            .lease
            .expect("lease");
        client
            .renew(pb::RenewRequest {
                namespace: NAMESPACE.into(),
                key: format!("renewed-{round}"),
                lease_token: lease.token.clone(),
                lease_ttl: ms(60_000),
            })
            .await
            .expect("renew");
        client
            .release(pb::ReleaseRequest {
                namespace: NAMESPACE.into(),
                key: format!("renewed-{round}"),
                lease_token: lease.token,
            })
            .await
            .expect("release");
    }
    // Bursts wider than the batch slots, so that Acquires and Completes also go in batches.
    for burst in 0..6 {
        let mut pairs = tokio::task::JoinSet::new();
        for index in 0..32 {
            let mut client = client.clone();
            pairs.spawn(async move { pair(&mut client, format!("burst-{burst}-{index}")).await });
        }
        while let Some(done) = pairs.join_next().await {
            done.expect("pair");
        }
    }
    server.stop().await;

    // A backend sends its index statistics when it exits: end every other session of the test
    // database and wait until they are gone.
    let admin = database.connect().await;
    let ended: Vec<i32> = admin
        .query(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("sessions")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(!ended.is_empty(), "the server's sessions are there");
    for pid in &ended {
        admin
            .execute("SELECT pg_terminate_backend($1)", &[pid])
            .await
            .expect("terminate");
    }
    eventually(Duration::from_secs(30), "the sessions exit", || {
        let (admin, ended) = (&admin, &ended);
        async move {
            admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                    &[ended],
                )
                .await
                .map(|row| row.get::<_, i64>(0) == 0)
                .unwrap_or(false)
        }
    })
    .await;

    let scans = index_scans(&database).await;
    let of = |name: &str| {
        scans
            .iter()
            .find(|(index, _)| index == name)
            .map(|(_, count)| *count)
            .unwrap_or_else(|| panic!("index {name} in {scans:?}"))
    };
    assert!(
        of("idemd_records_pkey") > 100,
        "the data plane went through the primary key: {scans:?}"
    );
    assert_eq!(
        of("idemd_records_namespace_created"),
        0,
        "no data-plane statement went through the ListRecords index: {scans:?}"
    );
}
