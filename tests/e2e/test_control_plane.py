"""The local control plane itself: the real kube-apiserver 1.36 with our CRDs, the status
subresource, garbage collection by the controller-manager, and `orchardist dev cluster up|down`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from orchardist.dev import procs
from orchardist.dev.cluster import Cluster
from tests.fixtures.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
CRD_FILES = sorted((REPO / "crds").glob("*.yaml"))
DIGEST = "sha256:" + "ab" * 32

pytestmark = pytest.mark.cluster


def test_version_is_kubernetes_1_36(cluster: Cluster) -> None:
    raw = json.loads(cluster.kubectl("get", "--raw", "/version").stdout)
    assert raw["gitVersion"].startswith("v1.36."), raw
    assert (raw["major"], raw["minor"]) == ("1", "36")
    # The Python client (what kopf and the agent use) sees the same server through orchardist.kube.
    with cluster.api_client() as api:
        info = client.VersionApi(api).get_code()
    assert info.git_version == raw["gitVersion"]


def test_crds_are_established(cluster: Cluster) -> None:
    names = [yaml.safe_load(f.read_text())["metadata"]["name"] for f in CRD_FILES]
    assert len(names) == 3
    for name in names:
        crd = json.loads(cluster.kubectl("get", "crd", name, "-o", "json").stdout)
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True", (name, conditions)
        assert conditions.get("NamesAccepted") == "True", (name, conditions)


def test_explain_shows_the_field_descriptions(cluster: Cluster) -> None:
    crd = yaml.safe_load((REPO / "crds" / "modeldeployments.orchardist.io.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    out = cluster.kubectl("explain", "modeldeployment.spec").stdout
    assert "orchardist.io" in out and "DESCRIPTION" in out
    assert " ".join(spec["description"].split())[:40] in " ".join(out.split())
    for field in ("model", "engine", "replicas", "kvCache", "placement"):
        assert field in out
        first_words = " ".join(spec["properties"][field]["description"].split()[:4])
        assert first_words in " ".join(out.split()), (field, first_words)


def _md(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"model": "oci://registry.example.com/models/qwen:v1", **spec},
    }


def _get(cluster: Cluster, kind: str, name: str, namespace: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)
    return obj


def test_status_subresource_separates_spec_and_status(cluster: Cluster, namespace: str) -> None:
    md = _md("split", namespace)
    md["status"] = {"phase": "Ready"}
    cluster.kubectl("create", "-f", "-", input=json.dumps(md))
    obj = _get(cluster, "md", "split", namespace)
    assert "status" not in obj or "phase" not in obj["status"], "status in a create body must be dropped"
    gen = obj["metadata"]["generation"]

    # A write to the main resource cannot set status...
    both = {"spec": {"replicas": 2}, "status": {"phase": "Ready"}}
    cluster.kubectl("patch", "md", "split", "-n", namespace, "--type=merge", "-p", json.dumps(both))
    obj = _get(cluster, "md", "split", namespace)
    assert obj["spec"]["replicas"] == 2
    assert obj.get("status", {}).get("phase") is None
    assert obj["metadata"]["generation"] == gen + 1

    # ...and a write to /status cannot change spec, nor bump the generation.
    sneaky = {"spec": {"replicas": 5}, "status": {"phase": "Ready"}}
    cluster.kubectl(
        "patch",
        "md",
        "split",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(sneaky),
    )
    obj = _get(cluster, "md", "split", namespace)
    assert obj["status"]["phase"] == "Ready"
    assert obj["spec"]["replicas"] == 2
    assert obj["metadata"]["generation"] == gen + 1

    # The scale subresource reads spec.replicas and writes it back.
    cluster.kubectl("scale", "md", "split", "-n", namespace, "--replicas=3")
    assert _get(cluster, "md", "split", namespace)["spec"]["replicas"] == 3


def test_deleting_a_deployment_garbage_collects_its_replicas(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "-f", "-", input=json.dumps(_md("owner", namespace)))
    owner = _get(cluster, "md", "owner", namespace)
    replica = {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "ModelReplica",
        "metadata": {
            "name": "owner-0",
            "namespace": namespace,
            "labels": {"orchardist.io/deployment": "owner", "orchardist.io/node": "mac-a"},
            "ownerReferences": [
                {
                    "apiVersion": "orchardist.io/v1alpha1",
                    "kind": "ModelDeployment",
                    "name": "owner",
                    "uid": owner["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "nodeName": "mac-a",
            "deployment": "owner",
            "model": f"oci://registry.example.com/models/qwen@{DIGEST}",
            "digest": DIGEST,
            "servedModelName": "owner",
            "memoryPlan": {
                "weightBytes": 1 << 30,
                "overheadBytes": 1 << 29,
                "kvBudgetBytes": 1 << 31,
                "kvBytesPerToken": 114688,
                "blockSize": 16,
                "numBlocks": 2048,
                "maxModelLen": 32768,
                "maxNumSeqs": 8,
                "maxNumBatchedTokens": 4096,
                "gpuMemoryUtilization": 0.92,
                "reservedBytes": 4 << 30,
            },
        },
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(replica))
    # Foreground: the owner is only gone once the garbage collector has deleted the replica.
    cluster.kubectl("delete", "md", "owner", "-n", namespace, "--cascade=foreground", "--wait=false")
    left: list[str] = []

    def collected() -> bool:
        left[:] = cluster.kubectl("get", "md,mr", "-n", namespace, "-o", "name").stdout.split()
        return not left

    wait_for(collected, timeout=60, interval=0.5, message=lambda: f"garbage-collected; left: {left}")


def test_dev_cluster_up_then_down_leaves_nothing(tmp_path: Path, cluster: Cluster) -> None:
    """Acceptance: `dev cluster up` prints a kubeconfig that works; `down` leaves no process behind."""
    state = tmp_path / "dev"
    env = dict(os.environ, ORCHARDIST_KUBEBINS=str(cluster.bin_dir))
    cli = [sys.executable, "-m", "orchardist", "dev", "cluster"]
    up = subprocess.run(
        [*cli, "up", "--state-dir", str(state)], capture_output=True, text=True, env=env, timeout=120
    )
    assert up.returncode == 0, up.stderr
    assert f"export KUBECONFIG={state.resolve() / 'kubeconfig'}" in up.stdout
    records = procs.load(state.resolve() / "pids")
    try:
        expected = {"etcd", "authz-webhook", "kube-apiserver", "kube-controller-manager"}
        assert {r.name for r in records} == expected
        assert all(procs.is_running(r) for r in records)
        shown = subprocess.run(
            [*cli, "env", "--state-dir", str(state)], capture_output=True, text=True, env=env
        )
        kubeconfig = shown.stdout.split("KUBECONFIG=", 1)[1].split()[0]
        kubectl = [str(cluster.bin("kubectl")), f"--kubeconfig={kubeconfig}"]
        subprocess.run(
            [*kubectl, "apply", "-f", str(REPO / "crds")], check=True, capture_output=True, timeout=60
        )
        crds = subprocess.run(
            [*kubectl, "get", "crd", "-o", "name"], check=True, capture_output=True, text=True
        )
        assert sorted(crds.stdout.split()) == sorted(
            f"customresourcedefinition.apiextensions.k8s.io/{f.stem}" for f in CRD_FILES
        )
    finally:
        down = subprocess.run(
            [*cli, "down", "--state-dir", str(state)], capture_output=True, text=True, env=env
        )
    assert down.returncode == 0, down.stderr
    assert not any(procs.is_running(r) for r in records)
    assert not state.exists()
