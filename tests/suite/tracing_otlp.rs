//! OpenTelemetry traces, end to end: the real `idemd` binary with `--traces` sends its spans over
//! OTLP gRPC to a receiver of our own (a tonic server implementing the collector's
//! `TraceService`, from the `opentelemetry-proto` definitions), and the tests read what arrived.
//! A call that carries a W3C `traceparent` (as raw gRPC metadata, or from the Rust client's
//! current OpenTelemetry context) must come back as idemd's server span in the same trace, under
//! the caller's span, with the gRPC attributes and idemd's own, and never the key, a token or a
//! fingerprint. With the collector black-holed, RPCs still succeed and the dropped spans are
//! counted.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemd::proto::idempotency::v1 as pb;
use idemd::proto::idempotency::v1::idempotency_service_client::IdempotencyServiceClient;
use idemd_client::{IdempotencyClient, Options, WorkError};
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::Request;

use crate::harness::{acquire_request, eventually, sample_result, unique_key, TestDatabase};
use crate::processes::{http_get, IdemdProcess};

/// One span as the receiver got it, with its resource's attributes.
#[derive(Debug, Clone)]
struct Received {
    span: Span,
    resource: Vec<KeyValue>,
}

/// An OTLP trace receiver on 127.0.0.1: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|resource| resource.attributes)
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    kept.push(Received {
                        span,
                        resource: resource.clone(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Starts the receiver; it serves until the test's runtime ends.
    async fn start() -> (Self, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let collector = Self::default();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        (collector, addr)
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The spans of `trace`, once `count` of them have arrived.
    async fn trace(&self, trace: &str, count: usize) -> Vec<Received> {
        let of_trace = || -> Vec<Received> {
            self.spans()
                .into_iter()
                .filter(|received| hex(&received.span.trace_id) == trace)
                .collect()
        };
        eventually(
            Duration::from_secs(20),
            "the spans reached the collector",
            || {
                let arrived = of_trace().len();
                async move { arrived >= count }
            },
        )
        .await;
        of_trace()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|attribute| attribute.key == key)
        .and_then(|attribute| attribute.value.as_ref())
        .and_then(|value| value.value.as_ref())
}

fn string_attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attribute(attributes, key) {
        Some(Value::StringValue(text)) => Some(text),
        _ => None,
    }
}

fn int_attribute(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attribute(attributes, key) {
        Some(Value::IntValue(number)) => Some(*number),
        _ => None,
    }
}

/// The one span named `name` among `spans`.
fn named<'a>(spans: &'a [Received], name: &str) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .map(|received| &received.span)
        .filter(|span| span.name == name)
        .collect();
    assert_eq!(found.len(), 1, "one span named {name} in {spans:#?}");
    found[0]
}

/// idemd's server span of one RPC: its name, kind, parent and gRPC attributes.
fn assert_server_span(span: &Span, method: &str, parent: &str, outcome: &str, namespace: &str) {
    assert_eq!(
        span.name,
        format!("idempotency.v1.IdempotencyService/{method}")
    );
    assert_eq!(span.kind, SpanKind::Server as i32, "{span:#?}");
    assert_eq!(
        hex(&span.parent_span_id),
        parent,
        "the caller's span is the parent"
    );
    let attributes = &span.attributes;
    assert_eq!(string_attribute(attributes, "rpc.system"), Some("grpc"));
    assert_eq!(
        string_attribute(attributes, "rpc.service"),
        Some("idempotency.v1.IdempotencyService")
    );
    assert_eq!(string_attribute(attributes, "rpc.method"), Some(method));
    assert_eq!(int_attribute(attributes, "rpc.grpc.status_code"), Some(0));
    assert_eq!(
        string_attribute(attributes, "idemd.namespace"),
        Some(namespace)
    );
    assert_eq!(string_attribute(attributes, "idemd.outcome"), Some(outcome));
}

