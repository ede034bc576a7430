//! The fuzz targets' checks, run as proptests in CI (a few thousand cases each); the cargo-fuzz
//! targets in `fuzz/` run the same checks for as long as one likes. Both include the checks by
//! path, so they cannot drift: `tests/model/decode_check.rs` (request decoding and validation) and
//! `tests/model/fingerprint_check.rs` (`idemd_client::fingerprint`). The memory store's model
//! test, the third target's CI twin, is in `model.rs`.

use std::{collections::BTreeMap, time::Duration};

use idemd::domain::{DurationPolicy, Limits};
use idemd::proto::idempotency::v1 as pb;
use proptest::prelude::*;
use proptest::{collection::vec, sample::select};
use prost::Message;
use serde_json::Value;
use tonic::Code;
use tonic_types::StatusExt;

use crate::harness::*;

#[path = "../model/decode_check.rs"]
mod decode_check;

#[path = "../model/fingerprint_check.rs"]
mod fingerprint_check;

use decode_check::{check, input, tight_limits, Kind, Verdict};

/// Namespaces, keys, holders, metadata: valid ones, lengths at and just past every limit, control
/// characters, multi-byte and non-printable text, and a long one.
fn text() -> impl Strategy<Value = String> {
    let limit_lengths = select(vec![63usize, 64, 65, 127, 128, 129, 254, 255, 256, 257]);
    prop_oneof![
        3 => "[A-Za-z0-9._-]{1,64}",
        2 => any::<String>(),
        1 => Just(String::new()),
        2 => (limit_lengths.clone(), select(vec!["a", "é", "€", "😀", "\u{10ffff}"]))
            .prop_map(|(bytes, unit)| unit.repeat(bytes.div_ceil(unit.len()))),
        2 => ("[a-z]{0,8}", select(vec!['\0', '\t', '\n', '\u{1f}', '\u{7f}', '\u{85}', '\u{9f}', '\u{a0}', '\u{202e}', '\u{feff}']), "[a-z]{0,8}")
            .prop_map(|(head, bad, tail)| format!("{head}{bad}{tail}")),
        1 => limit_lengths.prop_map(|bytes| "k".repeat(bytes)),
        1 => Just("k".repeat(70_000)),
    ]
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[0-9a-f]{32}",
        2 => "[0-9a-fA-F]{32}",
        1 => "[0-9a-f]{31}|[0-9a-f]{33}",
        1 => "[0-9a-g]{32}",
        1 => "[0-9a-f]{30}é",
        1 => text(),
    ]
}

/// Durations just around every bound of both sets of limits, and malformed ones.
fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
    let mut bounds = Vec::new();
    for limits in [Limits::default(), tight_limits()] {
        let policies: [DurationPolicy; 3] =
            [limits.lease_ttl, limits.retention, limits.wait_timeout];
        for policy in policies {
            for bound in [policy.min, policy.max, policy.default] {
                bounds.push(bound.saturating_sub(Duration::from_nanos(1)));
                bounds.push(bound);
                bounds.push(bound + Duration::from_nanos(1));
            }
        }
    }
    let wire = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
    prop_oneof![
        2 => Just(None),
        1 => Just(wire(0, 0)),
        3 => select(bounds).prop_map(move |d| wire(d.as_secs() as i64, d.subsec_nanos() as i32)),
        2 => (0i64..4000, 0i32..1_000_000_000).prop_map(move |(s, n)| wire(s, n)),
        1 => (-3i64..3, -3i32..3).prop_map(move |(s, n)| wire(s, n)),
        1 => select(vec![(i64::MAX, 999_999_999), (i64::MIN, 0), (0, 1_000_000_000), (1, i32::MIN), (0, i32::MAX)])
            .prop_map(move |(s, n)| wire(s, n)),
        1 => any::<(i64, i32)>().prop_map(move |(s, n)| wire(s, n)),
    ]
}

