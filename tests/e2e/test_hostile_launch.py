"""Hostile engineArgs and env refused at `kubectl apply` by the real kube-apiserver.

Two layers, both from orchardist.api.launch's lists: the CRDs' CEL refuses the operator-owned flags
in every spelling argparse reads (exact, flag=value, --flag_name, abbreviations), `--`, and the
owned variables; the chart's ValidatingAdmissionPolicy refuses code-loading flags and variables
unless a cluster admin sets engines.allowCodeLoading. Every refusal names the offending item, and a
refused create leaves nothing behind.
"""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchardist.dev.cluster import Cluster
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.cluster

CHART = Path(__file__).resolve().parents[2] / "charts" / "orchardist"
POLICY_TEMPLATE = "templates/engine-code-loading-policy.yaml"
DIGEST = "sha256:" + "cd" * 32

MD: dict[str, Any] = {
    "apiVersion": "orchardist.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "tenant"},
    "spec": {"model": "oci://registry.example.com/models/qwen3:q4", "engine": "vllm"},
}
MR: dict[str, Any] = {
    "apiVersion": "orchardist.io/v1alpha1",
    "kind": "ModelReplica",
    "metadata": {"name": "tenant-r"},
    "spec": {
        "nodeName": "mac-a",
        "deployment": "tenant",
        "model": f"oci://registry.example.com/models/qwen3@{DIGEST}",
        "digest": DIGEST,
        "engine": "mlx-lm",
        "servedModelName": "tenant",
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

CODE = "makes the engine run code or read files named by the deployment"


def sets(item: str, flag: str) -> str:
    """The CRD's refusal of an item that sets an owned flag (the message names the item)."""
    return f"spec.engineArgs: {item} sets {flag}"


def code(item: str) -> str:
    """The admission policy's refusal of a code-loading item."""
    return f"spec.engineArgs: {item} {CODE}"


def args(*items: str, base: dict[str, Any] = MD) -> dict[str, Any]:
    obj = copy.deepcopy(base)
    obj["spec"]["engineArgs"] = list(items)
    return obj


def env(*names: str, base: dict[str, Any] = MD) -> dict[str, Any]:
    obj = copy.deepcopy(base)
    obj["spec"]["env"] = [{"name": n, "value": "/models/m"} for n in names]
    return obj


HOSTILE = [
    # (id, object, words the refusal must hold: each names the offending item)
    ("abbrev-max-model", args("--max-model", "99999"), sets("--max-model", "--max-model-len")),
    ("underscore-eq", args("--max_model_len=99999"), sets("--max_model_len=99999", "--max-model-len")),
    ("abbrev-underscore", args("--max_mod=1"), sets("--max_mod=1", "--max-model-len")),
    ("ctx-size", args("-c", "999999"), sets("-c", "--max-model-len, -c or --ctx-size")),
    ("gpu-mem", args("--gpu-mem=0.99"), sets("--gpu-mem=0.99", "--gpu-memory-utilization")),
    ("kv-bytes", args("--kv-cache-memory-bytes", "1"), "spec.engineArgs: --kv-cache-memory-bytes sets"),
    ("cpu-offload", args("--cpu-offload", "64"), "spec.engineArgs: --cpu-offload sets"),
    ("swap", args("--swap-space=64"), "spec.engineArgs: --swap-space=64 sets"),
    ("kv-dtype", args("--kv-cache-dtype", "fp8"), "spec.engineArgs: --kv-cache-dtype sets"),
    ("mlx-prompt-cache", args("--prompt-cache-b", "1"), "spec.engineArgs: --prompt-cache-b sets"),
    ("mlx-decode", args("--decode-c=512"), "spec.engineArgs: --decode-c=512 sets"),
    ("llama-cache-ram", args("-cram", "99999"), "spec.engineArgs: -cram sets"),
    ("host-abbrev", args("--ho", "0.0.0.0"), sets("--ho", "--host, --port")),
    ("port-eq", args("--por=1"), sets("--por=1", "--host, --port")),
    ("uds", args("--uds", "/tmp/x.sock"), sets("--uds", "--host, --port, --uds")),
    ("api-key-abbrev", args("--api-k", "mine"), sets("--api-k", "--api-key")),
    ("api-key-file", args("--api-key-file=/k"), sets("--api-key-file=/k", "--api-key")),
    ("served-name", args("--served", "other"), sets("--served", "--served-model-name")),
    ("model-abbrev", args("--mod", "/elsewhere"), sets("--mod", "--model")),
    ("hf-repo", args("-hf", "user/model"), sets("-hf", "--model")),
    ("config-file", args("--conf", "/m/evil.yaml"), sets("--conf", "--config")),
    ("ngl", args("-ngl", "1"), sets("-ngl", "-ngl")),
    ("end-of-options", args("--seed", "1", "--", "x"), "spec.engineArgs must not contain '--'"),
    ("replica-owned", args("--max-num-seqs=999", base=MR), "spec.engineArgs: --max-num-seqs=999 sets"),
    ("env-api-key", env("VLLM_API_KEY"), "spec.env must not set VLLM_API_KEY, LLAMA_API_KEY"),
    ("env-llama-arg", env("LLAMA_ARG_PORT"), "spec.env must not set LLAMA_ARG_*"),
    ("env-kv-space", env("VLLM_CPU_KVCACHE_SPACE"), "must not set VLLM_METAL_MEMORY_FRACTION, VLLM_CPU_KV"),
    ("env-offline", env("HF_HUB_OFFLINE"), "the agent sets these for every engine process"),
    # ---- code loading (the chart's admission policy) ----
    ("trust-remote-code", args("--trust-remote-code"), code("--trust-remote-code")),
    ("trust-abbrev", args("--trust-rem"), code("--trust-rem")),
    ("trust-underscore", args("--trust_remote_code"), code("--trust_remote_code")),
    ("tool-plugin", args("--tool-parser-plugin=/m/p.py"), code("--tool-parser-plugin=/m/p.py")),
    ("reasoning-plugin", args("--reasoning-parser-p", "/m/r.py"), code("--reasoning-parser-p")),
    ("chat-template-path", args("--chat-template", "/etc/passwd"), code("--chat-template")),
    ("logits-processors", args("--logits-processors", "m:P"), code("--logits-processors")),
    ("logging-config", args("--logging-config=/m/l.json"), code("--logging-config=/m/l.json")),
    ("lora-modules", args("--lora-modules", "a=/m/a"), code("--lora-modules")),
    ("adapter-path", args("--adapter-path", "/m/a", base=MR), code("--adapter-path")),
    ("log-file", args("--log-file", "/root/.kube/config"), code("--log-file")),
    ("env-pythonpath", env("PYTHONPATH"), f"spec.env: PYTHONPATH {CODE}"),
    ("env-pythonstartup", env("PYTHONSTARTUP"), f"spec.env: PYTHONSTARTUP {CODE}"),
    ("env-ld-preload", env("LD_PRELOAD"), f"spec.env: LD_PRELOAD {CODE}"),
    ("env-dyld", env("DYLD_INSERT_LIBRARIES", base=MR), f"spec.env: DYLD_INSERT_LIBRARIES {CODE}"),
    ("env-vllm-plugins", env("VLLM_PLUGINS"), f"spec.env: VLLM_PLUGINS {CODE}"),
    ("env-dev-mode", env("VLLM_SERVER_DEV_MODE"), f"spec.env: VLLM_SERVER_DEV_MODE {CODE}"),
]  # fmt: skip

ACCEPTED = [
    ("allowed-flags", args("--seed", "7", "--enable-prefix-caching", "--max-logprobs=5")),
    ("whole-flag-not-abbrev", args("--reasoning-parser", "qwen3", "--tool-call-parser", "hermes")),
    ("hostname-is-not-host", args("--hostname")),
    ("allowed-env", env("OMP_NUM_THREADS", "VLLM_LOGGING_LEVEL", "LLAMA_LOG_COLORS")),
    ("replica-allowed", args("--temp", "0.7", base=MR)),
]


def render_policy(cluster: Cluster, *values: str) -> list[dict[str, Any]]:
    where = ("-n", "orchardist-system", "--show-only", POLICY_TEMPLATE)
    out = cluster.helm("template", "orchardist", str(CHART), *where, *values, check=False)
    if out.returncode != 0 and "could not find template" in out.stderr:
        return []  # the template rendered nothing
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def code_policy(cluster: Cluster) -> Iterator[None]:
    """The chart's code-loading policy and binding, applied and enforcing (defaults: code loading off)."""
    docs = render_policy(cluster)
    assert [d["kind"] for d in docs] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    manifest = "\n---\n".join(json.dumps(d) for d in docs)
    cluster.kubectl("apply", "-f", "-", input=manifest)
    probe = args("--trust-remote-code")
    probe["metadata"]["namespace"] = "default"

    def enforced() -> bool:
        out = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(probe), check=False)
        return out.returncode != 0 and CODE in out.stderr

    wait_for(enforced, timeout=60, interval=0.5, message="the code-loading policy never refused")
    try:
        yield
    finally:
        cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=manifest, check=False)


