//! Hostile input over the wire: garbage and malformed protobuf, invalid UTF-8, oversized
//! messages, truncated HTTP/2, hundreds of idle connections. idemd answers or drops them, never
//! crashes, and keeps serving everyone else.

use std::io::Write;

use idemd::proto::idempotency::v1 as pb;
use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Code;

use crate::harness::*;

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

async fn raw_call(
    server: &TestServer,
    method: &str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = format!("/idempotency.v1.IdempotencyService/{method}")
        .parse()
        .expect("path");
    grpc.unary(tonic::Request::new(body), path, RawCodec)
        .await
        .map(|response| response.into_inner())
}

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
    let server = TestServer::memory().await;
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
    // Nothing was written by any of it.
    let mut client = server.client().await;
    let get = client
        .get(pb::GetRequest {
            namespace: "a".into(),
            key: "k".into(),
        })
        .await;
    assert_status(get, Code::NotFound, "RECORD_NOT_FOUND");
    still_serving(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused() {
    let server = TestServer::memory().await;
    let huge = pb::CompleteRequest {
        namespace: "hostile".into(),
        key: "k".into(),
        lease_token: "0".repeat(32),
        result: Some(pb::Result {
            body: vec![0; 5 * 1024 * 1024],
            ..Default::default()
        }),
        retention: None,
    };
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
    // Hundreds of connections that never say anything.
    let mut idle = Vec::new();
    for _ in 0..500 {
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