fn metadata() -> impl Strategy<Value = BTreeMap<String, String>> {
    let value_limit = 16 * 1024;
    prop_oneof![
        4 => proptest::collection::btree_map(text(), text(), 0..6),
        1 => (63usize..67).prop_map(|n| (0..n).map(|i| (format!("k{i}"), String::new())).collect::<BTreeMap<_, _>>()),
        1 => select(vec![value_limit, value_limit + 1])
            .prop_map(|len| BTreeMap::from([("big".to_string(), "v".repeat(len))])),
        // Hundreds of broken entries: more violations than one status lists.
        1 => (1usize..400).prop_map(|n| (0..n).map(|i| (format!("\u{1}{i}"), "v".into())).collect::<BTreeMap<_, _>>()),
        1 => (1usize..70).prop_map(|n| {
            (0..n)
                .map(|i| (format!("{i}{}", "\u{10ffff}".repeat(80)), "\0".into()))
                .collect::<BTreeMap<_, _>>()
        }),
    ]
}

fn result() -> impl Strategy<Value = Option<pb::Result>> {
    let body = prop_oneof![
        4 => vec(any::<u8>(), 0..40),
        1 => select(vec![16usize, 17, 1 << 20, (1 << 20) + 1]).prop_map(|len| vec![7; len]),
    ];
    prop_oneof![
        1 => Just(None),
        6 => (body, any::<i32>(), metadata())
            .prop_map(|(body, code, metadata)| Some(pb::Result { body, code, metadata })),
    ]
}

