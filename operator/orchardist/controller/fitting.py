"""The scheduler's ``fit`` function for one deployment: ``orchardist.planning`` bound to its model.

Pure. Results are memoised by the Mac's shape and the free bytes, because a fleet has few distinct
Mac shapes and the scheduler asks the same question many times.
"""

from __future__ import annotations

from orchardist.api.modeldeployment import ModelDeploymentSpec
from orchardist.controller.scheduler import Fit, FitFn, Mac, Misfit, gib
from orchardist.planning import memory
from orchardist.planning.profile import ModelProfile


def plan_request(spec: ModelDeploymentSpec) -> memory.PlanRequest:
    return memory.PlanRequest(
        context_length=spec.context_length,
        max_num_seqs=spec.max_concurrent_sequences,
        gpu_memory_utilization=spec.kv_cache.gpu_memory_utilization,
        block_size=spec.kv_cache.block_size,
    )


def fit_for(profile: ModelProfile, request: memory.PlanRequest) -> FitFn:
    """``fit(mac, free)``: the replica's memory plan on ``mac`` with ``free`` working-set bytes left."""
    cache: dict[tuple[int, int, int, int], Fit | Misfit] = {}

    def fit(mac: Mac, free: int) -> Fit | Misfit:
        key = (mac.working_set_bytes, mac.total_bytes, mac.bandwidth, free)
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = _fit(profile, request, mac, free)
        return hit

    return fit


def _fit(profile: ModelProfile, request: memory.PlanRequest, mac: Mac, free: int) -> Fit | Misfit:
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
        return Fit(p.to_spec(), p.reserved_bytes)
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
