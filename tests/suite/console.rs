//! The web console (`--console-listen`) of a real idemd process on PostgreSQL: its sessions,
//! CSRF defences, headers and error pages over plain HTTP, then the whole on-call workflow in
//! Debian's chromium driven by playwright-core (tests/console/console.test.mjs).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use idemd::proto::idempotency::admin::v1 as admin;
use idemd::proto::idempotency::admin::v1::admin_service_client::AdminServiceClient;
use idemd::proto::idempotency::v1 as pb;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::Code;

use crate::harness::*;
use crate::processes::IdemdProcess;

const NAMESPACE: &str = "console-orders";
/// admin_read_results and admin_write on console-*.
const ONCALL_TOKEN: &str = "oncall-token-0123456789abcdef";
/// admin_read only.
const READER_TOKEN: &str = "reader-token-0123456789abcdef";
/// The data plane only: seeds records, may not sign in to the console.
const WRITER_TOKEN: &str = "writer-token-0123456789abcdef";

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn policy() -> String {
    format!(
        r#"
[[callers]]
name = "oncall"
token_sha256 = ["{oncall}"]
  [[callers.admin_grants]]
  namespaces = ["console-*"]
  access = ["admin_read_results", "admin_write"]

[[callers]]
name = "reader"
token_sha256 = ["{reader}"]
  [[callers.admin_grants]]
  namespaces = ["console-*"]
  access = ["admin_read"]

[[callers]]
name = "writer"
token_sha256 = ["{writer}"]
  [[callers.grants]]
  namespaces = ["console-*"]
  rpcs = ["*"]
"#,
        oncall = sha256_hex(ONCALL_TOKEN),
        reader = sha256_hex(READER_TOKEN),
        writer = sha256_hex(WRITER_TOKEN),
    )
}

/// idemd on a fresh database with auth required and the console on a free port.
struct ConsoleServer {
    server: IdemdProcess,
    console: SocketAddr,
    policy_path: PathBuf,
    _database: TestDatabase,
    _dir: tempfile::TempDir,
}

impl ConsoleServer {
    async fn start() -> Self {
        let database = TestDatabase::create().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let policy_path = dir.path().join("policy.toml");
        std::fs::write(&policy_path, policy()).expect("write policy");
        let server = IdemdProcess::start(&[
            "--database-url",
            &database.url,
            "--auth-config",
            policy_path.to_str().expect("utf-8 path"),
            "--require-auth",
            "--console-listen",
            "127.0.0.1:0",
        ]);
        let console = server.console_addr().await;
        Self {
            server,
            console,
            policy_path,
            _database: database,
            _dir: dir,
        }
    }

    async fn client(&self) -> Client {
        Client::connect(format!("http://{}", self.server.addr))
            .await
            .expect("connect")
    }

    async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::connect(format!("http://{}", self.server.addr))
            .await
            .expect("connect")
    }
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {token}").parse().expect("header value");
    request.metadata_mut().insert("authorization", value);
    request
}

/// Acquires `key` as the writer; returns the lease.
async fn acquire(client: &mut Client, key: &str, lease_ttl: Duration) -> pb::Lease {
    let request = pb::AcquireRequest {
        lease_ttl: Some(prost_types::Duration::try_from(lease_ttl).expect("duration")),
        holder: "checkout-7f9c".into(),
        ..acquire_request(NAMESPACE, key, b"fp")
    };
    let answer = client
        .acquire(with_token(request, WRITER_TOKEN))
        .await
        .expect("acquire")
        .into_inner();
    assert_eq!(answer.outcome, pb::Outcome::Acquired as i32, "{answer:?}");
    answer.lease.expect("lease")
}

/// Acquires and completes `key` with `body`.
async fn completed(client: &mut Client, key: &str, body: &[u8]) {
    let lease = acquire(client, key, Duration::from_secs(30)).await;
    let request = pb::CompleteRequest {
        namespace: NAMESPACE.into(),
        key: key.into(),
        lease_token: lease.token,
        result: Some(pb::Result {
            body: body.to_vec(),
            code: 201,
            metadata: [("x-tag".to_string(), "console".to_string())]
                .into_iter()
                .collect(),
        }),
        retention: None,
    };
    client
        .complete(with_token(request, WRITER_TOKEN))
        .await
        .expect("complete");
}

async fn get(client: &mut Client, key: &str) -> Result<pb::Record, tonic::Status> {
    client
        .get(with_token(
            pb::GetRequest {
                namespace: NAMESPACE.into(),
                key: key.into(),
            },
            WRITER_TOKEN,
        ))
        .await
        .map(|answer| answer.into_inner().record.expect("record"))
}

