//! "Create order / charge payment", made idempotent with idemd — and a driver that proves it.
//!
//! The service keeps its orders in a PostgreSQL table of its own (deliberately WITHOUT a unique
//! constraint on the idempotency key: idemd alone must prevent doubles). The driver fires every
//! logical request many times — concurrent duplicates, client timeouts, retries — and then checks
//! that exactly one order exists per request and that every caller got the same answer.
//!
//!   cargo run --release -p idemd                          # idemd, in another terminal
//!   cargo run -p idemd-client --example orders -- http://127.0.0.1:50051 postgres://postgres@127.0.0.1/postgres

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use idemd_client::proto::idempotency::v1 as pb;
use idemd_client::{fingerprint, IdempotencyClient, Options, WorkError};
use tokio::task::JoinSet;

const REQUESTS: usize = 20;
const DUPLICATES: usize = 8;
const RETRIES: usize = 6;

/// The order service: one handler, idempotent through idemd.
#[derive(Clone)]
struct OrderService {
    idemd: IdempotencyClient,
    db: Arc<tokio_postgres::Client>,
}

impl OrderService {
    /// Handles a CreateOrder request. Like a real server, the handler keeps running when the
    /// client stops waiting: it runs on a task of its own.
    fn create_order(
        &self,
        key: String,
        request: serde_json::Value,
    ) -> tokio::task::JoinHandle<Result<String, String>> {
        let service = self.clone();
        tokio::spawn(async move {
            let print = fingerprint(&request).map_err(|e| e.to_string())?;
            let options = Options {
                lease_ttl: Duration::from_secs(2),
                ..Options::default()
            };
            let db = service.db.clone();
            let order_key = key.clone();
            let outcome = service
                .idemd
                .idempotent("orders", &key, print, options, |lease| async move {
                    // The "payment provider" is slow and jittery.
                    let delay = 50 + (lease.fencing_token % 7) * 40;
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    let amount = request["amount"].as_i64().unwrap_or(0);
                    let row = db
                        .query_one(
                            "INSERT INTO example_orders (idempotency_key, amount, fencing_token)
                             VALUES ($1, $2, $3) RETURNING id",
                            &[&order_key, &amount, &(lease.fencing_token as i64)],
                        )
                        .await
                        .map_err(|e| WorkError::Retryable(e.to_string()))?;
                    let id: i64 = row.get(0);
                    Ok(pb::Result {
                        body: format!("{{\"order_id\":{id}}}").into_bytes(),
                        code: 201,
                        metadata: [("content-type".into(), "application/json".into())].into(),
                    })
                })
                .await
                .map_err(|e| e.to_string())?;
            String::from_utf8(outcome.result.body).map_err(|e| e.to_string())
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let idemd_url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let database_url = args
        .next()
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into());

    let (db, connection) = tokio_postgres::connect(&database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS example_orders (
             id bigserial PRIMARY KEY,
             idempotency_key text NOT NULL,
             amount bigint NOT NULL,
             fencing_token bigint NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let service = OrderService {
        idemd: IdempotencyClient::connect(idemd_url).await?,
        db: Arc::new(db),
    };

    // Every logical request, sent DUPLICATES times at once, each copy with its own client
    // timeout and retries.
    let timeouts = Arc::new(AtomicUsize::new(0));
    let mut callers = JoinSet::new();
    for request in 0..REQUESTS {
        for copy in 0..DUPLICATES {
            let service = service.clone();
            let timeouts = timeouts.clone();
            let key = format!("order-{run}-{request}");
            let body =
                serde_json::json!({"customer": format!("cus_{request}"), "amount": 1000 + request});
            callers.spawn(async move {
                let timeout = Duration::from_millis(60 + (copy as u64 * 37) % 300);
                for _ in 0..RETRIES {
                    match tokio::time::timeout(
                        timeout,
                        service.create_order(key.clone(), body.clone()),
                    )
                    .await
                    {
                        Ok(Ok(Ok(answer))) => return (key, Some(answer)),
                        Err(_) => {
                            // The client gave up waiting; the server keeps working. Retry.
                            timeouts.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Ok(Err(_))) | Ok(Err(_)) => {} // an error answer: retry
                    }
                }
                // Last try without a timeout: the answer must come.
                let answer = service
                    .create_order(key.clone(), body)
                    .await
                    .ok()
                    .and_then(Result::ok);
                (key, answer)
            });
        }
    }
    let mut answers: HashMap<String, Vec<Option<String>>> = HashMap::new();
    while let Some(joined) = callers.join_next().await {
        let (key, answer) = joined?;
        answers.entry(key).or_default().push(answer);
    }

    let mut violations = 0;
    for (key, got) in &answers {
        let rows: i64 = service
            .db
            .query_one(
                "SELECT count(*) FROM example_orders WHERE idempotency_key = $1",
                &[key],
            )
            .await?
            .get(0);
        let first = &got[0];
        let consistent = first.is_some() && got.iter().all(|answer| answer == first);
        if rows != 1 || !consistent {
            violations += 1;
            println!("VIOLATION {key}: {rows} orders, answers {got:?}");
        }
    }
    let orders: i64 = service
        .db
        .query_one(
            "SELECT count(*) FROM example_orders WHERE idempotency_key LIKE $1",
            &[&format!("order-{run}-%")],
        )
        .await?
        .get(0);
    println!(
        "{} requests x {} concurrent duplicates, {} client timeouts retried: {} orders in the table, {} violations",
        answers.len(),
        DUPLICATES,
        timeouts.load(Ordering::Relaxed),
        orders,
        violations
    );
    if violations > 0 {
        std::process::exit(1);
    }
    println!("exactly one order per request, and every caller got the same answer");
    Ok(())
}
