"""The CEL rules of the generated CRDs, evaluated offline with cel-python on accept/refuse samples.

The real API server is the final judge (the e2e tier applies objects to it); these tables pin each
rule's meaning and keep its message stable, fast and without a cluster.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import cache
from typing import Any

import celpy
import pytest
from celpy import celtypes
from celpy.adapter import json_to_cel

from orchardist.api.crds import all_crds

DIGEST = "sha256:" + "ab" * 32
PINNED = f"oci://registry.example.com/models/qwen3@{DIGEST}"
PLAN = {
    "weightBytes": 1,
    "overheadBytes": 1,
    "kvBudgetBytes": 1 << 30,
    "kvBytesPerToken": 1024,
    "blockSize": 16,
    "numBlocks": 256,
    "maxModelLen": 4096,
    "maxNumSeqs": 8,
    "maxNumBatchedTokens": 2048,
    "gpuMemoryUtilization": 0.9,
    "reservedBytes": 1,
}


def _split(text: Any, sep: Any) -> Any:
    return celtypes.ListType([celtypes.StringType(p) for p in str(text).split(str(sep))])


def _replace(text: Any, old: Any, new: Any) -> Any:
    return celtypes.StringType(str(text).replace(str(old), str(new)))


# The two functions of the Kubernetes CEL strings library the launch rules use (cel-python lacks them).
K8S_STRINGS = {"split": _split, "replace": _replace}


@cache
def _program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule), functions=K8S_STRINGS)


def evaluate(rule: str, self_value: Any, old_value: Any = None) -> bool:
    """The rule's verdict on `self_value` (and `oldSelf` for transition rules)."""
    activation = {"self": json_to_cel(self_value)}
    if old_value is not None:
        activation["oldSelf"] = json_to_cel(old_value)
    result = _program(rule).evaluate(activation)
    if isinstance(result, Exception):
        raise result
    return bool(result)


def schemas() -> dict[str, dict[str, Any]]:
    return {
        c["spec"]["names"]["kind"]: c["spec"]["versions"][0]["schema"]["openAPIV3Schema"] for c in all_crds()
    }


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (items as [], map values as {})."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def all_rules() -> list[tuple[str, str, dict[str, str]]]:
    """(kind, path, rule) for every x-kubernetes-validations entry."""
    return [
        (kind, path, rule)
        for kind, schema in schemas().items()
        for path, node in walk(schema)
        for rule in node.get("x-kubernetes-validations", [])
    ]