// ---- A plain HTTP/1.1 client: what a browser sends, with no browser's help. ----

struct HttpResponse {
    status: u16,
    headers: BTreeMap<String, Vec<String>>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|values| values.first())
            .map(String::as_str)
    }
}

fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the console");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    exchange(&mut stream, addr, method, path, headers, body)
}

/// Sends one request on `stream` (plain TCP or TLS) and reads the whole response.
fn exchange(
    stream: &mut (impl Read + Write),
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "POST" {
        request.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).expect("send");
    let mut raw = Vec::new();
    if let Err(error) = stream.read_to_end(&mut raw) {
        // A TLS peer that closes without close_notify still sent the whole response.
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "{error}");
    }
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in lines {
        let (name, value) = line.split_once(':').expect("a header line");
        headers
            .entry(name.trim().to_ascii_lowercase())
            .or_default()
            .push(value.trim().to_string());
    }
    HttpResponse {
        status,
        headers,
        body: body.to_string(),
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(name, value)| format!("{}={}", encode(name), encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Signs in with `token`; returns the `Cookie` header value.
fn sign_in(console: SocketAddr, token: &str) -> String {
    let response = http(console, "POST", "/sign-in", &[], &form(&[("token", token)]));
    assert_eq!(response.status, 303, "{}", response.body);
    let cookie = response.header("set-cookie").expect("a session cookie");
    cookie.split(';').next().expect("name=value").to_string()
}

/// The CSRF token the session's pages carry in their forms.
fn csrf_of(page: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = page.find(marker).expect("a form with a CSRF token") + marker.len();
    page[start..]
        .split('"')
        .next()
        .expect("token value")
        .to_string()
}

/// Off unless set: idemd announces the console (after its metrics address, before its gRPC
/// address, which `start` waits for) only with --console-listen.
#[test]
fn the_console_is_off_unless_set() {
    let server = IdemdProcess::start(&[]);
    let logs = server.logs();
    assert!(logs.iter().any(|line| line.contains("serving metrics on")));
    assert!(
        !logs.iter().any(|line| line.contains("web console")),
        "{logs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sessions_csrf_headers_and_bad_input_over_plain_http() {
    let server = ConsoleServer::start().await;
    let console = server.console;
    let mut client = server.client().await;
    let key = unique_key("http");
    completed(&mut client, &key, br#"{"order":7}"#).await;

    // Every page, even the sign-in page, has the CSP and the other defensive headers.
    let page = http(console, "GET", "/sign-in", &[], "");
    assert_eq!(page.status, 200);
    let csp = page.header("content-security-policy").expect("a CSP");
    assert_eq!(csp, idemd::console::CONTENT_SECURITY_POLICY);
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
    for needed in [
        "script-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ] {
        assert!(csp.contains(needed), "{csp} lacks {needed}");
    }
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    // `no-referrer` would make Chromium send `Origin: null` on the console's own forms.
    assert_eq!(page.header("referrer-policy"), Some("same-origin"));
    assert!(!page.body.contains("<script>"), "no inline script");

    // No session: every view sends the browser to sign in.
    for path in [
        "/namespaces",
        "/records?namespace=console-orders",
        "/audit?namespace=x",
    ] {
        let response = http(console, "GET", path, &[], "");
        assert_eq!(response.status, 303, "{path}");
        assert_eq!(response.header("location"), Some("/sign-in"), "{path}");
    }
    let forged = http(
        console,
        "GET",
        "/namespaces",
        &[("Cookie", "idemd_console=00ff")],
        "",
    );
    assert_eq!(forged.status, 303, "an unknown session id is no session");

    // Unknown tokens and tokens without an admin grant cannot sign in; no cookie is set.
    for (token, why) in [
        ("not-a-token", "does not know this token"),
        (WRITER_TOKEN, "no admin grant"),
        ("", "Paste a bearer token"),
    ] {
        let response = http(console, "POST", "/sign-in", &[], &form(&[("token", token)]));
        assert_eq!(response.status, 401, "{token:?}: {}", response.body);
        assert!(response.body.contains(why), "{token:?}: {}", response.body);
        assert!(response.header("set-cookie").is_none());
    }

    // Refused sign-ins are logged on the audit target, without the token.
    eventually(Duration::from_secs(10), "refused sign-ins logged", || {
        let logged = server
            .server
            .logs()
            .iter()
            .filter(|line| line.contains("console sign-in refused"))
            .count();
        async move { logged >= 2 }
    })
    .await;
    for line in server.server.logs() {
        assert!(
            !line.contains("not-a-token") && !line.contains(WRITER_TOKEN),
            "a token in the log: {line}"
        );
    }

    // The session cookie: a 256-bit random id, HttpOnly, SameSite=Strict, Path=/, expiring.
    let response = http(
        console,
        "POST",
        "/sign-in",
        &[],
        &form(&[("token", ONCALL_TOKEN)]),
    );
    assert_eq!(response.status, 303);
    let set_cookie = response.header("set-cookie").expect("cookie").to_string();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(set_cookie.contains(part), "{set_cookie} lacks {part}");
    }
    let cookie = set_cookie
        .split(';')
        .next()
        .expect("name=value")
        .to_string();
    let id = cookie.strip_prefix("idemd_console=").expect("cookie name");
    assert_eq!(id.len(), 64);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(
        !set_cookie.contains(ONCALL_TOKEN),
        "the token stays on the server"
    );
    assert_ne!(
        sign_in(console, ONCALL_TOKEN),
        cookie,
        "each sign-in gets a new id"
    );

    let namespaces = http(console, "GET", "/namespaces", &[("Cookie", &cookie)], "");
    assert_eq!(namespaces.status, 200);
    assert!(namespaces.body.contains(NAMESPACE));
    assert!(!namespaces.body.contains(ONCALL_TOKEN));
    // The chart counts the one record created and completed above (GetNamespaceStats answers
    // this replica's counts at once, flushed or not).
    for legend in [
        ">created 1<",
        ">completed 1<",
        "<polyline class=\"created\"",
    ] {
        assert!(
            namespaces.body.contains(legend),
            "{legend}: {}",
            namespaces.body
        );
    }
    let csrf = csrf_of(&namespaces.body);
    assert_eq!(csrf.len(), 64);

    // Bad input: a readable 4xx page naming the field, never a 500.
    for (path, field) in [
        ("/records?namespace=console-orders&state=sideways", "state"),
        (
            "/records?namespace=console-orders&created_after=yesterday",
            "created_after",
        ),
        (
            "/records?namespace=console-orders&page_token=Zm9yZ2Vk",
            "page_token",
        ),
        ("/records?namespace=", "namespace"),
        (
            "/audit?namespace=console-orders&page_token=%FF%FE",
            "page_token",
        ),
        ("/record?namespace=console-orders", "key"),
    ] {
        let response = http(console, "GET", path, &[("Cookie", &cookie)], "");
        assert_eq!(response.status, 400, "{path}: {}", response.body);
        assert!(response.body.contains("<h1>Bad request</h1>"), "{path}");
        assert!(
            response.body.contains(&format!("<code>{field}</code>")),
            "{path}: {}",
            response.body
        );
    }
    let missing = http(
        console,
        "GET",
        "/record?namespace=console-orders&key=nope",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(missing.status, 404);
    let nowhere = http(console, "GET", "/no/such/page", &[("Cookie", &cookie)], "");
    assert_eq!(nowhere.status, 404);
    assert!(nowhere.body.contains("<h1>Not found</h1>"));
    let other_tenant = http(
        console,
        "GET",
        "/records?namespace=payments",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(other_tenant.status, 403, "{}", other_tenant.body);

    // Changes need the session's CSRF token, a same-origin request, and a valid reason.
    let purge = |extra: &[(&str, &str)], reason: &str, token: &str| {
        let mut headers = vec![("Cookie", cookie.as_str())];
        headers.extend_from_slice(extra);
        http(
            console,
            "POST",
            "/actions/purge",
            &headers,
            &form(&[
                ("csrf", token),
                ("namespace", NAMESPACE),
                ("key", &key),
                ("reason", reason),
            ]),
        )
    };
    let refused = purge(&[], "no token", "");
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.body.contains("CSRF"));
    assert_eq!(purge(&[], "wrong token", &"0".repeat(64)).status, 403);
    let origin = format!("http://127.0.0.1:{}", console.port() + 1);
    assert_eq!(
        purge(&[("Origin", &origin)], "cross origin", &csrf).status,
        403
    );
    assert_eq!(
        purge(&[("Sec-Fetch-Site", "same-site")], "same site", &csrf).status,
        403
    );
    for reason in ["", "   ", &"x".repeat(501)] {
        let response = purge(&[], reason, &csrf);
        assert_eq!(response.status, 400, "reason {:?}", reason.len());
        assert!(
            response.body.contains("<code>reason</code>"),
            "{}",
            response.body
        );
    }
    let record = get(&mut client, &key)
        .await
        .expect("nothing was purged yet");
    assert_eq!(record.state, pb::RecordState::Completed as i32);

    // admin_read without admin_read_results: no body, no actions, and purges refused.
    let reader = sign_in(console, READER_TOKEN);
    let path = format!("/record?namespace={NAMESPACE}&key={}", encode(&key));
    let page = http(console, "GET", &path, &[("Cookie", &reader)], "");
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("needs the admin_read_results grant"));
    assert!(
        !page.body.contains("&quot;order&quot;"),
        "the body stays hidden"
    );
    assert!(!page.body.contains("Purge…"));
    let reader_page = http(console, "GET", "/namespaces", &[("Cookie", &reader)], "");
    let reader_csrf = csrf_of(&reader_page.body);
    let denied = http(
        console,
        "POST",
        "/actions/purge",
        &[("Cookie", &reader)],
        &form(&[
            ("csrf", &reader_csrf),
            ("namespace", NAMESPACE),
            ("key", &key),
            ("reason", "not mine"),
        ]),
    );
    assert_eq!(denied.status, 403, "{}", denied.body);
    get(&mut client, &key).await.expect("still there");

    // The on-call caller sees the body and can purge, with its token and a reason.
    let page = http(console, "GET", &path, &[("Cookie", &cookie)], "");
    assert!(page.body.contains("&quot;order&quot;: 7"), "{}", page.body);
    let purged = purge(
        &[
            ("Origin", &format!("http://{console}")),
            ("Sec-Fetch-Site", "same-origin"),
        ],
        "support case 123",
        &csrf,
    );
    assert_eq!(purged.status, 200, "{}", purged.body);
    let gone = get(&mut client, &key).await.expect_err("purged");
    assert_eq!(gone.code(), Code::NotFound);

    // Bulk purge: a dry-run count first, then the purge of at most `limit` records.
    for n in 0..3 {
        completed(&mut client, &format!("bulk-{n}"), b"bulk").await;
    }
    acquire(&mut client, "bulk-held", Duration::from_secs(300)).await;
    let counted = http(
        console,
        "GET",
        "/bulk-purge?namespace=console-orders&state=completed&key_prefix=bulk-",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(counted.status, 200, "{}", counted.body);
    assert!(
        counted
            .body
            .contains("<strong>3</strong> records match now"),
        "{}",
        counted.body
    );
    get(&mut client, "bulk-0")
        .await
        .expect("a dry run deletes nothing");

    // Paging: pages of two follow the "Next page" link, none repeated or missed.
    let mut path = "/records?namespace=console-orders&key_prefix=bulk-&page_size=2".to_string();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let page = http(console, "GET", &path, &[("Cookie", &cookie)], "");
        assert_eq!(page.status, 200, "{path}: {}", page.body);
        for n in ["bulk-0", "bulk-1", "bulk-2", "bulk-held"] {
            if page.body.contains(&format!(">{n}</a>")) {
                seen.push(n);
            }
        }
        let marker = "<a class=\"next\" href=\"";
        let Some(start) = page.body.find(marker) else {
            break;
        };
        let rest = &page.body[start + marker.len()..];
        path = rest[..rest.find('"').expect("link end")].replace("&amp;", "&");
        assert!(path.contains("page_size=2"), "{path}");
    }
    seen.sort();
    assert_eq!(seen, ["bulk-0", "bulk-1", "bulk-2", "bulk-held"]);
    let bad_size = http(
        console,
        "GET",
        "/records?namespace=console-orders&page_size=501",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(bad_size.status, 400);
    assert!(bad_size.body.contains("<code>page_size</code>"));
    let bulk = |limit: &str, reason: &str| {
        http(
            console,
            "POST",
            "/actions/purge-records",
            &[("Cookie", cookie.as_str())],
            &form(&[
                ("csrf", &csrf),
                ("namespace", NAMESPACE),
                ("state", "completed"),
                ("key_prefix", "bulk-"),
                ("limit", limit),
                ("reason", reason),
            ]),
        )
    };
    for (limit, field) in [("0", "limit"), ("10001", "limit"), ("many", "limit")] {
        let response = bulk(limit, "cleanup");
        assert_eq!(response.status, 400, "limit {limit}: {}", response.body);
        assert!(response.body.contains(&format!("<code>{field}</code>")));
    }
    assert_eq!(bulk("2", "").status, 400, "a bulk purge needs a reason");
    let purged = bulk("2", "INC-1: test data");
    assert_eq!(purged.status, 200, "{}", purged.body);
    assert!(purged.body.contains("Purged 2 records"), "{}", purged.body);
    let mut left = 0;
    for n in 0..3 {
        left += usize::from(get(&mut client, &format!("bulk-{n}")).await.is_ok());
    }
    assert_eq!(left, 1, "the limit held");
    get(&mut client, "bulk-held")
        .await
        .expect("the state filter kept the in-progress record");

    // A token taken out of the policy ends its sessions at the next request.
    let without_reader: String = policy()
        .split("[[callers]]")
        .filter(|caller| !caller.contains("name = \"reader\""))
        .collect::<Vec<_>>()
        .join("[[callers]]");
    assert!(!without_reader.contains("reader"));
    std::fs::write(&server.policy_path, without_reader).expect("rewrite policy");
    let hangup = Command::new("kill")
        .args(["-HUP", &server.server.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hangup.success());
    eventually(
        Duration::from_secs(10),
        "the reader's session ended",
        || {
            let status = http(console, "GET", "/namespaces", &[("Cookie", &reader)], "").status;
            async move { status == 303 }
        },
    )
    .await;
    let still = http(console, "GET", "/namespaces", &[("Cookie", &cookie)], "");
    assert_eq!(still.status, 200, "the on-call session is unaffected");

    // Hostile input anywhere: a 4xx page, never a 5xx.
    let long = "k".repeat(10_000);
    let gets = [
        "/records?namespace=console-orders&namespace=other".to_string(),
        "/records?namespace=console-orders&key_prefix=%00%01".to_string(),
        format!("/records?namespace=console-orders&key_prefix={long}"),
        format!("/records?namespace=console-orders&holder={long}"),
        "/records?namespace=console-orders&page_size=-1".to_string(),
        "/records?namespace=console-orders&page_size=99999999999".to_string(),
        "/records?namespace=console-orders&created_before=9999-99-99T99:99:99Z".to_string(),
        "/records?namespace=%E2%80%AE%FF".to_string(),
        format!("/record?namespace=console-orders&key={long}"),
        "/confirm/purge?namespace=console-orders&key=".to_string(),
        "/confirm/force-release?namespace=console-orders&key=no-such-key".to_string(),
        "/bulk-purge?namespace=console-orders&state=nope".to_string(),
        "/audit?namespace=".to_string(),
        "/audit?namespace=console-orders&page_token=%25%25%25".to_string(),
    ];
    for path in &gets {
        let response = http(console, "GET", path, &[("Cookie", &cookie)], "");
        let shown: String = path.chars().take(80).collect();
        assert!(
            (400..500).contains(&response.status),
            "{shown}: {} {}",
            response.status,
            response.body
        );
        assert!(response.body.starts_with("<!DOCTYPE html>"), "{shown}");
    }
    completed(&mut client, "done-1", b"done").await;
    let posts: [(&str, String); 6] = [
        (
            "/actions/purge",
            format!("csrf={csrf}&namespace=console-orders&key=%00&reason=x"),
        ),
        ("/actions/purge", format!("csrf={csrf}&csrf={csrf}&key=a")),
        (
            "/actions/force-release",
            format!(
                "csrf={csrf}&namespace=console-orders&key=nope&reason=x&expected_fencing_token=-5"
            ),
        ),
        (
            "/actions/force-release",
            format!("csrf={csrf}&namespace=console-orders&key=done-1&reason=x"),
        ),
        (
            "/actions/purge-records",
            format!("csrf={csrf}&namespace=console-orders&limit=5&reason={long}"),
        ),
        ("/sign-in", format!("token={long}&token=b")),
    ];
    for (path, body) in &posts {
        let response = http(console, "POST", path, &[("Cookie", &cookie)], body);
        assert!(
            (400..500).contains(&response.status),
            "{path}: {} {}",
            response.status,
            response.body
        );
    }
    let json = http(
        console,
        "POST",
        "/actions/purge",
        &[("Cookie", &cookie), ("Content-Type", "application/json")],
        "{}",
    );
    assert!((400..500).contains(&json.status), "{}", json.status);
    let completed_release = http(
        console,
        "POST",
        "/actions/force-release",
        &[("Cookie", &cookie)],
        &form(&[
            ("csrf", &csrf),
            ("namespace", NAMESPACE),
            ("key", "done-1"),
            ("reason", "x"),
        ]),
    );
    assert_eq!(
        completed_release.status, 409,
        "a completed record is not force-released"
    );

    // Sign-out needs the token too, then the session is over.
    let out = http(
        console,
        "POST",
        "/sign-out",
        &[("Cookie", &cookie)],
        &form(&[("csrf", "")]),
    );
    assert_eq!(out.status, 403);
    let out = http(
        console,
        "POST",
        "/sign-out",
        &[("Cookie", &cookie)],
        &form(&[("csrf", &csrf)]),
    );
    assert_eq!(out.status, 303);
    assert!(out
        .header("set-cookie")
        .is_some_and(|c| c.contains("Max-Age=0")));
    let after = http(console, "GET", "/namespaces", &[("Cookie", &cookie)], "");
    assert_eq!(after.status, 303);
}

/// Where the browser test writes its screenshots: docs/ when IDEMD_UPDATE_SCREENSHOTS=1 (to
/// refresh the committed ones the README shows), else a temporary directory.
fn screenshot_dir(temp: &Path) -> PathBuf {
    if std::env::var("IDEMD_UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
    } else {
        temp.to_path_buf()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_on_call_workflow_in_chromium() {
    let script_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console");
    // Missing tools fail the test: it never passes by not running.
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: `apt-get install chromium` (CI's .ci/run does)"
    );
    assert!(
        script_dir.join("node_modules/playwright-core").exists(),
        "run `npm ci --prefix tests/console` first (CI's .ci/run does)"
    );
    let server = ConsoleServer::start().await;
    let mut client = server.client().await;

    // The night's state: one stuck key (its lease ran out, its holder gone), one held key with
    // the same prefix, completed keys, and a key that looks like HTML.
    let stuck_key = format!("night-stuck-{}", uuid::Uuid::new_v4().simple());
    let held_key = format!("night-held-{}", uuid::Uuid::new_v4().simple());
    let completed_key = unique_key("order");
    let csrf_target_key = unique_key("keep");
    let xss_key = "<img src=x onerror=alert(1)>";
    let stuck_lease = acquire(&mut client, &stuck_key, Duration::from_secs(1)).await;
    acquire(&mut client, &held_key, Duration::from_secs(300)).await;
    completed(
        &mut client,
        &completed_key,
        br#"{"status":"paid","order":42}"#,
    )
    .await;
    completed(&mut client, &csrf_target_key, b"keep me").await;
    completed(&mut client, xss_key, b"<script>alert(2)</script>").await;
    wait_past(to_system_time(&stuck_lease.expires_at)).await;

    let temp = tempfile::tempdir().expect("temp dir");
    let screenshots = screenshot_dir(temp.path());
    let reason = "INC-4711: holder pod gone, freeing the key";
    let script_dir_for_node = script_dir.clone();
    let console_url = format!("http://{}", server.console);
    let env: Vec<(&str, String)> = vec![
        ("CONSOLE_URL", console_url),
        ("CONSOLE_TOKEN", ONCALL_TOKEN.into()),
        ("CALLER", "oncall".into()),
        ("NAMESPACE", NAMESPACE.into()),
        ("STUCK_PREFIX", "night-".into()),
        ("STUCK_KEY", stuck_key.clone()),
        ("COMPLETED_KEY", completed_key.clone()),
        ("CSRF_TARGET_KEY", csrf_target_key.clone()),
        ("XSS_KEY", xss_key.into()),
        ("REASON", reason.into()),
        ("SCREENSHOT_DIR", screenshots.display().to_string()),
    ];
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("console.test.mjs")
            .current_dir(&script_dir_for_node)
            .envs(env)
            .output()
            .expect("run node")
    })
    .await
    .expect("node finished");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser test failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("console browser steps: 12 passed"),
        "not every step ran:\n{stdout}"
    );

    // What the clicks changed, read back through gRPC.
    let mut admin = server.admin().await;
    let audit = admin
        .list_audit_entries(with_token(
            admin::ListAuditEntriesRequest {
                namespace: NAMESPACE.into(),
                ..Default::default()
            },
            ONCALL_TOKEN,
        ))
        .await
        .expect("audit")
        .into_inner()
        .entries;
    let actions: Vec<(i32, &str, &str)> = audit
        .iter()
        .map(|entry| (entry.action, entry.key.as_str(), entry.caller.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            (
                admin::AuditAction::PurgeRecord as i32,
                completed_key.as_str(),
                "oncall"
            ),
            (
                admin::AuditAction::ForceRelease as i32,
                stuck_key.as_str(),
                "oncall"
            ),
        ],
        "newest first; the cross-site post changed nothing"
    );
    assert_eq!(audit[1].reason, reason);
    assert_eq!(audit[1].state_before, pb::RecordState::InProgress as i32);
    assert_eq!(audit[1].fencing_token_before, stuck_lease.fencing_token);

    // The force-released holder's lease is gone; the purged key is new again; the key the
    // cross-site form aimed at is still there.
    let late = client
        .complete(with_token(
            pb::CompleteRequest {
                namespace: NAMESPACE.into(),
                key: stuck_key.clone(),
                lease_token: stuck_lease.token.clone(),
                result: Some(sample_result("late")),
                retention: None,
            },
            WRITER_TOKEN,
        ))
        .await
        .expect_err("the released holder's Complete fails");
    assert_eq!(crate::harness::reason(&late), "LEASE_NOT_HELD", "{late:?}");
    let fresh = client
        .acquire(with_token(
            acquire_request(NAMESPACE, &completed_key, b"fp"),
            WRITER_TOKEN,
        ))
        .await
        .expect("acquire the purged key")
        .into_inner();
    assert_eq!(fresh.outcome, pb::Outcome::Acquired as i32, "{fresh:?}");
    let kept = get(&mut client, &csrf_target_key)
        .await
        .expect("not purged");
    assert_eq!(kept.state, pb::RecordState::Completed as i32);

    for name in ["console-namespaces.png", "console-record.png"] {
        let bytes = std::fs::read(screenshots.join(name)).expect("screenshot written");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{name} is a PNG");
        assert!(
            bytes.len() > 10_000,
            "{name} shows a page ({} bytes)",
            bytes.len()
        );
    }
}

/// A console client that sends its headers a byte at a time is cut off (the header read
/// timeout, 10 s), and at most 256 console connections are open at once: the 257th is not
/// served until one closes, while the API goes on answering. Without either, a flood of
/// console connections would hold the process's file descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_cuts_off_slow_headers_and_caps_its_connections() {
    const CAP: usize = 256;
    let server = ConsoleServer::start().await;
    let console = server.console;

    // Slow headers: one byte every 200 ms; the server must end the connection within 30 s.
    let slow = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(console).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let started = std::time::Instant::now();
        let header = b"GET /sign-in HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .chain(std::iter::repeat(&b'a'));
        let mut buffer = [0u8; 1024];
        for byte in header {
            if stream.write_all(&[*byte]).is_err() {
                return started.elapsed();
            }
            match stream.read(&mut buffer) {
                // Closed, or an error answer before closing: either way, cut off.
                Ok(_) => return started.elapsed(),
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return started.elapsed(),
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "a client sending its headers a byte every 200 ms was still connected after 30 s"
            );
        }
        unreachable!("the header never ends")
    })
    .await
    .expect("slow client");
    assert!(
        slow >= Duration::from_secs(5),
        "cut off after {slow:?}: too early for a 10 s timeout"
    );

    // The cap: CAP idle connections, each accepted and waiting for its headers...
    let mut idle = Vec::new();
    for _ in 0..CAP {
        idle.push(std::net::TcpStream::connect(console).expect("connect"));
    }
    // ...so one more, with a whole request, is not served while they stay open.
    let mut waiting = std::net::TcpStream::connect(console).expect("connect");
    waiting
        .write_all(b"GET /static/console.css HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    waiting
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut first = [0u8; 64];
    match waiting.read(&mut first) {
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("the connection past the cap was answered: {other:?}"),
    }
    // The API is untouched by a full console.
    let mut client = server.client().await;
    acquire(
        &mut client,
        "while-the-console-is-full",
        Duration::from_secs(30),
    )
    .await;
    // One place frees: the waiting request is served.
    drop(idle.pop());
    waiting
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut answer = Vec::new();
    waiting
        .read_to_end(&mut answer)
        .expect("the answer once a place freed");
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
}

/// With --console-tls the console speaks HTTPS with the API's certificate (HTTP/1.1 in ALPN) and
/// its session cookie is `Secure`; plaintext on its port gets no HTTP answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_over_tls_sets_secure_cookies() {
    let ca = crate::security::TestCa::new("console test CA");
    let (cert, key) = ca.issue(&["localhost"], false);
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.to_str().expect("utf-8 path").to_string()
    };
    let (cert_path, key_path) = (write("tls.crt", &cert), write("tls.key", &key));
    let policy_path = write("policy.toml", &policy());
    let server = IdemdProcess::start(&[
        "--auth-config",
        &policy_path,
        "--tls-cert",
        &cert_path,
        "--tls-key",
        &key_path,
        "--console-listen",
        "127.0.0.1:0",
        "--console-tls",
    ]);
    let console = server.console_addr().await;

    let config = tls_client(&ca, None);
    let https =
        |method: &str, path: &str, body: &str| https(&config, console, method, path, &[], body);
    let page = https("GET", "/sign-in", "");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Sign in"));
    let signed_in = https("POST", "/sign-in", &form(&[("token", ONCALL_TOKEN)]));
    assert_eq!(signed_in.status, 303, "{}", signed_in.body);
    let cookie = signed_in.header("set-cookie").expect("cookie");
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));

    let mut plain = std::net::TcpStream::connect(console).expect("connect");
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    plain
        .write_all(b"GET /sign-in HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plaintext got an HTTP answer"
    );
}

