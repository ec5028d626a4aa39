"""ModelDeployment: what the user asks for (a model served by N replicas on the Macs)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field

from orchardist.api.common import (
    DIGEST,
    DNS_LABEL,
    ENGINE_ARGS_DESCRIPTION,
    ENV_DESCRIPTION,
    Conditions,
    Engine,
    EngineArgs,
    EnvVars,
    SecretKeyRef,
    SecretRef,
)
from orchardist.api.constants import MODEL_DEPLOYMENT
from orchardist.api.rules import ApiModel, Rule
from orchardist.api.scaling import (
    ALIAS,
    ANNOTATION_HELD,
    ANNOTATION_IN_FLIGHT,
    DEMAND_LEASE_SUFFIX,
    LABEL_DEMAND_FOR,
    LABEL_GATEWAY_INSTANCE,
    SCALING_DESCRIPTION,
    Aliases,
    Autoscaling,
    Recommendation,
    Scaling,
    demand_lease_name,
    instance_hash,
)

# oci://host[:port]/repo[:tag|@sha256:<64 hex>]; repository path components as in the OCI spec.
_OCI_HOST = r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?"
_OCI_PATH = r"[a-z0-9]+(([.]|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+(([.]|_|__|-+)[a-z0-9]+)*)*"
_OCI_TAG = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
OCI_REF = rf"^oci://{_OCI_HOST}/{_OCI_PATH}(:{_OCI_TAG}|@sha256:[0-9a-f]{{64}})?$"
OCI_PINNED_REF = rf"^oci://{_OCI_HOST}/{_OCI_PATH}@sha256:[0-9a-f]{{64}}$"
_DIGEST_SUFFIX = r"@sha256:[0-9a-f]{64}$"

EXAMPLE_REF = "oci://registry.example.com:5000/models/qwen3-0.6b:q4"
EXAMPLE_PINNED = "oci://registry.example.com/models/qwen3-0.6b@sha256:<64 hex digits>"

SCHEME_RULE = Rule(
    rule="self.startsWith('oci://')",
    message=f"spec.model must be an OCI reference starting with oci://, for example {EXAMPLE_REF}",
    check=lambda v: v.startswith("oci://"),
)
DIGEST_RULE = Rule(
    rule=f"!self.contains('@') || self.matches('{_DIGEST_SUFFIX}')",
    message="the digest in spec.model must be written @sha256: followed by 64 lowercase hex digits, "
    f"for example {EXAMPLE_PINNED}",
    check=lambda v: "@" not in v or re.search(_DIGEST_SUFFIX, v) is not None,
)
# Only judged once the scheme and the digest are right, so one mistake gives one message.
SHAPE_RULE = Rule(
    rule=f"!self.startsWith('oci://') || (self.contains('@') && !self.matches('{_DIGEST_SUFFIX}')) "
    f"|| self.matches('{OCI_REF}')",
    message="spec.model must be oci://host[:port]/repository[:tag] or oci://host[:port]/repository@sha256:"
    "<digest>, with a lowercase repository path (letters, digits, '.', '_', '-', separated by '/'), "
    f"for example {EXAMPLE_REF}",
    check=lambda v: (
        not v.startswith("oci://")
        or ("@" in v and re.search(_DIGEST_SUFFIX, v) is None)
        or re.search(OCI_REF, v) is not None
    ),
)
ModelRef = Annotated[
    str,
    Field(min_length=8, max_length=512),
    SCHEME_RULE,
    DIGEST_RULE,
    SHAPE_RULE,
]

MIN_CONTEXT = 128
MAX_CONTEXT = 2_097_152

ContextLength = Annotated[
    int,
    Field(ge=MIN_CONTEXT, le=MAX_CONTEXT),
    Rule(
        rule=f"self >= {MIN_CONTEXT} && self <= {MAX_CONTEXT}",
        message=f"spec.contextLength must be between {MIN_CONTEXT} and {MAX_CONTEXT} tokens; leave it out "
        "to get the largest context that fits on the Mac, up to the model's own maximum",
        check=lambda v: MIN_CONTEXT <= v <= MAX_CONTEXT,
    ),
]

GpuMemoryUtilization = Annotated[
    float,
    Field(ge=0.1, le=0.99),
    Rule(
        rule="self >= 0.1 && self <= 0.99",
        message="gpuMemoryUtilization must be between 0.1 and 0.99: the fraction of the Mac's GPU working "
        "set the engine may use for weights and KV cache (0.92 is the default)",
        check=lambda v: 0.1 <= v <= 0.99,
    ),
]

# An enum, not a CEL rule: the API server skips CEL once an enum fails, so a rule could never speak.
BlockSize = Literal[8, 16, 32]


class KvCache(ApiModel):
    """How much of the Mac's GPU working set the engine may use, and how the KV cache is paged."""

    gpu_memory_utilization: GpuMemoryUtilization = Field(
        0.92,
        description="The fraction (0.1-0.99) of the Mac's GPU working set that the engine may fill with "
        "weights, activations and KV cache. The rest is left to macOS and other apps.",
    )
    block_size: BlockSize = Field(
        16, description="Tokens per KV-cache block (8, 16 or 32) for engines with a paged KV cache."
    )


