"""Offline checks of the Kubernetes manifests: the kustomize base and its components
(deploy/kubernetes, built with the real `kubectl kustomize`) and the Helm chart
(deploy/helm/ssh-proxy, rendered and linted by Helm's own Go engine through helm-python-sdk).

Every rendered object is validated against the Kubernetes OpenAPI schemas that
kubernetes-validate ships (strict: unknown fields are errors), then checked for what the
deployment promises: a namespace-scoped Role with exactly the verbs the proxy needs, two
replicas sharing read-only host keys, probes, only the capabilities sshd needs, and a
Service and PodDisruptionBudget that select the proxy's pods. No cluster is contacted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterable

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "deploy" / "kubernetes"
COMPONENTS = BASE / "components"
CHART = REPO / "deploy" / "helm" / "ssh-proxy"
KUBECTL = shutil.which("kubectl")

needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed (Debian package `kubectl`; tests/run.sh installs it)")

# The oldest and newest schemas kubernetes-validate ships, and kubectl's own version.
SCHEMA_VERSIONS = ("1.25.0", "1.32.0", "1.37.0")

# Found by logging in through the real image under `docker run --cap-drop ALL --cap-add ...`:
# without any of the first four, sshd does not serve a login; KILL lets root signal
# session processes that run as limited-user.
CAPABILITIES = {"NET_BIND_SERVICE", "SETUID", "SETGID", "SYS_CHROOT", "KILL"}

READ_RULES = {("pods", frozenset({"get", "list", "watch"})), ("services", frozenset({"list", "watch"}))}
EXEC_RULE = ("pods/exec", frozenset({"get", "create"}))

NAMESPACED_KINDS = {"ServiceAccount", "Role", "RoleBinding", "Deployment", "Service",
                    "PodDisruptionBudget", "NetworkPolicy"}
HOST_KEYS = {"ssh_host_ed25519_key", "ssh_host_ecdsa_key", "ssh_host_rsa_key"}
BASE_ENV = {
    "SSH_PROXY_MODE": "kubernetes",
    "SSH_PERMIT_TARGET_HOST": "*",
    "SSH_PERMIT_TARGET_PORT": "*",
    "SSH_TARGET_LABELS": "",
    "SSH_TARGET_PUBLICKEY_API_PORT": "8080",
    "SSH_TARGET_KEY_PATH": "~/.ssh/id_ed25519.pub",
    "SSH_TARGET_KEY_SOURCE": "api,exec",
    "WATCHER_LOG_LEVEL": "info",
}


# --------------------------------------------------------------------------- building


def parse_documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def kustomize(tmp_path: Path, components: Iterable[str] = (), extra: str = "",
              root: Path = BASE) -> list[dict[str, Any]]:
    """`kubectl kustomize ROOT` (the base by default), or of an overlay written to tmp_path
    that adds the named components (and `extra` kustomization text), as a user's would."""
    components = list(components)
    if components or extra:
        base = os.path.relpath(BASE, tmp_path)  # kustomize refuses absolute paths
        lines = ["apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization",
                 f"resources: [{base}]"]
        if components:
            lines.append("components: [" + ", ".join(f"{base}/components/{c}" for c in components) + "]")
        (tmp_path / "kustomization.yaml").write_text("\n".join(lines) + "\n" + extra)
        root = tmp_path
    proc = subprocess.run([KUBECTL, "kustomize", str(root)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {root} failed:\n{proc.stderr}"
    return parse_documents(proc.stdout)


def render_chart(values: dict[str, Any] | None = None, name: str = "ssh-proxy",
                 namespace: str = "tunnels") -> list[dict[str, Any]]:
    """`helm template` with Helm's engine: the chart's objects (NOTES.txt left out)."""
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name=name, namespace=namespace, is_install=True)
    return [doc for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")
            for doc in parse_documents(text)]


# --------------------------------------------------------------------------- reading objects


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = objects(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def pod_labels(docs: list[dict[str, Any]]) -> dict[str, str]:
    return one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]


def proxy_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(docs)["containers"]
    assert len(containers) == 1, "the proxy pod has one container"
    return containers[0]


def env_values(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """name -> value, or the valueFrom object for variables taken from elsewhere."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in proxy_container(docs)["env"]}


def role_rules(docs: list[dict[str, Any]]) -> set[tuple[str, frozenset[str]]]:
    rules = set()
    for rule in one(docs, "Role")["rules"]:
        assert rule["apiGroups"] == [""], f"only the core API group is needed: {rule}"
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for resource in rule["resources"]:
            rules.add((resource, frozenset(rule["verbs"])))
    return rules


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels,
              "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def ports_of(rule: dict[str, Any], protocol: str) -> set[int]:
    """Every port of `protocol` a NetworkPolicy rule's `ports` list allows."""
    out: set[int] = set()
    for p in rule.get("ports") or []:
        if p.get("protocol", "TCP") == protocol:
            out.update(range(p["port"], p.get("endPort", p["port"]) + 1))
    return out


# --------------------------------------------------------------------------- the checks


def validate_schemas(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        for version in SCHEMA_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']} is not a valid Kubernetes "
                            f"{version} object: {exc.message} at {list(exc.path)}", pytrace=False)


def check_proxy_objects(docs: list[dict[str, Any]], exec_enabled: bool, namespace: str | None = None,
                        env: dict[str, str] | None = None) -> None:
    """What both the kustomize base and the chart promise; `env`: variables set otherwise."""
    kinds = {d["kind"] for d in docs}
    assert kinds <= NAMESPACED_KINDS, f"only namespaced objects, got {kinds - NAMESPACED_KINDS}"
    for doc in docs:
        assert doc["metadata"].get("namespace") in (None, namespace), \
            f"{doc['kind']} {doc['metadata']['name']} is placed in another namespace"

    # RBAC: exactly the verbs the source needs, bound to the pod's service account.
    expected = READ_RULES | ({EXEC_RULE} if exec_enabled else set())
    assert role_rules(docs) == expected
    binding = one(docs, "RoleBinding")
    role = one(docs, "Role")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    spec = pod_spec(docs)
    assert [(s["kind"], s["name"]) for s in binding["subjects"]] == \
        [("ServiceAccount", spec["serviceAccountName"])]
    assert one(docs, "ServiceAccount")["metadata"]["name"] == spec["serviceAccountName"]

    # Two replicas, all selected by the Deployment.
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    labels = pod_labels(docs)
    assert selects(deployment["spec"]["selector"], labels)

    # Host keys: one Secret for every replica, read-only, readable by root only, all three types.
    container = proxy_container(docs)
    mounts = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/ssh/host_keys"]
    assert len(mounts) == 1 and mounts[0]["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == mounts[0]["name"])
    secret = volume["secret"]
    assert secret["secretName"] == "ssh-proxy-host-keys"
    assert secret["defaultMode"] & 0o077 == 0, "sshd refuses a host key others can read"
    assert {item["key"] for item in secret["items"]} == HOST_KEYS
    assert {item["path"] for item in secret["items"]} == HOST_KEYS

    # Probes: startup and readiness are the image's own health check (the API is watched);
    # liveness leaves the API out, so an API outage never restarts a serving replica.
    for probe, args in (("readinessProbe", ["health"]), ("startupProbe", ["health"]),
                        ("livenessProbe", ["health", "--liveness"])):
        command = container[probe]["exec"]["command"]
        assert Path(command[0]).name == "watcher" and command[1:] == args, probe
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]

    # Only what sshd needs.
    security = container["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == CAPABILITIES
    assert security["allowPrivilegeEscalation"] is False
    assert not security.get("privileged")
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not spec.get("hostNetwork") and not spec.get("hostPID")

    # The users' variables and the pod's identity from the downward API.
    actual = env_values(docs)
    assert {k: actual.get(k) for k in BASE_ENV} == \
        {**BASE_ENV, "SSH_TARGET_KEY_SOURCE": "api,exec" if exec_enabled else "api", **(env or {})}
    assert actual["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert actual["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}

    # The Service and the PodDisruptionBudget reach the proxy's pods, on sshd's port.
    service = one(docs, "Service")
    assert selects({"matchLabels": service["spec"]["selector"]}, labels)
    [port] = service["spec"]["ports"]
    assert port["port"] == 22 and port["protocol"] == "TCP"
    [named] = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    assert named["containerPort"] == 22
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and selects(pdb["spec"]["selector"], labels)


def check_network_policy(docs: list[dict[str, Any]], ssh_port: int = 22, key_port: int = 8080) -> None:
    """Only the proxy reaches the targets' SSH and key ports; every other port is as open as
    without the policy."""
    policy = one(docs, "NetworkPolicy")["spec"]
    proxy = pod_labels(docs)
    assert not selects(policy["podSelector"], proxy), "the proxy itself stays reachable"
    for target in ({}, {"app": "web"}, {"app.kubernetes.io/name": "workspace"}):
        assert selects(policy["podSelector"], target), f"a pod labelled {target} is protected"
    assert policy["policyTypes"] == ["Ingress"]

    guarded = {ssh_port, key_port}
    from_proxy = [r for r in policy["ingress"] if r.get("from")]
    from_anyone = [r for r in policy["ingress"] if not r.get("from")]
    assert len(from_proxy) == 1 and len(from_anyone) == 1
    [peer] = from_proxy[0]["from"]
    assert set(peer) == {"podSelector"}, "no namespaceSelector or ipBlock: the proxy's pods only"
    assert selects(peer["podSelector"], proxy)
    assert not selects(peer["podSelector"], {"app": "web"})
    assert ports_of(from_proxy[0], "TCP") == guarded
    assert ports_of(from_anyone[0], "TCP") == set(range(1, 65536)) - guarded
    assert ports_of(from_anyone[0], "UDP") == set(range(1, 65536))


# --------------------------------------------------------------------------- kustomize


KUSTOMIZE_VARIANTS = {
    "base": [],
    "no-exec": ["no-exec"],
    "network-policy": ["network-policy"],
    "loadbalancer": ["loadbalancer"],
    "nodeport": ["nodeport"],
    "all": ["no-exec", "network-policy", "nodeport"],
}


@needs_kubectl
@pytest.mark.parametrize("variant", KUSTOMIZE_VARIANTS)
def test_kustomize_builds_valid_objects(tmp_path: Path, variant: str) -> None:
    docs = kustomize(tmp_path, KUSTOMIZE_VARIANTS[variant])
    validate_schemas(docs)
    check_proxy_objects(docs, exec_enabled="no-exec" not in KUSTOMIZE_VARIANTS[variant])


@needs_kubectl
def test_kustomize_base(tmp_path: Path) -> None:
    docs = kustomize(tmp_path)
    assert sorted(d["kind"] for d in docs) == sorted(NAMESPACED_KINDS - {"NetworkPolicy"}), \
        "the NetworkPolicy is opt-in (components/network-policy)"
    assert one(docs, "Service")["spec"]["type"] == "ClusterIP"
    assert proxy_container(docs)["image"] == "ssh-proxy:0.1.0"


@needs_kubectl
def test_no_exec_component_drops_only_the_exec_permission(tmp_path: Path) -> None:
    base, docs = kustomize(tmp_path), kustomize(tmp_path, ["no-exec"])
    assert role_rules(docs) == READ_RULES
    assert env_values(docs)["SSH_TARGET_KEY_SOURCE"] == "api"
    # Nothing else moves: same objects, same container apart from that one variable.
    assert sorted(d["kind"] for d in docs) == sorted(d["kind"] for d in base)

    def without_key_source(container: dict[str, Any]) -> dict[str, Any]:
        return {**container, "env": [e for e in container["env"] if e["name"] != "SSH_TARGET_KEY_SOURCE"]}

    assert without_key_source(proxy_container(docs)) == without_key_source(proxy_container(base))


@needs_kubectl
def test_network_policy_component(tmp_path: Path) -> None:
    check_network_policy(kustomize(tmp_path, ["network-policy"]))


@needs_kubectl
@pytest.mark.parametrize("component,service_type", [("loadbalancer", "LoadBalancer"), ("nodeport", "NodePort")])
def test_service_exposure_components(tmp_path: Path, component: str, service_type: str) -> None:
    docs = kustomize(tmp_path, [component])
    spec = one(docs, "Service")["spec"]
    assert spec["type"] == service_type
    assert spec["externalTrafficPolicy"] == "Local", "the access log shows the user's address"
    if service_type == "NodePort":
        assert spec["ports"][0]["nodePort"] == 30022


@needs_kubectl
def test_image_tag_is_overridable(tmp_path: Path) -> None:
    docs = kustomize(tmp_path, extra="images:\n  - name: ssh-proxy\n"
                                     "    newName: registry.example/ops/ssh-proxy\n    newTag: \"1.2.3\"\n")
    assert proxy_container(docs)["image"] == "registry.example/ops/ssh-proxy:1.2.3"


# --------------------------------------------------------------------------- helm


def test_chart_lints_clean() -> None:
    report = helm.lint(str(CHART), strict=True, namespace="tunnels")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


CHART_VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "no-exec": {"exec": {"enabled": False}},
    "network-policy": {"networkPolicy": {"enabled": True}},
    "loadbalancer": {"service": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                                 "loadBalancerSourceRanges": ["192.0.2.0/24"]}},
    "nodeport": {"service": {"type": "NodePort", "nodePort": 30022}},
}


@pytest.mark.parametrize("variant", CHART_VARIANTS)
def test_chart_renders_valid_objects(variant: str) -> None:
    values = CHART_VARIANTS[variant]
    docs = render_chart(values)
    validate_schemas(docs)
    check_proxy_objects(docs, exec_enabled=values.get("exec", {}).get("enabled", True), namespace="tunnels")


@needs_kubectl
def test_chart_matches_the_kustomize_base(tmp_path: Path) -> None:
    """Two ways to install, one deployment: same kinds, rules, container and pod security."""
    base, chart = kustomize(tmp_path), render_chart()
    assert sorted(d["kind"] for d in chart) == sorted(d["kind"] for d in base)
    assert role_rules(chart) == role_rules(base)
    assert proxy_container(chart) == proxy_container(base)
    for key in ("securityContext", "automountServiceAccountToken", "enableServiceLinks", "volumes"):
        assert pod_spec(chart)[key] == pod_spec(base)[key], key
    assert one(chart, "Deployment")["spec"]["strategy"] == one(base, "Deployment")["spec"]["strategy"]


def test_chart_values_reach_the_environment() -> None:
    docs = render_chart({"config": {"permitTargetHost": "workspace-*,db-1", "permitTargetPort": "22,8000",
                                    "targetLabels": "team=a,ssh", "publickeyApiPort": 9090,
                                    "keyPath": "/etc/ssh-key.pub", "keySource": "exec",
                                    "logLevel": "debug"},
                         "extraEnv": [{"name": "EXTRA", "value": "1"}],
                         "image": {"repository": "registry.example/ssh-proxy", "tag": "2.0.0"},
                         "replicaCount": 3})
    env = env_values(docs)
    assert {k: env[k] for k in BASE_ENV} == {
        "SSH_PROXY_MODE": "kubernetes", "SSH_PERMIT_TARGET_HOST": "workspace-*,db-1",
        "SSH_PERMIT_TARGET_PORT": "22,8000", "SSH_TARGET_LABELS": "team=a,ssh",
        "SSH_TARGET_PUBLICKEY_API_PORT": "9090", "SSH_TARGET_KEY_PATH": "/etc/ssh-key.pub",
        "SSH_TARGET_KEY_SOURCE": "exec", "WATCHER_LOG_LEVEL": "debug"}
    assert env["EXTRA"] == "1"
    assert proxy_container(docs)["image"] == "registry.example/ssh-proxy:2.0.0"
    assert one(docs, "Deployment")["spec"]["replicas"] == 3
    validate_schemas(docs)


def test_chart_refuses_exec_key_source_without_exec_permission() -> None:
    with pytest.raises(helm.HelmRenderError, match="exec.enabled=false"):
        render_chart({"exec": {"enabled": False}, "config": {"keySource": "api,exec"}})


def test_chart_without_rbac_uses_the_named_service_account() -> None:
    docs = render_chart({"rbac": {"create": False},
                         "serviceAccount": {"create": False, "name": "ops-proxy"}})
    assert not objects(docs, "Role") and not objects(docs, "RoleBinding")
    assert not objects(docs, "ServiceAccount")
    assert pod_spec(docs)["serviceAccountName"] == "ops-proxy"
    with pytest.raises(helm.HelmRenderError, match="serviceAccount.name is required"):
        render_chart({"serviceAccount": {"create": False}})


def test_chart_network_policy_follows_the_ports() -> None:
    docs = render_chart({"networkPolicy": {"enabled": True, "sshPort": 2222},
                         "config": {"publickeyApiPort": 9000}})
    check_network_policy(docs, ssh_port=2222, key_port=9000)
    validate_schemas(docs)
    same = render_chart({"networkPolicy": {"enabled": True, "sshPort": 8080}})
    check_network_policy(same, ssh_port=8080, key_port=8080)
    assert not objects(render_chart(), "NetworkPolicy"), "opt-in"


def test_chart_names_follow_the_release() -> None:
    docs = render_chart(name="jump", namespace="team-a")
    assert {d["metadata"]["name"] for d in docs} == {"jump-ssh-proxy"}
    check_proxy_objects(docs, exec_enabled=True, namespace="team-a")
    assert one(docs, "RoleBinding")["subjects"][0]["namespace"] == "team-a"


@pytest.mark.parametrize("values,complaint", [
    ({"config": {"keysource": "api"}}, "keysource"),
    ({"config": {"keySource": "http"}}, "keySource"),
    ({"service": {"type": "ExternalName"}}, "type"),
    ({"replicaCount": 0}, "replicaCount"),
])
def test_chart_rejects_bad_values(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=complaint):
        render_chart(values)


# --------------------------------------------------------------------------- the README


@needs_kubectl
def test_readme_overlay_example_builds(tmp_path: Path) -> None:
    """The overlay deploy/README.md shows, pointed at this checkout, builds what it says."""
    readme = (REPO / "deploy" / "README.md").read_text()
    start = readme.index("# my-ssh-proxy/kustomization.yaml")
    overlay = readme[start:readme.index("```", start)]
    (tmp_path / "kustomization.yaml").write_text(
        overlay.replace("../ssh-proxy/deploy/kubernetes", os.path.relpath(BASE, tmp_path)))
    docs = kustomize(tmp_path, root=tmp_path)
    validate_schemas(docs)
    check_proxy_objects(docs, exec_enabled=False, namespace="tunnels", env={"SSH_TARGET_LABELS": "ssh=on"})
    assert {d["metadata"]["namespace"] for d in docs} == {"tunnels"}
    assert proxy_container(docs)["image"] == "registry.example.com/ssh-proxy:0.1.0"
    assert one(docs, "Service")["spec"]["type"] == "LoadBalancer"
    check_network_policy(docs)


def test_readme_host_key_secret_has_every_key_the_pod_mounts() -> None:
    readme = (REPO / "deploy" / "README.md").read_text()
    for key in HOST_KEYS:
        assert f"--from-file={key}=" in readme, key
