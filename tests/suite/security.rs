//! Tenants cannot see or touch each other: bearer tokens and client certificates, namespace
//! grants per RPC, policy reload, TLS and mTLS with real handshakes, per-caller limits.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use idemd::auth::AuthState;
use idemd::proto::idempotency::v1 as pb;
use idemd::proto::idempotency::v1::idempotency_service_client::IdempotencyServiceClient;
use idemd::server::ServerSettings;
use idemd::store::MemoryStore;
use idemd::tls::{TlsFiles, TlsState};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

use crate::harness::*;

const PAYMENTS_TOKEN: &str = "payments-token-7f3a9c";
const ORDERS_TOKEN: &str = "orders-token-1b2c3d";
const OPERATOR_TOKEN: &str = "operator-token-9e8d7c";

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn policy(extra: &str) -> String {
    format!(
        r#"
[[callers]]
name = "payments-api"
token_sha256 = ["{payments}"]
tls_identities = ["payments-api.payments.svc"]
  [[callers.grants]]
  namespaces = ["payments"]
  rpcs = ["*"]

[[callers]]
name = "orders-api"
token_sha256 = ["{orders}"]
  [[callers.grants]]
  namespaces = ["orders", "orders-*"]
  rpcs = ["*"]

[[callers]]
name = "operator"
token_sha256 = ["{operator}"]
  [[callers.grants]]
  namespaces = ["*"]
  rpcs = ["Get"]
{extra}"#,
        payments = sha256_hex(PAYMENTS_TOKEN),
        orders = sha256_hex(ORDERS_TOKEN),
        operator = sha256_hex(OPERATOR_TOKEN),
    )
}

fn write(path: &Path, text: &str) {
    // Write then rename, as Kubernetes' atomic Secret updates do: readers never see half a file.
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).expect("write");
    std::fs::rename(&temporary, path).expect("rename");
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {token}").parse().expect("header value");
    request.metadata_mut().insert("authorization", value);
    request
}

struct Secured {
    server: TestServer,
    auth: Arc<AuthState>,
    _dir: tempfile::TempDir,
    policy_path: PathBuf,
}

async fn secured(extra_policy: &str, tls: Option<Arc<TlsState>>) -> Secured {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy_path = dir.path().join("policy.toml");
    write(&policy_path, &policy(extra_policy));
    let auth = Arc::new(AuthState::load(&policy_path).expect("policy loads"));
    let settings = ServerSettings {
        auth: Some(auth.clone()),
        tls,
        reload_interval: Duration::from_millis(100),
        ..test_settings()
    };
    let server = TestServer::start(Arc::new(MemoryStore::new()), settings).await;
    Secured {
        server,
        auth,
        _dir: dir,
        policy_path,
    }
}

fn key_request(namespace: &str, key: &str) -> pb::GetRequest {
    pb::GetRequest {
        namespace: namespace.into(),
        key: key.into(),
    }
}

/// Calls every RPC on (namespace, key) with `token`, expecting `code` from each; returns each
/// RPC's status.
async fn every_rpc(
    client: &mut Client,
    token: Option<&str>,
    namespace: &str,
    key: &str,
    lease_token: &str,
    code: Code,
) -> Vec<(&'static str, tonic::Status)> {
    let wrap = |message| match token {
        Some(token) => with_token(message, token),
        None => tonic::Request::new(message),
    };
    let acquire = client
        .acquire(wrap(acquire_request(namespace, key, b"")))
        .await;
    let complete = client
        .complete(match token {
            Some(token) => with_token(
                pb::CompleteRequest {
                    namespace: namespace.into(),
                    key: key.into(),
                    lease_token: lease_token.into(),
                    result: Some(sample_result("x")),
                    retention: None,
                },
                token,
            ),
            None => tonic::Request::new(pb::CompleteRequest {
                namespace: namespace.into(),
                key: key.into(),
                lease_token: lease_token.into(),
                result: Some(sample_result("x")),
                retention: None,
            }),
        })
        .await;
    let release_message = pb::ReleaseRequest {
        namespace: namespace.into(),
        key: key.into(),
        lease_token: lease_token.into(),
    };
    let release = client
        .release(match token {
            Some(token) => with_token(release_message, token),
            None => tonic::Request::new(release_message),
        })
        .await;
    let renew_message = pb::RenewRequest {
        namespace: namespace.into(),
        key: key.into(),
        lease_token: lease_token.into(),
        lease_ttl: None,
    };
    let renew = client
        .renew(match token {
            Some(token) => with_token(renew_message, token),
            None => tonic::Request::new(renew_message),
        })
        .await;
    let get_message = key_request(namespace, key);
    let get = client
        .get(match token {
            Some(token) => with_token(get_message, token),
            None => tonic::Request::new(get_message),
        })
        .await;
    let statuses = [
        ("Acquire", acquire.err()),
        ("Complete", complete.err()),
        ("Release", release.err()),
        ("Renew", renew.err()),
        ("Get", get.err()),
    ];
    statuses
        .into_iter()
        .map(|(rpc, status)| {
            let status =
                status.unwrap_or_else(|| panic!("{rpc} in {namespace} with {token:?} succeeded"));
            assert_eq!(
                status.code(),
                code,
                "{rpc} in {namespace} with {token:?}: {status:?}"
            );
            (rpc, status)
        })
        .collect()
}

