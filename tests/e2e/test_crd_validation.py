"""The CRDs' schema constraints and CEL rules, enforced by the real kube-apiserver.

Every row is one invalid object and a substring of the message the user should see. The messages
are the ones written next to the fields in operator/orchardist/api; the server must say them.
Every example manifest is accepted (server-side dry run).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchardist.dev.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
DIGEST = "sha256:" + "ab" * 32
DELETE = object()

MD: dict[str, Any] = {
    "apiVersion": "orchardist.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "bad"},
    "spec": {"model": "oci://registry.example.com:5000/models/qwen3-0.6b:q4"},
}
MN: dict[str, Any] = {
    "apiVersion": "orchardist.io/v1alpha1",
    "kind": "MacNode",
    "metadata": {"name": "bad-node"},
    "spec": {"taints": [{"key": "example.com/maintenance", "value": "os-update", "effect": "NoSchedule"}]},
}
MR: dict[str, Any] = {
    "apiVersion": "orchardist.io/v1alpha1",
    "kind": "ModelReplica",
    "metadata": {"name": "bad-replica"},
    "spec": {
        "nodeName": "mac-a",
        "deployment": "qwen",
        "model": f"oci://registry.example.com/models/qwen@{DIGEST}",
        "digest": DIGEST,
        "engine": "mlx-lm",
        "servedModelName": "qwen",
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


def variant(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with dotted paths set (or removed with DELETE)."""
    obj = copy.deepcopy(base)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = obj
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return obj


def md_args(*args: str) -> dict[str, Any]:
    return variant(MD, {"spec.engineArgs": list(args)})


def md_env(name: str) -> dict[str, Any]:
    return variant(MD, {"spec.env": [{"name": name, "value": "x"}]})


