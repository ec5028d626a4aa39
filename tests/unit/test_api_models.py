"""The API types: defaults, JSON round trips by alias, and refusals with the CRD's own messages."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from orchardist.api import (
    AGENT_OWNED_ENV,
    API_VERSION,
    OPERATOR_OWNED_FLAGS,
    ApiModel,
    MacNode,
    ModelDeployment,
    ModelReplica,
    owned_flag,
)

DIGEST = "sha256:" + "ab" * 32
PINNED = f"oci://registry.example.com/models/qwen3@{DIGEST}"
PLAN: dict[str, Any] = {
    "weightBytes": 1 << 30,
    "overheadBytes": 1 << 30,
    "kvBudgetBytes": 1 << 32,
    "kvBytesPerToken": 114688,
    "blockSize": 16,
    "numBlocks": 2048,
    "maxModelLen": 32768,
    "maxNumSeqs": 8,
    "maxNumBatchedTokens": 4096,
    "gpuMemoryUtilization": 0.92,
    "reservedBytes": 6 << 30,
}


def md(spec: dict[str, Any] | None = None, name: str = "qwen3") -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"model": "oci://registry.example.com/models/qwen3:latest", **(spec or {})},
    }


def mr(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    base = {
        "nodeName": "mac-mini-01",
        "deployment": "qwen3",
        "model": PINNED,
        "digest": DIGEST,
        "servedModelName": "qwen3",
        "memoryPlan": PLAN,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelReplica",
        "metadata": {"name": "r"},
        "spec": {**base, **(spec or {})},
    }


def mn(spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "kind": "MacNode",
        "metadata": {"name": "mac-mini-01"},
        "spec": spec or {},
        "status": status or {},
    }


def attr(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize(
    ("model", "body", "path", "expected"),
    [
        (ModelDeployment, md(), "spec.engine", "vllm-metal"),
        (ModelDeployment, md(), "spec.replicas", 1),
        (ModelDeployment, md(), "spec.context_length", None),
        (ModelDeployment, md(), "spec.max_concurrent_sequences", None),
        (ModelDeployment, md(), "spec.kv_cache.gpu_memory_utilization", 0.92),
        (ModelDeployment, md(), "spec.kv_cache.block_size", 16),
        (ModelDeployment, md(), "spec.engine_args", []),
        (ModelDeployment, md(), "spec.env", []),
        (ModelDeployment, md(), "spec.placement.spread", "Preferred"),
        (ModelDeployment, md(), "spec.placement.prefer_cached_nodes", True),
        (ModelDeployment, md(), "spec.placement.node_selector", {}),
        (ModelDeployment, md(), "spec.service.name", None),
        (ModelDeployment, md(), "spec.service.port", 8000),
        (ModelDeployment, md(), "spec.rollout.max_surge", 1),
        (ModelDeployment, md(), "spec.rollout.max_unavailable", 0),
        (ModelDeployment, md(), "status.conditions", []),
        (ModelDeployment, md(), "status.phase", None),
        (ModelDeployment, md(), "spec.aliases", []),
        (ModelDeployment, md(), "spec.scaling", None),
        (ModelDeployment, md(), "status.autoscaling", None),
        (ModelDeployment, md({"scaling": {"maxReplicas": 2}}), "spec.scaling.min_replicas", 1),
        (ModelDeployment, md({"scaling": {"maxReplicas": 2}}), "spec.scaling.target_in_flight", 4),
        (
            ModelDeployment,
            md({"scaling": {"maxReplicas": 2}}),
            "spec.scaling.scale_up_stabilization_seconds",
            0,
        ),
        (
            ModelDeployment,
            md({"scaling": {"maxReplicas": 2}}),
            "spec.scaling.scale_down_stabilization_seconds",
            300,
        ),
        (ModelDeployment, md({"apiKeySecretRef": {"name": "k"}}), "spec.api_key_secret_ref.key", "api-key"),
        (
            ModelDeployment,
            md({"placement": {"tolerations": [{"key": "a"}]}}),
            "spec.placement.tolerations.0.operator",
            "Equal",
        ),
        (MacNode, mn(), "spec.unschedulable", False),
        (MacNode, mn(), "spec.taints", []),
        (MacNode, mn(), "status.memory", None),
        (MacNode, mn(), "api_version", API_VERSION),
        (ModelReplica, mr(), "spec.engine", "vllm-metal"),
        (ModelReplica, mr(), "spec.memory_plan.block_size", 16),
        (ModelReplica, mr(), "status.phase", None),
        (ModelReplica, mr(), "status.restarts", None),
    ],
)
def test_defaults(model: type[ApiModel], body: dict[str, Any], path: str, expected: Any) -> None:
    """Fields left out take the defaults the CRD also applies."""
    obj = model.model_validate(body)
    if ".0." in path:
        head, _, tail = path.partition(".0.")
        assert attr(attr(obj, head)[0], tail) == expected
    else:
        assert attr(obj, path) == expected


FULL_MD = md(
    {
        "pullSecretRef": {"name": "regcred"},
        "engine": "mlx-lm",
        "engineVersion": "0.28.0",
        "replicas": 3,
        "contextLength": 32768,
        "maxConcurrentSequences": 4,
        "kvCache": {"gpuMemoryUtilization": 0.8, "blockSize": 32},
        "engineArgs": ["--enable-prefix-caching", "--seed", "7"],
        "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}],
        "apiKeySecretRef": {"name": "qwen-key", "key": "token"},
        "placement": {
            "nodeSelector": {"orchardist.io/rack": "studio"},
            "spread": "Required",
            "preferCachedNodes": False,
            "tolerations": [{"key": "example.com/maintenance", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "service": {"name": "qwen-api", "port": 8080},
        "rollout": {"maxSurge": 0, "maxUnavailable": 1},
    }
)
FULL_MD["status"] = {
    "observedGeneration": 2,
    "conditions": [
        {
            "type": "Ready",
            "status": "True",
            "reason": "Ready",
            "message": "3/3 replicas ready",
            "lastTransitionTime": "2026-11-26T09:00:00Z",
            "observedGeneration": 2,
        }
    ],
    "phase": "Ready",
    "resolvedDigest": DIGEST,
    "resolvedModel": PINNED,
    "modelProfile": {
        "format": "safetensors",
        "weightBytes": 1 << 30,
        "kvBytesPerToken": 114688,
        "maxContext": 40960,
    },
    "replicas": 3,
    "readyReplicas": 3,
    "updatedReplicas": 3,
    "ready": "3/3",
    "selector": "orchardist.io/deployment=qwen3",
    "replicaStatuses": [
        {"name": "qwen3-a", "nodeName": "mac-mini-01", "phase": "Pulling", "progress": {"percent": "42%"}}
    ],
    "endpoint": "qwen-api.default.svc:8080",
}
FULL_MR = mr(
    {"engineArgs": ["--seed", "7"], "env": [{"name": "A", "value": "b"}], "pullSecretRef": {"name": "r"}}
)
FULL_MR["status"] = {
    "observedGeneration": 1,
    "phase": "Failed",
    "progress": {"bytesDone": 10, "bytesTotal": 20, "bytesPerSecond": 5, "etaSeconds": 2, "percent": "50%"},
    "endpoint": "192.168.1.21:41000",
    "restarts": 4,
    "lastError": {"reason": "CrashLoop", "message": "exit 1"},
    "startTime": "2026-11-26T09:00:00Z",
    "measured": {"overheadBytes": 123, "numBlocks": 2000},
}
FULL_MN = mn(
    {"unschedulable": True, "taints": [{"key": "dedicated", "value": "team-a", "effect": "NoExecute"}]},
    {
        "chip": {"name": "Apple M4 Pro", "family": "M4 Pro", "modelIdentifier": "Mac16,11"},
        "cpu": {"performanceCores": 10, "efficiencyCores": 4},
        "gpuCores": 20,
        "memory": {
            "totalBytes": 64 << 30,
            "gpuWorkingSetBytes": 48 << 30,
            "gpuWorkingSetSource": "mlx",
            "total": "64Gi",
            "gpuWorkingSet": "48Gi",
        },
        "engines": [{"name": "vllm-metal", "version": "0.2.0"}],
        "cachedModels": [{"digest": DIGEST, "sizeBytes": 1 << 30}],
        "simulatedProfile": "m4-pro-64",
    },
)


@pytest.mark.parametrize(
    ("model", "body"), [(ModelDeployment, FULL_MD), (ModelReplica, FULL_MR), (MacNode, FULL_MN)]
)
def test_json_round_trip_by_alias(model: type[ApiModel], body: dict[str, Any]) -> None:
    """Parsing camelCase JSON and dumping it again gives the same JSON (nothing lost or renamed)."""
    obj = model.model_validate(body)
    dumped = obj.to_json()
    expected = {"apiVersion": API_VERSION, **body}
    # Defaults the API server would also have filled in are the only additions.
    assert {k: dumped[k] for k in ("apiVersion", "kind", "metadata")} == {
        k: expected[k] for k in ("apiVersion", "kind", "metadata")
    }
    assert model.model_validate(dumped) == obj
    assert _subset(body["spec"], dumped["spec"])
    assert _subset(body.get("status", {}), dumped["status"])


def _subset(small: Any, big: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _subset(v, big[k]) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(small) == len(big) and all(map(_subset, small, big))
    return bool(small == big)


def test_snake_case_names_populate_too() -> None:
    """Python code builds objects with snake_case names; JSON still comes out camelCase."""
    obj = ModelDeployment.model_validate(
        md({"kv_cache": {"gpu_memory_utilization": 0.5}, "context_length": 4096})
    )
    assert obj.to_json()["spec"]["kvCache"]["gpuMemoryUtilization"] == 0.5
    assert obj.to_json()["spec"]["contextLength"] == 4096


def test_unknown_fields_are_ignored() -> None:
    """A newer CRD's fields must not crash an older reader."""
    obj = ModelDeployment.model_validate(md({"someFutureField": {"x": 1}}))
    assert "someFutureField" not in obj.to_json()["spec"]