/// No span carries an attribute named after a key, a token or a fingerprint, nor any of the
/// `secrets` (the key, the lease token, the fingerprint's bytes) as a value.
fn assert_nothing_forbidden(spans: &[Received], secrets: &[&str]) {
    for received in spans {
        for attribute in &received.span.attributes {
            let name = attribute.key.to_ascii_lowercase();
            for forbidden in ["key", "token", "fingerprint", "authorization", "body"] {
                assert!(
                    !name.contains(forbidden),
                    "span {} carries the forbidden attribute {}",
                    received.span.name,
                    attribute.key
                );
            }
            let value = format!("{:?}", attribute.value);
            for secret in secrets {
                assert!(
                    !value.contains(secret),
                    "span {} attribute {} carries {secret:?}",
                    received.span.name,
                    attribute.key
                );
            }
        }
    }
}

/// A call's W3C trace context, as a caller's tracer would send it.
fn traceparent(
    trace: &str,
    parent: &str,
) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
    format!("00-{trace}-{parent}-01")
        .parse()
        .expect("traceparent")
}

fn with_trace<T>(message: T, trace: &str, parent: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", traceparent(trace, parent));
    request.metadata_mut().insert(
        "tracestate",
        "congo=t61rcWkgMzE".parse().expect("tracestate"),
    );
    request
}

/// idemd with traces on, exporting to `endpoint` quickly (20 ms batches).
fn traced_idemd(args: &[&str], endpoint: &str, extra_env: &[(&str, &str)]) -> IdemdProcess {
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_SERVICE_NAME", "idemd-under-test"),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
    ];
    env.extend_from_slice(extra_env);
    let mut all_args = vec!["--traces"];
    all_args.extend_from_slice(args);
    IdemdProcess::spawn("127.0.0.1:0", &all_args, &env)
}

/// Raw gRPC calls carrying `traceparent`/`tracestate`: each becomes a server span in the caller's
/// trace, under the caller's span, with the gRPC and idemd attributes; the store's work is a
/// child span (statement kind, batch size, replay-cache hit or miss); the trace id is in the
/// `rpc` log lines; and no key, token or fingerprint is in any span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_continue_the_callers_trace() {
    const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    const PARENT: &str = "b7ad6b7169203331";
    let (collector, collector_addr) = Collector::start().await;
    let database = TestDatabase::create().await;
    let server = traced_idemd(
        &[
            "--database-url",
            &database.url,
            "--log-level",
            "idemd=debug,info",
        ],
        &format!("http://{collector_addr}"),
        &[],
    );
    let mut client = IdempotencyServiceClient::connect(format!("http://{}", server.addr))
        .await
        .expect("connect");
    let namespace = "traced";
    let key = unique_key("order");
    let fingerprint = b"fingerprint-bytes-0123456789";
    let acquired = client
        .acquire(with_trace(
            acquire_request(namespace, &key, fingerprint),
            TRACE,
            PARENT,
        ))
        .await
        .expect("acquire")
        .into_inner();
    let lease = acquired.lease.expect("lease");
    client
        .complete(with_trace(
            pb::CompleteRequest {
                namespace: namespace.into(),
                key: key.clone(),
                lease_token: lease.token.clone(),
                result: Some(sample_result("traced")),
                ..Default::default()
            },
            TRACE,
            PARENT,
        ))
        .await
        .expect("complete");
    // The first Get reads PostgreSQL (and learns its clock); the second is a replay-cache hit.
    for _ in 0..2 {
        client
            .get(with_trace(
                pb::GetRequest {
                    namespace: namespace.into(),
                    key: key.clone(),
                },
                TRACE,
                PARENT,
            ))
            .await
            .expect("get");
    }

    // Four server spans and their four store spans.
    let spans = collector.trace(TRACE, 8).await;
    assert_eq!(spans.len(), 8, "{spans:#?}");
    let acquire = named(&spans, "idempotency.v1.IdempotencyService/Acquire");
    assert_server_span(acquire, "Acquire", PARENT, "acquired", namespace);
    assert_eq!(acquire.trace_state, "congo=t61rcWkgMzE");
    let complete = named(&spans, "idempotency.v1.IdempotencyService/Complete");
    assert_server_span(complete, "Complete", PARENT, "completed", namespace);
    let mut gets: Vec<&Span> = spans
        .iter()
        .map(|received| &received.span)
        .filter(|span| span.name == "idempotency.v1.IdempotencyService/Get")
        .collect();
    gets.sort_by_key(|span| span.start_time_unix_nano);
    assert_eq!(gets.len(), 2);
    for get in &gets {
        assert_server_span(get, "Get", PARENT, "found", namespace);
    }

    // Acquires and Completes go through the batcher: alone here, as nothing else was queued.
    for (store_name, server_span, cache, batch_size) in [
        ("postgresql acquire", acquire, Some("miss"), Some(1)),
        ("postgresql complete", complete, None, Some(1)),
        ("postgresql get", gets[0], Some("miss"), None),
        ("postgresql get", gets[1], Some("hit"), None),
    ] {
        // The store span under this RPC's span.
        let children: Vec<&Span> = spans
            .iter()
            .map(|received| &received.span)
            .filter(|span| span.parent_span_id == server_span.span_id)
            .collect();
        assert_eq!(
            children.len(),
            1,
            "one store span under {}",
            server_span.name
        );
        let store = children[0];
        assert_eq!(store.name, store_name);
        assert_eq!(store.trace_id, server_span.trace_id);
        assert_eq!(store.kind, SpanKind::Internal as i32);
        let attributes = &store.attributes;
        assert_eq!(
            string_attribute(attributes, "db.system.name"),
            Some("postgresql")
        );
        assert_eq!(
            string_attribute(attributes, "idemd.cache"),
            cache,
            "{store_name}"
        );
        assert_eq!(
            int_attribute(attributes, "idemd.batch_size"),
            batch_size,
            "{store_name}"
        );
    }
    let resource = &spans[0].resource;
    assert_eq!(
        string_attribute(resource, "service.name"),
        Some("idemd-under-test")
    );
    assert_nothing_forbidden(
        &spans,
        &[&key, &lease.token, &hex(fingerprint), "fingerprint-bytes"],
    );

    // Logs and traces meet: the rpc log line names the trace.
    let logs = server.logs();
    let acquire_line = logs
        .iter()
        .find(|line| line.contains("rpc finished") && line.contains("method=\"Acquire\""))
        .unwrap_or_else(|| panic!("the Acquire's rpc line in {logs:#?}"));
    assert!(
        acquire_line.contains(&format!("trace_id={TRACE}")),
        "{acquire_line}"
    );
}

