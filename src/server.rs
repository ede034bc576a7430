//! The gRPC server: the idempotency service, the admin service, standard health, reflection (v1
//! and v1alpha), the reaper, and a shutdown that is injected by the caller and bounded by a grace period.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::Stream;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use crate::api::{AdminApi, IdempotencyApi};
use crate::auth::AuthState;
use crate::defaults;
use crate::domain::Limits;
use crate::store::{AdminStore, Store};
use crate::telemetry::metrics;
use crate::tls::{self, TlsState};

/// Encoded descriptors of `idempotency.v1` and `idempotency.admin.v1`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("idempotency_descriptor");

/// Health-check name of the idempotency service: the readiness probe.
pub const SERVICE_NAME: &str = "idempotency.v1.IdempotencyService";

/// How the server runs, apart from where it listens and what it stores in.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub limits: Limits,
    /// Pause between reaper rounds.
    pub reaper_interval: Duration,
    /// Most records one reaper batch deletes.
    pub reaper_batch: u32,
    /// Pause between readiness checks of the store.
    pub readiness_interval: Duration,
    /// Pause between flushes of the per-minute event counts (GetNamespaceStats) to the store;
    /// they are flushed once more at shutdown.
    pub counts_flush_interval: Duration,
    /// How long in-flight RPCs may run after shutdown begins.
    pub shutdown_grace: Duration,
    /// Each client connection is closed gracefully (GOAWAY) this long after it opened; `None`:
    /// never. Calls in flight on it finish: every RPC is bounded anyway (a Wait by its timeout,
    /// the rest by the database's query timeout).
    pub max_connection_age: Option<Duration>,
    /// Most RPCs served at once; more are shed with RESOURCE_EXHAUSTED.
    pub max_concurrent_rpcs: usize,
    /// Most Waits in progress at once (they do not count against `max_concurrent_rpcs`).
    pub max_waiters: usize,
    /// Largest request message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Pause between refreshes of the store's gauges (pool, record counts).
    pub metrics_interval: Duration,
    /// The access policy; `None` turns auth off.
    pub auth: Option<Arc<AuthState>>,
    /// TLS for the gRPC listener; `None` serves plaintext.
    pub tls: Option<Arc<TlsState>>,
    /// How often the policy and certificate files are checked for changes (SIGHUP checks now).
    pub reload_interval: Duration,
    /// Serve the console over TLS with `tls` (ignored without it).
    pub console_tls: bool,
}

impl Default for ServerSettings {
    /// What `idemd serve` runs with when no flag is given.
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            reaper_interval: defaults::REAPER_INTERVAL.value,
            reaper_batch: defaults::REAPER_BATCH,
            readiness_interval: defaults::READINESS_INTERVAL,
            counts_flush_interval: defaults::COUNTS_FLUSH_INTERVAL,
            shutdown_grace: defaults::SHUTDOWN_GRACE.value,
            max_connection_age: None,
            max_concurrent_rpcs: defaults::MAX_CONCURRENT_RPCS as usize,
            max_waiters: defaults::MAX_WAITERS as usize,
            max_message_bytes: defaults::MAX_MESSAGE_BYTES as usize,
            metrics_interval: defaults::METRICS_INTERVAL.value,
            auth: None,
            tls: None,
            reload_interval: defaults::RELOAD_INTERVAL.value,
            console_tls: false,
        }
    }
}

/// Failures that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("HTTP/JSON gateway: {0}")]
    Gateway(#[from] crate::gateway::GatewayError),
}

/// Where the server listens.
pub struct Listeners {
    /// The gRPC API (TLS when `ServerSettings::tls` is set), health and reflection, and the same
    /// API as HTTP/JSON (`crate::gateway`).
    pub grpc: TcpListener,
    /// Prometheus `GET /metrics`.
    pub metrics: Option<TcpListener>,
    /// Plaintext gRPC health only, for probes that cannot speak TLS (Kubernetes `grpc:` probes).
    pub health: Option<TcpListener>,
    /// The web console (`crate::console`), over the same admin API.
    pub console: Option<TcpListener>,
}

impl Listeners {
    /// Just the gRPC listener.
    pub fn grpc(listener: TcpListener) -> Self {
        Self {
            grpc: listener,
            metrics: None,
            health: None,
            console: None,
        }
    }
}