/// A TLS client configuration trusting `ca`, presenting `identity` (certificate and key PEM).
fn tls_client(
    ca: &crate::security::TestCa,
    identity: Option<&(String, String)>,
) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;

    let mut roots = rustls::RootCertStore::empty();
    for der in rustls_pki_types::CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
        roots.add(der.expect("CA PEM")).expect("CA certificate");
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = rustls_pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("certificate PEM");
            let key =
                rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client identity")
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    std::sync::Arc::new(config)
}

fn https(
    config: &std::sync::Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let connection = rustls::ClientConnection::new(config.clone(), name).expect("TLS client");
    let tcp = std::net::TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    exchange(&mut stream, addr, method, path, headers, body)
}

/// With --tls-client-ca a caller signs in with its client certificate (no token), and the
/// session holds only on connections presenting that certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sign_in_with_a_client_certificate() {
    let ca = crate::security::TestCa::new("console mTLS CA");
    let server_cert = ca.issue(&["localhost"], false);
    let oncall = ca.issue(&["oncall.example"], false);
    let stranger = ca.issue(&["stranger.example"], false);
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.to_str().expect("utf-8 path").to_string()
    };
    let policy = format!(
        "{}\n[[callers]]\nname = \"oncall-cert\"\ntls_identities = [\"oncall.example\"]\n  [[callers.admin_grants]]\n  namespaces = [\"console-*\"]\n  access = [\"admin_read\"]\n",
        policy()
    );
    let args = [
        "--auth-config".to_string(),
        write("policy.toml", &policy),
        "--tls-cert".to_string(),
        write("tls.crt", &server_cert.0),
        "--tls-key".to_string(),
        write("tls.key", &server_cert.1),
        "--tls-client-ca".to_string(),
        write("ca.crt", &ca.pem),
        "--console-listen".to_string(),
        "127.0.0.1:0".to_string(),
        "--console-tls".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = IdemdProcess::start(&args);
    let console = server.console_addr().await;
    let as_oncall = tls_client(&ca, Some(&oncall));
    let as_stranger = tls_client(&ca, Some(&stranger));

    let page = https(&as_oncall, console, "GET", "/sign-in", &[], "");
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("<strong>oncall.example</strong>"),
        "{}",
        page.body
    );
    let signed_in = https(
        &as_oncall,
        console,
        "POST",
        "/sign-in",
        &[],
        "with=certificate",
    );
    assert_eq!(signed_in.status, 303, "{}", signed_in.body);
    let set_cookie = signed_in.header("set-cookie").expect("cookie");
    assert!(set_cookie.ends_with("; Secure"));
    let cookie = set_cookie
        .split(';')
        .next()
        .expect("name=value")
        .to_string();
    let namespaces = https(
        &as_oncall,
        console,
        "GET",
        "/namespaces",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(namespaces.status, 200, "{}", namespaces.body);
    assert!(namespaces.body.contains("<strong>oncall-cert</strong>"));

    // The cookie without the certificate is no session; an unknown certificate cannot sign in.
    let copied = https(
        &as_stranger,
        console,
        "GET",
        "/namespaces",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(copied.status, 303);
    assert_eq!(copied.header("location"), Some("/sign-in"));
    let unknown = https(
        &as_stranger,
        console,
        "POST",
        "/sign-in",
        &[],
        "with=certificate",
    );
    assert_eq!(unknown.status, 401, "{}", unknown.body);
    assert!(unknown.body.contains("does not know this certificate"));
    assert!(unknown.header("set-cookie").is_none());
    // The real holder's session goes on.
    let again = https(
        &as_oncall,
        console,
        "GET",
        "/namespaces",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(again.status, 200);
}