/// Asserts that two refusals are the same answer: code, message and details, byte for byte.
#[track_caller]
fn assert_same_refusals(
    on_existing: &[(&'static str, tonic::Status)],
    on_absent: &[(&'static str, tonic::Status)],
) {
    assert_eq!(on_existing.len(), on_absent.len());
    for ((rpc, existing), (_, absent)) in on_existing.iter().zip(on_absent) {
        assert_eq!(
            (existing.code(), existing.message(), existing.details()),
            (absent.code(), absent.message(), absent.details()),
            "{rpc}: the refusal differs when the key exists"
        );
    }
}

/// Who the caller is is settled from the headers before the message is read: a caller without
/// known credentials gets UNAUTHENTICATED for a malformed or oversized message, not the decoding
/// error that would show its message was read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_callers_are_refused_before_their_message_is_decoded() {
    let secured = secured("", None).await;
    let server = &secured.server;
    let garbage = vec![0xff; 64];
    for token in [None, Some("forged-token")] {
        for method in ["Acquire", "Complete", "Release", "Renew", "Get", "Wait"] {
            let request = match token {
                Some(token) => with_token(garbage.clone(), token),
                None => tonic::Request::new(garbage.clone()),
            };
            let refused = raw_call(server, method, request).await;
            assert_status(refused, Code::Unauthenticated, "UNAUTHENTICATED");
        }
    }
    // Over --max-message-bytes (4 MiB).
    let huge = oversized_complete("payments");
    let mut client = server.client().await;
    let refused = client.complete(huge.clone()).await;
    assert_status(refused, Code::Unauthenticated, "UNAUTHENTICATED");
    // A known caller's message is read: the same bytes fail to decode, the same size is too big.
    let undecodable = raw_call(server, "Acquire", with_token(garbage, PAYMENTS_TOKEN))
        .await
        .expect_err("garbage");
    assert!(
        matches!(undecodable.code(), Code::Internal | Code::InvalidArgument),
        "{undecodable:?}"
    );
    let too_big = client
        .complete(with_token(huge, PAYMENTS_TOKEN))
        .await
        .expect_err("too big");
    assert!(
        matches!(
            too_big.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument
        ),
        "{too_big:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_confined_to_their_namespaces_and_rpcs() {
    let secured = secured("", None).await;
    let mut client = secured.server.client().await;
    let key = unique_key("charge");
    // payments-api works in its own namespace.
    let lease = client
        .acquire(with_token(
            acquire_request("payments", &key, b""),
            PAYMENTS_TOKEN,
        ))
        .await
        .expect("own namespace")
        .into_inner()
        .lease
        .expect("lease");

    // No credentials, a wrong token, another scheme: UNAUTHENTICATED for every RPC.
    let unauthenticated_on_existing = every_rpc(
        &mut client,
        None,
        "payments",
        &key,
        &lease.token,
        Code::Unauthenticated,
    )
    .await;
    every_rpc(
        &mut client,
        Some("not-a-known-token"),
        "payments",
        &key,
        &lease.token,
        Code::Unauthenticated,
    )
    .await;
    let mut basic = tonic::Request::new(key_request("payments", &key));
    basic.metadata_mut().insert(
        "authorization",
        "Basic cGF5bWVudHM6eA==".parse().expect("value"),
    );
    assert_status(
        client.get(basic).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );

    // Another tenant is refused for every RPC, on a key that exists and on one that does not:
    // the answer is the same (code, message, details), so it reveals nothing.
    let on_existing = every_rpc(
        &mut client,
        Some(ORDERS_TOKEN),
        "payments",
        &key,
        &lease.token,
        Code::PermissionDenied,
    )
    .await;
    let on_absent = every_rpc(
        &mut client,
        Some(ORDERS_TOKEN),
        "payments",
        "no-such-key",
        &lease.token,
        Code::PermissionDenied,
    )
    .await;
    assert_same_refusals(&on_existing, &on_absent);
    // The same for a caller without credentials.
    let on_absent = every_rpc(
        &mut client,
        None,
        "payments",
        "no-such-key",
        &lease.token,
        Code::Unauthenticated,
    )
    .await;
    assert_same_refusals(&unauthenticated_on_existing, &on_absent);
    let denied = client
        .get(with_token(key_request("payments", &key), ORDERS_TOKEN))
        .await;
    let status = assert_status(denied, Code::PermissionDenied, "PERMISSION_DENIED");
    assert!(
        status.message().contains("orders-api"),
        "{}",
        status.message()
    );
    // orders-api works in its own namespaces, prefix grants included.
    client
        .acquire(with_token(
            acquire_request("orders-eu", &key, b""),
            ORDERS_TOKEN,
        ))
        .await
        .expect("prefix grant");

    // The operator may only read.
    let record = client
        .get(with_token(key_request("payments", &key), OPERATOR_TOKEN))
        .await
        .expect("operator reads")
        .into_inner()
        .record
        .expect("record");
    assert_eq!(record.state(), pb::RecordState::InProgress);
    let acquire = client
        .acquire(with_token(
            acquire_request("payments", &unique_key("op"), b""),
            OPERATOR_TOKEN,
        ))
        .await;
    assert_status(acquire, Code::PermissionDenied, "PERMISSION_DENIED");
    let release = client
        .release(with_token(
            pb::ReleaseRequest {
                namespace: "payments".into(),
                key: key.clone(),
                lease_token: lease.token.clone(),
            },
            OPERATOR_TOKEN,
        ))
        .await;
    assert_status(release, Code::PermissionDenied, "PERMISSION_DENIED");

    // None of the refused calls changed anything: the lease still completes.
    client
        .complete(with_token(
            pb::CompleteRequest {
                namespace: "payments".into(),
                key: key.clone(),
                lease_token: lease.token.clone(),
                result: Some(sample_result("paid")),
                retention: None,
            },
            PAYMENTS_TOKEN,
        ))
        .await
        .expect("the holder completes");

    // Health and reflection stay open without credentials.
    let health = HealthClient::new(secured.server.channel().await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health without credentials");
    assert_eq!(health.into_inner().status, 1);
}

/// The value of one series (`name{labels}`) in a Prometheus text exposition.
fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// Refusals are counted, exactly, for each reason (permission_denied, unauthenticated,
/// caller_limited): an idemd process of this test's own (the in-process recorder is
/// shared by every test in this binary), its /metrics scraped after a known number of refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_counted_exactly_in_metrics() {
    use crate::processes::{http_get, IdemdProcess};

    let dir = tempfile::tempdir().expect("temp dir");
    let policy_path = dir.path().join("policy.toml");
    const SLOW_TOKEN: &str = "slow-token-0002";
    let slow = format!(
        "\n[[callers]]\nname = \"slow\"\ntoken_sha256 = [\"{}\"]\nrate_per_second = 1\n  [[callers.grants]]\n  namespaces = [\"slow\"]\n  rpcs = [\"*\"]\n",
        sha256_hex(SLOW_TOKEN)
    );
    write(&policy_path, &policy(&slow));
    let server = IdemdProcess::start(&[
        "--auth-config",
        policy_path.to_str().expect("utf-8 path"),
        "--require-auth",
    ]);
    let mut client = Client::connect(format!("http://{}", server.addr))
        .await
        .expect("connect");
    let key = unique_key("counted");
    let lease = client
        .acquire(with_token(
            acquire_request("payments", &key, b""),
            PAYMENTS_TOKEN,
        ))
        .await
        .expect("own namespace")
        .into_inner()
        .lease
        .expect("lease");
    // Five RPCs by another tenant, twice; five without credentials, five with an unknown token.
    for key in [key.as_str(), "no-such-key"] {
        every_rpc(
            &mut client,
            Some(ORDERS_TOKEN),
            "payments",
            key,
            &lease.token,
            Code::PermissionDenied,
        )
        .await;
    }
    for token in [None, Some("not-a-known-token")] {
        every_rpc(
            &mut client,
            token,
            "payments",
            &key,
            &lease.token,
            Code::Unauthenticated,
        )
        .await;
    }
    // A caller allowed one call a second, sending ten at once: the ones shed are counted too.
    let mut shed = 0;
    for _ in 0..10 {
        let result = client
            .get(with_token(key_request("slow", "k"), SLOW_TOKEN))
            .await;
        match result {
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert_eq!(reason(&status), "CALLER_LIMITED", "{status:?}");
                shed += 1;
            }
            Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
            Ok(response) => panic!("no record was written: {response:?}"),
        }
    }
    assert!(shed > 0, "ten calls at once stayed within one a second");
    let metrics_addr = server.metrics_addr;
    let (code, exposition) =
        tokio::task::spawn_blocking(move || http_get(metrics_addr, "/metrics"))
            .await
            .expect("scrape");
    assert_eq!(code, 200);
    for (reason, expected) in [
        ("permission_denied", 10.0),
        ("unauthenticated", 10.0),
        ("caller_limited", f64::from(shed)),
    ] {
        let series = format!(r#"idemd_auth_denied_total{{reason="{reason}"}}"#);
        assert_eq!(
            metric_value(&exposition, &series),
            Some(expected),
            "{series}:\n{exposition}"
        );
    }
}

/// A channel whose TCP connections are counted, to prove a reload drops none.
async fn counted_channel(addr: SocketAddr, connections: Arc<AtomicUsize>) -> Channel {
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let connections = connections.clone();
        async move {
            connections.fetch_add(1, Ordering::SeqCst);
            let stream = tokio::net::TcpStream::connect(addr).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    Endpoint::from_static("http://idemd.test")
        .connect_with_connector(connector)
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reload_applies_without_dropping_connections_and_rejects_bad_files() {
    let secured = secured("", None).await;
    let connections = Arc::new(AtomicUsize::new(0));
    let mut client = IdempotencyServiceClient::new(
        counted_channel(secured.server.addr, connections.clone()).await,
    );
    const NEW_TOKEN: &str = "reporting-token-5a5a";
    let get = |token: &'static str| with_token(key_request("reports", "k"), token);
    assert_status(
        client.get(get(NEW_TOKEN)).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );

    // A new caller appears in the file: it is let in, on the same connection.
    let extra = format!(
        "\n[[callers]]\nname = \"reporting\"\ntoken_sha256 = [\"{}\"]\n  [[callers.grants]]\n  namespaces = [\"reports\"]\n  rpcs = [\"Get\"]\n",
        sha256_hex(NEW_TOKEN)
    );
    write(&secured.policy_path, &policy(&extra));
    eventually(Duration::from_secs(10), "new policy in force", || {
        let mut client = client.clone();
        async move { client.get(get(NEW_TOKEN)).await.err().map(|s| s.code()) == Some(Code::NotFound) }
    })
    .await;

    // A malformed file is rejected; the policy in force stays.
    write(
        &secured.policy_path,
        "[[callers]]\nname = \"broken\"\ntoken_sha256 = [\"zz\"]\n",
    );
    let error = secured
        .auth
        .reload()
        .expect_err("malformed policy is rejected");
    assert!(error.contains("64 hex"), "{error}");
    assert_eq!(
        client.get(get(NEW_TOKEN)).await.err().map(|s| s.code()),
        Some(Code::NotFound)
    );
    assert_eq!(
        client
            .get(get(PAYMENTS_TOKEN))
            .await
            .err()
            .map(|s| s.code()),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "the reloads dropped no connection"
    );
}

#[test]
fn bad_policy_or_missing_policy_stops_startup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[callers]]\nname = 1\n").expect("write");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_idemd"))
            .args(args)
            .output()
            .expect("run idemd")
    };
    let output = run(&["serve", "--auth-config", bad.to_str().expect("utf-8 path")]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--auth-config"));
    let output = run(&["serve", "--require-auth"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--require-auth"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_sheds_the_noisy_caller_while_a_quiet_one_keeps_succeeding() {
    let noisy_token = "noisy-token-0001";
    let extra = format!(
        "\n[[callers]]\nname = \"noisy\"\ntoken_sha256 = [\"{}\"]\nrate_per_second = 20\nmax_concurrent_rpcs = 4\n  [[callers.grants]]\n  namespaces = [\"noisy\"]\n  rpcs = [\"*\"]\n",
        sha256_hex(noisy_token)
    );
    let secured = secured(&extra, None).await;
    let client = secured.server.client().await;
    let started = std::time::Instant::now();
    let mut calls = JoinSet::new();
    for index in 0..200 {
        let mut client = client.clone();
        let (token, namespace) = if index % 2 == 0 {
            (noisy_token, "noisy")
        } else {
            (PAYMENTS_TOKEN, "payments")
        };
        calls.spawn(async move {
            let request = with_token(acquire_request(namespace, &unique_key("rate"), b""), token);
            (token, client.acquire(request).await.map(|_| ()))
        });
    }
    let (mut noisy_ok, mut noisy_shed, mut quiet_ok) = (0, 0, 0);
    while let Some(joined) = calls.join_next().await {
        match joined.expect("task") {
            (token, Ok(())) if token == noisy_token => noisy_ok += 1,
            (token, Err(status)) if token == noisy_token => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(reason(&status), "CALLER_LIMITED");
                noisy_shed += 1;
            }
            (_, Ok(())) => quiet_ok += 1,
            (_, Err(status)) => panic!("the quiet caller was refused: {status:?}"),
        }
    }
    // The bucket holds one second's worth (20) and refills at 20/s while the calls run: on a
    // loaded machine the 100 noisy calls can span a second or more, so the bound is what the
    // bucket can have handed out over the measured span, not a fixed 20.
    let limit = 20 + (20.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    assert_eq!(quiet_ok, 100, "every quiet call succeeded");
    assert!(
        noisy_shed > 0 && noisy_ok > 0,
        "noisy: {noisy_ok} admitted, {noisy_shed} shed"
    );
    assert!(
        noisy_ok <= limit,
        "the noisy caller got past its limit: {noisy_ok} admitted, at most {limit} allowed"
    );
}

/// A certificate authority for tests, and certificates it signs.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("self-signed CA");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) for `names`; `expired` backdates it.
    pub fn issue(&self, names: &[&str], expired: bool) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        params.distinguished_name.push(DnType::CommonName, names[0]);
        if expired {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        (cert.pem(), key.serialize_pem())
    }
}

fn write_tls_files(dir: &Path, cert: &(String, String), client_ca: Option<&str>) -> TlsFiles {
    write(&dir.join("tls.crt"), &cert.0);
    write(&dir.join("tls.key"), &cert.1);
    if let Some(ca) = client_ca {
        write(&dir.join("ca.crt"), ca);
    }
    TlsFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        client_ca: client_ca.map(|_| dir.join("ca.crt")),
    }
}

async fn tls_client(
    addr: SocketAddr,
    trust: &str,
    identity: Option<&(String, String)>,
) -> Result<Client, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(trust))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(IdempotencyServiceClient::new(channel))
}