type Serving = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// Serves until `shutdown` resolves; then readiness turns NOT_SERVING, the gRPC listener closes
/// (new connections are refused; open ones take no new RPCs), and in-flight RPCs get at most
/// `settings.shutdown_grace` to finish. The health-only listener, if any, keeps answering
/// (readiness NOT_SERVING) until that drain is over.
pub async fn serve<S: Store + AdminStore>(
    listeners: Listeners,
    store: Arc<S>,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let metrics_handle = metrics::install().map_err(ServeError::Metrics)?;
    // One shutdown signal, fanned out to every listener, the health Watch streams and the
    // background loop.
    let (stop, stopped) = watch::channel(false);
    let health = HealthReporter::new();
    let health_service = HealthServer::new(DrainingHealth {
        inner: HealthService::from_health_reporter(health.clone()),
        stopped: stopped.clone(),
    });
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    if settings.auth.is_none() {
        tracing::warn!(
            "AUTHENTICATION IS OFF: no --auth-config, so every caller may read and write every \
             namespace. Set --auth-config (and --require-auth) for anything but local use"
        );
    }
    let admin_api = AdminApi::new(store.clone(), settings.auth.clone());
    let api = IdempotencyApi::new(
        store.clone(),
        settings.limits,
        settings.max_concurrent_rpcs,
        settings.max_waiters,
        settings.auth.clone(),
    );

    let background = tokio::spawn(run_background(
        store.clone(),
        health.clone(),
        settings.clone(),
        stopped.clone(),
    ));
    let upkeep = {
        let metrics_handle = metrics_handle.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                metrics_handle.run_upkeep();
            }
        })
    };

    {
        let health = health.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: readiness NOT_SERVING, draining in-flight RPCs");
            health
                .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
                .await;
            let _ = stop.send(true);
        });
    }
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stopped| *stopped).await;
        }
    };

    // The console stops taking requests when shutdown begins, like the API.
    let console_task = listeners.console.map(|listener| {
        let tls = settings.tls.clone().filter(|_| settings.console_tls);
        let serving = crate::console::serve(
            listener,
            tls,
            admin_api.clone(),
            settings.auth.clone(),
            until_stopped(),
        );
        tokio::spawn(async move {
            if let Err(error) = serving.await {
                tracing::error!(%error, "console listener failed");
            }
        })
    });
    let metrics_task = listeners
        .metrics
        .map(|listener| tokio::spawn(metrics::serve(listener, metrics_handle, until_stopped())));
    // The probes' port outlives the API's drain: a probe during the drain reads NOT_SERVING from
    // the health RPC rather than a refused connection it cannot tell from a crash.
    let (drain_over, mut api_drained) = watch::channel(false);
    let health_task = listeners.health.map(|listener| {
        let health_only = tonic::transport::Server::builder()
            .add_service(health_service.clone())
            .serve_with_incoming_shutdown(incoming(listener), async move {
                let _ = api_drained.wait_for(|drained| *drained).await;
            });
        tokio::spawn(health_only)
    });

    let mut builder = tonic::transport::Server::builder();
    if let Some(age) = settings.max_connection_age {
        // A ClusterIP Service or an L4 balancer spreads connections, not calls: aged connections
        // are replaced, so new replicas get their share of long-lived clients. No
        // `max_connection_age_grace`: tonic 0.14 then skips the GOAWAY and cuts the connection at
        // age + grace, failing the calls in flight.
        builder = builder.max_connection_age(age);
    }
    // gRPC and HTTP/JSON on one listener: HTTP/1.1 too, for JSON clients; gRPC goes on as before.
    let gateway = Arc::new(crate::gateway::Gateway::new(settings.max_message_bytes)?);
    let router = builder
        .accept_http1(true)
        .layer(crate::gateway::GatewayLayer::new(gateway))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api.into_service(settings.max_message_bytes))
        .add_service(admin_api.into_service(settings.max_message_bytes));
    let server: Serving = match &settings.tls {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
            tls::incoming(listeners.grpc, tls.clone()),
            until_stopped(),
        )),
        None => {
            Box::pin(router.serve_with_incoming_shutdown(incoming(listeners.grpc), until_stopped()))
        }
    };
    // tonic's drain has no deadline of its own.
    let grace = settings.shutdown_grace;
    let drain_deadline = until_stopped();
    let outcome = tokio::select! {
        outcome = server => outcome.map_err(ServeError::from),
        _ = async { drain_deadline.await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "grace period over: cutting off remaining RPCs");
            Ok(())
        }
    };
    let _ = drain_over.send(true);
    background.abort();
    upkeep.abort();
    // The counts of the RPCs just drained (a flush the abort cut short is sent again, once).
    match tokio::time::timeout(grace, store.flush_counts()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "the last per-minute counts were not flushed"),
        Err(_) => tracing::warn!(
            ?grace,
            "the last per-minute counts were not flushed in time"
        ),
    }
    for task in [
        metrics_task,
        console_task,
        health_task.map(|task| {
            tokio::spawn(async move {
                let _ = task.await;
            })
        }),
    ]
    .into_iter()
    .flatten()
    {
        let _ = tokio::time::timeout(grace, task).await;
    }
    outcome
}

