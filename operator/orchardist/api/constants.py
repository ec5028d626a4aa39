"""Names of the API (group, version, kinds) and the flags and variables the operator owns.

These constants are duplicated from nowhere else on purpose: ``orchardist.api`` imports nothing of
ours, so the engine drivers, the controller and the CRD generator all read the same lists from here.
"""

from __future__ import annotations

from typing import Final

GROUP: Final = "orchardist.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
CATEGORIES: Final = ("orchardist",)

MODEL_DEPLOYMENT: Final = "ModelDeployment"
MAC_NODE: Final = "MacNode"
MODEL_REPLICA: Final = "ModelReplica"
KINDS: Final = (MODEL_DEPLOYMENT, MAC_NODE, MODEL_REPLICA)

PLURALS: Final = {MODEL_DEPLOYMENT: "modeldeployments", MAC_NODE: "macnodes", MODEL_REPLICA: "modelreplicas"}
SINGULARS: Final = {MODEL_DEPLOYMENT: "modeldeployment", MAC_NODE: "macnode", MODEL_REPLICA: "modelreplica"}
SHORT_NAMES: Final = {MODEL_DEPLOYMENT: "md", MAC_NODE: "mn", MODEL_REPLICA: "mr"}

#: Labels the controller puts on every ModelReplica.
LABEL_DEPLOYMENT: Final = f"{GROUP}/deployment"
LABEL_NODE: Final = f"{GROUP}/node"
LABEL_REVISION: Final = f"{GROUP}/revision"

ENGINES: Final = ("vllm-metal", "mlx-lm", "llama.cpp", "vllm")

#: Engine flags the operator sets itself, grouped by what the user sets instead. Each group becomes
#: one CEL rule (so the message can name the right spec field) and one entry of the Python check.
FLAG_OWNERS: Final[tuple[tuple[tuple[str, ...], str], ...]] = (
    (("--model", "-m"), "set spec.model instead"),
    (
        ("--host", "--port"),
        "the agent binds every engine to an address and port it chooses; set spec.service.port "
        "for the Service port",
    ),
    (("--max-model-len", "-c", "--ctx-size"), "set spec.contextLength instead"),
    (("--gpu-memory-utilization",), "set spec.kvCache.gpuMemoryUtilization instead"),
    (("--block-size",), "set spec.kvCache.blockSize instead"),
    (("--max-num-seqs", "-np", "--parallel"), "set spec.maxConcurrentSequences instead"),
    (
        ("--max-num-batched-tokens",),
        "the memory planner sets it from the Mac's memory; lower "
        "spec.maxConcurrentSequences or spec.contextLength instead",
    ),
    (("--served-model-name", "--alias", "-a"), "the model is served under the ModelDeployment's name"),
    (("--api-key",), "set spec.apiKeySecretRef instead"),
    (("-ngl", "--gpu-layers", "--n-gpu-layers"), "the operator always offloads every layer to the GPU"),
)

#: Every flag the operator owns; engine drivers refuse these in extra args with the same list.
OPERATOR_OWNED_FLAGS: Final = tuple(flag for flags, _ in FLAG_OWNERS for flag in flags)

#: Environment variables the agent (or the spec) owns for every engine process.
ENV_OWNERS: Final[tuple[tuple[tuple[str, ...], str], ...]] = (
    (
        (
            "VLLM_HOST_IP",
            "VLLM_PORT",
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "VLLM_WORKER_MULTIPROC_METHOD",
        ),
        "the agent sets these for every engine process",
    ),
    (("VLLM_METAL_MEMORY_FRACTION",), "set spec.kvCache.gpuMemoryUtilization instead"),
    (("VLLM_API_KEY",), "set spec.apiKeySecretRef instead"),
)
AGENT_OWNED_ENV: Final = tuple(name for names, _ in ENV_OWNERS for name in names)


def flag_forms(flag: str) -> tuple[str, ...]:
    """The spellings of one flag an engine accepts: `--flag`, `--flag=v`, and vLLM's `--flag_name`."""
    forms = [flag]
    if flag.startswith("--") and "-" in flag[2:]:
        forms.append("--" + flag[2:].replace("-", "_"))
    return tuple(forms)


def owned_flag(arg: str) -> str | None:
    """The operator-owned flag that `arg` sets (in any accepted spelling), or None if it is free."""
    name = arg.split("=", 1)[0]
    for flags, _ in FLAG_OWNERS:
        for flag in flags:
            if name in flag_forms(flag):
                return flag
    return None
