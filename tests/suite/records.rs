//! The PostgreSQL store answers Acquire and Complete with records it builds from the command and
//! the few columns the statement returns (the key, the token and the result are not sent back).
//! Those records are what the replay cache keeps and what callers see, so each must be exactly
//! the row PostgreSQL stored, field by field (revision, retention and token included), on the
//! one-command path and in shared batches. The rows are read back by a second store whose replay
//! cache is off, so every read is the database's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use idemd::domain::{
    AcquireCommand, AcquireOutcome, CompleteCommand, Fingerprint, GetCommand, Holder, Key,
    Namespace, Record, StoredResult,
};
use idemd::store::postgres::PostgresConfig;
use idemd::store::{PostgresStore, Store};
use tokio::task::JoinSet;

use crate::harness::*;

const NAMESPACE: &str = "records";

/// Command `index`'s own values differ from the others' in every field the record takes from
/// the command, and durations carry sub-microsecond parts that PostgreSQL does not keep.
fn acquire_command(index: usize) -> AcquireCommand {
    AcquireCommand {
        namespace: Namespace::parse(NAMESPACE.into()).expect("namespace"),
        key: Key::parse(unique_key(&format!("k{index}"))).expect("key"),
        fingerprint: Fingerprint::parse(format!("fp-{index}").into_bytes()).expect("fingerprint"),
        lease_ttl: Duration::from_secs(60) + Duration::from_nanos(1_234_567 + index as u64),
        retention: Duration::from_secs(3600 + index as u64) + Duration::from_nanos(999),
        holder: Holder::parse(format!("holder-{index}")).expect("holder"),
    }
}

/// Every third Complete sets its own retention; results differ in body, code and metadata.
fn complete_command(acquired: &Record, index: usize) -> CompleteCommand {
    let metadata: BTreeMap<String, String> = (0..index % 4)
        .map(|n| (format!("x-meta-{n}"), format!("value {index}/{n}")))
        .collect();
    CompleteCommand {
        namespace: acquired.namespace.clone(),
        key: acquired.key.clone(),
        lease_token: acquired.lease_token,
        result: StoredResult {
            body: format!("result of {index}")
                .repeat(index % 7 + 1)
                .into_bytes(),
            code: 200 + index as i32 % 7,
            metadata,
        },
        retention: index
            .is_multiple_of(3)
            .then(|| Duration::from_secs(7200 + index as u64)),
    }
}

fn acquired(outcome: AcquireOutcome) -> Record {
    match outcome {
        AcquireOutcome::Acquired { record, lease, .. } => {
            assert_eq!(lease, record.lease(), "the lease is the record's");
            record
        }
        other => panic!("a new key is acquired, got {other:?}"),
    }
}

/// The stored row of `record`'s key, read by `reader` (no replay cache), must equal `record`.
async fn assert_stored(reader: &PostgresStore, record: &Record, what: &str) {
    let stored = reader
        .get(
            GetCommand {
                namespace: record.namespace.clone(),
                key: record.key.clone(),
            },
            None,
        )
        .await
        .expect("the record is stored");
    assert_eq!(
        &stored,
        record,
        "{what} of {}: the record returned (right) differs from the row stored (left)",
        record.key.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_and_complete_return_the_rows_they_stored() {
    let database = TestDatabase::create().await;
    let store = Arc::new(
        PostgresStore::connect(&PostgresConfig {
            max_batch: 64,
            // One slot per command kind: while it is busy, the rest queue and share statements.
            batch_slots: 1,
            pool_size: 4,
            ..database.config()
        })
        .expect("pool"),
    );
    let reader = PostgresStore::connect(&PostgresConfig {
        pool_size: 2,
        replay_cache_bytes: 0,
        ..PostgresConfig::new(database.url.clone())
    })
    .expect("pool");

    // One at a time: each command runs alone, by the one-command path.
    for index in 0..6 {
        let record = acquired(
            store
                .acquire(acquire_command(index), None)
                .await
                .expect("acquire"),
        );
        assert_stored(&reader, &record, "a lone Acquire").await;
        let completed = store
            .complete(complete_command(&record, index), None)
            .await
            .expect("complete");
        assert_stored(&reader, &completed, "a lone Complete").await;
    }
    assert_eq!(
        store.shared_batches(),
        (0, 0),
        "sequential commands ran alone"
    );

    // Many at once: most share batch statements.
    const MANY: usize = 300;
    let mut acquires = JoinSet::new();
    for index in 100..100 + MANY {
        let store = store.clone();
        acquires.spawn(async move {
            let outcome = store.acquire(acquire_command(index), None).await;
            (index, acquired(outcome.expect("acquire")))
        });
    }
    let mut records = Vec::new();
    while let Some(joined) = acquires.join_next().await {
        records.push(joined.expect("task"));
    }
    for (_, record) in &records {
        assert_stored(&reader, record, "an Acquire").await;
    }
    let mut completes = JoinSet::new();
    for (index, record) in records {
        let store = store.clone();
        completes.spawn(async move {
            store
                .complete(complete_command(&record, index), None)
                .await
                .expect("complete")
        });
    }
    let mut completed = Vec::new();
    while let Some(joined) = completes.join_next().await {
        completed.push(joined.expect("task"));
    }
    assert_eq!(completed.len(), MANY);
    for record in &completed {
        assert_stored(&reader, record, "a Complete").await;
    }
    let (acquire_batches, complete_batches) = store.shared_batches();
    assert!(
        acquire_batches > 0 && complete_batches > 0,
        "no shared batch of Acquires ({acquire_batches}) or of Completes ({complete_batches}): \
         the test proves nothing about batches"
    );
}
