//! The HTTP/JSON gateway on the gRPC listener (src/gateway): every route over HTTP/1.1 and HTTP/2
//! with a real HTTP client (hyper's), on PostgreSQL; keys that need percent-encoding; the error
//! bodies and statuses; authentication and authorisation; TLS; JSON and gRPC on the same keys;
//! and schemathesis against /openapi.json.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use idemd::auth::AuthState;
use idemd::proto::idempotency::v1 as pb;
use idemd::server::ServerSettings;
use idemd::store::MemoryStore;
use idemd::tls::{TlsFiles, TlsState};
use prost::bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::harness::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Version {
    Http1,
    Http2,
}

const BOTH: [Version; 2] = [Version::Http1, Version::Http2];

/// One HTTP answer.
struct Answer {
    status: u16,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "HTTP {}: body is not JSON ({error}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body of a 2xx answer.
    fn ok(&self) -> Value {
        assert_eq!(self.status, 200, "{}", String::from_utf8_lossy(&self.body));
        self.json()
    }

    /// Checks an error answer: the HTTP status, the google.rpc.Status JSON with `code`, a
    /// message, and an ErrorInfo in domain idemd with `reason`. Returns the body.
    fn error(&self, http: u16, code: i64, reason: &str) -> Value {
        let body = self.json();
        assert_eq!(self.status, http, "{body}");
        assert_eq!(
            self.headers
                .get("content-type")
                .and_then(|value| value.to_str().ok()),
            Some("application/json"),
            "{body}"
        );
        assert_eq!(body["code"], json!(code), "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        let info = body["details"]
            .as_array()
            .and_then(|details| {
                details.iter().find(|detail| {
                    detail["@type"] == json!("type.googleapis.com/google.rpc.ErrorInfo")
                })
            })
            .unwrap_or_else(|| panic!("no ErrorInfo: {body}"));
        assert_eq!(info["reason"], json!(reason), "{body}");
        assert_eq!(info["domain"], json!("idemd"), "{body}");
        body
    }
}

/// A request over a fresh connection on `io`.
async fn exchange<IO>(
    io: IO,
    version: Version,
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Answer
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let mut builder = hyper::Request::builder().method(method);
    builder = match version {
        Version::Http1 => builder.uri(path).header("host", authority),
        Version::Http2 => builder.uri(format!("http://{authority}{path}")),
    };
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(Bytes::from(body))).expect("request");
    let response = match version {
        Version::Http1 => {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("HTTP/1.1 handshake");
            tokio::spawn(connection);
            sender.send_request(request).await
        }
        Version::Http2 => {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("HTTP/2 handshake");
            tokio::spawn(connection);
            sender.send_request(request).await
        }
    }
    .expect("an HTTP answer");
    let expected = match version {
        Version::Http1 => hyper::Version::HTTP_11,
        Version::Http2 => hyper::Version::HTTP_2,
    };
    assert_eq!(response.version(), expected, "answered in another version");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the body").to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// An HTTP client of one test server (plaintext), with an optional bearer token.
struct Http {
    addr: SocketAddr,
    version: Version,
    token: Option<String>,
}

impl Http {
    fn new(addr: SocketAddr, version: Version) -> Self {
        Self {
            addr,
            version,
            token: None,
        }
    }

    fn with_token(addr: SocketAddr, version: Version, token: &str) -> Self {
        Self {
            token: Some(token.to_string()),
            ..Self::new(addr, version)
        }
    }

    async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Answer {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        let bearer = self.token.as_ref().map(|token| format!("Bearer {token}"));
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(bearer) = &bearer {
            all.push(("authorization", bearer));
        }
        exchange(
            tcp,
            self.version,
            &self.addr.to_string(),
            method,
            path,
            &all,
            body,
        )
        .await
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        self.raw(
            "POST",
            path,
            &[("content-type", "application/json")],
            body.to_string().into_bytes(),
        )
        .await
    }

