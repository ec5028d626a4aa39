"""MacNode: one Mac in the fleet, registered and kept up to date by the agent running on it."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic.config import JsonDict

from orchardist.api.common import DIGEST, Conditions
from orchardist.api.constants import MAC_NODE
from orchardist.api.rules import ApiModel, Rule

# A qualified name as in label and taint keys: an optional DNS subdomain prefix and '/', then a name.
_PREFIX = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/"
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
QUALIFIED_NAME = rf"^({_PREFIX})?{_NAME}$"
LABEL_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"

TaintEffect = Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]


class Taint(ApiModel):
    """Keeps replicas off this Mac unless their ModelDeployment tolerates the taint."""

    key: Annotated[
        str,
        Field(min_length=1, max_length=316),
        Rule(
            rule=f"self.matches('{QUALIFIED_NAME}')",
            message="a taint key must be a qualified name such as dedicated or example.com/maintenance: an "
            "optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or '.', starting and "
            "ending with a letter or digit",
            check=lambda v: re.search(QUALIFIED_NAME, v) is not None,
        ),
    ] = Field(description="The taint's key, for example dedicated or example.com/maintenance.")
    value: Annotated[
        str,
        Field(max_length=63),
        Rule(
            rule=f"self.matches('{LABEL_VALUE}')",
            message="a taint value must be at most 63 letters, digits, '-', '_' or '.', starting and ending "
            "with a letter or digit",
            check=lambda v: re.search(LABEL_VALUE, v) is not None,
        ),
    ] = Field("", description="The taint's value (may be empty).")
    # An enum, not a CEL rule: the API server skips CEL once an enum fails.
    effect: TaintEffect = Field(
        description="NoSchedule (no new replicas), PreferNoSchedule (avoid this Mac when possible) or "
        "NoExecute (also move running replicas away)."
    )


def _no_schema_default(schema: JsonDict) -> None:
    """Missing means false, read through the model; a default in the CRD would be filled in when the
    agent creates its MacNode and owned by the agent, so a user's apply of the field would conflict."""
    schema.pop("default", None)


class MacNodeSpec(ApiModel):
    """What the user decides about this Mac (the agent creates its MacNode without a spec)."""

    unschedulable: bool = Field(
        False,
        description="When true, no new replicas are placed on this Mac; missing means false.",
        json_schema_extra=_no_schema_default,
    )
    taints: list[Taint] = Field(
        default_factory=list,
        max_length=32,
        description="Taints that keep replicas without a matching toleration off this Mac.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["key", "effect"]},
    )


class Chip(ApiModel):
    """The Apple silicon chip."""

    name: str | None = Field(
        None, max_length=128, description='The chip\'s full name, such as "Apple M4 Pro".'
    )
    family: str | None = Field(None, max_length=64, description='The chip family, such as "M4 Pro".')
    model_identifier: str | None = Field(
        None, max_length=64, description='The Mac\'s model identifier, such as "Mac16,11".'
    )


class Cpu(ApiModel):
    """CPU cores by kind."""

    performance_cores: int | None = Field(None, ge=0, description="Performance cores.")
    efficiency_cores: int | None = Field(None, ge=0, description="Efficiency cores.")


class Memory(ApiModel):
    """Unified memory, and how much of it the GPU may use."""

    __rules__ = (
        Rule(
            rule="!has(self.totalBytes) || !has(self.gpuWorkingSetBytes) || self.gpuWorkingSetBytes <= "
            "self.totalBytes",
            message="status.memory.gpuWorkingSetBytes cannot be larger than status.memory.totalBytes",
            check=lambda m: (
                m.total_bytes is None
                or m.gpu_working_set_bytes is None
                or m.gpu_working_set_bytes <= m.total_bytes
            ),
            field_path=".gpuWorkingSetBytes",
        ),
    )

    total_bytes: int | None = Field(None, ge=0, description="Physical memory (hw.memsize).")
    gpu_working_set_bytes: int | None = Field(
        None, ge=0, description="The most memory the GPU may keep resident (Metal's recommended working set)."
    )
    gpu_working_set_source: Literal["mlx", "sysctl", "estimate", "simulated"] | None = Field(
        None, description="Where gpuWorkingSetBytes came from: mlx, sysctl, estimate or simulated."
    )
    wired_limit_bytes: int | None = Field(
        None,
        ge=0,
        description="The GPU wired-memory limit (iogpu.wired_limit_mb); 0 means the macOS default.",
    )
    allocated_bytes: int | None = Field(
        None, ge=0, description="Memory reserved by the replicas placed on this Mac (their memory plans)."
    )
    total: str | None = Field(None, max_length=16, description='totalBytes for display, such as "64Gi".')
    gpu_working_set: str | None = Field(
        None, max_length=16, description='gpuWorkingSetBytes for display, such as "48Gi".'
    )
    allocated: str | None = Field(
        None, max_length=16, description='allocatedBytes for display, such as "20Gi".'
    )
    free: str | None = Field(
        None,
        max_length=16,
        description='The GPU working set not allocated to replicas, for display, such as "28Gi".',
    )