/// The Rust client carries the caller's current OpenTelemetry context into every call it makes:
/// the Acquire and the Complete of one `idempotent` call are server spans under the caller's span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_carries_the_callers_context() {
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";
    let (collector, collector_addr) = Collector::start().await;
    let server = traced_idemd(&[], &format!("http://{collector_addr}"), &[]);
    let client = IdempotencyClient::connect(format!("http://{}", server.addr))
        .await
        .expect("connect");
    let caller = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_hex(TRACE).expect("trace id"),
        SpanId::from_hex(PARENT).expect("span id"),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ));
    let key = unique_key("client");
    let outcome = client
        .idempotent(
            "traced",
            &key,
            b"client-fingerprint".to_vec(),
            Options::default(),
            |_lease| async {
                Ok::<_, WorkError<String>>(idemd_client::proto::idempotency::v1::Result {
                    body: b"client".to_vec(),
                    code: 200,
                    ..Default::default()
                })
            },
        )
        .with_context(caller)
        .await
        .expect("idempotent");
    assert!(!outcome.replayed);

    let spans = collector.trace(TRACE, 2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let acquire = named(&spans, "idempotency.v1.IdempotencyService/Acquire");
    assert_server_span(acquire, "Acquire", PARENT, "acquired", "traced");
    let complete = named(&spans, "idempotency.v1.IdempotencyService/Complete");
    assert_server_span(complete, "Complete", PARENT, "completed", "traced");
    assert_nothing_forbidden(&spans, &[&key]);
}

