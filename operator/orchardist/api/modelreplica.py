"""ModelReplica: one engine process serving one model on one Mac, bound by the controller."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field

from orchardist.api.common import (
    DIGEST,
    DNS_SUBDOMAIN,
    ENGINE_ARGS_DESCRIPTION,
    ENV_DESCRIPTION,
    Condition,
    Conditions,
    Engine,
    EngineArgs,
    EnvVars,
    SecretKeyRef,
    SecretRef,
)
from orchardist.api.constants import MODEL_REPLICA
from orchardist.api.modeldeployment import OCI_PINNED_REF, BlockSize, ReplicaPhase, ReplicaProgress
from orchardist.api.rules import ApiModel, Rule

__all__ = ["Condition", "MemoryPlan", "ModelReplica", "ModelReplicaSpec", "ModelReplicaStatus"]


# A replica's share may be far below the 0.1 a user can ask for: a small model on a 512 GB Mac
# needs a few percent of its working set, and a floor would book memory nobody uses.
PlanUtilization = Annotated[
    float,
    Field(gt=0.0, le=0.99),
    Rule(
        rule="self > 0.0 && self <= 0.99",
        message="memoryPlan.gpuMemoryUtilization must be above 0 and at most 0.99: the share of the Mac's "
        "GPU working set this replica's engine may use",
        check=lambda v: 0.0 < v <= 0.99,
    ),
]


class MemoryPlan(ApiModel):
    """How the replica uses the Mac's memory, decided by the memory planner before placement."""

    __rules__ = (
        Rule(
            rule="self.numBlocks * self.blockSize >= self.maxModelLen",
            message="memoryPlan.numBlocks x memoryPlan.blockSize must hold at least one sequence of "
            "memoryPlan.maxModelLen tokens",
            check=lambda p: p.num_blocks * p.block_size >= p.max_model_len,
            field_path=".numBlocks",
        ),
        Rule(
            rule="self.maxNumBatchedTokens >= self.maxNumSeqs",
            message="memoryPlan.maxNumBatchedTokens must be at least memoryPlan.maxNumSeqs (one token per "
            "sequence per step)",
            check=lambda p: p.max_num_batched_tokens >= p.max_num_seqs,
            field_path=".maxNumBatchedTokens",
        ),
    )

    weight_bytes: int = Field(ge=0, description="Bytes of weights in memory.")
    overhead_bytes: int = Field(ge=0, description="Activations, buffers and runtime overhead, in bytes.")
    kv_budget_bytes: Annotated[
        int,
        Rule(
            rule="self > 0",
            message="memoryPlan.kvBudgetBytes must be greater than 0: no room is left for the KV cache",
            check=lambda v: v > 0,
        ),
    ] = Field(description="Bytes set aside for the KV cache.")
    kv_bytes_per_token: int = Field(ge=1, description="KV-cache bytes per token of context.")
    block_size: BlockSize = Field(16, description="Tokens per KV-cache block.")
    num_blocks: int = Field(
        ge=1, description="KV-cache blocks: kvBudgetBytes / (blockSize x kvBytesPerToken)."
    )
    max_model_len: Annotated[
        int,
        Rule(
            rule="self >= 1",
            message="memoryPlan.maxModelLen must be at least 1 token",
            check=lambda v: v >= 1,
        ),
    ] = Field(description="The context length the engine is started with (--max-model-len).")
    max_num_seqs: int = Field(ge=1, description="Sequences served at once (--max-num-seqs).")
    max_num_batched_tokens: int = Field(
        ge=1, description="Tokens per engine step (--max-num-batched-tokens)."
    )
    gpu_memory_utilization: PlanUtilization = Field(
        description="The fraction of the GPU working set given to the engine (--gpu-memory-utilization)."
    )
    reserved_bytes: int = Field(
        ge=0, description="What this replica holds of the Mac's GPU working set (counted in allocatedBytes)."
    )