# (id, object, message substring the apiserver must return)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    # ---- ModelDeployment: schema ----
    ("md-model-required", variant(MD, {"spec.model": DELETE}), "spec.model: Required value"),
    ("md-engine-enum", variant(MD, {"spec.engine": "tgi"}), 'spec.engine: Unsupported value: "tgi"'),
    (
        "md-replicas-min",
        variant(MD, {"spec.replicas": -1}),
        "spec.replicas in body should be greater than or equal to 0",
    ),
    (
        "md-max-seqs-min",
        variant(MD, {"spec.maxConcurrentSequences": 0}),
        "spec.maxConcurrentSequences in body",
    ),
    ("md-block-size-enum", variant(MD, {"spec.kvCache.blockSize": 12}), 'supported values: "8", "16", "32"'),
    (
        "md-env-name-pattern",
        variant(MD, {"spec.env": [{"name": "1BAD", "value": "x"}]}),
        "spec.env[0].name in body should match",
    ),
    (
        "md-pull-secret-name-required",
        variant(MD, {"spec.pullSecretRef": {}}),
        "spec.pullSecretRef.name: Required value",
    ),
    (
        "md-spread-enum",
        variant(MD, {"spec.placement.spread": "Always"}),
        'spec.placement.spread: Unsupported value: "Always"',
    ),
    # ---- ModelDeployment: CEL ----
    (
        "md-model-scheme",
        variant(MD, {"spec.model": "https://registry.example.com/m:1"}),
        "spec.model must be an OCI reference starting with oci://",
    ),
    (
        "md-model-digest",
        variant(MD, {"spec.model": "oci://registry.example.com/m@sha256:abc"}),
        "must be written @sha256: followed by 64 lowercase hex digits",
    ),
    (
        "md-model-shape",
        variant(MD, {"spec.model": "oci://registry.example.com/Models/Q:1"}),
        "spec.model must be oci://host[:port]/repository[:tag]",
    ),
    (
        "md-context-length",
        variant(MD, {"spec.contextLength": 64}),
        "spec.contextLength must be between 128 and 2097152",
    ),
    (
        "md-gpu-util",
        variant(MD, {"spec.kvCache.gpuMemoryUtilization": 1.5}),
        "gpuMemoryUtilization must be between 0.1 and 0.99",
    ),
    ("md-args-model", md_args("--mod", "x"), "--mod sets --model, -m,"),
    ("md-args-port", md_args("--port=9000"), "--port=9000 sets --host, --port"),
    ("md-args-max-model-len", md_args("--max-model-len=4096"), "set spec.contextLength instead"),
    ("md-args-ctx-size", md_args("-c", "4096"), "set spec.contextLength instead"),
    (
        "md-args-gpu-util",
        md_args("--gpu-memory-utilization", "0.5"),
        "set spec.kvCache.gpuMemoryUtilization instead",
    ),
    ("md-args-block-size", md_args("--block-size=32"), "set spec.kvCache.blockSize instead"),
    ("md-args-max-num-seqs", md_args("--max-num-seqs", "4"), "set spec.maxConcurrentSequences instead"),
    (
        "md-args-batched",
        md_args("--max-num-batched-tokens=8192"),
        "sets --max-num-batched-tokens",
    ),
    ("md-args-served-name", md_args("--served-model-name", "x"), "served under the ModelDeployment's name"),
    ("md-args-api-key", md_args("--api-key=s3cret"), "set spec.apiKeySecretRef instead"),
    ("md-args-ngl", md_args("-ngl", "10"), "always offloads every layer to the GPU"),
    ("md-env-vllm-port", md_env("VLLM_PORT"), "the agent sets these for every engine process"),
    (
        "md-env-memory-fraction",
        md_env("VLLM_METAL_MEMORY_FRACTION"),
        "must not set VLLM_METAL_MEMORY_FRACTION",
    ),
    ("md-env-api-key", md_env("VLLM_API_KEY"), "must not set VLLM_API_KEY"),
    (
        "md-toleration-exists-value",
        variant(MD, {"spec.placement.tolerations": [{"operator": "Exists", "value": "x"}]}),
        "a toleration with operator Exists matches any value",
    ),
    (
        "md-toleration-equal-key",
        variant(MD, {"spec.placement.tolerations": [{"operator": "Equal", "value": "x"}]}),
        "a toleration with operator Equal needs a key",
    ),
    (
        "md-rollout-both-zero",
        variant(MD, {"spec.rollout": {"maxSurge": 0, "maxUnavailable": 0}}),
        "maxSurge and spec.rollout.maxUnavailable cannot both be 0",
    ),
    (
        "md-service-name",
        variant(MD, {"spec.service.name": "Bad_Name"}),
        "spec.service.name must be a DNS label",
    ),
    ("md-service-port", variant(MD, {"spec.service.port": 70000}), "spec.service.port must be a TCP port"),
    (
        "md-name-needs-service-name",
        variant(MD, {"metadata.name": "qwen.v1"}),
        "so metadata.name must be a DNS label",
    ),
    # ---- MacNode ----
    (
        "mn-taint-effect",
        variant(MN, {"spec.taints": [{"key": "k", "effect": "Sometimes"}]}),
        'spec.taints[0].effect: Unsupported value: "Sometimes"',
    ),
    (
        "mn-taint-key",
        variant(MN, {"spec.taints": [{"key": "bad key!", "effect": "NoSchedule"}]}),
        "a taint key must be a qualified name",
    ),
    (
        "mn-taint-value",
        variant(MN, {"spec.taints": [{"key": "k", "value": "-bad-", "effect": "NoSchedule"}]}),
        "a taint value must be at most 63 letters",
    ),
    # ---- ModelReplica ----
    ("mr-node-required", variant(MR, {"spec.nodeName": DELETE}), "spec.nodeName: Required value"),
    ("mr-node-pattern", variant(MR, {"spec.nodeName": "Mac_A"}), "spec.nodeName in body should match"),
    (
        "mr-digest-shape",
        variant(MR, {"spec.digest": "sha256:xyz"}),
        "spec.digest must be sha256: followed by 64",
    ),
    (
        "mr-model-pinned",
        variant(MR, {"spec.model": "oci://registry.example.com/models/qwen:v1"}),
        "spec.model of a ModelReplica must be pinned by digest",
    ),
    (
        "mr-digest-matches-model",
        variant(MR, {"spec.digest": "sha256:" + "cd" * 32}),
        "spec.digest must equal the digest at the end of spec.model",
    ),
    (
        "mr-plan-required",
        variant(MR, {"spec.memoryPlan.numBlocks": DELETE}),
        "spec.memoryPlan.numBlocks: Required value",
    ),
    (
        "mr-plan-kv-budget",
        variant(MR, {"spec.memoryPlan.kvBudgetBytes": 0}),
        "memoryPlan.kvBudgetBytes must be greater than 0",
    ),
    (
        "mr-plan-blocks-hold-a-sequence",
        variant(MR, {"spec.memoryPlan.numBlocks": 10}),
        "must hold at least one sequence of memoryPlan.maxModelLen tokens",
    ),
    (
        "mr-plan-batched-tokens",
        variant(MR, {"spec.memoryPlan.maxNumBatchedTokens": 4}),
        "maxNumBatchedTokens must be at least memoryPlan.maxNumSeqs",
    ),
    ("mr-args", variant(MR, {"spec.engineArgs": ["--host=0.0.0.0"]}), "--host=0.0.0.0 sets --host, --port"),
]