/// The value of one series (`name{labels}`) in idemd's /metrics.
fn metric(server: &IdemdProcess, series: &str) -> Option<f64> {
    let (status, body) = http_get(server.metrics_addr, "/metrics");
    assert_eq!(status, 200, "/metrics answered {status}: {body}");
    body.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// A collector that accepts connections and never answers: every RPC still succeeds (export is
/// queued and bounded, never on the RPC's path), and the spans that found the queue full are
/// counted in `idemd_trace_spans_dropped_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_collector_slows_no_rpc_and_drops_are_counted() {
    let hole = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hole_addr = hole.local_addr().expect("local addr");
    let accepted = Arc::new(Mutex::new(Vec::new()));
    {
        let accepted = accepted.clone();
        // Accepts, holds the connection open, and never reads or writes a byte.
        tokio::spawn(async move {
            while let Ok((connection, _)) = hole.accept().await {
                accepted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(connection);
            }
        });
    }
    let server = traced_idemd(
        &[],
        &format!("http://{hole_addr}"),
        &[("OTEL_BSP_MAX_QUEUE_SIZE", "4")],
    );
    let mut client = IdempotencyServiceClient::connect(format!("http://{}", server.addr))
        .await
        .expect("connect");
    let trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    for call in 0..40 {
        let key = unique_key("black-hole");
        let mut request = with_trace(
            acquire_request("traced", &key, b"fingerprint"),
            trace,
            "10f067aa0ba902b7",
        );
        // An RPC held up by the export (10 s per attempt on a black hole) fails this deadline.
        request.set_timeout(Duration::from_secs(5));
        let acquired = client
            .acquire(request)
            .await
            .unwrap_or_else(|status| panic!("call {call} failed: {status:?}"));
        assert_eq!(acquired.into_inner().outcome(), pb::Outcome::Acquired);
    }
    eventually(
        Duration::from_secs(10),
        "idemd connected to the black-holed collector",
        || {
            let connected = !accepted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty();
            async move { connected }
        },
    )
    .await;
    // 40 server spans, at most 4 queued plus one batch stuck in export: the rest were dropped.
    let dropped = r#"idemd_trace_spans_dropped_total{reason="queue_full"}"#;
    eventually(Duration::from_secs(10), "dropped spans counted", || {
        let counted = metric(&server, dropped).unwrap_or(0.0);
        async move { counted >= 30.0 }
    })
    .await;
}

/// `--trace-keys` is the one way a key gets into a span: as `idemd.key` of the RPC's span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_traced_only_when_asked() {
    const TRACE: &str = "6bf92f3577b34da6a3ce929d0e0e4736";
    let (collector, collector_addr) = Collector::start().await;
    let server = traced_idemd(&["--trace-keys"], &format!("http://{collector_addr}"), &[]);
    let mut client = IdempotencyServiceClient::connect(format!("http://{}", server.addr))
        .await
        .expect("connect");
    let key = unique_key("asked");
    client
        .acquire(with_trace(
            acquire_request("traced", &key, b"fingerprint"),
            TRACE,
            "20f067aa0ba902b7",
        ))
        .await
        .expect("acquire");
    let spans = collector.trace(TRACE, 1).await;
    let acquire = named(&spans, "idempotency.v1.IdempotencyService/Acquire");
    assert_eq!(
        string_attribute(&acquire.attributes, "idemd.key"),
        Some(key.as_str())
    );
}

/// idemd refuses to start with traces it cannot send: an `https://` collector (the exporter is
/// plaintext gRPC only) or a malformed `OTEL_BSP_*` value, one line naming it and exit code 2.
/// `OTEL_SDK_DISABLED=true` turns traces off: the same `https://` endpoint is then never looked at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_collector_is_refused_at_start() {
    for (name, value, named) in [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "https://127.0.0.1:4317",
            "https",
        ),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "lots", "OTEL_BSP_MAX_QUEUE_SIZE"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_idemd"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--traces")
            .env(name, value)
            .env_remove("OTEL_SDK_DISABLED")
            .output()
            .expect("run idemd");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}={value}: {stderr}");
        assert!(stderr.contains(named), "{name}={value}: {stderr}");
    }
    let server = traced_idemd(
        &[],
        "https://127.0.0.1:4317",
        &[("OTEL_SDK_DISABLED", "true")],
    );
    assert!(
        !server
            .logs()
            .iter()
            .any(|line| line.contains("sending OpenTelemetry traces")),
        "{:#?}",
        server.logs()
    );
}