class Toleration(ApiModel):
    """Lets replicas run on MacNodes with a matching taint, as a Pod toleration does."""

    __rules__ = (
        Rule(
            rule="self.operator != 'Exists' || !has(self.value) || self.value == ''",
            message="a toleration with operator Exists matches any value, so it must not set value; use "
            "operator Equal to match one value",
            check=lambda t: t.operator != "Exists" or not t.value,
        ),
        Rule(
            rule="self.operator != 'Equal' || (has(self.key) && self.key != '')",
            message="a toleration with operator Equal needs a key; to tolerate every taint use operator "
            "Exists with no key",
            check=lambda t: t.operator != "Equal" or bool(t.key),
        ),
    )

    key: str = Field(
        "",
        max_length=316,
        description="The taint key to match; empty with operator Exists matches every key.",
    )
    operator: Literal["Exists", "Equal"] = Field(
        "Equal", description="Equal matches the taint's value; Exists matches any value (default Equal)."
    )
    value: str = Field("", max_length=63, description="The taint value to match when operator is Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="The taint effect to match; empty matches every effect."
    )


class Placement(ApiModel):
    """Which Macs may run the replicas, and how the replicas spread over them."""

    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict,
        max_length=32,
        description="Only MacNodes whose labels match all of these key/value pairs are used.",
    )
    spread: Literal["Preferred", "Required", "None"] = Field(
        "Preferred",
        description="How replicas spread over Macs: Preferred puts each on a different Mac when possible; "
        "Required never puts two on one Mac (extra replicas stay Pending); None packs them.",
    )
    prefer_cached_nodes: bool = Field(
        True, description="Prefer Macs that already hold the model's layers, so a replica starts sooner."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        description="Tolerations for MacNode taints, as on Pods.",
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
    )


class Service(ApiModel):
    """The Service in front of the ready replicas (an OpenAI-compatible endpoint)."""

    name: (
        Annotated[
            str,
            Field(min_length=1, max_length=63),
            Rule(
                rule=f"self.matches('{DNS_LABEL}')",
                message="spec.service.name must be a DNS label: lowercase letters, digits and '-', starting "
                "with a letter and ending with a letter or digit, at most 63 characters",
                check=lambda v: re.search(DNS_LABEL, v) is not None,
            ),
        ]
        | None
    ) = Field(None, description="The Service's name (default: the ModelDeployment's name).")
    port: Annotated[
        int,
        Field(ge=1, le=65535),
        Rule(
            rule="self >= 1 && self <= 65535",
            message="spec.service.port must be a TCP port between 1 and 65535 (8000 is the default)",
            check=lambda v: 1 <= v <= 65535,
        ),
    ] = Field(8000, description="The Service's port (default 8000).")


class Rollout(ApiModel):
    """How replicas are replaced when the model, engine, arguments or memory plan change."""

    __rules__ = (
        Rule(
            rule="(has(self.maxSurge) ? self.maxSurge : 1) > 0 || (has(self.maxUnavailable) ? "
            "self.maxUnavailable : 0) > 0",
            message="spec.rollout.maxSurge and spec.rollout.maxUnavailable cannot both be 0, or a rollout "
            "could never replace a replica; set maxSurge: 1 (start the new replica first) or "
            "maxUnavailable: 1 (stop an old one first, for Macs without room for two)",
            check=lambda r: r.max_surge > 0 or r.max_unavailable > 0,
        ),
    )

    max_surge: int = Field(
        1, ge=0, le=64, description="How many replicas above spec.replicas may exist during a rollout."
    )
    max_unavailable: int = Field(
        0, ge=0, le=64, description="How many replicas below spec.replicas may be unready during a rollout."
    )


