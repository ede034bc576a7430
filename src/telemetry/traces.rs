//! OpenTelemetry traces, off unless `--traces` is given.
//!
//! When on, a second `tracing` layer turns idemd's spans — the `rpc` span of every call and the
//! store's `postgresql <command>` child spans — into OpenTelemetry spans and sends them over OTLP
//! gRPC, configured by the standard `OTEL_*` environment variables (endpoint, timeout, headers,
//! service name, resource attributes, sampler). When off, no layer is installed and no span
//! beyond the `rpc` log span is created: the store spans are at TRACE level, which the log
//! filter leaves out unless asked for.
//!
//! Export never holds up an RPC: a finished span goes into a bounded queue without waiting, and
//! one background task sends batches from it, each bounded in time. A span that finds the queue
//! full, or whose batch the collector did not take, is counted in
//! `idemd_trace_spans_dropped_total` and forgotten.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        OnceLock,
    },
    time::Duration,
};

use metrics::{counter, describe_counter, Counter};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::codegen::http::HeaderMap;

use super::metrics as idemd_metrics;

pub const SPANS_DROPPED: &str = "idemd_trace_spans_dropped_total";
pub const SPANS_EXPORTED: &str = "idemd_trace_spans_exported_total";

/// The `tracing` target of the store's spans (see `store::postgres`).
pub const STORE_TARGET: &str = "idemd::store";

/// The instrumentation scope idemd's spans carry.
const SCOPE: &str = "idemd";

/// Set once, when traces are installed; read by every RPC to decide whether to do the tracing
/// work (parent extraction, attributes).
static ENABLED: AtomicBool = AtomicBool::new(false);
/// Whether the record's key goes into the `rpc` span (`--trace-keys`).
static KEYS: AtomicBool = AtomicBool::new(false);

/// Whether traces are on in this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether the `rpc` span carries the key as `idemd.key`.
pub fn keys_enabled() -> bool {
    KEYS.load(Ordering::Relaxed)
}

/// What `--traces` and the `OTEL_*` variables ask for.
#[derive(Debug, Clone)]
pub struct TraceSettings {
    /// Put the key into the `rpc` span as `idemd.key` (keys may be personal data; off by
    /// default).
    pub include_keys: bool,
    /// The batch queue, read from the standard `OTEL_BSP_*` variables.
    pub batch: BatchSettings,
}

impl TraceSettings {
    /// Settings from the standard environment variables; `include_keys` from the flag.
    pub fn from_env(include_keys: bool) -> Result<Self, String> {
        Ok(Self {
            include_keys,
            batch: BatchSettings::from_env(|name| std::env::var(name).ok())?,
        })
    }
}