/// A caller that did not sample its trace (`traceparent` flags 00) gets no span from idemd: the
/// default sampler follows the parent's decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_callers_are_not_traced() {
    const UNSAMPLED: &str = "7bf92f3577b34da6a3ce929d0e0e4736";
    const SAMPLED: &str = "8bf92f3577b34da6a3ce929d0e0e4736";
    let (collector, collector_addr) = Collector::start().await;
    let server = traced_idemd(&[], &format!("http://{collector_addr}"), &[]);
    let mut client = IdempotencyServiceClient::connect(format!("http://{}", server.addr))
        .await
        .expect("connect");
    let mut unsampled = Request::new(acquire_request("traced", &unique_key("no"), b"fp"));
    unsampled.metadata_mut().insert(
        "traceparent",
        format!("00-{UNSAMPLED}-30f067aa0ba902b7-00")
            .parse()
            .expect("traceparent"),
    );
    client.acquire(unsampled).await.expect("unsampled acquire");
    client
        .acquire(with_trace(
            acquire_request("traced", &unique_key("yes"), b"fp"),
            SAMPLED,
            "40f067aa0ba902b7",
        ))
        .await
        .expect("sampled acquire");
    // Spans leave in the order they ended: once the later call's span is in, the earlier's would be.
    collector.trace(SAMPLED, 1).await;
    assert!(
        !collector
            .spans()
            .iter()
            .any(|received| hex(&received.span.trace_id) == UNSAMPLED),
        "an unsampled caller's call was traced"
    );
}

/// On SIGTERM, the spans still queued are sent before idemd exits (within --shutdown-grace): here
/// the batch delay is an hour, so only the shutdown sends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_spans_are_sent_on_shutdown() {
    const TRACE: &str = "9bf92f3577b34da6a3ce929d0e0e4736";
    let (collector, collector_addr) = Collector::start().await;
    let mut server = traced_idemd(
        &[],
        &format!("http://{collector_addr}"),
        &[("OTEL_BSP_SCHEDULE_DELAY", "3600000")],
    );
    let mut client = IdempotencyServiceClient::connect(format!("http://{}", server.addr))
        .await
        .expect("connect");
    client
        .acquire(with_trace(
            acquire_request("traced", &unique_key("last"), b"fp"),
            TRACE,
            "50f067aa0ba902b7",
        ))
        .await
        .expect("acquire");
    drop(client);
    assert!(
        collector.spans().is_empty(),
        "nothing is sent before the batch delay"
    );
    server.terminate();
    assert_eq!(server.wait_exit(Duration::from_secs(20)), Some(0));
    let spans = collector.trace(TRACE, 1).await;
    named(&spans, "idempotency.v1.IdempotencyService/Acquire");
}

