"""The scheduler's ``fit`` function for one deployment: ``orchardist.planning`` bound to its model.

Pure. Results are memoised by the Mac's shape and the free bytes, because a fleet has few distinct
Mac shapes and the scheduler asks the same question many times.
"""

from __future__ import annotations

from typing import Any

from orchardist.api.modeldeployment import ModelDeploymentSpec
from orchardist.controller.scheduler import Fit, FitFn, Mac, Misfit, gib
from orchardist.planning import memory
from orchardist.planning.profile import ModelProfile

#: The smallest --gpu-memory-utilization the ModelReplica API accepts (spec.memoryPlan minimum 0.1).
MIN_SHARE = 0.1


def plan_request(spec: ModelDeploymentSpec) -> memory.PlanRequest:
    return memory.PlanRequest(
        context_length=spec.context_length,
        max_num_seqs=spec.max_concurrent_sequences,
        gpu_memory_utilization=spec.kv_cache.gpu_memory_utilization,
        block_size=spec.kv_cache.block_size,
    )


def fit_for(profile: ModelProfile, request: memory.PlanRequest, min_share: float | None = None) -> FitFn:
    """``fit(mac, free)``: the replica's memory plan on ``mac`` with ``free`` working-set bytes left.

    ``min_share``: the smallest engine share of the working set a replica may get (default: the
    ModelReplica API's floor, :data:`MIN_SHARE`).
    """
    floor = MIN_SHARE if min_share is None else min_share
    cache: dict[tuple[int, int, int, int], Fit | Misfit] = {}

    def fit(mac: Mac, free: int) -> Fit | Misfit:
        key = (mac.working_set_bytes, mac.total_bytes, mac.bandwidth, free)
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = _fit(profile, request, mac, free, floor)
        return hit

    return fit


def _at_least_min_share(spec: dict[str, Any], ws: int, free: int, floor: float) -> Fit | Misfit:
    """A small replica sharing a big Mac may plan a share below the API's 0.1 floor; round it up.

    The engine then really holds 0.1 of the working set, so the reservation and the KV pool grow to
    match (the plan stays what the engine will compute), and the larger reservation must still fit.
    """
    share = float(spec["gpuMemoryUtilization"])
    if share >= floor:
        return Fit(spec, int(spec["reservedBytes"]))
    reserved = int(ws * floor)
    if reserved > free:
        return Misfit(
            reserved,
            free,
            f"the smallest engine share ({floor:g} of the working set) needs {gib(reserved)}",
        )
    per_block = int(spec["blockSize"]) * int(spec["kvBytesPerToken"])
    kv = reserved - int(spec["weightBytes"]) - int(spec["overheadBytes"])
    out = {
        **spec,
        "gpuMemoryUtilization": floor,
        "reservedBytes": reserved,
        "kvBudgetBytes": kv,
        "numBlocks": kv // per_block if per_block else spec["numBlocks"],
    }
    return Fit(out, reserved)


def _fit(
    profile: ModelProfile, request: memory.PlanRequest, mac: Mac, free: int, floor: float
) -> Fit | Misfit:
    ws = mac.working_set_bytes
    node = memory.NodeCapacity(
        gpu_working_set_bytes=ws,
        memory_bandwidth_bytes_per_second=mac.bandwidth or None,
        total_memory_bytes=mac.total_bytes or None,
        reserved_bytes=max(0, ws - free),
        name=mac.name,
    )
    p = memory.plan(profile, node, request)
    if p.fits:
        return _at_least_min_share(p.to_spec(), ws, free, floor)
    # What the smallest runnable replica needs, against what this Mac can still give the engine.
    tokens = request.context_length or request.block_size * memory.PAGED_ATTENTION_MIN_BLOCKS
    blocks = max(
        memory.blocks_for_sequence(profile, tokens, request.block_size), memory.PAGED_ATTENTION_MIN_BLOCKS
    )
    kv = blocks * request.block_size * profile.kv_bytes_per_token
    need = p.weight_bytes + p.overhead_bytes + kv + profile.linear_state_bytes_per_sequence
    usable = max(0, p.usable_bytes - node.reserved_bytes)
    if request.context_length and request.context_length > profile.max_position_embeddings:
        return Misfit(need, usable, p.reason)
    what = (
        f"weights {gib(p.weight_bytes)} + engine overhead {gib(p.overhead_bytes)} + KV for {tokens:,} tokens "
        f"{gib(kv)} need {gib(need)}"
    )
    return Misfit(need, usable, what)
