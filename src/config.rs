//! Command line and environment. Every setting is a flag with an `IDEMD_*` variable and a
//! documented default; `idemd --help` and `idemd serve --help` list them.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::auth::AuthState;
use crate::defaults;
use crate::domain::{DurationPolicy, Limits, StoredResult};
use crate::server::ServerSettings;
use crate::store::postgres::PostgresConfig;
use crate::telemetry::traces::TraceSettings;
use crate::telemetry::LogFormat;
use crate::tls::{TlsFiles, TlsState};

/// idemd — an idempotency authority for polyglot microservices.
///
/// With no subcommand, idemd serves (same flags as `idemd serve`).
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API (the default).
    Serve(Box<ServeArgs>),
    /// Apply pending database migrations, then exit.
    Migrate(MigrateArgs),
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|error| format!("{error} (examples: 500ms, 30s, 24h, 30d)"))
}

/// Logging flags, shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, env = "IDEMD_LOG_FORMAT", value_enum, default_value = defaults::LOG_FORMAT)]
    pub log_format: LogFormat,
    /// Log filter in RUST_LOG syntax, e.g. `info` or `idemd=debug,info`.
    #[arg(long, env = "IDEMD_LOG_LEVEL", default_value = defaults::LOG_LEVEL)]
    pub log_level: String,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the gRPC API listens on.
    #[arg(long, env = "IDEMD_LISTEN", default_value = defaults::LISTEN)]
    pub listen: SocketAddr,
    /// Address of the Prometheus metrics listener (GET /metrics).
    #[arg(long, env = "IDEMD_METRICS_LISTEN", default_value = defaults::METRICS_LISTEN)]
    pub metrics_listen: SocketAddr,
    /// Optional plaintext listener serving only gRPC health, for probes that cannot speak TLS
    /// (Kubernetes `grpc:` probes) when the API listener uses TLS.
    #[arg(long, env = "IDEMD_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Address of the web console (plain HTTP; off unless set). Bind it to loopback and reach
    /// it through an SSH tunnel or `kubectl port-forward`: it has no TLS of its own.
    #[arg(long, env = "IDEMD_CONSOLE_LISTEN")]
    pub console_listen: Option<SocketAddr>,
    /// Serve the console over TLS with --tls-cert and --tls-key (and, with --tls-client-ca,
    /// only to clients with a certificate it signed); its session cookie is then `Secure`.
    #[arg(long, env = "IDEMD_CONSOLE_TLS", requires_all = ["console_listen", "tls_cert"])]
    pub console_tls: bool,
    /// PostgreSQL URL (e.g. postgres://idemd@db:5432/idemd). Unset: serve from memory, which is
    /// neither durable nor shared between replicas.
    #[arg(long, env = "IDEMD_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Most records the memory store holds (live, or expired and not yet reaped). When it is
    /// full, an Acquire of a new key first reaps expired records; if that frees none, it is
    /// refused with RESOURCE_EXHAUSTED (STORE_FULL), while calls on keys it holds keep working.
    /// Unused with --database-url.
    #[arg(long, env = "IDEMD_MAX_RECORDS", default_value_t = defaults::MAX_RECORDS, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_records: u64,
    /// Most Acquires (or Completes) sent to PostgreSQL as one statement and one commit when
    /// they arrive together; 1 turns batching off. A command arriving with nothing queued goes
    /// at once, alone: batching adds no delay.
    #[arg(long, env = "IDEMD_DB_BATCH", default_value_t = defaults::DB_BATCH, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub db_batch: u16,
    /// Statements of each kind (Acquire, Complete) in flight at once. While they are all busy,
    /// newcomers queue and go together in the next batch; one worker at most sends the queue (a
    /// slot that frees meanwhile takes a single waiter, else leaves the queue to it).
    #[arg(long, env = "IDEMD_DB_BATCH_SLOTS", default_value_t = defaults::DB_BATCH_SLOTS, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub db_batch_slots: u16,
    /// Bytes of completed records each replica keeps in memory, so replays (Acquire of a
    /// completed key, Get) skip the database; 0 turns the cache off.
    #[arg(long, env = "IDEMD_REPLAY_CACHE_BYTES", default_value_t = defaults::REPLAY_CACHE_BYTES, value_parser = clap::value_parser!(u64).range(0..=16 * 1024 * 1024 * 1024))]
    pub replay_cache_bytes: u64,
    /// CA certificates (PEM) that verify the database's certificate when the URL says
    /// sslmode=require (the system's roots are trusted too).
    #[arg(long, env = "IDEMD_DB_CA_FILE")]
    pub db_ca_file: Option<PathBuf>,
    /// Most PostgreSQL connections per replica.
    #[arg(long, env = "IDEMD_POOL_SIZE", default_value_t = defaults::POOL_SIZE, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub pool_size: u16,
    /// Bound on opening a database connection or waiting for a free one.
    #[arg(long, env = "IDEMD_DB_CONNECT_TIMEOUT", default_value = defaults::DB_CONNECT_TIMEOUT.text, value_parser = duration)]
    pub db_connect_timeout: Duration,
    /// Bound on one RPC's database work; past it the RPC fails with UNAVAILABLE.
    #[arg(long, env = "IDEMD_DB_QUERY_TIMEOUT", default_value = defaults::DB_QUERY_TIMEOUT.text, value_parser = duration)]
    pub db_query_timeout: Duration,
    /// Do not apply migrations at start (run `idemd migrate` separately).
    #[arg(long, env = "IDEMD_NO_MIGRATE")]
    pub no_migrate: bool,
    /// Lease length when Acquire or Renew leaves lease_ttl unset.
    #[arg(long, env = "IDEMD_DEFAULT_LEASE_TTL", default_value = defaults::DEFAULT_LEASE_TTL.text, value_parser = duration)]
    pub default_lease_ttl: Duration,
    /// Shortest lease_ttl a caller may ask for.
    #[arg(long, env = "IDEMD_MIN_LEASE_TTL", default_value = defaults::MIN_LEASE_TTL.text, value_parser = duration)]
    pub min_lease_ttl: Duration,
    /// Longest lease_ttl a caller may ask for.
    #[arg(long, env = "IDEMD_MAX_LEASE_TTL", default_value = defaults::MAX_LEASE_TTL.text, value_parser = duration)]
    pub max_lease_ttl: Duration,
    /// Retention when Acquire leaves retention unset.
    #[arg(long, env = "IDEMD_DEFAULT_RETENTION", default_value = defaults::DEFAULT_RETENTION.text, value_parser = duration)]
    pub default_retention: Duration,
    /// Shortest retention a caller may ask for.
    #[arg(long, env = "IDEMD_MIN_RETENTION", default_value = defaults::MIN_RETENTION.text, value_parser = duration)]
    pub min_retention: Duration,
    /// Longest retention a caller may ask for.
    #[arg(long, env = "IDEMD_MAX_RETENTION", default_value = defaults::MAX_RETENTION.text, value_parser = duration)]
    pub max_retention: Duration,
    /// Largest result body Complete accepts, in bytes.
    #[arg(long, env = "IDEMD_MAX_RESULT_BYTES", default_value_t = defaults::MAX_RESULT_BYTES, value_parser = clap::value_parser!(u32).range(0..=32 * 1024 * 1024))]
    pub max_result_bytes: u32,
    /// Pause between rounds of deleting expired records.
    #[arg(long, env = "IDEMD_REAPER_INTERVAL", default_value = defaults::REAPER_INTERVAL.text, value_parser = duration)]
    pub reaper_interval: Duration,
    /// Most records deleted per reaper batch.
    #[arg(long, env = "IDEMD_REAPER_BATCH", default_value_t = defaults::REAPER_BATCH, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub reaper_batch: u32,
    /// Pause between refreshes of the pool and record-count gauges.
    #[arg(long, env = "IDEMD_METRICS_INTERVAL", default_value = defaults::METRICS_INTERVAL.text, value_parser = duration)]
    pub metrics_interval: Duration,
    /// How long a Wait lasts when the request leaves timeout unset.
    #[arg(long, env = "IDEMD_DEFAULT_WAIT_TIMEOUT", default_value = defaults::DEFAULT_WAIT_TIMEOUT.text, value_parser = duration)]
    pub default_wait_timeout: Duration,
    /// Longest timeout a Wait may ask for.
    #[arg(long, env = "IDEMD_MAX_WAIT_TIMEOUT", default_value = defaults::MAX_WAIT_TIMEOUT.text, value_parser = duration)]
    pub max_wait_timeout: Duration,
    /// Most Waits in progress at once (they hold no database connection while waiting); more are
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "IDEMD_MAX_WAITERS", default_value_t = defaults::MAX_WAITERS, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_waiters: u32,
    /// Most RPCs served at once; more are shed at once with RESOURCE_EXHAUSTED.
    #[arg(long, env = "IDEMD_MAX_CONCURRENT_RPCS", default_value_t = defaults::MAX_CONCURRENT_RPCS, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_concurrent_rpcs: u32,
    /// Largest gRPC request message accepted, in bytes (must exceed --max-result-bytes).
    #[arg(long, env = "IDEMD_MAX_MESSAGE_BYTES", default_value_t = defaults::MAX_MESSAGE_BYTES, value_parser = clap::value_parser!(u32).range(1024..=64 * 1024 * 1024))]
    pub max_message_bytes: u32,
    /// Access policy file (TOML; see docs/SECURITY.md). Unset: auth is OFF and every caller may
    /// do everything (a loud warning is logged).
    #[arg(long, env = "IDEMD_AUTH_CONFIG")]
    pub auth_config: Option<PathBuf>,
    /// Refuse to start without --auth-config.
    #[arg(long, env = "IDEMD_REQUIRE_AUTH")]
    pub require_auth: bool,
    /// Server certificate chain (PEM) for TLS on the gRPC listener; needs --tls-key.
    #[arg(long, env = "IDEMD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM); needs --tls-cert.
    #[arg(long, env = "IDEMD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to: turns on mTLS. Needs --tls-cert.
    #[arg(long, env = "IDEMD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// How often the policy and certificate files are checked for changes (SIGHUP: at once).
    #[arg(long, env = "IDEMD_RELOAD_INTERVAL", default_value = defaults::RELOAD_INTERVAL.text, value_parser = duration)]
    pub reload_interval: Duration,
    /// How long in-flight RPCs may finish after SIGTERM/SIGINT.
    #[arg(long, env = "IDEMD_SHUTDOWN_GRACE", default_value = defaults::SHUTDOWN_GRACE.text, value_parser = duration)]
    pub shutdown_grace: Duration,
    /// Send OpenTelemetry traces over OTLP gRPC, configured by the standard OTEL_* variables
    /// (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER, ...). Off: no trace
    /// work is done at all. Export is queued and bounded; a slow or dead collector never slows
    /// or fails an RPC (dropped spans are counted in idemd_trace_spans_dropped_total).
    #[arg(long, env = "IDEMD_TRACES")]
    pub traces: bool,
    /// Put the record's key into each RPC's span as `idemd.key`. Off by default: keys may carry
    /// personal data, and trace backends are often less guarded than the database.
    #[arg(long, env = "IDEMD_TRACE_KEYS", requires = "traces")]
    pub trace_keys: bool,
    /// Close each client connection this long after it opened (HTTP/2 GOAWAY: calls in flight
    /// finish, new ones go to a new connection), so clients re-balance over the replicas after a
    /// scale-out or a rolling update. Unset: connections live as long as the client keeps them.
    #[arg(long, env = "IDEMD_MAX_CONNECTION_AGE", value_parser = duration)]
    pub max_connection_age: Option<Duration>,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// PostgreSQL URL to migrate.
    #[arg(long, env = "IDEMD_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// CA certificates (PEM) for sslmode=require, as for `serve`.
    #[arg(long, env = "IDEMD_DB_CA_FILE")]
    pub db_ca_file: Option<PathBuf>,
    #[command(flatten)]
    pub log: LogArgs,
}