@pytest.mark.parametrize(
    ("model", "body", "message"),
    [
        (ModelDeployment, md({"model": "https://registry.example.com/m:1"}), "starting with oci://"),
        (ModelDeployment, md({"model": "oci://r.example.com/m@sha256:abc"}), "64 lowercase hex digits"),
        (ModelDeployment, md({"model": "oci://r.example.com/Big/m"}), "lowercase repository path"),
        (ModelDeployment, md({"contextLength": 64}), "greater than or equal to 128"),
        (ModelDeployment, md({"kvCache": {"gpuMemoryUtilization": 1.2}}), "less than or equal to 0.99"),
        (ModelDeployment, md({"kvCache": {"blockSize": 12}}), "8, 16 or 32"),
        (ModelDeployment, md({"engine": "ollama"}), "'vllm-metal', 'mlx-lm', 'llama.cpp' or 'vllm'"),
        (ModelDeployment, md({"replicas": -1}), "greater than or equal to 0"),
        (ModelDeployment, md({"engineArgs": ["--port=9000"]}), "must not set --host, --port"),
        (ModelDeployment, md({"engineArgs": ["--max_model_len", "1"]}), "set spec.contextLength instead"),
        (
            ModelDeployment,
            md({"engineArgs": ["--gpu-memory-utilization", "1"]}),
            "kvCache.gpuMemoryUtilization",
        ),
        (ModelDeployment, md({"engineArgs": ["-np", "4"]}), "set spec.maxConcurrentSequences instead"),
        (ModelDeployment, md({"engineArgs": ["-ngl", "99"]}), "every layer to the GPU"),
        (
            ModelDeployment,
            md({"env": [{"name": "VLLM_HOST_IP", "value": "0.0.0.0"}]}),
            "the agent sets these",
        ),
        (ModelDeployment, md({"env": [{"name": "VLLM_API_KEY"}]}), "set spec.apiKeySecretRef instead"),
        (ModelDeployment, md({"env": [{"name": "BAD-NAME"}]}), "should match pattern"),
        (ModelDeployment, md({"rollout": {"maxSurge": 0}}), "cannot both be 0"),
        (ModelDeployment, md({"service": {"port": 70000}}), "less than or equal to 65535"),
        (ModelDeployment, md({"service": {"name": "Qwen_API"}}), "must be a DNS label"),
        (ModelDeployment, md(name="qwen3.5"), "named after the ModelDeployment"),
        (ModelDeployment, md({"placement": {"spread": "Always"}}), "'Preferred', 'Required' or 'None'"),
        (
            ModelDeployment,
            md({"placement": {"tolerations": [{"operator": "Exists", "value": "x"}]}}),
            "must not set value",
        ),
        (ModelDeployment, md({"placement": {"tolerations": [{"value": "x"}]}}), "Equal needs a key"),
        (ModelDeployment, md({"aliases": ["qwen", "qwen"]}), "same alias twice"),
        (ModelDeployment, md({"aliases": ["team/qwen"]}), "each of spec.aliases"),
        (ModelDeployment, md({"scaling": {"minReplicas": 3, "maxReplicas": 2}}), "must not be larger"),
        (ModelDeployment, md({"scaling": {"minReplicas": 0}}), "Field required"),
        (
            ModelDeployment,
            md({"scaling": {"maxReplicas": 2, "targetInFlight": 0}}),
            "greater than or equal to 1",
        ),
        (ModelDeployment, {"kind": "ModelDeployment", "metadata": {}}, "Field required"),
        (MacNode, mn({"taints": [{"key": "-x", "effect": "NoSchedule"}]}), "qualified name"),
        (
            MacNode,
            mn({"taints": [{"key": "a", "effect": "Evict"}]}),
            "'NoSchedule', 'PreferNoSchedule' or 'NoExecute'",
        ),
        (MacNode, mn({"taints": [{"key": "a", "value": "a b", "effect": "NoSchedule"}]}), "a taint value"),
        (MacNode, mn(status={"memory": {"totalBytes": 1, "gpuWorkingSetBytes": 2}}), "cannot be larger"),
        (
            MacNode,
            mn(status={"conditions": [{"type": "Ready", "status": "Yes"}]}),
            "'True', 'False' or 'Unknown'",
        ),
        (MacNode, mn(status={"cachedModels": [{"digest": "sha256:abc"}]}), "should match pattern"),
        (ModelReplica, mr({"model": "oci://registry.example.com/models/qwen3:latest"}), "pinned by digest"),
        (
            ModelReplica,
            mr({"digest": "sha256:" + "cd" * 32}),
            "must equal the digest at the end of spec.model",
        ),
        (ModelReplica, mr({"digest": "md5:x"}), "64 lowercase hex digits"),
        (
            ModelReplica,
            mr({"memoryPlan": {**PLAN, "kvBudgetBytes": 0}}),
            "kvBudgetBytes must be greater than 0",
        ),
        (ModelReplica, mr({"memoryPlan": {**PLAN, "maxModelLen": 0}}), "maxModelLen must be at least 1"),
        (ModelReplica, mr({"memoryPlan": {**PLAN, "numBlocks": 10}}), "hold at least one sequence"),
        (
            ModelReplica,
            mr({"memoryPlan": {**PLAN, "maxNumBatchedTokens": 4}}),
            "at least memoryPlan.maxNumSeqs",
        ),
        (
            ModelReplica,
            mr({"engineArgs": ["--served-model-name=x"]}),
            "served under the ModelDeployment's name",
        ),
        (ModelReplica, mr({"nodeName": "Mac_Mini"}), "should match pattern"),
    ],
)
def test_invalid_input_is_refused_with_its_message(
    model: type[ApiModel], body: dict[str, Any], message: str
) -> None:
    """Bad objects are refused, and the message says what is wrong (the CEL message where there is one)."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("arg", "owner"),
    [
        ("--port", "--port"),
        ("--port=8000", "--port"),
        ("--max_model_len=4096", "--max-model-len"),
        ("-c", "-c"),
        ("--ctx-size=8192", "--ctx-size"),
        ("-ngl", "-ngl"),
        ("--n-gpu-layers=99", "--n-gpu-layers"),
        ("--enable-prefix-caching", None),
        ("--hostname", None),
        ("8000", None),
    ],
)
def test_owned_flag(arg: str, owner: str | None) -> None:
    """Engine drivers find operator-owned flags in every spelling, with the same list as the CRD."""
    assert owned_flag(arg) == owner


def test_owned_lists_cover_the_contract() -> None:
    """The flags and variables named in the architecture contract are all owned."""
    for flag in (
        "--host",
        "--port",
        "--model",
        "--max-model-len",
        "--gpu-memory-utilization",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--served-model-name",
        "--api-key",
        "--block-size",
        "-c",
        "--ctx-size",
        "-np",
        "--parallel",
        "-m",
        "-ngl",
    ):
        assert flag in OPERATOR_OWNED_FLAGS
    for name in ("VLLM_HOST_IP", "HF_HUB_OFFLINE", "VLLM_PORT"):
        assert name in AGENT_OWNED_ENV


def test_api_imports_nothing_else_of_ours() -> None:
    """`orchardist.api` is the shared ground: it may import only itself (architecture.md, import rules)."""
    import ast
    from pathlib import Path

    import orchardist.api

    for path in Path(orchardist.api.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                ours = name.split(".")[0] in {"orchardist", "orchardist_agent"}
                assert not ours or name.startswith("orchardist.api"), f"{path.name} imports {name}"