/// The bounded batch queue, named after the standard `OTEL_BSP_*` variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// `OTEL_BSP_MAX_QUEUE_SIZE`: spans waiting for export; past it new ones are dropped.
    pub max_queue_size: usize,
    /// `OTEL_BSP_SCHEDULE_DELAY` (ms): how long a span may wait for its batch to fill.
    pub schedule_delay: Duration,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`: most spans per export.
    pub max_export_batch_size: usize,
    /// `OTEL_BSP_EXPORT_TIMEOUT` (ms): bound on one export; past it the batch is dropped.
    pub export_timeout: Duration,
}

impl Default for BatchSettings {
    /// The OpenTelemetry specification's defaults.
    fn default() -> Self {
        Self {
            max_queue_size: 2048,
            schedule_delay: Duration::from_millis(5000),
            max_export_batch_size: 512,
            export_timeout: Duration::from_millis(30000),
        }
    }
}

impl BatchSettings {
    /// Reads the `OTEL_BSP_*` variables through `var`; a malformed one is an error naming it.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let number = |name: &str, default: u64| -> Result<u64, String> {
            match var(name) {
                None => Ok(default),
                Some(text) => match text.trim().parse::<u64>() {
                    Ok(value) if value > 0 => Ok(value),
                    _ => Err(format!("{name}={text:?}: expected a positive whole number")),
                },
            }
        };
        let defaults = Self::default();
        let max_queue_size = number("OTEL_BSP_MAX_QUEUE_SIZE", defaults.max_queue_size as u64)?;
        let batch = number(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            defaults.max_export_batch_size as u64,
        )?;
        let to_usize = |value: u64| usize::try_from(value).unwrap_or(usize::MAX);
        Ok(Self {
            max_queue_size: to_usize(max_queue_size),
            // The specification: a batch larger than the queue is cut to the queue's size.
            max_export_batch_size: to_usize(batch.min(max_queue_size)),
            schedule_delay: Duration::from_millis(number(
                "OTEL_BSP_SCHEDULE_DELAY",
                defaults.schedule_delay.as_millis() as u64,
            )?),
            export_timeout: Duration::from_millis(number(
                "OTEL_BSP_EXPORT_TIMEOUT",
                defaults.export_timeout.as_millis() as u64,
            )?),
        })
    }
}

/// Installed traces: the provider whose tracer the `tracing` layer uses, and the export task.
pub struct Traces {
    provider: SdkTracerProvider,
    stop: watch::Sender<bool>,
    exporting: JoinHandle<()>,
}

impl Traces {
    /// Builds the OTLP exporter and the batch queue. Must run inside the Tokio runtime: the
    /// export task and the exporter's gRPC channel live on it. Connects lazily, so a collector
    /// that is down does not stop idemd from starting.
    pub fn start(
        settings: &TraceSettings,
    ) -> Result<(Self, opentelemetry_sdk::trace::SdkTracer), String> {
        // The dropped-spans counter records into the Prometheus recorder: install it first.
        idemd_metrics::install()?;
        describe_counter!(
            SPANS_DROPPED,
            "Finished spans not exported, by reason: queue_full (the export queue was full), \
             export_failed (the collector refused the batch or did not answer in time)."
        );
        describe_counter!(SPANS_EXPORTED, "Spans the collector accepted.");
        let resource = Resource::builder().build();
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|error| format!("OTLP exporter: {error}"))?;
        exporter.set_resource(&resource);
        let (queue, queued) = mpsc::channel(settings.batch.max_queue_size);
        let (stop, stopped) = watch::channel(false);
        let exporting = tokio::spawn(export_loop(exporter, queued, stopped, settings.batch));
        let processor = BoundedBatch {
            queue,
            queue_full: counter!(SPANS_DROPPED, "reason" => "queue_full"),
        };
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_span_processor(processor)
            .build();
        let tracer = provider.tracer(SCOPE);
        KEYS.store(settings.include_keys, Ordering::Relaxed);
        ENABLED.store(true, Ordering::Relaxed);
        Ok((
            Self {
                provider,
                stop,
                exporting,
            },
            tracer,
        ))
    }

    /// Sends what is queued, waiting at most `grace`; then stops exporting.
    pub async fn shutdown(self, grace: Duration) {
        ENABLED.store(false, Ordering::Relaxed);
        let _ = self.stop.send(true);
        let mut exporting = self.exporting;
        if tokio::time::timeout(grace, &mut exporting).await.is_err() {
            tracing::warn!(
                ?grace,
                "trace export did not finish in time; queued spans are lost"
            );
            exporting.abort();
        }
        // Its processor only signals the task, which has stopped: this does not block.
        let _ = self.provider.shutdown_with_timeout(Duration::ZERO);
    }
}

/// Queues finished spans for `export_loop` without ever waiting.
#[derive(Debug)]
struct BoundedBatch {
    queue: mpsc::Sender<SpanData>,
    queue_full: Counter,
}

impl SpanProcessor for BoundedBatch {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        // Called on the thread that ended the span (an RPC's): never block it.
        if self.queue.try_send(span).is_err() {
            self.queue_full.increment(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        // The export task sends within `schedule_delay`; a synchronous flush would block a
        // runtime thread on the network.
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        // `Traces::shutdown` stops the export task, asynchronously and bounded; a synchronous
        // wait here would block a runtime thread.
        Ok(())
    }
}

/// Takes spans from the queue and exports them in batches of up to `max_export_batch_size`,
/// waiting at most `schedule_delay` for a batch to fill, each export bounded by
/// `export_timeout`. Once `stopped` turns true it sends what is queued and ends.
async fn export_loop<E: SpanExporter>(
    exporter: E,
    mut queued: mpsc::Receiver<SpanData>,
    mut stopped: watch::Receiver<bool>,
    settings: BatchSettings,
) {
    let export_failed = counter!(SPANS_DROPPED, "reason" => "export_failed");
    let exported = counter!(SPANS_EXPORTED);
    let mut batch = Vec::with_capacity(settings.max_export_batch_size);
    let mut stopping = false;
    loop {
        if !stopping {
            // Wait for a first span (or the stop), then give the batch `schedule_delay` to fill.
            tokio::select! {
                received = queued.recv_many(&mut batch, settings.max_export_batch_size) => {
                    if received == 0 {
                        stopping = true;
                    }
                }
                _ = stopped.wait_for(|stop| *stop) => stopping = true,
            }
            if !stopping {
                let filled = tokio::time::sleep(settings.schedule_delay);
                tokio::pin!(filled);
                while batch.len() < settings.max_export_batch_size {
                    let room = settings.max_export_batch_size - batch.len();
                    tokio::select! {
                        received = queued.recv_many(&mut batch, room) => {
                            if received == 0 {
                                stopping = true;
                                break;
                            }
                        }
                        _ = &mut filled => break,
                        _ = stopped.wait_for(|stop| *stop) => {
                            stopping = true;
                            break;
                        }
                    }
                }
            }
        }
        if stopping {
            // No more spans will be waited for: take what is queued now.
            queued.close();
            while batch.len() < settings.max_export_batch_size {
                match queued.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
        }
        if batch.is_empty() {
            if stopping {
                return;
            }
            continue;
        }
        let spans = batch.len() as u64;
        let sent = std::mem::replace(
            &mut batch,
            Vec::with_capacity(settings.max_export_batch_size),
        );
        match tokio::time::timeout(settings.export_timeout, exporter.export(sent)).await {
            Ok(Ok(())) => exported.increment(spans),
            Ok(Err(error)) => {
                export_failed.increment(spans);
                tracing::debug!(%error, spans, "trace export failed; the batch is dropped");
            }
            Err(_) => {
                export_failed.increment(spans);
                tracing::debug!(spans, "trace export timed out; the batch is dropped");
            }
        }
    }
}

/// A W3C trace-context propagator, made once.
fn propagator() -> &'static TraceContextPropagator {
    static PROPAGATOR: OnceLock<TraceContextPropagator> = OnceLock::new();
    PROPAGATOR.get_or_init(TraceContextPropagator::new)
}

/// gRPC metadata, read as a carrier of `traceparent` and `tracestate`.
struct Metadata<'a>(&'a HeaderMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

/// The caller's trace context from a call's `traceparent`/`tracestate` metadata, if it sent a
/// valid one. A malformed header is ignored (the call starts a trace of its own).
pub fn remote_parent(headers: &HeaderMap) -> Option<opentelemetry::Context> {
    use opentelemetry::trace::TraceContextExt;
    headers.get("traceparent")?;
    let context = propagator().extract(&Metadata(headers));
    context.span().span_context().is_valid().then_some(context)
}

/// Makes an RPC's `rpc` span an OpenTelemetry server span: the caller's context (if it sent one)
/// is its parent, it carries the gRPC attributes, and its trace id goes into the log span as
/// `trace_id`, so log lines and traces meet. Call only when [`enabled`], before the span is
/// entered. The span's name is the RPC's path without its leading `/`
/// (`idempotency.v1.IdempotencyService/Acquire`).
pub fn begin_rpc(span: &tracing::Span, rpc: crate::auth::Rpc, headers: &HeaderMap) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    span.record("otel.name", rpc.path());
    span.record("otel.kind", "server");
    if let Some(parent) = remote_parent(headers) {
        // Fails only for a span the trace layer does not see (none when traces are on).
        let _ = span.set_parent(parent);
    }
    span.set_attribute("rpc.system", "grpc");
    span.set_attribute("rpc.service", rpc.service());
    span.set_attribute("rpc.method", rpc.name());
    let context = span.context();
    let trace_id = context.span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

/// The record an RPC is about. The key only with `--trace-keys`.
pub fn rpc_target(span: &tracing::Span, namespace: &str, key: &str) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    span.set_attribute("idemd.namespace", namespace.to_owned());
    if keys_enabled() {
        span.set_attribute("idemd.key", key.to_owned());
    }
}

/// What the RPC decided (`acquired`, `completed`, ...).
pub fn rpc_outcome(span: &tracing::Span, outcome: &'static str) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    span.set_attribute("idemd.outcome", outcome);
}

/// The RPC's gRPC status; the span's status is an error for the codes the gRPC conventions
/// count as a server's error.
pub fn finish_rpc(span: &tracing::Span, code: tonic::Code, label: &'static str) {
    use tonic::Code;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    span.set_attribute("rpc.grpc.status_code", code as i64);
    if matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    ) {
        span.set_status(opentelemetry::trace::Status::error(label));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_settings_follow_the_standard_variables() {
        let none = BatchSettings::from_env(|_| None).expect("defaults");
        assert_eq!(none, BatchSettings::default());
        let set = BatchSettings::from_env(|name| match name {
            "OTEL_BSP_MAX_QUEUE_SIZE" => Some("8".into()),
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE" => Some("100".into()),
            "OTEL_BSP_SCHEDULE_DELAY" => Some("50".into()),
            _ => None,
        })
        .expect("valid");
        assert_eq!(set.max_queue_size, 8);
        assert_eq!(
            set.max_export_batch_size, 8,
            "a batch never exceeds the queue"
        );
        assert_eq!(set.schedule_delay, Duration::from_millis(50));
        let bad = BatchSettings::from_env(|name| {
            (name == "OTEL_BSP_MAX_QUEUE_SIZE").then(|| "lots".to_string())
        });
        assert!(bad
            .expect_err("refused")
            .contains("OTEL_BSP_MAX_QUEUE_SIZE"));
    }

    #[test]
    fn remote_parents_come_from_traceparent() {
        use opentelemetry::trace::TraceContextExt;
        let mut headers = HeaderMap::new();
        assert!(remote_parent(&headers).is_none());
        headers.insert("traceparent", "garbage".parse().expect("value"));
        assert!(remote_parent(&headers).is_none(), "malformed is ignored");
        headers.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .expect("value"),
        );
        headers.insert("tracestate", "vendor=opaque".parse().expect("value"));
        let parent = remote_parent(&headers).expect("valid");
        let span = parent.span();
        let context = span.span_context();
        assert_eq!(
            context.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(context.span_id().to_string(), "b7ad6b7169203331");
        assert!(context.is_remote() && context.is_sampled());
        assert_eq!(context.trace_state().header(), "vendor=opaque");
    }
}
