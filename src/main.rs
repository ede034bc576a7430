//! The `idemd` binary: parse configuration, set up logging, and hand over to the library.

use std::{process::ExitCode, sync::Arc};

use clap::Parser;
use idemd::config::{Cli, Command, MigrateArgs, ServeArgs};
use idemd::server::{Listeners, ServerSettings};
use idemd::store::{postgres, MemoryStore, PostgresStore};
use tokio::net::TcpListener;

/// jemalloc instead of glibc's malloc: an RPC makes a few dozen small allocations on several
/// threads, and glibc's spent about 10 % of the server's CPU on them (docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (command, log) = match cli.command {
        Some(Command::Migrate(args)) => {
            let log = args.log.clone();
            (Command::Migrate(args), log)
        }
        Some(Command::Serve(args)) => {
            let log = args.log.clone();
            (Command::Serve(args), log)
        }
        None => {
            let log = cli.serve.log.clone();
            (Command::Serve(Box::new(cli.serve)), log)
        }
    };
    // The runtime first: traces' export task and gRPC channel live on it.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("idemd: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let trace_settings = match &command {
        Command::Serve(args) => args.trace_settings(),
        Command::Migrate(_) => Ok(None),
    };
    let traces = match trace_settings {
        Ok(None) => None,
        Ok(Some(settings)) => {
            let _runtime = runtime.enter();
            match idemd::telemetry::traces::Traces::start(&settings) {
                Ok(started) => Some(started),
                Err(message) => {
                    eprintln!("idemd: traces: {message}");
                    return ExitCode::from(2);
                }
            }
        }
        Err(message) => {
            eprintln!("idemd: traces: {message}");
            return ExitCode::from(2);
        }
    };
    let (traces, tracer) = match traces {
        Some((traces, tracer)) => (Some(traces), Some(tracer)),
        None => (None, None),
    };
    if let Err(message) = idemd::telemetry::init(log.log_format, &log.log_level, tracer) {
        eprintln!("idemd: {message}");
        return ExitCode::from(2);
    }
    if traces.is_some() {
        // Where the exporter sends, by the precedence it applies itself.
        let endpoint = [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ]
        .into_iter()
        .find_map(|name| std::env::var(name).ok())
        .unwrap_or_else(|| "http://localhost:4317".to_string());
        tracing::info!(%endpoint, "sending OpenTelemetry traces over OTLP gRPC to {endpoint}");
    }
    let outcome = match command {
        Command::Serve(args) => {
            // Flags, then the files they name, are checked before anything starts: a bad one is
            // one line and exit code 2.
            let checked = (|| {
                let mut settings = args.server_settings()?;
                let postgres_config = args.postgres_config()?;
                args.read_files(&mut settings, postgres_config.as_ref())?;
                Ok::<_, String>((settings, postgres_config))
            })();
            match checked {
                Ok((settings, postgres_config)) => runtime.block_on(async {
                    let grace = settings.shutdown_grace;
                    let served = serve(*args, settings, postgres_config).await;
                    if let Some(traces) = traces {
                        // The last spans, within the same grace as in-flight RPCs.
                        traces.shutdown(grace).await;
                    }
                    served
                }),
                Err(message) => {
                    eprintln!("idemd: {message}");
                    return ExitCode::from(2);
                }
            }
        }
        Command::Migrate(args) => runtime.block_on(migrate(args)),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(args: MigrateArgs) -> Result<(), String> {
    let config = postgres::PostgresConfig {
        ca_file: args.db_ca_file,
        ..postgres::PostgresConfig::new(args.database_url)
    };
    config
        .connection_settings()
        .map_err(|error| format!("--database-url: {error}"))?;
    let applied = postgres::migrate::migrate(&config)
        .await
        .map_err(|error| format!("migration failed: {error}"))?;
    tracing::info!(
        ?applied,
        latest = postgres::migrate::latest_version(),
        "schema is current"
    );
    Ok(())
}

async fn serve(
    args: ServeArgs,
    settings: ServerSettings,
    postgres_config: Option<postgres::PostgresConfig>,
) -> Result<(), String> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|error| format!("--listen {}: {error}", args.listen))?;
    let local_addr = listener
        .local_addr()
        .map_err(|error| format!("--listen {}: {error}", args.listen))?;
    let metrics_listener = idemd::telemetry::metrics::bind(args.metrics_listen)
        .await
        .map_err(|error| format!("--metrics-listen {}: {error}", args.metrics_listen))?;
    if let Ok(addr) = metrics_listener.local_addr() {
        tracing::info!(%addr, "serving metrics on {addr}");
    }
    let health_listener = match args.health_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|error| format!("--health-listen {addr}: {error}"))?;
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving plaintext gRPC health on {addr}");
            }
            Some(listener)
        }
        None => None,
    };
    let console_listener = match args.console_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|error| format!("--console-listen {addr}: {error}"))?;
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving the web console on {addr}");
            }
            Some(listener)
        }
        None => None,
    };
    let tls = if settings.tls.is_some() {
        "TLS"
    } else {
        "plaintext"
    };
    let listeners = Listeners {
        grpc: listener,
        metrics: Some(metrics_listener),
        health: health_listener,
        console: console_listener,
    };
    let shutdown = shutdown_signal();
    let served = match postgres_config {
        None => {
            tracing::warn!(
                "no --database-url: serving from memory. Records are NOT durable and NOT shared \
                 between replicas; use PostgreSQL for anything but trying idemd out"
            );
            tracing::info!(addr = %local_addr, store = "memory", tls, "serving gRPC on {local_addr}");
            let store = MemoryStore::bounded(args.max_records);
            idemd::server::serve(listeners, Arc::new(store), settings, shutdown).await
        }
        Some(config) => {
            if !args.no_migrate {
                postgres::migrate::migrate(&config)
                    .await
                    .map_err(|error| format!("migration failed: {error}"))?;
            }
            let store = PostgresStore::connect(&config).map_err(|error| error.to_string())?;
            tracing::info!(addr = %local_addr, store = "postgres", tls, "serving gRPC on {local_addr}");
            let pool = store.pool().clone();
            let served = idemd::server::serve(listeners, Arc::new(store), settings, shutdown).await;
            pool.close();
            served
        }
    };
    served.map_err(|error| error.to_string())?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM; only SIGINT stops idemd");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
