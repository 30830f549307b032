"""Pods and Services as complete as a real API server sends them.

Client 37.x deserialises into strict models, so every field a real server always sends
(uid, resourceVersion, creationTimestamp, container statuses with image/imageID...) is here.
`resourceVersion` is set by the server when the object is stored.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

NOW = "2026-12-04T10:00:00Z"


def make_pod(name: str, namespace: str = "", ip: str = "10.244.0.10",
             labels: dict[str, str] | None = None, phase: str = "Running", ready: bool = True,
             hostname: str = "", subdomain: str = "", restart_count: int = 0,
             started_at: str = NOW, uid: str = "", deletion: bool = False,
             containers: tuple[str, ...] = ("main",), node: str = "node-1") -> dict[str, Any]:
    """A pod as `kubectl get pod -o json` shows it (kind/apiVersion added by the server;
    without `namespace`, the server's namespace is filled in when it is stored)."""
    running = phase == "Running"
    metadata: dict[str, Any] = {
        "name": name, "uid": uid or str(uuid.uuid4()),
        "creationTimestamp": NOW, "labels": dict(labels or {}),
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                             "name": f"{name}-rs", "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
                             "controller": True, "blockOwnerDeletion": True}],
    }
    if namespace:
        metadata["namespace"] = namespace
    if deletion:
        metadata["deletionTimestamp"] = NOW
        metadata["deletionGracePeriodSeconds"] = 30
    spec: dict[str, Any] = {
        "containers": [{"name": c, "image": "example/target:1", "imagePullPolicy": "IfNotPresent",
                        "ports": [{"containerPort": 22, "protocol": "TCP"}],
                        "resources": {}, "terminationMessagePath": "/dev/termination-log",
                        "terminationMessagePolicy": "File"} for c in containers],
        "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default", "serviceAccount": "default", "nodeName": node,
        "securityContext": {}, "schedulerName": "default-scheduler", "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority", "priority": 0,
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                         "effect": "NoExecute", "tolerationSeconds": 300}],
    }
    if hostname:
        spec["hostname"] = hostname
    if subdomain:
        spec["subdomain"] = subdomain
    state = ({"running": {"startedAt": started_at}} if running
             else {"waiting": {"reason": "ContainerCreating"}})
    statuses = [{"name": c, "image": "docker.io/example/target:1",
                 "imageID": "docker.io/example/target@sha256:" + "ab" * 32,
                 "containerID": f"containerd://{uuid.uuid5(uuid.NAMESPACE_URL, name + c).hex}",
                 "ready": ready and running, "started": running, "restartCount": restart_count,
                 "state": state, "lastState": {}} for c in containers]
    cond = "True" if ready and running else "False"
    status: dict[str, Any] = {
        "phase": phase, "hostIP": "172.18.0.2", "hostIPs": [{"ip": "172.18.0.2"}],
        "startTime": NOW, "qosClass": "BestEffort",
        "conditions": [{"type": t, "status": s, "lastProbeTime": None,
                        "lastTransitionTime": NOW}
                       for t, s in (("PodReadyToStartContainers", "True"), ("Initialized", "True"),
                                    ("Ready", cond), ("ContainersReady", cond),
                                    ("PodScheduled", "True"))],
        "containerStatuses": statuses,
    }
    if ip and phase in ("Running", "Pending"):
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {"metadata": metadata, "spec": spec, "status": status}


def make_service(name: str, selector: dict[str, str] | None, namespace: str = "",
                 cluster_ip: str = "10.96.0.20", headless: bool = False,
                 ports: tuple[int, ...] = (22,), uid: str = "") -> dict[str, Any]:
    """A ClusterIP (or headless) Service as the API server stores it."""
    ip = "None" if headless else cluster_ip
    spec: dict[str, Any] = {
        "ports": [{"name": f"p{p}", "protocol": "TCP", "port": p, "targetPort": p} for p in ports],
        "clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP", "sessionAffinity": "None",
        "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
        "internalTrafficPolicy": "Cluster",
    }
    if selector is not None:
        spec["selector"] = dict(selector)
    metadata = {"name": name, "uid": uid or str(uuid.uuid4()), "creationTimestamp": NOW,
                "labels": {}}
    if namespace:
        metadata["namespace"] = namespace
    return {"metadata": metadata, "spec": spec, "status": {"loadBalancer": {}}}


def with_changes(obj: dict[str, Any], **paths: Any) -> dict[str, Any]:
    """A deep copy with dotted paths set, e.g. `with_changes(pod, status__phase="Failed")`."""
    out = copy.deepcopy(obj)
    for dotted, value in paths.items():
        node = out
        keys = dotted.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return out


def set_ready(pod: dict[str, Any], ready: bool) -> dict[str, Any]:
    """The pod with its Ready/ContainersReady conditions and container readiness flipped."""
    out = copy.deepcopy(pod)
    for cond in out["status"]["conditions"]:
        if cond["type"] in ("Ready", "ContainersReady"):
            cond["status"] = "True" if ready else "False"
    for status in out["status"]["containerStatuses"]:
        status["ready"] = ready
    return out