class ModelStore(ApiModel):
    """The agent's local store of model layers."""

    path: str | None = Field(None, max_length=4096, description="The store's directory on the Mac.")
    free_bytes: int | None = Field(None, ge=0, description="Free bytes on the store's disk.")
    used_bytes: int | None = Field(None, ge=0, description="Bytes the store holds.")
    budget_bytes: int | None = Field(None, ge=0, description="The most bytes the store may hold.")


class InstalledEngine(ApiModel):
    """An engine installed on the Mac."""

    name: str = Field(max_length=64, description="The engine's name, such as vllm-metal or mlx-lm.")
    version: str | None = Field(None, max_length=64, description="The installed version.")


class CachedModel(ApiModel):
    """A model whose layers are already in the Mac's store."""

    digest: str = Field(pattern=DIGEST, description="The model manifest's digest (sha256:<64 hex>).")
    size_bytes: int | None = Field(None, ge=0, description="Bytes the model's layers take in the store.")


class MacNodeStatus(ApiModel):
    """What the Mac's agent observed (written only by that agent)."""

    chip: Chip | None = Field(None, description="The Apple silicon chip.")
    cpu: Cpu | None = Field(None, description="CPU cores by kind.")
    gpu_cores: int | None = Field(None, ge=0, description="GPU cores.")
    memory: Memory | None = Field(None, description="Unified memory and the GPU's share of it.")
    memory_bandwidth_bytes_per_second: int | None = Field(
        None, ge=0, description="Memory bandwidth, which bounds token generation speed."
    )
    os_version: str | None = Field(None, max_length=64, description="The macOS version, such as 15.5.")
    model_store: ModelStore | None = Field(None, description="The agent's local store of model layers.")
    engines: list[InstalledEngine] = Field(
        default_factory=list,
        description="Engines installed on the Mac, with versions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    cached_models: list[CachedModel] = Field(
        default_factory=list,
        description="Models whose layers are already on the Mac (placement prefers these Macs).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["digest"]},
    )
    address: str | None = Field(
        None, max_length=253, description="The address replicas on this Mac serve on."
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="The port of the agent's Prometheus metrics on `address` (absent: not served).",
    )
    agent_version: str | None = Field(None, max_length=64, description="The agent's version.")
    simulated_profile: str | None = Field(
        None,
        max_length=128,
        description="The simulated Mac profile, set only when the agent simulates a Mac.",
    )
    conditions: Conditions = Field(
        default_factory=list, description="Ready (heartbeat), MemoryPressure and DiskPressure."
    )


class MacNode(ApiModel):
    """A Mac that serves models: its chip, memory and store (status) and whether it takes replicas (spec)."""

    api_version: Literal["orchardist.io/v1alpha1"] = Field(
        "orchardist.io/v1alpha1", description="orchardist.io/v1alpha1"
    )
    kind: Literal["MacNode"] = Field(MAC_NODE, description="MacNode")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: MacNodeSpec = Field(
        default_factory=MacNodeSpec, description="What the user decides about this Mac."
    )
    status: MacNodeStatus = Field(default_factory=MacNodeStatus, description="What the Mac's agent observed.")

    @field_validator("spec", mode="before")
    @classmethod
    def _null_spec(cls, value: Any) -> Any:
        """A server-side apply of ``spec: {}`` that drops the last field leaves a null spec (the
        CRD lets it be null): read as the empty spec."""
        return {} if value is None else value
