//! How the PostgreSQL store's batcher spends its slots (src/store/postgres/batch.rs): one worker at
//! most drains the queue, so the commands that queue while a batch runs go in together, in one
//! statement, even when another slot frees up meanwhile; but a single waiter does not wait behind
//! a running batch when a slot is free.
//!
//! Statements are held up deterministically: a trigger makes the insert of a `hold-*` key wait for
//! an advisory lock the test holds, and the test releases each lock when it wants that statement to
//! finish. Rows inserted by one statement share its transaction id (`xmin`): that is how the test
//! counts the statements that carried a set of keys.

use std::sync::Arc;
use std::time::Duration;

use idemd::domain::{AcquireCommand, AcquireOutcome, Fingerprint, Holder, Key, Namespace};
use idemd::store::postgres::PostgresConfig;
use idemd::store::{PostgresStore, Store};
use tokio::task::JoinHandle;

use crate::harness::*;

const NAMESPACE: &str = "batching";
const LIMIT: Duration = Duration::from_secs(20);

fn command(key: &str) -> AcquireCommand {
    AcquireCommand {
        namespace: Namespace::parse(NAMESPACE.into()).expect("namespace"),
        key: Key::parse(key.into()).expect("key"),
        fingerprint: Fingerprint::default(),
        lease_ttl: Duration::from_secs(60),
        retention: Duration::from_secs(3600),
        holder: Holder::default(),
    }
}

fn acquire(store: &Arc<PostgresStore>, key: &str) -> JoinHandle<()> {
    let (store, key) = (store.clone(), key.to_string());
    tokio::spawn(async move {
        let outcome = store.acquire(command(&key), None).await;
        assert!(
            matches!(outcome, Ok(AcquireOutcome::Acquired { .. })),
            "{key}: {outcome:?}"
        );
    })
}

/// The advisory lock a `hold-*` key's insert waits for: `hold-1…` lock 1, `hold-2…` lock 2, the
/// others lock 3.
fn lock_of(key: &str) -> i64 {
    if key.starts_with("hold-1") {
        1
    } else if key.starts_with("hold-2") {
        2
    } else {
        3
    }
}

/// Inserts waiting for a lock held by the test.
async fn waiting_inserts(sql: &tokio_postgres::Client) -> i64 {
    sql.query_one(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        &[],
    )
    .await
    .expect("pg_locks")
    .get(0)
}

async fn release(sql: &tokio_postgres::Client, key: &str) {
    sql.execute("SELECT pg_advisory_unlock($1)", &[&lock_of(key)])
        .await
        .expect("unlock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_drains_the_queue_and_a_lone_waiter_takes_a_free_slot() {
    let database = TestDatabase::create().await;
    let sql = database.connect().await;
    sql.batch_execute(
        "CREATE FUNCTION hold_insert() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_advisory_xact_lock_shared(CASE
                 WHEN NEW.key LIKE 'hold-1%' THEN 1 WHEN NEW.key LIKE 'hold-2%' THEN 2 ELSE 3 END);
             RETURN NEW;
         END $$;
         CREATE TRIGGER hold_insert BEFORE INSERT ON idemd_records
             FOR EACH ROW WHEN (NEW.key LIKE 'hold-%') EXECUTE FUNCTION hold_insert();
         SELECT pg_advisory_lock(1), pg_advisory_lock(2), pg_advisory_lock(3);",
    )
    .await
    .expect("trigger and locks");
    let store = Arc::new(
        PostgresStore::connect(&PostgresConfig {
            max_batch: 64,
            batch_slots: 2,
            pool_size: 8,
            // Held statements wait as long as the test holds them, never for a timeout.
            query_timeout: Duration::from_secs(120),
            ..database.config()
        })
        .expect("pool"),
    );

    // Both slots busy with a held insert each.
    let hold_1 = acquire(&store, "hold-1");
    let hold_2 = acquire(&store, "hold-2");
    eventually(LIMIT, "two held inserts", || async {
        waiting_inserts(&sql).await == 2
    })
    .await;
    // A third queues; when hold-1's slot frees, a worker takes it, and its insert is held too.
    let hold_3 = acquire(&store, "hold-3");
    eventually(LIMIT, "hold-3 queued", || async { store.queued().0 == 1 }).await;
    release(&sql, "hold-1").await;
    hold_1.await.expect("hold-1");
    eventually(LIMIT, "the worker's insert of hold-3 held", || async {
        store.queued().0 == 0 && waiting_inserts(&sql).await == 2
    })
    .await;

    // Ten queue behind the worker; then hold-2's slot frees. It leaves the ten to the worker.
    let mut first = Vec::new();
    for index in 0..10 {
        first.push(acquire(&store, &format!("fast-{index}")));
    }
    eventually(LIMIT, "ten queued", || async { store.queued().0 == 10 }).await;
    release(&sql, "hold-2").await;
    hold_2.await.expect("hold-2");
    // Ten more queue while the worker is still held.
    let mut second = Vec::new();
    for index in 10..20 {
        second.push(acquire(&store, &format!("fast-{index}")));
    }
    eventually(LIMIT, "twenty queued", || async { store.queued().0 == 20 }).await;

    // The worker's statement finishes: it takes all twenty in its next statement.
    release(&sql, "hold-3").await;
    hold_3.await.expect("hold-3");
    for handle in first.into_iter().chain(second) {
        handle.await.expect("fast acquire");
    }
    let statements: i64 = sql
        .query_one(
            "SELECT count(DISTINCT xmin::text) FROM idemd_records WHERE key LIKE 'fast-%'",
            &[],
        )
        .await
        .expect("count statements")
        .get(0);
    assert_eq!(
        statements, 1,
        "the twenty Acquires queued while one batch ran went in one statement, not {statements}"
    );

    // A single waiter does not wait behind a running batch when a slot is free.
    sql.execute(
        "SELECT pg_advisory_lock(1), pg_advisory_lock(2), pg_advisory_lock(3)",
        &[],
    )
    .await
    .expect("locks again");
    let hold_1 = acquire(&store, "hold-1b");
    let hold_2 = acquire(&store, "hold-2b");
    eventually(LIMIT, "two held inserts again", || async {
        waiting_inserts(&sql).await == 2
    })
    .await;
    let hold_3 = acquire(&store, "hold-3b");
    eventually(LIMIT, "hold-3b queued", || async { store.queued().0 == 1 }).await;
    // hold-2b's slot frees: a worker takes hold-3b, whose insert is held.
    release(&sql, "hold-2b").await;
    hold_2.await.expect("hold-2b");
    eventually(LIMIT, "the worker's insert of hold-3b held", || async {
        store.queued().0 == 0 && waiting_inserts(&sql).await == 2
    })
    .await;
    // One waiter queues behind the worker; hold-1b's slot frees and takes it, alone.
    let lone = acquire(&store, "hold-3c");
    eventually(LIMIT, "hold-3c queued", || async { store.queued().0 == 1 }).await;
    release(&sql, "hold-1b").await;
    hold_1.await.expect("hold-1b");
    eventually(
        LIMIT,
        "hold-3c started on the freed slot while the worker's statement is still held",
        || async { store.queued().0 == 0 && waiting_inserts(&sql).await == 2 },
    )
    .await;
    release(&sql, "hold-3c").await;
    hold_3.await.expect("hold-3b");
    lone.await.expect("hold-3c");
}
