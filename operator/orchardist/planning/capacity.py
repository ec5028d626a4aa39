"""The planner's view of a Mac (``NodeCapacity``), from a named profile or from a registered MacNode.

Pure: the caller reads the MacNode and its ModelReplicas; this only decides what they mean for
the plan, so ``orchardist plan --node`` and the controller agree on what a Mac has left.
"""

from __future__ import annotations

from collections.abc import Iterable

from orchardist.api import MacNode, ModelReplica
from orchardist.planning.macs import MacProfile
from orchardist.planning.memory import NodeCapacity


class CapacityError(ValueError):
    """A MacNode the planner cannot plan on (its agent has not reported a working set yet)."""


def from_profile(profile: MacProfile, reserved_bytes: int = 0) -> NodeCapacity:
    """A named Mac as a real agent would report it."""
    return NodeCapacity(
        gpu_working_set_bytes=profile.gpu_working_set_bytes,
        memory_bandwidth_bytes_per_second=profile.memory_bandwidth_bytes_per_second,
        total_memory_bytes=profile.memory_bytes,
        reserved_bytes=reserved_bytes,
        name=profile.name,
    )


def held_by_replicas(node_name: str, replicas: Iterable[ModelReplica]) -> int:
    """Working-set bytes the replicas bound to ``node_name`` hold (terminating ones too: until an
    engine exits, its memory is still taken), as the controller counts them."""
    return sum(r.spec.memory_plan.reserved_bytes for r in replicas if r.spec.node_name == node_name)


def from_macnode(
    node: MacNode, replicas: Iterable[ModelReplica] = (), extra_reserved: int = 0
) -> NodeCapacity:
    """What a registered Mac offers: its agent's working set and bandwidth, minus what is held there.

    Held is the larger of the agent's ``allocatedBytes`` and the replicas bound to the Mac: the
    agent counts what it runs, the controller counts what it bound, and either may lag the other by
    a heartbeat; planning against the larger never promises memory that is taken.
    """
    name = str(node.metadata.get("name") or "")
    memory = node.status.memory
    if memory is None or not memory.gpu_working_set_bytes:
        raise CapacityError(f"MacNode {name!r} reports no GPU working set yet (is its agent running?)")
    held = max(memory.allocated_bytes or 0, held_by_replicas(name, replicas))
    return NodeCapacity(
        gpu_working_set_bytes=memory.gpu_working_set_bytes,
        memory_bandwidth_bytes_per_second=node.status.memory_bandwidth_bytes_per_second or None,
        total_memory_bytes=memory.total_bytes or None,
        reserved_bytes=held + extra_reserved,
        name=name,
    )