/// Runs one client language's traced-call program (`program` gets ADDRESS TRACE_ID
/// PARENT_SPAN_ID KEY appended) against idemd with traces on, and checks that each of its
/// `calls` `idempotent` calls (an Acquire and a Complete each, on fresh keys) reached idemd as
/// server spans in the caller's trace, under the caller's span.
async fn assert_program_carries_the_callers_context(
    language: &str,
    mut program: std::process::Command,
    trace: &str,
    parent: &str,
    calls: usize,
) {
    let (collector, collector_addr) = Collector::start().await;
    let server = traced_idemd(&[], &format!("http://{collector_addr}"), &[]);
    let key = unique_key(language);
    program
        .arg(server.addr.to_string())
        .arg(trace)
        .arg(parent)
        .arg(&key);
    let output = tokio::task::spawn_blocking(move || program.output())
        .await
        .expect("the program's thread")
        .unwrap_or_else(|error| panic!("start the {language} traced call: {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.trim() == "ok",
        "the {language} traced call failed ({}): {stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    // This idemd served only the program: wait for its server spans, whatever trace they are in
    // (a call that lost the caller's context is a root span of a trace of its own), then check
    // that each is in the caller's trace, under the caller's span.
    let servers = || -> Vec<Span> {
        collector
            .spans()
            .into_iter()
            .map(|received| received.span)
            .filter(|span| span.kind == SpanKind::Server as i32)
            .collect()
    };
    eventually(
        Duration::from_secs(20),
        "the program's server spans reached the collector",
        || {
            let arrived = servers().len();
            async move { arrived >= 2 * calls }
        },
    )
    .await;
    let servers = servers();
    assert_eq!(servers.len(), 2 * calls, "{language}: {servers:#?}");
    for (method, outcome) in [("Acquire", "acquired"), ("Complete", "completed")] {
        let name = format!("idempotency.v1.IdempotencyService/{method}");
        let of_method: Vec<&Span> = servers.iter().filter(|span| span.name == name).collect();
        assert_eq!(of_method.len(), calls, "{language}: {method} spans");
        for span in of_method {
            assert_eq!(
                hex(&span.trace_id),
                trace,
                "{language}: the {method} span is in the caller's trace"
            );
            assert_server_span(span, method, parent, outcome, "traced");
        }
    }
    assert_nothing_forbidden(&collector.spans(), &[&key]);
}

fn client_dir(language: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(language)
}

/// The Python client (sync `Client` and asyncio `AsyncClient`) carries the caller's current
/// OpenTelemetry context (`opentelemetry-api`, the `otel` extra) into its calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_carries_the_callers_context() {
    let python = client_dir("python");
    for (flavour, trace, parent) in [
        (
            "sync",
            "a4bf92f3577b34da6a3ce929d0e0e473",
            "a0f067aa0ba902b7",
        ),
        (
            "asyncio",
            "b4bf92f3577b34da6a3ce929d0e0e473",
            "b0f067aa0ba902b7",
        ),
    ] {
        let mut program = std::process::Command::new("python3");
        program
            .arg(python.join("tests/traced_call.py"))
            // This checkout's client, whatever else is installed.
            .env("PYTHONPATH", &python)
            .env("IDEMD_TRACED_CALL_PYTHON", flavour);
        assert_program_carries_the_callers_context(
            &format!("python-{flavour}"),
            program,
            trace,
            parent,
            1,
        )
        .await;
    }
}

/// The Node client carries the active OpenTelemetry context (`@opentelemetry/api`, an optional
/// peer dependency) into its calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_client_carries_the_callers_context() {
    let node = client_dir("node");
    assert!(
        node.join("node_modules").exists(),
        "run `npm ci --prefix clients/node` first (CI's .ci/run does)"
    );
    // Its own output folder: `dist/` is the Node suite's and `dist-behaviour/` the behaviour
    // suite's, either possibly being rebuilt at the same time.
    let out = node.join("dist-traces");
    let compiled = tokio::task::spawn_blocking({
        let (node, out) = (node.clone(), out.clone());
        move || {
            std::process::Command::new("node")
                .current_dir(&node)
                .args(["node_modules/typescript/bin/tsc", "-p", ".", "--outDir"])
                .arg(&out)
                .output()
        }
    })
    .await
    .expect("the compiler's thread")
    .expect("run tsc");
    assert!(
        compiled.status.success(),
        "tsc could not compile the Node client: {}",
        String::from_utf8_lossy(&compiled.stdout)
    );
    let mut program = std::process::Command::new("node");
    program.arg(out.join("test/traced-call.js"));
    assert_program_carries_the_callers_context(
        "node",
        program,
        "c4bf92f3577b34da6a3ce929d0e0e473",
        "c0f067aa0ba902b7",
        1,
    )
    .await;
}

/// The Go client carries the context's OpenTelemetry span context into its calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_client_carries_the_callers_context() {
    let binary = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-traced-call");
    let built = tokio::task::spawn_blocking({
        let binary = binary.clone();
        move || {
            std::process::Command::new("go")
                .current_dir(client_dir("go"))
                .args(["build", "-o"])
                .arg(&binary)
                .arg("./internal/tracedcall")
                .output()
        }
    })
    .await
    .expect("the build's thread")
    .expect("run go build (Go is installed by .ci/run)");
    assert!(
        built.status.success(),
        "go build of the traced call failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    assert_program_carries_the_callers_context(
        "go",
        std::process::Command::new(&binary),
        "d4bf92f3577b34da6a3ce929d0e0e473",
        "d0f067aa0ba902b7",
        1,
    )
    .await;
}

/// The Java client carries the current OpenTelemetry context into its calls, from the blocking
/// `idempotent` and from `idempotentAsync`, whose protocol runs on the client's executor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_java_client_carries_the_callers_context() {
    let program = tokio::task::spawn_blocking(|| {
        crate::java_client::java_test_program("dev.idemd.client.TracedCall")
    })
    .await
    .expect("build the Java client");
    assert_program_carries_the_callers_context(
        "java",
        program,
        "e4bf92f3577b34da6a3ce929d0e0e473",
        "e0f067aa0ba902b7",
        2,
    )
    .await;
}