/// gRPC health whose Watch streams end, with UNAVAILABLE, once shutdown begins (after the
/// NOT_SERVING that shutdown sets first): an open Watch would otherwise hold its connection, and
/// so the drain, for the whole grace period.
struct DrainingHealth {
    inner: HealthService,
    stopped: watch::Receiver<bool>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut statuses = self.inner.watch(request).await?.into_inner();
        let mut stopped = self.stopped.clone();
        // A closed channel means the server is gone: stopped as well.
        let mut stop = Box::pin(async move {
            let _ = stopped.wait_for(|stopped| *stopped).await;
        });
        let mut ended = false;
        let stream = futures_util::stream::poll_fn(move |cx: &mut Context<'_>| {
            if ended {
                return Poll::Ready(None);
            }
            // Statuses first, so the watcher gets the NOT_SERVING set before the stop.
            if let Poll::Ready(status) = Pin::new(&mut statuses).poll_next(cx) {
                return Poll::Ready(status);
            }
            match stop.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    ended = true;
                    Poll::Ready(Some(Err(Status::unavailable("idemd is shutting down"))))
                }
                Poll::Pending => Poll::Pending,
            }
        });
        Ok(Response::new(Box::pin(stream) as WatchStream))
    }
}

/// Keeps readiness in step with the store, reaps expired records, and flushes the per-minute
/// counts.
async fn run_background<S: Store>(
    store: Arc<S>,
    health: HealthReporter,
    settings: ServerSettings,
    stopped: watch::Receiver<bool>,
) {
    let mut readiness = tokio::time::interval(settings.readiness_interval);
    readiness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first round comes one interval after start, not whenever the loop first gets round to
    // it: rounds keep to a schedule the operator (and a test) can count on.
    let mut reaper = tokio::time::interval_at(
        tokio::time::Instant::now() + settings.reaper_interval,
        settings.reaper_interval,
    );
    reaper.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flushes = tokio::time::interval_at(
        tokio::time::Instant::now() + settings.counts_flush_interval,
        settings.counts_flush_interval,
    );
    flushes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gauges = tokio::time::interval(settings.metrics_interval);
    gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reload = tokio::time::interval(settings.reload_interval);
    reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hangups = hangup_signals();
    let mut ready = None;
    loop {
        tokio::select! {
            _ = readiness.tick() => {
                let now_ready = match store.check_ready().await {
                    Ok(()) => true,
                    Err(error) => {
                        if ready != Some(false) {
                            tracing::warn!(%error, "store not ready");
                        }
                        false
                    }
                };
                metrics::store_ready(now_ready);
                // Once shutdown began, readiness stays NOT_SERVING.
                if *stopped.borrow() {
                    continue;
                }
                if ready != Some(now_ready) {
                    let status = if now_ready { ServingStatus::Serving } else { ServingStatus::NotServing };
                    health.set_service_status(SERVICE_NAME, status).await;
                    tracing::info!(ready = now_ready, "readiness changed");
                    ready = Some(now_ready);
                }
            }
            _ = reaper.tick() => reap(store.as_ref(), settings.reaper_batch).await,
            _ = flushes.tick() => {
                if let Err(error) = store.flush_counts().await {
                    tracing::debug!(%error, "flush of per-minute counts failed; they go with the next");
                }
            }
            _ = gauges.tick() => store.report_metrics().await,
            _ = reload.tick() => reload_files(&settings),
            Some(()) = hangups.recv() => {
                tracing::info!("SIGHUP: reloading the auth policy and TLS certificates");
                reload_files(&settings);
            }
        }
    }
}

/// Deletes expired records in batches until a batch comes back short.
async fn reap<S: Store>(store: &S, batch: u32) {
    let mut total = 0;
    loop {
        match store.reap_expired(batch).await {
            Ok(deleted) => {
                total += deleted;
                metrics::reaped(deleted);
                if deleted < u64::from(batch) {
                    break;
                }
            }
            Err(error) => {
                tracing::debug!(%error, "reaper round failed");
                break;
            }
        }
    }
    if total > 0 {
        tracing::debug!(deleted = total, "reaped expired records");
    }
}

fn reload_files(settings: &ServerSettings) {
    if let Some(auth) = &settings.auth {
        auth.reload_and_log();
    }
    if let Some(tls) = &settings.tls {
        tls.reload_and_log();
    }
}

/// SIGHUP deliveries, as a channel (empty and never ready where there is no SIGHUP).
fn hangup_signals() -> tokio::sync::mpsc::Receiver<()> {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hangup) => {
                tokio::spawn(async move {
                    while hangup.recv().await.is_some() {
                        let _ = sender.try_send(());
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; files are still polled")
            }
        }
    }
    #[cfg(not(unix))]
    drop(sender);
    receiver
}

/// Accepted plaintext connections: TCP_NODELAY (a response must not wait for the client's ACK of
/// the previous one), and TCP keepalive so peers that vanished are noticed.
fn incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
}