def _refusal(cluster: Cluster, obj: dict[str, Any], namespace: str) -> str:
    if obj["kind"] != "MacNode":
        obj = variant(obj, {"metadata.namespace": namespace})
    out = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(obj), check=False)
    assert out.returncode != 0, f"the apiserver accepted an invalid object: {out.stdout}"
    return out.stderr


@pytest.mark.cluster
@pytest.mark.parametrize(("obj", "message"), [(o, m) for _, o, m in INVALID], ids=[i for i, _, _ in INVALID])
def test_invalid_object_is_refused_with_its_message(
    cluster: Cluster, namespace: str, obj: dict[str, Any], message: str
) -> None:
    err = _refusal(cluster, obj, namespace)
    assert message in err, err


@pytest.mark.cluster
@pytest.mark.parametrize("base", [MD, MN, MR], ids=["ModelDeployment", "MacNode", "ModelReplica"])
def test_table_bases_are_valid(cluster: Cluster, namespace: str, base: dict[str, Any]) -> None:
    """Each refusal above is caused by its change alone: the unchanged base is accepted."""
    obj = base if base["kind"] == "MacNode" else variant(base, {"metadata.namespace": namespace})
    cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(obj))


@pytest.mark.cluster
def test_macnode_status_memory_rule(cluster: Cluster) -> None:
    """A status rule: the GPU working set cannot exceed physical memory (checked on /status writes)."""
    node = variant(MN, {"metadata.name": "status-rule-node"})
    cluster.kubectl("apply", "-f", "-", input=json.dumps(node))
    try:
        patch = {"status": {"memory": {"totalBytes": 16 << 30, "gpuWorkingSetBytes": 32 << 30}}}
        out = cluster.kubectl(
            "patch", "macnode", "status-rule-node", "--subresource=status", "--type=merge",
            "-p", json.dumps(patch), check=False,
        )  # fmt: skip
        assert out.returncode != 0
        assert "gpuWorkingSetBytes cannot be larger than status.memory.totalBytes" in out.stderr
        ok = {"status": {"memory": {"totalBytes": 32 << 30, "gpuWorkingSetBytes": 24 << 30}}}
        cluster.kubectl(
            "patch",
            "macnode",
            "status-rule-node",
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps(ok),
        )
    finally:
        cluster.kubectl("delete", "macnode", "status-rule-node", "--ignore-not-found")


@pytest.mark.cluster
def test_replica_node_name_is_immutable(cluster: Cluster, namespace: str) -> None:
    """A transition rule (oldSelf): a replica stays on the Mac it was bound to."""
    cluster.kubectl("create", "-f", "-", input=json.dumps(variant(MR, {"metadata.namespace": namespace})))
    out = cluster.kubectl(
        "patch", "modelreplica", "bad-replica", "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"nodeName": "mac-b"}}), check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert "spec.nodeName is immutable" in out.stderr
    # An unrelated spec change is still allowed.
    cluster.kubectl(
        "patch", "modelreplica", "bad-replica", "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"engineVersion": "0.2.1"}}),
    )  # fmt: skip


def test_table_covers_enough_rules() -> None:
    ids = [i for i, _, _ in INVALID]
    assert len(ids) >= 15
    assert len(set(ids)) == len(ids)


# ---- every example is accepted -------------------------------------------------------------------
#: Example documents for tools that are not installed on a bare control plane (Argo CD, Flux).
#: They are checked for shape only; everything else must pass a server-side dry run.
FOREIGN_GROUPS = {"argoproj.io", "kustomize.toolkit.fluxcd.io", "source.toolkit.fluxcd.io"}
EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))


@pytest.mark.cluster
@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(REPO / "examples")) for p in EXAMPLES])
def test_example_is_accepted(cluster: Cluster, namespace: str, path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} holds no objects"
    checked = 0
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), doc
        if doc["apiVersion"].split("/")[0] in FOREIGN_GROUPS:
            continue
        if doc["kind"] != "MacNode":
            doc["metadata"]["namespace"] = namespace  # examples name namespaces that may not exist here
        out = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(doc), check=False)
        assert out.returncode == 0, f"{path}: {doc['kind']} {doc['metadata']['name']} refused:\n{out.stderr}"
        checked += 1
    foreign = [d for d in docs if d["apiVersion"].split("/")[0] in FOREIGN_GROUPS]
    assert checked + len(foreign) == len(docs)
    if not foreign:
        assert checked > 0