def with_defaults(schema: dict[str, Any], value: Any) -> Any:
    """`value` with the schema's defaults filled in, as the API server does before validating."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, sub in schema["properties"].items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = with_defaults(sub, out[name])
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [with_defaults(schema["items"], v) for v in value]
    return value


def failures(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Messages of every rule `value` breaks (transition rules are skipped: there is no old object)."""
    out = []
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" not in rule["rule"] and not evaluate(rule["rule"], value):
            out.append(f"{path or '<root>'}: {rule['message']}")
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                out += failures(sub, value[name], f"{path}.{name}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += failures(schema["items"], item, f"{path}[{i}]")
    return out


def rule_at(kind: str, path: str, fragment: str) -> str:
    found = [r["rule"] for k, p, r in all_rules() if k == kind and p == path and fragment in r["message"]]
    assert len(found) == 1, f"expected one rule at {kind}{path} with {fragment!r}, found {len(found)}"
    return found[0]


HOST_PORT = "--host, --port, --uds or --grpc-port"

CASES = [
    # (kind, path, message fragment, self, accepted)
    ("ModelDeployment", ".spec.aliases[]", "each of spec.aliases", "qwen3-0.6b", True),
    ("ModelDeployment", ".spec.aliases[]", "each of spec.aliases", "team/qwen3", False),
    ("ModelDeployment", ".spec.aliases[]", "each of spec.aliases", "Qwen3", False),
    ("ModelDeployment", ".spec.aliases", "same alias twice", ["a", "b"], True),
    ("ModelDeployment", ".spec.aliases", "same alias twice", ["a", "b", "a"], False),
    ("ModelDeployment", ".spec.scaling", "minReplicas must not", {"minReplicas": 0, "maxReplicas": 1}, True),
    ("ModelDeployment", ".spec.scaling", "minReplicas must not", {"maxReplicas": 1}, True),
    ("ModelDeployment", ".spec.scaling", "minReplicas must not", {"minReplicas": 3, "maxReplicas": 2}, False),
    ("ModelDeployment", ".spec.model", "starting with oci://", "oci://r.example.com/m:1", True),
    ("ModelDeployment", ".spec.model", "starting with oci://", "https://r.example.com/m:1", False),
    ("ModelDeployment", ".spec.model", "the digest in spec.model", PINNED, True),
    ("ModelDeployment", ".spec.model", "the digest in spec.model", "oci://r.example.com/m@sha256:abc", False),
    ("ModelDeployment", ".spec.model", "the digest in spec.model", "oci://r/m@sha256:" + "AB" * 32, False),
    ("ModelDeployment", ".spec.model", "the digest in spec.model", "oci://r.example.com/m:tag", True),
    (
        "ModelDeployment",
        ".spec.model",
        "lowercase repository path",
        "oci://localhost:5000/a/b-c_d.e:v1.0",
        True,
    ),
    (
        "ModelDeployment",
        ".spec.model",
        "lowercase repository path",
        "oci://127.0.0.1:5001/orchardist/tiny",
        True,
    ),
    ("ModelDeployment", ".spec.model", "lowercase repository path", "oci://r.example.com/Models/x", False),
    ("ModelDeployment", ".spec.model", "lowercase repository path", "oci://r.example.com", False),
    ("ModelDeployment", ".spec.model", "lowercase repository path", "oci://r.example.com/m:bad tag", False),
    (
        "ModelDeployment",
        ".spec.model",
        "lowercase repository path",
        "oci://r/m@sha256:abc",
        True,
    ),  # digest rule's job
    ("ModelDeployment", ".spec.model", "lowercase repository path", "http://x", True),  # scheme rule's job
    ("ModelDeployment", ".spec.contextLength", "between 128", 128, True),
    ("ModelDeployment", ".spec.contextLength", "between 128", 2_097_153, False),
    ("ModelDeployment", ".spec.kvCache.gpuMemoryUtilization", "between 0.1 and 0.99", 0.92, True),
    ("ModelDeployment", ".spec.kvCache.gpuMemoryUtilization", "between 0.1 and 0.99", 1.0, False),
    ("ModelDeployment", ".spec.kvCache.gpuMemoryUtilization", "between 0.1 and 0.99", 0.05, False),
    (
        "ModelDeployment",
        ".spec.engineArgs",
        HOST_PORT,
        ["--enable-prefix-caching", "--seed", "7"],
        True,
    ),
    ("ModelDeployment", ".spec.engineArgs", HOST_PORT, ["--port", "9000"], False),
    ("ModelDeployment", ".spec.engineArgs", HOST_PORT, ["--host=0.0.0.0"], False),
    ("ModelDeployment", ".spec.engineArgs", HOST_PORT, ["--hostname"], True),
    ("ModelDeployment", ".spec.engineArgs", HOST_PORT, ["--ho", "0.0.0.0"], False),
    ("ModelDeployment", ".spec.engineArgs", HOST_PORT, ["--po=1"], False),
    ("ModelDeployment", ".spec.engineArgs", HOST_PORT, ["--uds", "/tmp/s"], False),
    ("ModelDeployment", ".spec.engineArgs", "--ctx-size (exactly", ["--max_model_len=4096"], False),
    ("ModelDeployment", ".spec.engineArgs", "--ctx-size (exactly", ["--max-model", "9"], False),
    ("ModelDeployment", ".spec.engineArgs", "--ctx-size (exactly", ["--max_mod=9"], False),
    ("ModelDeployment", ".spec.engineArgs", "--ctx-size (exactly", ["-c", "4096"], False),
    ("ModelDeployment", ".spec.engineArgs", "--ctx-size (exactly", ["--ctx-size=8192"], False),
    ("ModelDeployment", ".spec.engineArgs", "--ctx-size (exactly", ["-cb", "--max-logprobs", "5"], True),
    (
        "ModelDeployment",
        ".spec.engineArgs",
        "--gpu-memory-utilization (exactly",
        ["--gpu-memory-utilization=0.5"],
        False,
    ),
    ("ModelDeployment", ".spec.engineArgs", "--gpu-memory-utilization (exactly", ["--gpu-mem", "0.5"], False),
    ("ModelDeployment", ".spec.engineArgs", "cache and offload", ["--kv-cache-memory-bytes=1"], False),
    ("ModelDeployment", ".spec.engineArgs", "cache and offload", ["--cpu-offload", "8"], False),
    ("ModelDeployment", ".spec.engineArgs", "cache and offload", ["--swap-space", "8"], False),
    ("ModelDeployment", ".spec.engineArgs", "cache and offload", ["--prompt-cache-size", "9"], False),
    ("ModelDeployment", ".spec.engineArgs", "weight and KV cache types", ["--kv-cache-dtype=fp8"], False),
    ("ModelDeployment", ".spec.engineArgs", "weight and KV cache types", ["-q", "awq"], False),
    ("ModelDeployment", ".spec.engineArgs", "blockSize instead", ["--block-size", "32"], False),
    ("ModelDeployment", ".spec.engineArgs", "blockSize instead", ["--block", "32"], False),
    ("ModelDeployment", ".spec.engineArgs", "--parallel, --decode", ["-np", "4"], False),
    ("ModelDeployment", ".spec.engineArgs", "--parallel, --decode", ["--max-num-seqs=4"], False),
    ("ModelDeployment", ".spec.engineArgs", "--parallel, --decode", ["--decode-conc", "4"], False),
    ("ModelDeployment", ".spec.engineArgs", "memory planner", ["--max-num-batched-tokens", "1"], False),
    ("ModelDeployment", ".spec.engineArgs", "memory planner", ["-ub", "1"], False),
    ("ModelDeployment", ".spec.engineArgs", "set spec.model instead", ["-m", "x.gguf"], False),
    ("ModelDeployment", ".spec.engineArgs", "set spec.model instead", ["--mod", "other"], False),
    ("ModelDeployment", ".spec.engineArgs", "set spec.model instead", ["-hf", "u/m"], False),
    ("ModelDeployment", ".spec.engineArgs", "not from a file", ["--config", "x.yaml"], False),
    ("ModelDeployment", ".spec.engineArgs", "served under", ["--served-model-name=x"], False),
    ("ModelDeployment", ".spec.engineArgs", "served under", ["--served", "x"], False),
    ("ModelDeployment", ".spec.engineArgs", "apiKeySecretRef instead", ["--api-key=secret"], False),
    ("ModelDeployment", ".spec.engineArgs", "apiKeySecretRef instead", ["--api-k", "secret"], False),
    ("ModelDeployment", ".spec.engineArgs", "apiKeySecretRef instead", ["--api-key-file", "/k"], False),
    ("ModelDeployment", ".spec.engineArgs", "every layer to the GPU", ["-ngl", "99"], False),
    ("ModelDeployment", ".spec.engineArgs", "it ends the options", ["--seed", "1", "--"], False),
    ("ModelDeployment", ".spec.engineArgs", "it ends the options", ["-", "--seed"], True),
    (
        "ModelDeployment",
        ".spec.env",
        "the agent sets these",
        [{"name": "VLLM_LOGGING_LEVEL", "value": "INFO"}],
        True,
    ),
    (
        "ModelDeployment",
        ".spec.env",
        "the agent sets these",
        [{"name": "HF_HUB_OFFLINE", "value": "0"}],
        False,
    ),
    ("ModelDeployment", ".spec.env", "the agent sets these", [{"name": "VLLM_PORT", "value": "1"}], False),
    (
        "ModelDeployment",
        ".spec.env",
        "VLLM_METAL_MEMORY_FRACTION",
        [{"name": "VLLM_METAL_MEMORY_FRACTION"}],
        False,
    ),
    ("ModelDeployment", ".spec.env", "not set VLLM_API_KEY", [{"name": "VLLM_API_KEY", "value": "k"}], False),
    ("ModelDeployment", ".spec.env", "LLAMA_ARG_*", [{"name": "LLAMA_ARG_PORT", "value": "1"}], False),
    ("ModelDeployment", ".spec.env", "LLAMA_ARG_*", [{"name": "LLAMA_LOG_COLORS", "value": "1"}], True),
    ("ModelDeployment", ".spec.rollout", "cannot both be 0", {"maxSurge": 0, "maxUnavailable": 1}, True),
    ("ModelDeployment", ".spec.rollout", "cannot both be 0", {"maxSurge": 0, "maxUnavailable": 0}, False),
    ("ModelDeployment", ".spec.rollout", "cannot both be 0", {"maxSurge": 0}, False),
    ("ModelDeployment", ".spec.service.port", "between 1 and 65535", 65535, True),
    ("ModelDeployment", ".spec.service.port", "between 1 and 65535", 0, False),
    ("ModelDeployment", ".spec.service.name", "DNS label", "qwen-api", True),
    ("ModelDeployment", ".spec.service.name", "DNS label", "Qwen_API", False),
    (
        "ModelDeployment",
        ".spec.placement.tolerations[]",
        "Exists matches any value",
        {"operator": "Exists"},
        True,
    ),
    (
        "ModelDeployment",
        ".spec.placement.tolerations[]",
        "Exists matches any value",
        {"operator": "Exists", "value": "x"},
        False,
    ),
    (
        "ModelDeployment",
        ".spec.placement.tolerations[]",
        "Equal needs a key",
        {"operator": "Equal", "key": ""},
        False,
    ),
    (
        "ModelDeployment",
        ".spec.placement.tolerations[]",
        "Equal needs a key",
        {"operator": "Equal", "key": "a"},
        True,
    ),
    (
        "ModelDeployment",
        "",
        "named after the ModelDeployment",
        {"metadata": {"name": "qwen3"}, "spec": {"service": {}}},
        True,
    ),
    (
        "ModelDeployment",
        "",
        "named after the ModelDeployment",
        {"metadata": {"name": "qwen3.5"}, "spec": {"service": {}}},
        False,
    ),
    (
        "ModelDeployment",
        "",
        "named after the ModelDeployment",
        {"metadata": {"name": "qwen3.5"}, "spec": {"service": {"name": "qwen"}}},
        True,
    ),
    ("MacNode", ".spec.taints[].key", "qualified name", "example.com/maintenance", True),
    ("MacNode", ".spec.taints[].key", "qualified name", "dedicated", True),
    ("MacNode", ".spec.taints[].key", "qualified name", "-bad", False),
    ("MacNode", ".spec.taints[].key", "qualified name", "a/b/c", False),
    ("MacNode", ".spec.taints[].value", "taint value", "", True),
    ("MacNode", ".spec.taints[].value", "taint value", "a b", False),
    ("MacNode", ".status.memory", "cannot be larger", {"totalBytes": 10, "gpuWorkingSetBytes": 8}, True),
    ("MacNode", ".status.memory", "cannot be larger", {"totalBytes": 10, "gpuWorkingSetBytes": 11}, False),
    ("MacNode", ".status.memory", "cannot be larger", {"gpuWorkingSetBytes": 11}, True),
    ("ModelReplica", ".spec", "must equal the digest", {"model": PINNED, "digest": DIGEST}, True),
    (
        "ModelReplica",
        ".spec",
        "must equal the digest",
        {"model": PINNED, "digest": "sha256:" + "cd" * 32},
        False,
    ),
    ("ModelReplica", ".spec.model", "pinned by digest", PINNED, True),
    (
        "ModelReplica",
        ".spec.model",
        "pinned by digest",
        "oci://registry.example.com/models/qwen3:latest",
        False,
    ),
    ("ModelReplica", ".spec.digest", "64 lowercase hex", DIGEST, True),
    ("ModelReplica", ".spec.digest", "64 lowercase hex", "sha256:abc", False),
    ("ModelReplica", ".spec.memoryPlan.kvBudgetBytes", "greater than 0", 1, True),
    ("ModelReplica", ".spec.memoryPlan.kvBudgetBytes", "greater than 0", 0, False),
    ("ModelReplica", ".spec.memoryPlan.maxModelLen", "at least 1 token", 0, False),
    ("ModelReplica", ".spec.memoryPlan", "hold at least one sequence", PLAN, True),
    ("ModelReplica", ".spec.memoryPlan", "hold at least one sequence", {**PLAN, "numBlocks": 255}, False),
    (
        "ModelReplica",
        ".spec.memoryPlan",
        "at least memoryPlan.maxNumSeqs",
        {**PLAN, "maxNumBatchedTokens": 7},
        False,
    ),
    ("ModelReplica", ".spec.memoryPlan.gpuMemoryUtilization", "above 0 and at most 0.99", 0.995, False),
    ("ModelReplica", ".spec.memoryPlan.gpuMemoryUtilization", "above 0 and at most 0.99", 0.0, False),
    ("ModelReplica", ".spec.memoryPlan.gpuMemoryUtilization", "above 0 and at most 0.99", 0.03, True),
]


@pytest.mark.parametrize(("kind", "path", "fragment", "value", "accepted"), CASES)
def test_rule_verdict(kind: str, path: str, fragment: str, value: Any, accepted: bool) -> None:
    """Each rule accepts what the API allows and refuses what it must not."""
    assert evaluate(rule_at(kind, path, fragment), value) is accepted


@pytest.mark.parametrize(
    ("old", "new", "accepted"),
    [("mac-mini-01", "mac-mini-01", True), ("mac-mini-01", "mac-studio-02", False)],
)
def test_node_name_is_immutable(old: str, new: str, accepted: bool) -> None:
    """A transition rule keeps a replica on the Mac it was bound to."""
    assert evaluate(rule_at("ModelReplica", ".spec.nodeName", "immutable"), new, old) is accepted


def test_every_rule_compiles_and_is_exercised() -> None:
    """Every rule compiles in CEL and some table row exercises its text (a new rule needs rows)."""
    exercised = {(k, p, f) for k, p, f, _, _ in CASES} | {("ModelReplica", ".spec.nodeName", "immutable")}
    covered = {rule_at(k, p, f) for k, p, f in exercised}
    for kind, path, rule in all_rules():
        _program(rule["rule"])
        assert rule["rule"] in covered, f"no table row exercises {kind}{path}: {rule['message']}"


def test_defaults_make_an_empty_rollout_valid() -> None:
    """The schema's defaults (maxSurge 1) make `rollout: {}` pass the both-zero rule."""
    md = schemas()["ModelDeployment"]
    spec = with_defaults(md["properties"]["spec"], {"model": "oci://r.example.com/m:1"})
    assert spec["rollout"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert failures(md["properties"]["spec"], spec, ".spec") == []