class ModelReplicaSpec(ApiModel):
    """What to run on which Mac (written by the controller when it binds the replica)."""

    __rules__ = (
        Rule(
            rule="self.model.endsWith('@' + self.digest)",
            message="spec.digest must equal the digest at the end of spec.model (the part after '@')",
            check=lambda s: s.model.endswith("@" + s.digest),
            field_path=".digest",
        ),
    )

    node_name: Annotated[
        str,
        Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN),
        Rule(
            rule="self == oldSelf",
            message="spec.nodeName is immutable: a replica stays on the Mac it was bound to; delete the "
            "replica and the controller creates a new one",
        ),
    ] = Field(description="The MacNode this replica runs on (immutable; agents select on this field).")
    deployment: str = Field(max_length=253, description="The name of the owning ModelDeployment.")
    model: Annotated[
        str,
        Field(max_length=512),
        Rule(
            rule=f"self.matches('{OCI_PINNED_REF}')",
            message="spec.model of a ModelReplica must be pinned by digest: oci://host[:port]/repository@sha256:"
            "<64 hex digits>",
            check=lambda v: re.search(OCI_PINNED_REF, v) is not None,
        ),
    ] = Field(description="The model pinned to its digest: oci://host[:port]/repository@sha256:<64 hex>.")
    digest: Annotated[
        str,
        Field(max_length=71),
        Rule(
            rule=f"self.matches('{DIGEST}')",
            message="spec.digest must be sha256: followed by 64 lowercase hex digits",
            check=lambda v: re.search(DIGEST, v) is not None,
        ),
    ] = Field(description="The model manifest's digest (sha256:<64 hex>).")
    engine: Engine = Field("vllm-metal", description="The inference engine.")
    engine_version: str | None = Field(None, max_length=64, description="The engine version to run.")
    memory_plan: MemoryPlan = Field(description="The memory plan the engine is started with.")
    engine_args: EngineArgs = Field(default_factory=list, description=ENGINE_ARGS_DESCRIPTION)
    env: EnvVars = Field(default_factory=list, description=ENV_DESCRIPTION)
    pull_secret_ref: SecretRef | None = Field(None, description="Registry credentials (from the deployment).")
    api_key_secret_ref: SecretKeyRef | None = Field(
        None, description="The API key Secret (from the deployment)."
    )
    served_model_name: str = Field(
        max_length=253, description="The name clients ask for in requests (the deployment's name)."
    )


class LastError(ApiModel):
    """The last failure of the replica."""

    reason: str | None = Field(None, max_length=128, description="A CamelCase reason, such as CrashLoop.")
    message: str | None = Field(None, max_length=4096, description="What failed, in words (log excerpt).")


class Measured(ApiModel):
    """Numbers the engine printed at start, to compare with the memory plan."""

    overhead_bytes: int | None = Field(None, ge=0, description="The overhead the engine measured.")
    num_blocks: int | None = Field(None, ge=0, description="The KV-cache blocks the engine allocated.")


# status.phase (ReplicaPhase, beside ReplicaSummary): CrashLoopBackOff, the engine crashed and waits to
# be restarted; Unknown, written by the controller while the Mac's Lease is expired.


class ModelReplicaStatus(ApiModel):
    """What the agent of spec.nodeName observed; the controller marks it Unknown while the Mac is NotReady."""

    observed_generation: int | None = Field(None, ge=0, description="The metadata.generation described.")
    phase: ReplicaPhase | None = Field(
        None,
        description="A one-word summary for display: Pending, Pulling, Starting, Ready, CrashLoopBackOff "
        "(waiting to restart a crashed engine), Failed, Terminating, Unknown (the Mac is NotReady: its "
        "agent's Lease expired; set by the controller until the agent reports again).",
    )
    message: str | None = Field(
        None,
        max_length=1024,
        description="One line for display: why the replica is not Ready (the exit and the next try "
        "during a backoff, the Mac's Lease age while Unknown).",
    )
    next_restart_time: datetime | None = Field(
        None, description="During CrashLoopBackOff: when the engine is started again (RFC 3339)."
    )
    conditions: Conditions = Field(default_factory=list, description="Scheduled, Pulled, Started and Ready.")
    progress: ReplicaProgress | None = Field(None, description="Download progress while pulling.")
    endpoint: str | None = Field(None, max_length=512, description='Where the engine serves: "address:port".')
    restarts: int | None = Field(None, ge=0, description="How many times the engine process was restarted.")
    last_error: LastError | None = Field(None, description="The last failure, if any.")
    start_time: datetime | None = Field(None, description="When the engine last started (RFC 3339).")
    measured: Measured | None = Field(None, description="Numbers the engine printed at start.")


class ModelReplica(ApiModel):
    """One engine process serving one model on one Mac; created and owned by a ModelDeployment."""

    api_version: Literal["orchardist.io/v1alpha1"] = Field(
        "orchardist.io/v1alpha1", description="orchardist.io/v1alpha1"
    )
    kind: Literal["ModelReplica"] = Field(MODEL_REPLICA, description="ModelReplica")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: ModelReplicaSpec = Field(description="What to run on which Mac (written by the controller).")
    status: ModelReplicaStatus = Field(
        default_factory=ModelReplicaStatus, description="What the agent observed."
    )