class ModelDeploymentSpec(ApiModel):
    """The model to serve, the engine to serve it with, and how many replicas where."""

    model: ModelRef = Field(
        description="The model as an OCI reference: oci://host[:port]/repository[:tag|@sha256:<64 hex>], "
        f"for example {EXAMPLE_REF}. A tag is resolved to a digest once (status.resolvedDigest)."
    )
    pull_secret_ref: SecretRef | None = Field(
        None,
        description="A kubernetes.io/dockerconfigjson Secret in this namespace with the registry's "
        "credentials.",
    )
    engine: Engine = Field(
        "vllm-metal",
        description="The inference engine: vllm-metal (default), mlx-lm, llama.cpp (GGUF models) or vllm.",
    )
    engine_version: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="A version of the engine the Mac must have installed (default: whatever it has)."
    )
    replicas: int = Field(
        1,
        ge=0,
        le=1024,
        description="How many replicas to run (default 1); 0 stops serving. With spec.scaling set, only the "
        "count to start with (see spec.scaling).",
    )
    context_length: ContextLength | None = Field(
        None,
        description="The context length in tokens. Leave it out to get the largest that fits in the Mac's "
        "memory, up to the model's own maximum.",
    )
    max_concurrent_sequences: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="How many requests one replica serves at the same time (default: as many as fit).",
    )
    kv_cache: KvCache = Field(
        default_factory=KvCache,
        description="Memory share and KV-cache paging of the engine.",
        json_schema_extra={"default": {}},
    )
    engine_args: EngineArgs = Field(default_factory=list, description=ENGINE_ARGS_DESCRIPTION)
    env: EnvVars = Field(default_factory=list, description=ENV_DESCRIPTION)
    api_key_secret_ref: SecretKeyRef | None = Field(
        None,
        description="A Secret key holding an API key that clients must send (passed as --api-key where the "
        "engine supports it).",
    )
    placement: Placement = Field(
        default_factory=Placement,
        description="Which Macs may run the replicas and how they spread.",
        json_schema_extra={"default": {}},
    )
    service: Service = Field(
        default_factory=Service,
        description="The Service in front of the ready replicas.",
        json_schema_extra={"default": {}},
    )
    rollout: Rollout = Field(
        default_factory=Rollout,
        description="How replicas are replaced when something they run changes.",
        json_schema_extra={"default": {}},
    )
    aliases: Aliases = Field(
        default_factory=list,
        description="Other names a client may send as `model` to the gateway for this deployment (besides "
        "its name and namespace/name), such as the name the model is known by upstream.",
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
    )
    scaling: Scaling | None = Field(None, description=SCALING_DESCRIPTION)


class ModelProfile(ApiModel):
    """What the controller read from the model's config and layers (without downloading weights)."""

    format: str | None = Field(None, max_length=64, description="The weights' format: safetensors or gguf.")
    architecture: str | None = Field(
        None, max_length=128, description="The model architecture (for example Qwen3ForCausalLM)."
    )
    weight_bytes: int | None = Field(None, ge=0, description="Bytes of weights loaded into memory.")
    kv_bytes_per_token: int | None = Field(
        None, ge=0, description="KV-cache bytes one token of context uses."
    )
    max_context: int | None = Field(
        None, ge=0, description="The longest context the model supports, in tokens."
    )
    parameters: int | None = Field(None, ge=0, description="The number of parameters.")
    quantization: str | None = Field(
        None, max_length=64, description="The weights' quantization (for example 4bit, q4_k_m, bf16)."
    )


class ReplicaProgress(ApiModel):
    """How far a replica's model download has got."""

    bytes_done: int | None = Field(None, ge=0, description="Bytes downloaded so far.")
    bytes_total: int | None = Field(None, ge=0, description="Bytes to download in all.")
    bytes_per_second: int | None = Field(None, ge=0, description="The recent download rate.")
    eta_seconds: int | None = Field(None, ge=0, description="The estimated seconds until the download ends.")
    percent: str | None = Field(
        None, max_length=8, description='Bytes done as a display string, such as "42%".'
    )


# ModelReplica's status.phase (defined here: modelreplica.py imports this module, not the reverse).
ReplicaPhase = Literal[
    "Pending", "Pulling", "Starting", "Ready", "CrashLoopBackOff", "Failed", "Terminating", "Unknown"
]


class ReplicaSummary(ApiModel):
    """One replica of the deployment, as its ModelReplica reports it."""

    name: str = Field(max_length=253, description="The ModelReplica's name.")
    node_name: str | None = Field(None, max_length=253, description="The MacNode the replica is bound to.")
    phase: ReplicaPhase | None = Field(
        None, description="The replica's phase (see ModelReplica status.phase)."
    )
    endpoint: str | None = Field(None, max_length=512, description="address:port where the replica serves.")
    progress: ReplicaProgress | None = Field(
        None, description="The replica's download progress while pulling."
    )


