//! The axum example app of the Idempotency-Key conformance suite (clients/HTTP-MIDDLEWARE.md,
//! "The example app contract"):
//!
//! ```sh
//! PORT=8080 IDEMD_ADDR=http://127.0.0.1:50051 NAMESPACE=orders-api LEASE_MS=2000 \
//!   IDEMD_TIMEOUT_MS=2000 EFFECTS_FILE=/tmp/effects \
//!   cargo run -p idemd-client --features http --example axum_app
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use idemd_client::http::IdempotencyLayer;
use idemd_client::IdempotencyClient;

fn setting(name: &str) -> Result<String, String> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("{name} must be set"))
}

fn milliseconds(name: &str) -> Result<Duration, String> {
    let value = setting(name)?;
    value
        .parse::<u64>()
        .ok()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{name} must be a positive whole number of milliseconds"))
}

struct App {
    effects: PathBuf,
}

impl App {
    /// Every run of a handler appends one line, with O_APPEND; returns the body's `id`.
    fn effect(&self, kind: &str, body: &serde_json::Value) -> String {
        let id = match body.get("id") {
            None => "-".to_owned(),
            Some(serde_json::Value::String(id)) => id.clone(),
            Some(other) => other.to_string(),
        };
        let written = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.effects)
            .and_then(|mut file| file.write_all(format!("{kind} {id}\n").as_bytes()));
        if let Err(error) = written {
            eprintln!("axum_app: cannot append to the effects file: {error}");
        }
        id
    }
}

/// `value` as JSON with exactly `Content-Type: application/json`.
fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut response = (status, value.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn parse_body(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or(serde_json::Value::Null)
}

fn tenant(headers: &HeaderMap) -> String {
    headers
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("anonymous")
        .to_owned()
}

async fn order(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let body = parse_body(&body);
    app.effect("orders", &body);
    let run = uuid::Uuid::new_v4().to_string();
    let delay = headers
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if headers.get("x-fail").is_some_and(|v| v == "1") {
        return json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({"error": "failed"}),
        );
    }
    if let Some(status) = headers.get("x-status") {
        let status = status
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u16>().ok())
            .and_then(|s| StatusCode::from_u16(s).ok());
        return match status {
            Some(status) => json(
                status,
                &serde_json::json!({"status": status.as_u16(), "run": run}),
            ),
            None => json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": "bad X-Status"}),
            ),
        };
    }
    let id = body.get("id").cloned().unwrap_or(serde_json::Value::Null);
    let mut response = json(
        StatusCode::CREATED,
        &serde_json::json!({"run": run, "id": id, "tenant": tenant(&headers)}),
    );
    for (name, value) in [
        ("location", format!("/orders/{run}")),
        ("set-cookie", format!("s={run}")),
        ("x-run", run.clone()),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

fn runs(
    kind: &'static str,
    status: StatusCode,
) -> impl Fn(State<Arc<App>>, Bytes) -> std::future::Ready<Response> + Clone {
    move |State(app): State<Arc<App>>, body: Bytes| {
        app.effect(kind, &parse_body(&body));
        std::future::ready(json(
            status,
            &serde_json::json!({"run": uuid::Uuid::new_v4().to_string()}),
        ))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = setting("PORT")?.parse()?;
    let address = setting("IDEMD_ADDR")?;
    let namespace = setting("NAMESPACE")?;
    let lease = milliseconds("LEASE_MS")?;
    let idemd_timeout = milliseconds("IDEMD_TIMEOUT_MS")?;
    let effects = PathBuf::from(setting("EFFECTS_FILE")?);

    let mut client = IdempotencyClient::connect(address).await?;
    if let Some(token) = std::env::var("IDEMD_TOKEN").ok().filter(|t| !t.is_empty()) {
        client = client.with_token(&token)?;
    }
    let base = IdempotencyLayer::new(client, namespace)
        .lease_ttl(lease)
        .idemd_timeout(idemd_timeout);
    let orders = base
        .clone()
        .required(true)
        .scope(|parts| tenant(&parts.headers));
    let orders_wait = orders.clone().wait(Duration::from_secs(10));
    let open = base.clone().required(true).fail_open(true);

    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/orders",
            post(order)
                .get(runs("list", StatusCode::OK))
                .layer(orders.clone()),
        )
        .route("/orders-wait", post(order).layer(orders_wait))
        .route(
            "/notes",
            post(runs("notes", StatusCode::CREATED)).layer(base),
        )
        .route("/open", post(runs("open", StatusCode::CREATED)).layer(open))
        .route(
            "/orders/{id}",
            put(runs("put", StatusCode::OK)).layer(orders),
        )
        .with_state(Arc::new(App { effects }));

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("axum_app listening on {}", listener.local_addr()?);
    // SIGTERM ends the process at once (the suite stops its apps so; nothing here needs draining).
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        terminate.recv().await;
        std::process::exit(0);
    });
    axum::serve(listener, app).await?;
    Ok(())
}