/// A structurally valid request with hostile fields, encoded as a `check` input.
fn hostile_input() -> impl Strategy<Value = Vec<u8>> {
    let fingerprint = prop_oneof![
        3 => vec(any::<u8>(), 0..70),
        1 => select(vec![64usize, 65, 4096]).prop_map(|len| vec![1; len]),
    ];
    (
        select(Kind::ALL.to_vec()),
        any::<bool>(),
        (text(), text(), text()),
        fingerprint,
        token(),
        (duration(), duration()),
        result(),
    )
        .prop_map(
            |(
                kind,
                tight,
                (namespace, key, holder),
                fingerprint,
                lease_token,
                (d1, d2),
                result,
            )| {
                match kind {
                    Kind::Acquire => input(
                        kind,
                        tight,
                        &pb::AcquireRequest {
                            namespace,
                            key,
                            fingerprint,
                            lease_ttl: d1,
                            retention: d2,
                            holder,
                        },
                    ),
                    Kind::Complete => input(
                        kind,
                        tight,
                        &pb::CompleteRequest {
                            namespace,
                            key,
                            lease_token,
                            result,
                            retention: d1,
                        },
                    ),
                    Kind::Release => input(
                        kind,
                        tight,
                        &pb::ReleaseRequest {
                            namespace,
                            key,
                            lease_token,
                        },
                    ),
                    Kind::Renew => input(
                        kind,
                        tight,
                        &pb::RenewRequest {
                            namespace,
                            key,
                            lease_token,
                            lease_ttl: d1,
                        },
                    ),
                    Kind::Get => input(kind, tight, &pb::GetRequest { namespace, key }),
                    Kind::Wait => input(
                        kind,
                        tight,
                        &pb::WaitRequest {
                            namespace,
                            key,
                            timeout: d1,
                        },
                    ),
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_decoded_and_validated_as_the_contract_says(
        data in vec(any::<u8>(), 0..300),
    ) {
        check(&data);
    }

    #[test]
    fn hostile_requests_are_validated_as_the_contract_says(data in hostile_input()) {
        prop_assert_ne!(check(&data), Verdict::Undecodable);
    }

    #[test]
    fn mangled_requests_are_decoded_and_validated_as_the_contract_says(
        data in hostile_input(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..6),
    ) {
        let mut data = data;
        for (at, byte, how) in edits {
            // Keep the selector byte; overwrite, insert or cut in the message.
            let at = 1 + at.index(data.len());
            match how {
                0 if at < data.len() => data[at] = byte,
                1 => data.insert(at.min(data.len()), byte),
                _ => data.truncate(at),
            }
        }
        check(&data);
    }
}

/// JSON values, with numbers at the edges of what JCS can write.
fn json() -> impl Strategy<Value = Value> {
    let edge_numbers = select(vec![
        Value::from(9_007_199_254_740_991u64),
        Value::from(9_007_199_254_740_992u64),
        Value::from(u64::MAX),
        Value::from(i64::MIN),
        Value::from(-0.0),
        Value::from(1e21),
        Value::from(1e-7),
        Value::from(5e-324),
        Value::from(f64::MAX),
        Value::from(0.1 + 0.2),
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        edge_numbers,
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The cargo-fuzz target `fingerprint`, in CI.
    #[test]
    fn equal_canonical_json_gets_equal_fingerprints(value in json()) {
        let text = serde_json::to_vec(&value).expect("serializes");
        prop_assert!(fingerprint_check::check(&text));
    }

    #[test]
    fn json_like_bytes_get_fingerprints_without_panic(text in r#"[\[\]{}",:0-9eE.+\- tfnrula\\]{0,48}"#) {
        fingerprint_check::check(text.as_bytes());
    }
}

/// The checks are not vacuous: well-formed requests are accepted under both sets of limits.
#[test]
fn valid_requests_are_accepted() {
    let token = "0123456789abcdefABCDEF0123456789".to_string();
    let result = Some(pb::Result {
        body: b"ok".to_vec(),
        code: 200,
        metadata: [("content-type".into(), "application/json".into())].into(),
    });
    for tight in [false, true] {
        let inputs = [
            input(
                Kind::Acquire,
                tight,
                &pb::AcquireRequest {
                    namespace: "payments.v2-eu_1".into(),
                    key: "order-4711/ü".into(),
                    fingerprint: vec![9; 64],
                    holder: "pod-1".into(),
                    ..Default::default()
                },
            ),
            input(
                Kind::Complete,
                tight,
                &pb::CompleteRequest {
                    namespace: "n".into(),
                    key: "k".into(),
                    lease_token: token.clone(),
                    result: result.clone(),
                    retention: None,
                },
            ),
            input(
                Kind::Release,
                tight,
                &pb::ReleaseRequest {
                    namespace: "n".into(),
                    key: "k".into(),
                    lease_token: token.clone(),
                },
            ),
            input(
                Kind::Renew,
                tight,
                &pb::RenewRequest {
                    namespace: "n".into(),
                    key: "k".into(),
                    lease_token: token.clone(),
                    lease_ttl: None,
                },
            ),
            input(
                Kind::Get,
                tight,
                &pb::GetRequest {
                    namespace: "n".into(),
                    key: "k".into(),
                },
            ),
            input(
                Kind::Wait,
                tight,
                &pb::WaitRequest {
                    namespace: "n".into(),
                    key: "k".into(),
                    timeout: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 5_000_000,
                    }),
                },
            ),
        ];
        for data in inputs {
            assert_eq!(check(&data), Verdict::Accepted, "{data:?}");
        }
    }
    assert_eq!(check(&[]), Verdict::Undecodable);
    assert_eq!(check(&[0]), Verdict::Refused);
}

/// Found by the trailer-size invariant of `decode_check` (the hostile-request proptest above fails
/// without the fix): a request breaking a hundred rules got an h2 protocol error instead of
/// INVALID_ARGUMENT, because the status listing every violation overflowed the client's limit on
/// HTTP/2 trailers. The status now lists as many as fit and counts the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_breaking_hundreds_of_rules_still_gets_invalid_argument() {
    let server = TestServer::memory().await;
    let mut client = server.client().await;
    let crowded: [BTreeMap<String, String>; 2] = [
        // Hundreds of keys with a control character.
        (0..500)
            .map(|i| (format!("\u{1}{i}"), "v".into()))
            .collect(),
        // Within the entry count, but every key too long and every value holding U+0000, in text
        // that the violation's description escapes.
        (0..64)
            .map(|i| (format!("{i}{}", "\u{10ffff}".repeat(80)), "\0".into()))
            .collect(),
    ];
    for metadata in crowded {
        let entries = metadata.len();
        let request = pb::CompleteRequest {
            namespace: "fuzzing".into(),
            key: "k".into(),
            lease_token: "0".repeat(32),
            result: Some(pb::Result {
                metadata,
                ..Default::default()
            }),
            retention: None,
        };
        assert!(request.encoded_len() < 64 * 1024);
        let status = client.complete(request).await.expect_err("invalid");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{entries} entries: {status:?}"
        );
        assert_eq!(reason(&status), "INVALID_REQUEST");
        let listed = status
            .get_details_bad_request()
            .expect("BadRequest detail")
            .field_violations;
        assert!(!listed.is_empty());
        assert!(
            listed.iter().all(|v| v.field == "result.metadata"),
            "{listed:?}"
        );
        assert!(
            status.message().contains("more violations"),
            "{}",
            status.message()
        );
    }
    // The server still serves.
    client
        .acquire(acquire_request("fuzzing", "after", b""))
        .await
        .expect("acquire after the crowded requests");
}
