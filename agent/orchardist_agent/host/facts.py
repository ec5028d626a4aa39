"""HostFacts: what the host probe observes, field for field ``MacNode.status`` (docs/architecture.md).

camelCase on the wire (``model_dump(by_alias=True)``), snake_case in Python. Only the agent's
observed facts live here; conditions, engines and cached models are the node loop's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

WorkingSetSource = Literal["mlx", "sysctl", "estimate", "simulated"]


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


class Chip(_Camel):
    name: str | None = None  # "Apple M4 Pro"
    family: str | None = None  # "M4 Pro"
    model_identifier: str | None = None  # "Mac16,11"


class Cpu(_Camel):
    performance_cores: int | None = None
    efficiency_cores: int | None = None


class Memory(_Camel):
    total_bytes: int | None = None
    gpu_working_set_bytes: int | None = None
    gpu_working_set_source: WorkingSetSource | None = None
    wired_limit_bytes: int | None = None
    allocated_bytes: int | None = None
    total: str | None = None  # display: "64Gi"
    gpu_working_set: str | None = None  # display: "48Gi"


class ModelStore(_Camel):
    path: str | None = None
    free_bytes: int | None = None
    used_bytes: int | None = None
    budget_bytes: int | None = None


class HostFacts(_Camel):
    chip: Chip = Chip()
    cpu: Cpu = Cpu()
    gpu_cores: int | None = None
    memory: Memory = Memory()
    memory_bandwidth_bytes_per_second: int | None = None
    os_version: str | None = None
    model_store: ModelStore = ModelStore()
    address: str | None = None
    agent_version: str | None = None
    simulated_profile: str | None = None


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
