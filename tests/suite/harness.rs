//! Shared test fixtures: a fresh database per test on the shared PostgreSQL, an idemd server
//! started in-process on 127.0.0.1:0, and small client helpers.

use std::{
    net::SocketAddr,
    sync::{Arc, Once},
    time::{Duration, SystemTime},
};

use idemd::domain::{DurationPolicy, Limits};
use idemd::proto::idempotency::v1 as pb;
use idemd::proto::idempotency::v1::idempotency_service_client::IdempotencyServiceClient;
use idemd::server::{ServeError, ServerSettings};
use idemd::store::postgres::{migrate, PostgresConfig};
use idemd::store::{AdminStore, MemoryStore, PostgresStore, Store};
use prost::bytes::{Buf, BufMut};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic_types::StatusExt;

pub type Client = IdempotencyServiceClient<Channel>;
pub type AdminClient =
    idemd::proto::idempotency::admin::v1::admin_service_client::AdminServiceClient<Channel>;

/// Logs are silent unless TEST_LOG is set (to a filter, e.g. `debug`).
pub fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
    });
}

/// The shared PostgreSQL server's admin URL (IDEMD_TEST_DATABASE_URL overrides it).
pub fn admin_url() -> String {
    std::env::var("IDEMD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// Replace the database name in a URL of the form `postgres://…/name`.
pub fn with_database(url: &str, database: &str) -> String {
    let base = url.rsplit_once('/').map_or(url, |(base, _)| base);
    format!("{base}/{database}")
}

async fn admin_client(admin_url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|error| {
            panic!(
                "PostgreSQL is required for this test and is not reachable at {admin_url}: {error}. \
                 Start it or set IDEMD_TEST_DATABASE_URL."
            )
        });
    tokio::spawn(connection);
    client
}

/// A database made for one test (migrated unless made with `create_empty`), dropped when the value is dropped.
pub struct TestDatabase {
    pub url: String,
    admin_url: String,
    name: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        Self::create_on(&admin_url()).await
    }

    pub async fn create_on(admin_url: &str) -> Self {
        let database = Self::create_empty_on(admin_url).await;
        let config = PostgresConfig::new(database.url.clone());
        migrate::migrate(&config)
            .await
            .expect("migrate test database");
        database
    }

    /// A database without idemd's schema.
    pub async fn create_empty() -> Self {
        Self::create_empty_on(&admin_url()).await
    }

    async fn create_empty_on(admin_url: &str) -> Self {
        init_logs();
        let name = format!("idemd_test_{}", uuid::Uuid::new_v4().simple());
        let admin = admin_client(admin_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let url = with_database(admin_url, &name);
        Self {
            url,
            admin_url: admin_url.to_string(),
            name,
        }
    }

    pub fn config(&self) -> PostgresConfig {
        PostgresConfig {
            pool_size: 8,
            ..PostgresConfig::new(self.url.clone())
        }
    }

    pub fn store(&self) -> PostgresStore {
        PostgresStore::connect(&self.config()).expect("pool")
    }

    /// A direct connection, for checks below the API.
    pub async fn connect(&self) -> tokio_postgres::Client {
        admin_client(&self.url).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs inside a Tokio runtime; do the async cleanup on a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok((client, connection)) =
                    tokio_postgres::connect(&admin_url, tokio_postgres::NoTls).await
                {
                    tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Settings for tests: bounds low enough that leases and retention can run out in a test.
pub fn test_settings() -> ServerSettings {
    ServerSettings {
        limits: Limits {
            lease_ttl: DurationPolicy {
                default: Duration::from_secs(30),
                min: Duration::from_millis(10),
                max: Duration::from_secs(3600),
            },
            retention: DurationPolicy {
                default: Duration::from_secs(24 * 3600),
                min: Duration::from_millis(10),
                max: Duration::from_secs(30 * 24 * 3600),
            },
            max_result_body_bytes: 1024 * 1024,
            ..Limits::default()
        },
        reaper_interval: Duration::from_secs(3600),
        readiness_interval: Duration::from_millis(100),
        ..ServerSettings::default()
    }
}

/// An idemd server running in this process on 127.0.0.1:0.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
    /// Keeps a test's database alive as long as its server.
    _database: Option<Arc<TestDatabase>>,
}

impl TestServer {
    pub async fn start<S: Store + AdminStore>(store: Arc<S>, settings: ServerSettings) -> Self {
        init_logs();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(idemd::server::serve(
            idemd::server::Listeners::grpc(listener),
            store,
            settings,
            async move {
                let _ = stop.await;
            },
        ));
        Self {
            addr,
            shutdown: Some(shutdown),
            task: Some(task),
            _database: None,
        }
    }

    pub async fn memory() -> Self {
        Self::start(Arc::new(MemoryStore::new()), test_settings()).await
    }

    /// A server on a fresh database of its own.
    pub async fn postgres() -> Self {
        let database = Arc::new(TestDatabase::create().await);
        let mut server = Self::on_database(&database, test_settings()).await;
        server._database = Some(database);
        server
    }

    pub async fn on_database(database: &TestDatabase, settings: ServerSettings) -> Self {
        Self::start(Arc::new(database.store()), settings).await
    }

    /// A server on the database at `url` with the replay cache off: every Get and Acquire it
    /// answers was read from PostgreSQL. Durability tests read back through it, because a
    /// replica that cached a record answers it without asking the database.
    pub async fn uncached(url: &str) -> Self {
        let config = PostgresConfig {
            pool_size: 2,
            replay_cache_bytes: 0,
            ..PostgresConfig::new(url.to_string())
        };
        Self::start(
            Arc::new(PostgresStore::connect(&config).expect("pool")),
            test_settings(),
        )
        .await
    }

    pub async fn client(&self) -> Client {
        IdempotencyServiceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect to test server")
    }

    pub async fn admin(&self) -> AdminClient {
        AdminClient::new(self.channel().await)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect to test server")
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server result");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

pub fn ms(millis: u64) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(Duration::from_millis(millis)).ok()
}

pub fn to_system_time(timestamp: &Option<prost_types::Timestamp>) -> SystemTime {
    let timestamp = (*timestamp).expect("timestamp set");
    SystemTime::try_from(timestamp).expect("valid timestamp")
}

pub fn to_duration(duration: &Option<prost_types::Duration>) -> Duration {
    Duration::try_from(duration.expect("duration set")).expect("non-negative duration")
}

/// Waits until the local clock has passed `deadline` (a time the server reported). Server and
/// test run on one machine, so they share a clock; this is time passing, not synchronisation.
pub async fn wait_past(deadline: SystemTime) {
    let margin = Duration::from_millis(20);
    if let Ok(left) = deadline.duration_since(SystemTime::now()) {
        tokio::time::sleep(left + margin).await;
    } else {
        tokio::time::sleep(margin).await;
    }
}

/// The `ErrorInfo.reason` of a status.
pub fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// Asserts a status's code and reason.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    expected_reason: &str,
) -> tonic::Status {
    let status = result.expect_err("expected an error status");
    assert_eq!(status.code(), code, "unexpected code: {status:?}");
    assert_eq!(
        reason(&status),
        expected_reason,
        "unexpected reason: {status:?}"
    );
    status
}

/// A Complete of 5 MiB, over the default `--max-message-bytes` (4 MiB).
pub fn oversized_complete(namespace: &str) -> pb::CompleteRequest {
    pb::CompleteRequest {
        namespace: namespace.into(),
        key: "k".into(),
        lease_token: "0".repeat(32),
        result: Some(pb::Result {
            body: vec![0; 5 * 1024 * 1024],
            ..Default::default()
        }),
        retention: None,
    }
}

pub fn acquire_request(namespace: &str, key: &str, fingerprint: &[u8]) -> pb::AcquireRequest {
    pb::AcquireRequest {
        namespace: namespace.into(),
        key: key.into(),
        fingerprint: fingerprint.to_vec(),
        lease_ttl: None,
        retention: None,
        holder: "test-holder".into(),
    }
}

pub fn sample_result(tag: &str) -> pb::Result {
    let mut body = tag.as_bytes().to_vec();
    body.extend_from_slice(&[0, 159, 255, 0xc3, 0x28]);
    pb::Result {
        body,
        code: 201,
        metadata: [
            ("content-type".to_string(), "application/json".to_string()),
            ("x-tag".to_string(), tag.to_string()),
        ]
        .into_iter()
        .collect(),
    }
}

/// A unique key per call, so cases never collide.
pub fn unique_key(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4())
}

/// Polls `probe` every 50 ms until it holds, for at most `limit`: awaiting a condition, not
/// sleeping for a guessed time.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !probe().await {
        assert!(
            started.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a record that must exist.
pub async fn get_record(client: &mut Client, namespace: &str, key: &str) -> pb::Record {
    client
        .get(pb::GetRequest {
            namespace: namespace.into(),
            key: key.into(),
        })
        .await
        .expect("get")
        .into_inner()
        .record
        .expect("record")
}

/// Sends and receives raw bytes as the gRPC message.
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// Calls `method` of the idempotency service with raw bytes (and the request's metadata) as the
/// message.
pub async fn raw_call(
    server: &TestServer,
    method: &str,
    request: impl tonic::IntoRequest<Vec<u8>>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = format!("/idempotency.v1.IdempotencyService/{method}")
        .parse()
        .expect("path");
    grpc.unary(request.into_request(), path, RawCodec)
        .await
        .map(|response| response.into_inner())
}
