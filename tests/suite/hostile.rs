//! Hostile input over the wire: garbage and malformed protobuf, invalid UTF-8, oversized
//! messages, huge metadata, wrong content types, truncated HTTP/2, thousands of idle connections. idemd answers or drops them, never
//! crashes, and keeps serving everyone else.

use std::io::Write;

use idemd::proto::idempotency::v1 as pb;
use tonic::Code;

use crate::harness::*;

async fn still_serving(server: &TestServer) {
    let mut client = server.client().await;
    let response = client
        .acquire(acquire_request("hostile", &unique_key("after"), b""))
        .await
        .expect("still serving")
        .into_inner();
    assert_eq!(response.outcome(), pb::Outcome::Acquired);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_refused_and_change_nothing() {
    // On PostgreSQL, so that "changed nothing" is a count of every row, not a look at one key.
    let database = TestDatabase::create().await;
    let server = TestServer::on_database(&database, test_settings()).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0xff; 64]),
        ("truncated field", vec![0x0a, 0x40, b'a']),
        // namespace (field 1) holding invalid UTF-8
        (
            "invalid UTF-8",
            vec![0x0a, 0x02, 0xff, 0xfe, 0x12, 0x01, b'k'],
        ),
        ("unknown wire type", vec![0x0f, 0x00]),
        ("empty", Vec::new()),
    ];
    for (what, body) in cases {
        for method in ["Acquire", "Complete", "Release", "Renew", "Get", "Wait"] {
            let status = raw_call(&server, method, body.clone())
                .await
                .expect_err(&format!("{what} to {method} must be refused"));
            assert!(
                matches!(status.code(), Code::InvalidArgument | Code::Internal),
                "{what} to {method}: {status:?}"
            );
        }
    }
    // An empty message decodes to empty fields: refused by validation, naming them.
    let status = raw_call(&server, "Acquire", Vec::new())
        .await
        .expect_err("empty");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(reason(&status), "INVALID_REQUEST");
    // Nothing was written by any of it: the table is empty, whatever key a payload could have
    // named, and no fencing token was ever drawn.
    let sql = database.connect().await;
    let rows: i64 = sql
        .query_one("SELECT count(*) FROM idemd_records", &[])
        .await
        .expect("count records")
        .get(0);
    assert_eq!(rows, 0, "a refused payload wrote records");
    let drawn: bool = sql
        .query_one("SELECT is_called FROM idemd_fencing_token_seq", &[])
        .await
        .expect("fencing sequence")
        .get(0);
    assert!(!drawn, "a refused payload drew a fencing token");
    still_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused() {
    let server = TestServer::memory().await;
    let huge = oversized_complete("hostile");
    let status = server
        .client()
        .await
        .complete(huge)
        .await
        .expect_err("too large");
    assert!(
        matches!(
            status.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument
        ),
        "{status:?}"
    );
    // A map with thousands of metadata entries is refused by validation.
    let crowded = pb::CompleteRequest {
        namespace: "hostile".into(),
        key: "k".into(),
        lease_token: "0".repeat(32),
        result: Some(pb::Result {
            metadata: (0..5000).map(|i| (format!("k{i}"), "v".into())).collect(),
            ..Default::default()
        }),
        retention: None,
    };
    let status = server
        .client()
        .await
        .complete(crowded)
        .await
        .expect_err("crowded");
    assert_eq!(status.code(), Code::InvalidArgument);
    still_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_http2_and_idle_connections_do_not_hurt_others() {
    let server = TestServer::memory().await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        // Not HTTP/2 at all.
        if let Ok(mut stream) = std::net::TcpStream::connect(addr) {
            let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        }
        // The HTTP/2 preface, then a frame header promising more than is sent, then gone.
        if let Ok(mut stream) = std::net::TcpStream::connect(addr) {
            let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
            let _ = stream.write_all(&[
                0x00, 0x40, 0x00, 0x01, 0x04, 0x00, 0x00, 0x00, 0x01, 0xde, 0xad,
            ]);
        }
    })
    .await
    .expect("raw connections");
    // Thousands of connections that never say anything.
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(
            tokio::net::TcpStream::connect(addr)
                .await
                .expect("idle connection"),
        );
    }
    still_serving(&server).await;
    drop(idle);
    still_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_metadata_and_wrong_content_types_are_refused() {
    use tonic::codegen::{http, Service};
    use tower::ServiceExt;

    let server = TestServer::memory().await;

    // 64 KiB of request headers: beyond what the HTTP/2 server accepts.
    let mut request = tonic::Request::new(pb::GetRequest {
        namespace: "hostile".into(),
        key: "k".into(),
    });
    for n in 0..512 {
        let value = "v".repeat(128).parse().expect("header value");
        request.metadata_mut().insert(
            format!("x-filler-{n}")
                .parse::<tonic::metadata::MetadataKey<_>>()
                .expect("key"),
            value,
        );
    }
    // The key does not exist, so a server that took the headers would answer NOT_FOUND. The
    // HTTP/2 server hangs up instead (GOAWAY, which tonic reports as INTERNAL "h2 protocol
    // error"), before idemd sees the call: no ErrorInfo, which every answer of idemd carries.
    let refused = server
        .client()
        .await
        .get(request)
        .await
        .expect_err("64 KiB of headers accepted");
    assert_eq!(refused.code(), Code::Internal, "{refused:?}");
    assert_eq!(reason(&refused), "", "idemd answered: {refused:?}");
    let transport = format!("{refused:?}");
    assert!(
        transport.contains("GoAway") && transport.contains("Remote"),
        "not refused by the server's HTTP/2 layer: {transport}"
    );
    still_serving(&server).await;

    // Not gRPC: JSON, and no content type at all, on a gRPC method's path.
    for content_type in [Some("application/json"), Some("text/plain"), None] {
        let mut builder = http::Request::builder()
            .method("POST")
            .uri(format!(
                "http://{}/idempotency.v1.IdempotencyService/Get",
                server.addr
            ))
            .header("te", "trailers");
        if let Some(content_type) = content_type {
            builder = builder.header("content-type", content_type);
        }
        let request = builder
            .body(tonic::body::Body::new(http_body_util::Full::new(
                prost::bytes::Bytes::from_static(b"{\"namespace\": \"hostile\"}"),
            )))
            .expect("request");
        let mut channel = server.channel().await;
        let response = channel
            .ready()
            .await
            .expect("channel ready")
            .call(request)
            .await
            .expect("an HTTP answer");
        let (parts, body) = response.into_parts();
        let trailers = http_body_util::BodyExt::collect(body)
            .await
            .ok()
            .and_then(|collected| collected.trailers().cloned());
        let grpc_status = parts
            .headers
            .get("grpc-status")
            .or_else(|| trailers.as_ref().and_then(|t| t.get("grpc-status")))
            .and_then(|value| value.to_str().ok())
            .map(str::to_string);
        eprintln!(
            "{content_type:?}: HTTP {} grpc-status {grpc_status:?}",
            parts.status
        );
        assert!(
            parts.status != http::StatusCode::OK
                || grpc_status.as_deref().is_some_and(|s| s != "0"),
            "{content_type:?} was served as if it were gRPC: HTTP {}, grpc-status {grpc_status:?}",
            parts.status
        );
    }
    still_serving(&server).await;
}