def create(cluster: Cluster, obj: dict[str, Any], namespace: str) -> tuple[str, str]:
    """Create `obj` for real in `namespace`; (its name, the apiserver's stderr)."""
    obj = copy.deepcopy(obj)
    obj["metadata"] = {"name": f"{obj['metadata']['name']}-{secrets.token_hex(3)}", "namespace": namespace}
    out = cluster.kubectl("create", "-f", "-", input=json.dumps(obj), check=False)
    return obj["metadata"]["name"], out.stderr if out.returncode != 0 else ""


@pytest.mark.usefixtures("code_policy")
@pytest.mark.parametrize(("obj", "words"), [(o, w) for _, o, w in HOSTILE], ids=[i for i, _, _ in HOSTILE])
def test_hostile_launch_is_refused_and_nothing_is_written(
    cluster: Cluster, namespace: str, obj: dict[str, Any], words: str
) -> None:
    name, err = create(cluster, obj, namespace)
    assert err, f"the apiserver accepted {obj['spec']}"
    assert words in err, err
    plural = "modeldeployments" if obj["kind"] == "ModelDeployment" else "modelreplicas"
    got = cluster.kubectl("get", plural, name, "-n", namespace, "--ignore-not-found", "-o", "name")
    assert got.stdout.strip() == ""


@pytest.mark.usefixtures("code_policy")
@pytest.mark.parametrize("obj", [o for _, o in ACCEPTED], ids=[i for i, _ in ACCEPTED])
def test_allowed_launch_is_accepted(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> None:
    name, err = create(cluster, obj, namespace)
    assert err == ""
    plural = "modeldeployments" if obj["kind"] == "ModelDeployment" else "modelreplicas"
    stored = json.loads(cluster.kubectl("get", plural, name, "-n", namespace, "-o", "json").stdout)
    assert stored["spec"].get("engineArgs", []) == obj["spec"].get("engineArgs", [])


def test_table_is_large_enough() -> None:
    assert len(HOSTILE) >= 40


def test_a_cluster_admin_can_allow_code_loading(cluster: Cluster) -> None:
    """engines.allowCodeLoading=true renders no policy (the CRD rules on owned flags stay)."""
    assert render_policy(cluster, "--set", "engines.allowCodeLoading=true") == []
    assert len(render_policy(cluster, "--set", "engines.allowCodeLoading=false")) == 2
