//! Who may call the admin API: every admin RPC against callers with data-plane grants only,
//! admin_read, admin_read_results, admin_write, none, and unknown credentials. The same refusal
//! whether or not the record exists; result bodies only with admin_read_results; lease tokens
//! nowhere.

use std::sync::Arc;

use idemd::auth::AuthState;
use idemd::proto::idempotency::admin::v1 as admin;
use idemd::proto::idempotency::v1 as pb;
use idemd::server::ServerSettings;
use idemd::store::MemoryStore;
use sha2::{Digest, Sha256};
use tonic::Code;

use crate::admin::{list, purge};
use crate::harness::*;

const APP: &str = "app-token-0a1b2c";
const READER: &str = "reader-token-3d4e5f";
const RESULTS: &str = "results-token-6a7b8c";
const WRITER: &str = "writer-token-9d0e1f";
const NOBODY: &str = "unknown-token-000000";

fn sha(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn policy() -> String {
    format!(
        r#"
[[callers]]
name = "app"
token_sha256 = ["{app}"]
  [[callers.grants]]
  namespaces = ["*"]
  rpcs = ["*"]

[[callers]]
name = "reader"
token_sha256 = ["{reader}"]
  [[callers.admin_grants]]
  namespaces = ["pay*"]
  access = ["admin_read"]

[[callers]]
name = "results"
token_sha256 = ["{results}"]
  [[callers.admin_grants]]
  namespaces = ["payments"]
  access = ["admin_read_results"]

[[callers]]
name = "writer"
token_sha256 = ["{writer}"]
  [[callers.admin_grants]]
  namespaces = ["payments"]
  access = ["admin_write"]
"#,
        app = sha(APP),
        reader = sha(READER),
        results = sha(RESULTS),
        writer = sha(WRITER),
    )
}

fn as_caller<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().expect("header");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Calls one admin RPC as `token`: the answer's code, and its Debug text (to look for secrets).
async fn call(admin_client: &mut AdminClient, rpc: &str, token: Option<&str>) -> (Code, String) {
    macro_rules! answer {
        ($future:expr) => {
            match $future.await {
                Ok(response) => (Code::Ok, format!("{:?}", response.into_inner())),
                Err(status) => (status.code(), status.message().to_string()),
            }
        };
    }
    match rpc {
        "ListRecords" => answer!(admin_client.list_records(as_caller(list("payments"), token))),
        "ListRecords(orders)" => {
            answer!(admin_client.list_records(as_caller(list("orders"), token)))
        }
        "ListNamespaces" => {
            answer!(admin_client.list_namespaces(as_caller(admin::ListNamespacesRequest {}, token)))
        }
        "GetNamespaceStats" => answer!(admin_client.get_namespace_stats(as_caller(
            admin::GetNamespaceStatsRequest {
                namespace: "payments".into(),
                window: None,
            },
            token
        ))),
        "ListAuditEntries" => answer!(admin_client.list_audit_entries(as_caller(
            admin::ListAuditEntriesRequest {
                namespace: "payments".into(),
                ..Default::default()
            },
            token
        ))),
        // Changes aimed so that an authorised caller is refused by the record, not the policy:
        // they prove access without changing anything.
        "PurgeRecord(existing)" => answer!(admin_client.purge_record(as_caller(
            admin::PurgeRecordRequest {
                expected_fencing_token: u64::MAX,
                ..purge("payments", "paid", "matrix")
            },
            token
        ))),
        "PurgeRecord(missing)" => answer!(admin_client.purge_record(as_caller(
            purge("payments", "never-existed", "matrix"),
            token
        ))),
        "ForceRelease" => answer!(admin_client.force_release(as_caller(
            admin::ForceReleaseRequest {
                namespace: "payments".into(),
                key: "running".into(),
                reason: "matrix".into(),
                expected_fencing_token: u64::MAX,
            },
            token
        ))),
        "PurgeRecords" => answer!(admin_client.purge_records(as_caller(
            admin::PurgeRecordsRequest {
                namespace: "payments".into(),
                reason: "matrix".into(),
                dry_run: true,
                limit: 10,
                ..Default::default()
            },
            token
        ))),
        other => panic!("no such rpc in the matrix: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_authorisation_matrix() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy_path = dir.path().join("policy.toml");
    std::fs::write(&policy_path, policy()).expect("policy");
    let auth = Arc::new(AuthState::load(&policy_path).expect("policy loads"));
    let settings = ServerSettings {
        auth: Some(auth),
        ..test_settings()
    };
    let server = TestServer::start(Arc::new(MemoryStore::new()), settings).await;
    let mut client = server.client().await;
    let mut admin_client = server.admin().await;
    // Data: a completed and a running record in payments, one in orders.
    let paid = {
        let mut request = acquire_request("payments", "paid", b"fp");
        request.lease_ttl = ms(60_000);
        client
            .acquire(as_caller(request, Some(APP)))
            .await
            .expect("acquire")
            .into_inner()
            .lease
            .expect("lease")
    };
    client
        .complete(as_caller(
            pb::CompleteRequest {
                namespace: "payments".into(),
                key: "paid".into(),
                lease_token: paid.token.clone(),
                result: Some(sample_result("secret-body")),
                retention: None,
            },
            Some(APP),
        ))
        .await
        .expect("complete");
    let running = {
        let mut request = acquire_request("payments", "running", b"fp");
        request.lease_ttl = ms(60_000);
        client
            .acquire(as_caller(request, Some(APP)))
            .await
            .expect("acquire")
            .into_inner()
            .lease
            .expect("lease")
    };
    client
        .acquire(as_caller(
            acquire_request("orders", "o-1", b"fp"),
            Some(APP),
        ))
        .await
        .expect("acquire orders");

    use Code::{
        FailedPrecondition as Refused, NotFound, Ok as Allowed, PermissionDenied as Denied,
        Unauthenticated as Unauth,
    };
    let callers = [
        ("app", Some(APP)),
        ("reader", Some(READER)),
        ("results", Some(RESULTS)),
        ("writer", Some(WRITER)),
        ("no token", None),
        ("unknown token", Some(NOBODY)),
    ];
    #[rustfmt::skip]
    let matrix: [(&str, [Code; 6]); 9] = [
        //                          app     reader   results  writer   none    unknown
        ("ListRecords",           [Denied, Allowed, Allowed, Denied,  Unauth, Unauth]),
        ("ListRecords(orders)",   [Denied, Denied,  Denied,  Denied,  Unauth, Unauth]),
        ("ListNamespaces",        [Denied, Allowed, Allowed, Denied,  Unauth, Unauth]),
        ("GetNamespaceStats",     [Denied, Allowed, Allowed, Denied,  Unauth, Unauth]),
        ("ListAuditEntries",      [Denied, Allowed, Allowed, Denied,  Unauth, Unauth]),
        ("PurgeRecord(existing)", [Denied, Denied,  Denied,  Refused, Unauth, Unauth]),
        ("PurgeRecord(missing)",  [Denied, Denied,  Denied,  NotFound, Unauth, Unauth]),
        ("ForceRelease",          [Denied, Denied,  Denied,  Refused, Unauth, Unauth]),
        ("PurgeRecords",          [Denied, Denied,  Denied,  Allowed, Unauth, Unauth]),
    ];
    let mut failures = Vec::new();
    let mut answers = Vec::new();
    for (rpc, expected) in matrix {
        for ((caller, token), expected) in callers.iter().zip(expected) {
            let (code, text) = call(&mut admin_client, rpc, *token).await;
            if code != expected {
                failures.push(format!(
                    "{rpc} as {caller}: {code:?}, expected {expected:?} ({text})"
                ));
            }
            answers.push((rpc, *caller, code, text));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // A refusal says the same whether or not the record exists.
    for (caller, _) in &callers[..3] {
        let refusals: Vec<&String> = answers
            .iter()
            .filter(|(rpc, who, ..)| rpc.starts_with("PurgeRecord(") && who == caller)
            .map(|(.., text)| text)
            .collect();
        assert_eq!(refusals.len(), 2);
        assert_eq!(refusals[0], refusals[1], "{caller}");
    }
    // Lease tokens are in no answer.
    for (rpc, caller, _, text) in &answers {
        for secret in [&paid.token, &running.token] {
            assert!(
                !text.contains(secret.as_str()),
                "{rpc} as {caller} shows a lease token"
            );
        }
    }

    // Result bodies: admin_read leaves them out (code and metadata stay); admin_read_results
    // shows them.
    let paid_record = |token: &'static str| {
        let mut admin_client = admin_client.clone();
        async move {
            admin_client
                .list_records(as_caller(list("payments"), Some(token)))
                .await
                .expect("list")
                .into_inner()
                .records
                .into_iter()
                .find(|record| record.key == "paid")
                .expect("paid listed")
                .result
                .expect("result")
        }
    };
    let hidden = paid_record(READER).await;
    assert!(hidden.body.is_empty());
    assert_eq!(hidden.code, 201);
    assert_eq!(
        hidden.metadata.get("x-tag").map(String::as_str),
        Some("secret-body")
    );
    assert_eq!(
        paid_record(RESULTS).await.body,
        sample_result("secret-body").body
    );
    // The writer's purge answer leaves the body out too (it has no admin_read_results).
    let purged = admin_client
        .purge_record(as_caller(purge("payments", "paid", "matrix"), Some(WRITER)))
        .await
        .expect("writer purges")
        .into_inner()
        .record
        .expect("record");
    assert!(purged.result.expect("result").body.is_empty());

    // ListNamespaces shows only what the caller may read.
    let namespaces = admin_client
        .list_namespaces(as_caller(admin::ListNamespacesRequest {}, Some(READER)))
        .await
        .expect("namespaces")
        .into_inner()
        .namespaces;
    let names: Vec<&str> = namespaces.iter().map(|n| n.namespace.as_str()).collect();
    assert_eq!(names, ["payments"]);

    // The audit entry names the caller.
    let entries = admin_client
        .list_audit_entries(as_caller(
            admin::ListAuditEntriesRequest {
                namespace: "payments".into(),
                ..Default::default()
            },
            Some(READER),
        ))
        .await
        .expect("audit")
        .into_inner()
        .entries;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].caller, "writer");

    // The data plane still refuses admin callers: grants are apart both ways.
    let status = client
        .get(as_caller(
            pb::GetRequest {
                namespace: "payments".into(),
                key: "running".into(),
            },
            Some(WRITER),
        ))
        .await
        .expect_err("admin grants give no data-plane access");
    assert_eq!(status.code(), Code::PermissionDenied);
    server.stop().await;
}