impl ServeArgs {
    /// What traces to send, or `None` when they are off: without `--traces`, or when the
    /// standard `OTEL_SDK_DISABLED=true` says so.
    pub fn trace_settings(&self) -> Result<Option<TraceSettings>, String> {
        let disabled = std::env::var("OTEL_SDK_DISABLED")
            .is_ok_and(|value| value.trim().eq_ignore_ascii_case("true"));
        if !self.traces || disabled {
            return Ok(None);
        }
        TraceSettings::from_env(self.trace_keys).map(Some)
    }

    /// The server settings the flags describe, or one line naming the setting that is wrong.
    /// Reads no file: the access policy and TLS material stay unset until `read_files`.
    pub fn server_settings(&self) -> Result<ServerSettings, String> {
        let lease_ttl = policy(
            "lease ttl",
            self.default_lease_ttl,
            self.min_lease_ttl,
            self.max_lease_ttl,
        )?;
        let retention = policy(
            "retention",
            self.default_retention,
            self.min_retention,
            self.max_retention,
        )?;
        positive("--reaper-interval", self.reaper_interval)?;
        positive("--metrics-interval", self.metrics_interval)?;
        positive("--reload-interval", self.reload_interval)?;
        if self.require_auth && self.auth_config.is_none() {
            return Err("--require-auth is set but no --auth-config was given".into());
        }
        // A Complete carries the body plus metadata, key and token: leave room for them.
        let room = 64 * StoredResult::MAX_METADATA_VALUE_BYTES as u32 + 64 * 1024;
        if u64::from(self.max_message_bytes) < u64::from(self.max_result_bytes) + u64::from(room) {
            return Err(format!(
                "--max-message-bytes ({}) must exceed --max-result-bytes ({}) by at least {room} bytes",
                self.max_message_bytes, self.max_result_bytes
            ));
        }
        Ok(ServerSettings {
            limits: Limits {
                lease_ttl,
                retention,
                max_result_body_bytes: self.max_result_bytes as usize,
                wait_timeout: policy(
                    "wait timeout",
                    self.default_wait_timeout,
                    defaults::MIN_WAIT_TIMEOUT,
                    self.max_wait_timeout,
                )?,
            },
            reaper_interval: self.reaper_interval,
            reaper_batch: self.reaper_batch,
            shutdown_grace: self.shutdown_grace,
            max_connection_age: self.max_connection_age,
            max_concurrent_rpcs: self.max_concurrent_rpcs as usize,
            max_waiters: self.max_waiters as usize,
            max_message_bytes: self.max_message_bytes as usize,
            metrics_interval: self.metrics_interval,
            reload_interval: self.reload_interval,
            console_tls: self.console_tls,
            ..ServerSettings::default()
        })
    }