    async fn get(&self, path: &str) -> Answer {
        self.raw("GET", path, &[], Vec::new()).await
    }
}

/// A path segment as clients must send it: every byte but unreserved ones percent-encoded.
fn segment(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

fn key_path(namespace: &str, key: &str) -> String {
    format!(
        "/v1/namespaces/{}/keys/{}",
        segment(namespace),
        segment(key)
    )
}

fn b64(bytes: &[u8]) -> String {
    // The proto3 JSON mapping's base64 (standard alphabet, padded), written out so the test does
    // not share the server's encoder.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, byte)| n | (u32::from(*byte) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Keys that only survive a correct percent-decoding of the path.
const AWKWARD_KEYS: &[&str] = &[
    "order/4711",
    "100% sure",
    "a:b",
    "ключ-✓-🔑",
    "%2F-not-a-slash",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_over_http1_and_http2_on_postgres() {
    let server = TestServer::postgres().await;
    for version in BOTH {
        let http = Http::new(server.addr, version);
        let namespace = format!(
            "json-{}",
            if version == Version::Http1 {
                "h1"
            } else {
                "h2"
            }
        );
        for key in AWKWARD_KEYS {
            let path = key_path(&namespace, key);
            // Acquire → in progress for a second caller → renew → complete → replay.
            let acquired = http
                .post(
                    &format!("{path}:acquire"),
                    json!({"fingerprint": b64(b"fp-1"), "leaseTtl": "30s", "holder": "json-test"}),
                )
                .await
                .ok();
            assert_eq!(acquired["outcome"], "OUTCOME_ACQUIRED", "{acquired}");
            assert_eq!(acquired["record"]["key"], json!(key), "{acquired}");
            assert_eq!(acquired["record"]["namespace"], json!(namespace));
            assert_eq!(acquired["record"]["fingerprint"], json!(b64(b"fp-1")));
            assert_eq!(acquired["record"]["state"], "RECORD_STATE_IN_PROGRESS");
            let token = acquired["lease"]["token"]
                .as_str()
                .expect("lease token")
                .to_string();
            let fencing = acquired["lease"]["fencingToken"]
                .as_str()
                .expect("fencing token as a decimal string");
            assert!(fencing.parse::<u64>().is_ok(), "{acquired}");

            let busy = http
                .post(
                    &format!("{path}:acquire"),
                    json!({"fingerprint": b64(b"fp-1")}),
                )
                .await
                .ok();
            assert_eq!(busy["outcome"], "OUTCOME_IN_PROGRESS", "{busy}");
            assert!(busy.get("lease").is_none(), "{busy}");
            assert!(
                busy["retryAfter"]
                    .as_str()
                    .is_some_and(|d| d.ends_with('s')),
                "{busy}"
            );

            let renewed = http
                .post(
                    &format!("{path}:renew"),
                    // Proto field names are accepted as well as lowerCamelCase ones.
                    json!({"lease_token": token, "leaseTtl": "60s"}),
                )
                .await
                .ok();
            assert!(renewed["lease"]["expiresAt"].is_string(), "{renewed}");

            let timed_out = http
                .post(&format!("{path}:wait"), json!({"timeout": "0.05s"}))
                .await
                .ok();
            assert_eq!(
                timed_out["outcome"], "WAIT_OUTCOME_TIMED_OUT",
                "{timed_out}"
            );

            let completed = http
                .post(
                    &format!("{path}:complete"),
                    json!({
                        "leaseToken": token,
                        "result": {"body": b64(b"{\"charge\":\"ch_1\"}"), "code": 201,
                                   "metadata": {"content-type": "application/json"}},
                    }),
                )
                .await
                .ok();
            assert_eq!(completed["record"]["state"], "RECORD_STATE_COMPLETED");
            let replay = http
                .post(
                    &format!("{path}:acquire"),
                    json!({"fingerprint": b64(b"fp-1")}),
                )
                .await
                .ok();
            assert_eq!(replay["outcome"], "OUTCOME_COMPLETED", "{replay}");
            assert_eq!(replay["record"]["result"], completed["record"]["result"]);
            assert_eq!(
                replay["record"]["result"]["body"],
                json!(b64(b"{\"charge\":\"ch_1\"}"))
            );
            let got = http.get(&path).await.ok();
            assert_eq!(got["record"]["key"], json!(key), "{got}");
            assert!(got["record"].get("lease").is_none());
            let waited = http.post(&format!("{path}:wait"), json!({})).await.ok();
            assert_eq!(waited["outcome"], "WAIT_OUTCOME_COMPLETED", "{waited}");

            // The same key as gRPC sees it.
            let mut grpc = server.client().await;
            let record = get_record(&mut grpc, &namespace, key).await;
            assert_eq!(record.key, *key);
            assert_eq!(record.state(), pb::RecordState::Completed);
            assert_eq!(record.result.expect("result").code, 201);

            // Another request under the key: 409 with the reason.
            http.post(
                &format!("{path}:acquire"),
                json!({"fingerprint": b64(b"fp-2")}),
            )
            .await
            .error(409, 9, "FINGERPRINT_MISMATCH");
        }

        // Release, then the key is free again; a retried Release still answers {}.
        let path = key_path(&namespace, "released");
        let first = http.post(&format!("{path}:acquire"), json!({})).await.ok();
        let token = first["lease"]["token"].as_str().expect("token").to_string();
        let released = http
            .post(&format!("{path}:release"), json!({"leaseToken": token}))
            .await
            .ok();
        assert_eq!(released, json!({}));
        let again = http.post(&format!("{path}:acquire"), json!({})).await.ok();
        assert_eq!(again["outcome"], "OUTCOME_ACQUIRED");
        let before: u64 = first["lease"]["fencingToken"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .expect("u64");
        let after: u64 = again["lease"]["fencingToken"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .expect("u64");
        assert!(after > before, "{first} then {again}");
        http.post(
            &format!("{path}:complete"),
            json!({"leaseToken": token, "result": {}}),
        )
        .await
        .error(409, 9, "LEASE_NOT_HELD");
        http.get(&key_path(&namespace, "never-seen"))
            .await
            .error(404, 5, "RECORD_NOT_FOUND");

        // gRPC acquires, JSON completes, gRPC reads the replay.
        let mut grpc = server.client().await;
        let lease = grpc
            .acquire(acquire_request(&namespace, "from-grpc", b"g"))
            .await
            .expect("gRPC acquire")
            .into_inner()
            .lease
            .expect("lease");
        http.post(
            &format!("{}:complete", key_path(&namespace, "from-grpc")),
            json!({"leaseToken": lease.token, "result": {"code": 204}}),
        )
        .await
        .ok();
        let replay = grpc
            .acquire(acquire_request(&namespace, "from-grpc", b"g"))
            .await
            .expect("gRPC replay")
            .into_inner();
        assert_eq!(replay.outcome(), pb::Outcome::Completed);
        assert_eq!(
            replay.record.and_then(|r| r.result).map(|r| r.code),
            Some(204)
        );

        // The admin API.
        let admin = format!("/v1/admin/namespaces/{namespace}");
        let namespaces = http.get("/v1/admin/namespaces").await.ok();
        assert!(
            namespaces["namespaces"]
                .as_array()
                .is_some_and(|all| all.iter().any(|n| n["namespace"] == json!(namespace))),
            "{namespaces}"
        );
        let listed = http
            .get(&format!(
                "{admin}/records?states=RECORD_STATE_COMPLETED&pageSize=50&stuck_only=false"
            ))
            .await
            .ok();
        let keys: Vec<&str> = listed["records"]
            .as_array()
            .expect("records")
            .iter()
            .filter_map(|record| record["key"].as_str())
            .collect();
        for key in AWKWARD_KEYS {
            assert!(keys.contains(key), "{key} not listed: {listed}");
        }
        assert!(
            !keys.contains(&"released"),
            "an in-progress key listed as completed"
        );
        let stats = http.get(&format!("{admin}/stats?window=600s")).await.ok();
        assert!(stats.is_object(), "{stats}");
        let purged = http
            .post(
                &format!("{admin}/records/{}:purge", segment("order/4711")),
                json!({"reason": "json test"}),
            )
            .await
            .ok();
        assert_eq!(purged["record"]["key"], "order/4711");
        http.get(&key_path(&namespace, "order/4711"))
            .await
            .error(404, 5, "RECORD_NOT_FOUND");
        let forced = http
            .post(
                &format!("{admin}/records/released:forceRelease"),
                json!({"reason": "json test"}),
            )
            .await
            .ok();
        assert_eq!(forced["record"]["state"], "RECORD_STATE_IN_PROGRESS");
        let counted = http
            .post(
                &format!("{admin}/records:purge"),
                json!({"reason": "json test", "dryRun": true, "limit": 100,
                       "states": ["RECORD_STATE_COMPLETED"]}),
            )
            .await
            .ok();
        // The awkward keys but the purged one, and from-grpc.
        let completed = AWKWARD_KEYS.len() - 1 + 1;
        assert_eq!(counted["count"], json!(completed.to_string()), "{counted}");
        let audit = http.get(&format!("{admin}/audit?pageSize=10")).await.ok();
        let actions: Vec<&str> = audit["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .filter_map(|entry| entry["action"].as_str())
            .collect();
        assert!(actions.contains(&"AUDIT_ACTION_PURGE_RECORD"), "{audit}");
        assert!(actions.contains(&"AUDIT_ACTION_FORCE_RELEASE"), "{audit}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx_statuses_with_the_status_body() {
    let settings = ServerSettings {
        max_message_bytes: 16 * 1024,
        ..test_settings()
    };
    let server = TestServer::start(Arc::new(MemoryStore::new()), settings).await;
    for version in BOTH {
        let http = Http::new(server.addr, version);
        let acquire = key_path("bad", "k") + ":acquire";
        let json_header = [("content-type", "application/json")];
        for (what, body) in [
            ("malformed", b"{\"holder\": ".to_vec()),
            ("not an object", b"[1, 2]".to_vec()),
            ("unknown field", b"{\"holdr\": \"x\"}".to_vec()),
            ("wrong type", b"{\"leaseTtl\": 30}".to_vec()),
            ("bad base64", b"{\"fingerprint\": \"***\"}".to_vec()),
            ("a path field in the body", b"{\"key\": \"other\"}".to_vec()),
        ] {
            let answer = http.raw("POST", &acquire, &json_header, body).await;
            let body = answer.error(400, 3, "INVALID_JSON");
            assert!(
                body["details"].to_string().contains("fieldViolations"),
                "{what}: {body}"
            );
        }
        // Valid JSON that breaks the API's rules: the API's own INVALID_REQUEST, naming fields.
        let body = http
            .post(
                &(key_path("no spaces allowed", "k") + ":acquire"),
                json!({"leaseTtl": "-1s"}),
            )
            .await
            .error(400, 3, "INVALID_REQUEST");
        assert!(body.to_string().contains("namespace"), "{body}");
        // Not JSON.
        http.raw(
            "POST",
            &acquire,
            &[("content-type", "text/plain")],
            b"holder=x".to_vec(),
        )
        .await
        .error(415, 3, "UNSUPPORTED_MEDIA_TYPE");
        // Too large: the body, and the message it makes.
        let huge = json!({"holder": "x".repeat(100_000)})
            .to_string()
            .into_bytes();
        http.raw("POST", &acquire, &json_header, huge)
            .await
            .error(413, 3, "REQUEST_TOO_LARGE");
        let metadata: serde_json::Map<String, Value> =
            (0..3000).map(|i| (format!("k{i}"), json!("v"))).collect();
        http.post(
            &(key_path("bad", "k") + ":complete"),
            json!({"leaseToken": "0".repeat(32), "result": {"metadata": metadata}}),
        )
        .await
        .error(413, 3, "REQUEST_TOO_LARGE");
        // Not UTF-8 once decoded.
        http.get("/v1/namespaces/bad/keys/%FF%FE")
            .await
            .error(400, 3, "INVALID_JSON");
        // Query parameters: unknown, malformed, or on a route that takes a body.
        http.get("/v1/admin/namespaces/bad/records?nope=1")
            .await
            .error(400, 3, "INVALID_JSON");
        http.get("/v1/admin/namespaces/bad/records?pageSize=many")
            .await
            .error(400, 3, "INVALID_JSON");
        http.raw(
            "POST",
            &(acquire.clone() + "?holder=x"),
            &json_header,
            b"{}".to_vec(),
        )
        .await
        .error(400, 3, "INVALID_JSON");
        // No such route; a route's path with the wrong method.
        http.get("/v2/nothing").await.error(404, 5, "NO_SUCH_ROUTE");
        // (GET on the acquire path is Get of the key "k:acquire": keys may hold ':'.)
        let wrong = http
            .raw("DELETE", &key_path("bad", "k"), &[], Vec::new())
            .await;
        wrong.error(405, 12, "METHOD_NOT_ALLOWED");
        assert_eq!(
            wrong.headers.get("allow").and_then(|v| v.to_str().ok()),
            Some("GET")
        );
        // The document.
        let openapi = http.get("/openapi.json").await.ok();
        assert_eq!(openapi["openapi"], "3.0.3");
        assert!(
            openapi["paths"]["/v1/namespaces/{namespace}/keys/{key}:acquire"]["post"].is_object()
        );
    }
    // gRPC is served as before on the same listener.
    let answer = server
        .client()
        .await
        .acquire(acquire_request("bad", &unique_key("grpc"), b""))
        .await
        .expect("gRPC still served")
        .into_inner();
    assert_eq!(answer.outcome(), pb::Outcome::Acquired);
}

fn sha(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

const APP: &str = "json-app-token-1a2b3c";
const ADMIN: &str = "json-admin-token-4d5e6f";

/// `app` may call every RPC in `payments` only; `admin` may read and write admin data anywhere.
fn policy() -> String {
    format!(
        r#"
[[callers]]
name = "app"
token_sha256 = ["{app}"]
  [[callers.grants]]
  namespaces = ["payments"]
  rpcs = ["*"]

[[callers]]
name = "admin"
token_sha256 = ["{admin}"]
  [[callers.admin_grants]]
  namespaces = ["*"]
  access = ["admin_read", "admin_write"]
"#,
        app = sha(APP),
        admin = sha(ADMIN),
    )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_callers_are_authenticated_and_authorised_like_grpc_callers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy_path = dir.path().join("policy.toml");
    write(&policy_path, &policy());
    let settings = ServerSettings {
        auth: Some(Arc::new(AuthState::load(&policy_path).expect("policy"))),
        ..test_settings()
    };
    let server = TestServer::start(Arc::new(MemoryStore::new()), settings).await;
    for version in BOTH {
        let path = key_path("payments", &unique_key("auth")) + ":acquire";
        Http::new(server.addr, version)
            .post(&path, json!({}))
            .await
            .error(401, 16, "UNAUTHENTICATED");
        Http::with_token(server.addr, version, "not-a-known-token")
            .post(&path, json!({}))
            .await
            .error(401, 16, "UNAUTHENTICATED");
        let app = Http::with_token(server.addr, version, APP);
        app.post(&(key_path("orders", "k") + ":acquire"), json!({}))
            .await
            .error(403, 7, "PERMISSION_DENIED");
        app.get("/v1/admin/namespaces")
            .await
            .error(403, 7, "PERMISSION_DENIED");
        let acquired = app.post(&path, json!({})).await.ok();
        assert_eq!(acquired["outcome"], "OUTCOME_ACQUIRED");
        let admin = Http::with_token(server.addr, version, ADMIN);
        admin
            .post(&path, json!({}))
            .await
            .error(403, 7, "PERMISSION_DENIED");
        let namespaces = admin.get("/v1/admin/namespaces").await.ok();
        assert!(namespaces.to_string().contains("payments"), "{namespaces}");
        // The contract is public.
        let openapi = Http::new(server.addr, version)
            .get("/openapi.json")
            .await
            .ok();
        assert!(openapi["paths"].is_object());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_listener_serves_json_over_http1_and_http2_and_grpc() {
    use rustls_pki_types::pem::PemObject;

    let ca = crate::security::TestCa::new("gateway test CA");
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = ca.issue(&["localhost"], false);
    write(&dir.path().join("tls.crt"), &cert);
    write(&dir.path().join("tls.key"), &key);
    let tls = TlsState::load(TlsFiles {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
        client_ca: None,
    })
    .expect("TLS material");
    let settings = ServerSettings {
        tls: Some(Arc::new(tls)),
        ..test_settings()
    };
    let server = TestServer::start(Arc::new(MemoryStore::new()), settings).await;
    let mut roots = rustls::RootCertStore::empty();
    for der in rustls_pki_types::CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
        roots.add(der.expect("CA PEM")).expect("CA certificate");
    }
    for version in BOTH {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        config.alpn_protocols = vec![match version {
            Version::Http1 => b"http/1.1".to_vec(),
            Version::Http2 => b"h2".to_vec(),
        }];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let stream = connector.connect(name, tcp).await.expect("TLS handshake");
        let key = unique_key("tls");
        let answer = exchange(
            stream,
            version,
            "localhost",
            "POST",
            &(key_path("tls", &key) + ":acquire"),
            &[("content-type", "application/json")],
            b"{}".to_vec(),
        )
        .await
        .ok();
        assert_eq!(
            answer["outcome"], "OUTCOME_ACQUIRED",
            "{version:?}: {answer}"
        );
    }
    // gRPC clients still negotiate h2 on the same port.
    let channel =
        tonic::transport::Channel::from_shared(format!("https://localhost:{}", server.addr.port()))
            .expect("uri")
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&ca.pem))
                    .domain_name("localhost"),
            )
            .expect("TLS config")
            .connect()
            .await
            .expect("gRPC over TLS");
    let answer = pb::idempotency_service_client::IdempotencyServiceClient::new(channel)
        .acquire(acquire_request("tls", &unique_key("grpc"), b""))
        .await
        .expect("gRPC acquire over TLS")
        .into_inner();
    assert_eq!(answer.outcome(), pb::Outcome::Acquired);
}

/// schemathesis generates requests for every operation of /openapi.json (valid and invalid ones)
/// and checks that no answer is a 5xx and every answer matches the document's schemas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let database = Arc::new(TestDatabase::create().await);
    let dir = tempfile::tempdir().expect("temp dir");
    let policy_path = dir.path().join("policy.toml");
    // One caller with every grant, so generated requests reach the store.
    let everything = format!(
        "[[callers]]\nname = \"all\"\ntoken_sha256 = [\"{}\"]\n  [[callers.grants]]\n  namespaces = [\"*\"]\n  rpcs = [\"*\"]\n  [[callers.admin_grants]]\n  namespaces = [\"*\"]\n  access = [\"admin_read\", \"admin_write\", \"admin_read_results\"]\n",
        sha(APP)
    );
    write(&policy_path, &everything);
    let mut settings = ServerSettings {
        auth: Some(Arc::new(AuthState::load(&policy_path).expect("policy"))),
        ..test_settings()
    };
    // A Wait on a key that generated calls left in progress would last its timeout: keep Waits
    // short, so every answer comes within the request timeout below.
    settings.limits.wait_timeout.default = std::time::Duration::from_secs(1);
    settings.limits.wait_timeout.max = std::time::Duration::from_secs(2);
    let server = TestServer::start(Arc::new(database.store()), settings).await;
    let output = Command::new("schemathesis")
        .args([
            "run",
            &format!("http://{}/openapi.json", server.addr),
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--max-examples",
            "25",
            "--phases",
            "examples,coverage,fuzzing",
            // One worker: hypothesis parses lambdas with `ast` from several threads otherwise,
            // which CPython 3.11.7 fails with "AST constructor recursion depth mismatch".
            "--workers",
            "1",
            "--seed",
            "19",
            "--request-timeout",
            "20",
            "--no-color",
            // Nothing kept between runs (each run is the seed's), nothing written in the checkout.
            "--generation-database",
            "none",
            "--header",
            &format!("Authorization: Bearer {APP}"),
        ])
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(dir.path())
        .output()
        .expect("schemathesis must be installed: pip install schemathesis==4.32.5 (.ci/run does)");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{report}");
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{report}"
    );
    // It really ran every operation (the 13 RPCs).
    assert!(
        report.contains("Tested: 13"),
        "schemathesis did not test all 13 operations:\n{report}"
    );
}

/// The value of `idemd_rpc_requests_total{method, code}` in a Prometheus scrape (0 if absent).
fn rpc_count(scrape: &str, method: &str, code: &str) -> u64 {
    scrape
        .lines()
        .filter(|line| line.starts_with("idemd_rpc_requests_total{"))
        .filter(|line| {
            line.contains(&format!("method=\"{method}\""))
                && line.contains(&format!("code=\"{code}\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// JSON calls are RPCs to the metrics, as they are to everything else: counted by method and
/// code in a real idemd process of their own (so no other test's calls are in the count); a
/// request the gateway refuses before it becomes an RPC is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_calls_are_counted_like_grpc_calls() {
    let server = crate::processes::IdemdProcess::start(&[]);
    let http = Http::new(server.addr, Version::Http1);
    for n in 0..3 {
        http.get(&key_path("metrics", &format!("missing-{n}")))
            .await
            .error(404, 5, "RECORD_NOT_FOUND");
    }
    let acquire = key_path("metrics", "k") + ":acquire";
    http.post(&acquire, json!({})).await.ok();
    http.post(&acquire, json!({"holdr": "x"}))
        .await
        .error(400, 3, "INVALID_JSON");
    let metrics_addr = server.metrics_addr;
    let (status, scrape) =
        tokio::task::spawn_blocking(move || crate::processes::http_get(metrics_addr, "/metrics"))
            .await
            .expect("scrape");
    assert_eq!(status, 200);
    assert_eq!(rpc_count(&scrape, "Get", "NOT_FOUND"), 3, "{scrape}");
    assert_eq!(rpc_count(&scrape, "Acquire", "OK"), 1, "{scrape}");
    assert_eq!(
        rpc_count(&scrape, "Acquire", "INVALID_ARGUMENT"),
        0,
        "{scrape}"
    );
}