class ModelDeploymentStatus(ApiModel):
    """What the controller observed and did (written only by the controller)."""

    observed_generation: int | None = Field(
        None, ge=0, description="The metadata.generation this status describes."
    )
    conditions: Conditions = Field(
        default_factory=list,
        description="Ready, Reconciling, Stalled and Degraded, with reasons such as DoesNotFit or "
        "PullFailed.",
    )
    phase: Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"] | None = Field(
        None, description="A one-word summary of the conditions for display (STATUS column)."
    )
    reason: str | None = Field(
        None,
        max_length=64,
        description="For display (REASON column): the reason of Stalled, else Degraded, else Ready.",
    )
    message: str | None = Field(
        None,
        max_length=256,
        description="For display (MESSAGE column, -o wide): that condition's message on one line.",
    )
    resolved_digest: str | None = Field(
        None, pattern=DIGEST, description="The digest spec.model resolved to (sha256:<64 hex>)."
    )
    resolved_model: str | None = Field(
        None, max_length=512, description="spec.model pinned to its digest: oci://...@sha256:<64 hex>."
    )
    model_profile: ModelProfile | None = Field(
        None, description="What the model needs: weight bytes, KV bytes per token, maximum context."
    )
    replicas: int | None = Field(
        None, ge=0, description="How many replicas exist (for the scale subresource)."
    )
    ready_replicas: int | None = Field(None, ge=0, description="How many replicas are serving.")
    updated_replicas: int | None = Field(
        None, ge=0, description="How many replicas run the current revision."
    )
    ready: str | None = Field(None, max_length=32, description='Ready/desired for display, such as "1/2".')
    selector: str | None = Field(
        None, max_length=1024, description="The label selector of the replicas, for the scale subresource."
    )
    replica_statuses: list[ReplicaSummary] = Field(
        default_factory=list,
        description="One entry per replica: node, phase, endpoint and download progress.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    endpoint: str | None = Field(
        None,
        max_length=512,
        description="The Service's address, name.namespace.svc:port, while a replica is ready (else absent).",
    )
    autoscaling: Autoscaling | None = Field(
        None, description="The autoscaler's desired count and why (only when spec.scaling is set)."
    )


def _service_name_ok(md: ModelDeployment) -> bool:
    name = str(md.metadata.get("name", ""))
    return (
        md.spec.service.name is not None
        or not name
        or (len(name) <= 63 and re.search(DNS_LABEL, name) is not None)
    )


class ModelDeployment(ApiModel):
    """Serves one model from OCI on N replicas spread over the Macs (MacNodes), behind one Service."""

    __rules__ = (
        Rule(
            rule="has(self.spec.service.name) || (size(self.metadata.name) <= 63 && "
            f"self.metadata.name.matches('{DNS_LABEL}'))",
            message="without spec.service.name the Service is named after the ModelDeployment, so "
            "metadata.name must be a DNS label (lowercase letters, digits and '-', starting with a letter, "
            "at most 63 characters); rename it or set spec.service.name",
            check=_service_name_ok,
        ),
    )

    api_version: Literal["orchardist.io/v1alpha1"] = Field(
        "orchardist.io/v1alpha1", description="orchardist.io/v1alpha1"
    )
    kind: Literal["ModelDeployment"] = Field(MODEL_DEPLOYMENT, description="ModelDeployment")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: ModelDeploymentSpec = Field(description="What to serve and how (written by the user).")
    status: ModelDeploymentStatus = Field(
        default_factory=ModelDeploymentStatus, description="What the controller observed (written by it)."
    )


__all__ = [
    "ALIAS",
    "ANNOTATION_HELD",
    "ANNOTATION_IN_FLIGHT",
    "DEMAND_LEASE_SUFFIX",
    "DIGEST",
    "LABEL_DEMAND_FOR",
    "LABEL_GATEWAY_INSTANCE",
    "OCI_PINNED_REF",
    "OCI_REF",
    "Autoscaling",
    "KvCache",
    "ModelDeployment",
    "ModelDeploymentSpec",
    "ModelDeploymentStatus",
    "ModelProfile",
    "Placement",
    "Recommendation",
    "ReplicaProgress",
    "ReplicaSummary",
    "Rollout",
    "Scaling",
    "Service",
    "Toleration",
    "demand_lease_name",
    "instance_hash",
]
