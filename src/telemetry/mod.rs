//! Logs, metrics and traces.

pub mod metrics;
pub mod traces;

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{filter, EnvFilter, Layer};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber, writing logs to stderr. `filter` uses RUST_LOG syntax.
/// With `tracer` (traces on), a second layer sends idemd's spans to it, whatever the log filter.
pub fn init(
    format: LogFormat,
    filter: &str,
    tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|error| format!("--log-level: {error}"))?;
    let Some(tracer) = tracer else {
        // Traces off: logs only, filtered globally, exactly as without tracing support, so
        // spans the log filter leaves out are never created.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr);
        let installed = match format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => builder.json().try_init(),
        };
        return installed.map_err(|error| format!("cannot install logger: {error}"));
    };
    // Traces on: each layer filters for itself. The log filter decides what is logged; the
    // trace layer takes idemd's spans at every level and no events (an event may carry the key,
    // as the `request` debug line does).
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.with_filter(filter).boxed(),
        LogFormat::Json => logs.json().with_filter(filter).boxed(),
    };
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Only the span tree matters here; no OTel context switching on every poll, and no
        // source locations or thread names per span.
        .with_context_activation(false)
        .with_tracked_inactivity(false)
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_target(false)
        .with_filter(filter::filter_fn(|metadata| {
            metadata.is_span() && metadata.target().starts_with("idemd")
        }));
    tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .map_err(|error| format!("cannot install logger: {error}"))
}