    /// The PostgreSQL store's configuration, or `None` for the memory store. Reads no file (the
    /// database's CA is checked by `read_files`).
    pub fn postgres_config(&self) -> Result<Option<PostgresConfig>, String> {
        let Some(url) = &self.database_url else {
            return Ok(None);
        };
        positive("--db-connect-timeout", self.db_connect_timeout)?;
        positive("--db-query-timeout", self.db_query_timeout)?;
        let config = PostgresConfig {
            url: url.clone(),
            pool_size: usize::from(self.pool_size),
            connect_timeout: self.db_connect_timeout,
            query_timeout: self.db_query_timeout,
            ca_file: self.db_ca_file.clone(),
            max_batch: usize::from(self.db_batch),
            batch_slots: usize::from(self.db_batch_slots),
            replay_cache_bytes: self.replay_cache_bytes,
            ..PostgresConfig::new(url.clone())
        };
        config
            .driver_config()
            .map_err(|error| format!("--database-url: {error}"))?;
        Ok(Some(config))
    }

    /// Reads and checks every file the flags name — the access policy, the TLS certificate, key
    /// and client CA, and the database's CA — once, at start-up: the only place start-up touches
    /// the file system. The policy and TLS material go into `settings` (and are re-read later only
    /// by their reloads); the database's CA is read again when the store connects.
    pub fn read_files(
        &self,
        settings: &mut ServerSettings,
        postgres: Option<&PostgresConfig>,
    ) -> Result<(), String> {
        if let Some(path) = &self.auth_config {
            settings.auth = Some(Arc::new(
                AuthState::load(path).map_err(|error| format!("--auth-config: {error}"))?,
            ));
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            settings.tls = Some(Arc::new(TlsState::load(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            })?));
        }
        if let Some(config) = postgres {
            config
                .connection_settings()
                .map_err(|error| format!("--database-url: {error}"))?;
        }
        Ok(())
    }
}

fn positive(flag: &str, value: Duration) -> Result<(), String> {
    if value.is_zero() {
        Err(format!("{flag}: must be greater than zero"))
    } else {
        Ok(())
    }
}

fn policy(
    name: &str,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Result<DurationPolicy, String> {
    let flag = name.replace(' ', "-");
    positive(&format!("--min-{flag}"), min)?;
    if min > max {
        return Err(format!(
            "--min-{flag} ({min:?}) must not exceed --max-{flag} ({max:?})"
        ));
    }
    if default < min || default > max {
        return Err(format!(
            "--default-{flag} ({default:?}) must lie between --min-{flag} ({min:?}) and --max-{flag} ({max:?})"
        ));
    }
    Ok(DurationPolicy { default, min, max })
}
