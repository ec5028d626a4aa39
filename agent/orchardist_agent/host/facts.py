"""HostFacts: what the host probe observes, field for field ``MacNode.status`` (docs/architecture.md).

The parts are the API's own types (``orchardist.api.macnode``), so a fact the API would refuse (a
working set larger than RAM, a negative core count) fails here, in the agent, not at the API server.
camelCase on the wire (``model_dump(by_alias=True)``), snake_case in Python. Only the agent's
observed facts live here; conditions, engines and cached models are the node loop's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from orchardist.api.macnode import Chip, Cpu, Memory, ModelStore
from orchardist.api.rules import ApiModel

__all__ = [
    "Chip",
    "Cpu",
    "HostFacts",
    "Memory",
    "ModelStore",
    "WorkingSetSource",
    "display_gi",
    "memory_facts",
]

#: Where the GPU working set came from; the values of ``Memory.gpu_working_set_source``.
WorkingSetSource = Literal["mlx", "sysctl", "estimate", "simulated"]


class HostFacts(ApiModel):
    """The observed part of ``MacNodeStatus``: everything but engines, cached models and conditions."""

    chip: Chip = Field(default_factory=Chip)
    cpu: Cpu = Field(default_factory=Cpu)
    gpu_cores: int | None = Field(None, ge=0)
    memory: Memory = Field(default_factory=Memory)
    memory_bandwidth_bytes_per_second: int | None = Field(None, ge=0)
    os_version: str | None = Field(None, max_length=64)
    model_store: ModelStore = Field(default_factory=ModelStore)
    address: str | None = Field(None, max_length=253)
    agent_version: str | None = Field(None, max_length=64)
    simulated_profile: str | None = Field(None, max_length=128)


def display_gi(n: int | None) -> str | None:
    """Bytes as the printer-column string: "64Gi", "107.5Gi"."""
    if n is None:
        return None
    value = n / (1 << 30)
    return f"{value:.0f}Gi" if abs(value - round(value)) < 0.05 else f"{value:.1f}Gi"


def memory_facts(
    total: int | None,
    working_set: int | None,
    source: WorkingSetSource | None,
    wired_limit: int | None = None,
) -> Memory:
    """Memory with its display strings written at the same time as the numbers."""
    return Memory(
        total_bytes=total,
        gpu_working_set_bytes=working_set,
        gpu_working_set_source=source,
        wired_limit_bytes=wired_limit,
        total=display_gi(total),
        gpu_working_set=display_gi(working_set),
    )