/// Sends the HTTP/2 client preface and an empty SETTINGS frame in plaintext to `addr`; returns
/// the bytes that came back, and whether the server closed the connection (within 5 s).
fn plaintext_exchange(addr: SocketAddr) -> (Vec<u8>, bool) {
    use std::io::{ErrorKind, Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .expect("write preface");
    let mut answer = Vec::new();
    let closed = match stream.read_to_end(&mut answer) {
        Ok(_) => true,
        // A reset after the alert is a close too.
        Err(error) if error.kind() == ErrorKind::ConnectionReset => true,
        Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(error) => panic!("plaintext exchange: {error}"),
    };
    (answer, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_encrypted_and_reloads_rotated_certificates() {
    let ca = TestCa::new("idemd test CA");
    let dir = tempfile::tempdir().expect("temp dir");
    let files = write_tls_files(dir.path(), &ca.issue(&["localhost"], false), None);
    let tls = Arc::new(TlsState::load(files).expect("TLS material"));
    let secured = secured("", Some(tls.clone())).await;
    let addr = secured.server.addr;

    // Plaintext on the TLS port gets nowhere. On the wire: the HTTP/2 preface is answered with
    // one TLS alert record (content type 21) and the connection is closed; no HTTP/2 frame.
    let (answer, closed) = tokio::task::spawn_blocking(move || plaintext_exchange(addr))
        .await
        .expect("plaintext exchange");
    assert!(
        closed && answer.len() == 7 && answer[0] == 21,
        "the TLS port answered plaintext with other than one TLS alert and a close: \
         {answer:02x?}, closed: {closed}"
    );
    // Through a gRPC client: the call fails in the client's transport (which code depends on
    // how the client reads the alert and the close: UNKNOWN, CANCELLED or INTERNAL), and idemd
    // never answers it (every answer of idemd carries an ErrorInfo reason; a port that served
    // plaintext would say NOT_FOUND here).
    let mut plaintext = IdempotencyServiceClient::new(
        Endpoint::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_lazy(),
    );
    let status = plaintext
        .get(with_token(key_request("payments", "k"), PAYMENTS_TOKEN))
        .await
        .expect_err("plaintext on the TLS port");
    assert_eq!(reason(&status), "", "idemd answered plaintext: {status:?}");
    assert!(
        std::error::Error::source(&status)
            .is_some_and(|source| source.is::<tonic::transport::Error>()),
        "not a failure of the client's transport: {status:?}"
    );

    let mut client = tls_client(addr, &ca.pem, None)
        .await
        .expect("TLS handshake");
    client
        .acquire(with_token(
            acquire_request("payments", &unique_key("tls"), b""),
            PAYMENTS_TOKEN,
        ))
        .await
        .expect("RPC over TLS");

    // cert-manager rotates the certificate to one from a new CA: new connections get the new
    // one, the open connection keeps working.
    let rotated_ca = TestCa::new("idemd rotated CA");
    write_tls_files(dir.path(), &rotated_ca.issue(&["localhost"], false), None);
    eventually(
        Duration::from_secs(10),
        "rotated certificate served",
        || {
            let trust = rotated_ca.pem.clone();
            async move { tls_client(addr, &trust, None).await.is_ok() }
        },
    )
    .await;
    assert!(
        tls_client(addr, &ca.pem, None).await.is_err(),
        "the old certificate is no longer served"
    );
    client
        .get(with_token(key_request("payments", "k"), PAYMENTS_TOKEN))
        .await
        .expect_err("NOT_FOUND, over the connection opened before the rotation");
    let status = client
        .get(with_token(key_request("payments", "k"), PAYMENTS_TOKEN))
        .await
        .expect_err("not found");
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_identifies_callers_by_certificate_and_refuses_bad_ones() {
    let ca = TestCa::new("idemd test CA");
    let dir = tempfile::tempdir().expect("temp dir");
    let files = write_tls_files(dir.path(), &ca.issue(&["localhost"], false), Some(&ca.pem));
    let tls = Arc::new(TlsState::load(files).expect("TLS material"));
    let secured = secured("", Some(tls)).await;
    let addr = secured.server.addr;

    // A client certificate the policy knows: that caller, with its grants, no token needed.
    let payments = ca.issue(&["payments-api.payments.svc"], false);
    let mut client = tls_client(addr, &ca.pem, Some(&payments))
        .await
        .expect("mTLS handshake");
    client
        .acquire(acquire_request("payments", &unique_key("mtls"), b""))
        .await
        .expect("identified by its certificate");
    assert_status(
        client
            .acquire(acquire_request("orders", &unique_key("mtls"), b""))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    // A valid certificate of an identity the policy does not know: UNAUTHENTICATED.
    let stranger = ca.issue(&["stranger.example"], false);
    let mut client = tls_client(addr, &ca.pem, Some(&stranger))
        .await
        .expect("handshake");
    assert_status(
        client.get(key_request("payments", "k")).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );

    // No certificate, an expired one, one from an untrusted CA: the handshake fails with the
    // TLS alert that says why. (With TLS 1.3 the client may finish its side of the handshake
    // before the server refuses, so the alert can surface on the first RPC instead.)
    async fn refused_with(result: Result<Client, tonic::transport::Error>, alert: &str) {
        let error = match result {
            Err(error) => format!("{error:?}"),
            Ok(mut client) => match client.get(key_request("payments", "k")).await {
                Ok(_) => panic!("a bad client certificate was accepted"),
                // An answer from idemd (every one carries an ErrorInfo reason) would mean the
                // handshake succeeded; a transport failure carries none.
                Err(status) => {
                    assert_eq!(reason(&status), "", "idemd answered: {status:?}");
                    format!("{status:?}")
                }
            },
        };
        // The alert usually names the reason; when the server's close overtakes it the client
        // sees only a broken connection. Either way idemd never answered (checked above).
        if !error.contains(alert) {
            eprintln!("the {alert} alert was overtaken by the close: {error}");
        }
    }
    refused_with(tls_client(addr, &ca.pem, None).await, "CertificateRequired").await;
    let expired = ca.issue(&["payments-api.payments.svc"], true);
    refused_with(
        tls_client(addr, &ca.pem, Some(&expired)).await,
        "CertificateExpired",
    )
    .await;
    let rogue = TestCa::new("rogue CA").issue(&["payments-api.payments.svc"], false);
    refused_with(tls_client(addr, &ca.pem, Some(&rogue)).await, "UnknownCA").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_connections_use_verified_tls_with_sslmode_require() {
    use crate::processes::Cluster;
    use idemd::store::postgres::PostgresConfig;
    use idemd::store::{PostgresStore, Store};

    let ca = TestCa::new("database CA");
    let (cert, key) = ca.issue(&["localhost"], false);
    let cluster = Cluster::start_with_tls(&cert, &key);
    let database = TestDatabase::create_on(&cluster.admin_url()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("db-ca.crt");
    std::fs::write(&ca_file, &ca.pem).expect("write CA");
    let url = format!("{}?sslmode=require", database.url);

    let config = PostgresConfig {
        ca_file: Some(ca_file),
        ..PostgresConfig::new(url.clone())
    };
    idemd::store::postgres::migrate::migrate(&config)
        .await
        .expect("migrate over TLS");
    let store = Arc::new(PostgresStore::connect(&config).expect("pool"));
    store.check_ready().await.expect("ready over TLS");
    let server = TestServer::start(store, test_settings()).await;
    let mut client = server.client().await;
    client
        .acquire(acquire_request("tls-db", &unique_key("k"), b""))
        .await
        .expect("acquire over a TLS database connection");
    let encrypted: Vec<bool> = database
        .connect()
        .await
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'idemd' AND a.datname = current_database()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(!encrypted.is_empty(), "idemd has connections open");
    assert!(
        encrypted.iter().all(|ssl| *ssl),
        "every idemd connection uses TLS: {encrypted:?}"
    );

    // Without the CA, the certificate cannot be verified and idemd refuses to talk.
    let unverified = PostgresStore::connect(&PostgresConfig {
        connect_timeout: Duration::from_secs(2),
        ..PostgresConfig::new(url)
    })
    .expect("pool builds lazily");
    let error = unverified
        .check_ready()
        .await
        .expect_err("unverifiable certificate");
    assert!(error.to_string().contains("unavailable"), "{error}");
    server.stop().await;
    drop(database);
}

/// With TLS on the API port, probes use the plaintext health listener; denied calls are audited
/// (caller, namespace where one was asked for, RPC, the reason code of docs/SECURITY.md's
/// Answers table and a detail; never the token) in the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_process_serves_plaintext_health_and_audits_denials() {
    use crate::processes::IdemdProcess;
    const LIMITED_TOKEN: &str = "limited-token-0003";

    let ca = TestCa::new("idemd test CA");
    let dir = tempfile::tempdir().expect("temp dir");
    let files = write_tls_files(dir.path(), &ca.issue(&["localhost"], false), None);
    let policy_path = dir.path().join("policy.toml");
    // A caller allowed one call a second: its second call at once is CALLER_LIMITED.
    let limited = format!(
        "\n[[callers]]\nname = \"limited\"\ntoken_sha256 = [\"{}\"]\nrate_per_second = 1\n  [[callers.grants]]\n  namespaces = [\"limited\"]\n  rpcs = [\"*\"]\n",
        sha256_hex(LIMITED_TOKEN)
    );
    write(&policy_path, &policy(&limited));
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    let (cert, key, policy_file) = (path(&files.cert), path(&files.key), path(&policy_path));
    let server = IdemdProcess::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--auth-config",
        &policy_file,
        "--require-auth",
        "--health-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ]);
    let health_addr = server.health_addr().await;
    let channel = Endpoint::from_shared(format!("http://{health_addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("plaintext health port");
    let health = HealthClient::new(channel);
    for service in ["", idemd::server::SERVICE_NAME] {
        // Readiness turns SERVING after the first store check.
        eventually(
            Duration::from_secs(10),
            "SERVING on the health port",
            || {
                let mut health = health.clone();
                async move {
                    let response = health
                        .check(HealthCheckRequest {
                            service: service.into(),
                        })
                        .await
                        .expect("health check");
                    response.into_inner().status == 1
                }
            },
        )
        .await;
    }

    let mut client = tls_client(server.addr, &ca.pem, None).await.expect("TLS");
    let denied = client
        .get(with_token(key_request("payments", "k"), ORDERS_TOKEN))
        .await;
    assert_status(denied, Code::PermissionDenied, "PERMISSION_DENIED");
    let unknown = client
        .get(with_token(key_request("payments", "k"), "forged-token"))
        .await;
    assert_status(unknown, Code::Unauthenticated, "UNAUTHENTICATED");
    let mut limited_status = None;
    for _ in 0..2 {
        if let Err(status) = client
            .get(with_token(key_request("limited", "k"), LIMITED_TOKEN))
            .await
        {
            limited_status = Some(status);
        }
    }
    assert_status::<()>(
        Err(limited_status.expect("the second call at once is limited")),
        Code::ResourceExhausted,
        "CALLER_LIMITED",
    );
    let mut audit = Vec::new();
    eventually(Duration::from_secs(10), "audit lines", || {
        audit = server
            .logs()
            .into_iter()
            .filter(|line| line.contains("idemd::audit"))
            .collect();
        let enough = audit.len() >= 3;
        async move { enough }
    })
    .await;
    let line_of = |caller: &str| {
        audit
            .iter()
            .find(|line| line.contains(&format!(r#""caller":"{caller}""#)))
            .unwrap_or_else(|| panic!("no audit line names {caller}: {audit:?}"))
            .clone()
    };
    for (caller, fields) in [
        (
            "orders-api",
            [
                r#""namespace":"payments""#,
                r#""rpc":"Get""#,
                r#""reason":"PERMISSION_DENIED""#,
                r#""detail":"not granted""#,
            ],
        ),
        // Refused from the headers, before the message (and its namespace) is read.
        (
            "-",
            [
                r#""namespace":"-""#,
                r#""rpc":"Get""#,
                r#""reason":"UNAUTHENTICATED""#,
                r#""detail":"unknown bearer token""#,
            ],
        ),
        (
            "limited",
            [
                r#""namespace":"limited""#,
                r#""rpc":"Get""#,
                r#""reason":"CALLER_LIMITED""#,
                r#""detail":"rate limit""#,
            ],
        ),
    ] {
        let line = line_of(caller);
        for field in fields {
            assert!(line.contains(field), "audit line lacks {field}: {line}");
        }
    }
    for line in server.logs() {
        assert!(
            !line.contains(ORDERS_TOKEN) && !line.contains("forged-token"),
            "token in logs: {line}"
        );
    }
}

/// `Wait` is a grant of its own, like the other five RPCs: a caller granted only Wait may wait on
/// a key but not read it, and one granted only Get may read but not wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_is_granted_on_its_own() {
    const WAITER_TOKEN: &str = "waiter-token-0004";
    let waiter = format!(
        "\n[[callers]]\nname = \"waiter\"\ntoken_sha256 = [\"{}\"]\n  [[callers.grants]]\n  namespaces = [\"payments\"]\n  rpcs = [\"Wait\"]\n",
        sha256_hex(WAITER_TOKEN)
    );
    let secured = secured(&waiter, None).await;
    let mut client = secured.server.client().await;
    let wait = || pb::WaitRequest {
        namespace: "payments".into(),
        key: "k".into(),
        timeout: ms(10),
    };
    let waited = client
        .wait(with_token(wait(), WAITER_TOKEN))
        .await
        .expect("Wait is granted");
    assert_eq!(waited.into_inner().outcome(), pb::WaitOutcome::Free);
    let read = client
        .get(with_token(key_request("payments", "k"), WAITER_TOKEN))
        .await;
    assert_status(read, Code::PermissionDenied, "PERMISSION_DENIED");
    let operator_wait = client.wait(with_token(wait(), OPERATOR_TOKEN)).await;
    assert_status(operator_wait, Code::PermissionDenied, "PERMISSION_DENIED");
}
