"""The memory plan: vllm-metal's own KV-cache rule, computed before launch.

vllm-metal (notes §1.6, snapshot 2026-08-22, ``vllm_metal/v1/cache_policy.py``) sizes its paged KV pool as

    kv_budget  = int(max_recommended_working_set_size x gpu_memory_utilization) - model_memory - overhead
    num_blocks = kv_budget // (block_size x kv_bytes_per_token)

and refuses to start when the budget is <= 0 or ``num_blocks < 16``; vLLM then refuses a
``--max-model-len`` whose one sequence does not fit the pool. The controller places with this plan
and the agent launches with it, so the plan the scheduler trusted is the plan the engine gets.

Several replicas on one Mac: each engine believes the whole working set is its own (it sets the wired
limit to all of it), so the planner partitions explicitly: what co-located replicas hold comes off
the budget first, and a replica that takes only part of the Mac gets its own
``gpu_memory_utilization = its reservation / working set`` (notes §1.6 "design consequences", §5.2).

Pure: no I/O, no clock. Every constant says where it comes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from orchardist.planning.profile import ModelProfile

GiB: Final = 1 << 30

#: vllm-metal ``PAGED_ATTENTION_MIN_BLOCKS`` ("computed num_blocks too low" below it; notes 1.6 item 9).
PAGED_ATTENTION_MIN_BLOCKS: Final = 16

#: vLLM >= 0.27 default ``--gpu-memory-utilization`` (``vllm/config/cache.py``); on Metal it multiplies
#: the GPU working set, not RAM (notes 5.2).
DEFAULT_GPU_MEMORY_UTILIZATION: Final = 0.92

#: vLLM's default ``--block-size``; Metal kernels take 8, 16 or 32 (notes 1.6 item 13).
DEFAULT_BLOCK_SIZE: Final = 16
BLOCK_SIZES: Final = (8, 16, 32)

#: vLLM's default ``--max-num-seqs`` cap for the API server (notes 5.2). The planner never defaults
#: above it, and lower when fewer full-length sequences fit the pool.
DEFAULT_MAX_NUM_SEQS: Final = 256

#: vLLM picks bigger batch defaults on devices with >= 70 GiB (vllm-metal reports RAM as device
#: memory): ``--max-num-batched-tokens`` 2048 below, 8192 at or above (notes 5.2).
LARGE_DEVICE_BYTES: Final = 70 * GiB
MAX_NUM_BATCHED_TOKENS_SMALL: Final = 2048
MAX_NUM_BATCHED_TOKENS_LARGE: Final = 8192

#: Default engine overhead = base + per batched token. vllm-metal measures ``overhead`` as the growth
#: of MLX's buffer cache during one dummy forward of ``max_num_batched_tokens`` tokens (notes 1.6
#: item 3), so it scales with that flag: "lowering --max-num-batched-tokens lowers it", which is why
#: the 16/32 GB recipes use 2048/1024. Observed in issue logs at the 2048 default: 1.42 GB (0.6B
#: model, 8 GB Mac), 2.06-2.09 GB (4B and 27B models). base 1 GiB + 512 KiB x 2048 = 2 GiB (2.15 GB)
#: covers every observation with a little room; the slope (0.5 GiB saved per 1024 fewer tokens) is
#: an assumption until the agent calibrates it from the engine's "memory breakdown" log line
#: (``ModelReplica.status.measured.overheadBytes``). ``--overhead`` overrides it.
OVERHEAD_BASE_BYTES: Final = 1 * GiB
OVERHEAD_PER_BATCHED_TOKEN_BYTES: Final = 512 * 1024


@dataclass(frozen=True)
class NodeCapacity:
    """What the planner needs of a Mac: its GPU working set, bandwidth, and what others hold there."""

    gpu_working_set_bytes: int
    memory_bandwidth_bytes_per_second: int | None = None
    total_memory_bytes: int | None = None
    #: Bytes of the working set already reserved by replicas placed on this Mac.
    reserved_bytes: int = 0
    name: str = ""


@dataclass(frozen=True)
class PlanRequest:
    """What the deployment asks for (``ModelDeployment.spec``); ``None`` means "choose for me"."""

    context_length: int | None = None
    max_num_seqs: int | None = None
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    block_size: int = DEFAULT_BLOCK_SIZE
    overhead_bytes: int | None = None
    max_num_batched_tokens: int | None = None


@dataclass(frozen=True)
class MemoryPlan:
    """The plan: field for field ``ModelReplica.spec.memoryPlan`` plus the verdict and predictions."""

    weight_bytes: int
    overhead_bytes: int
    kv_budget_bytes: int
    kv_bytes_per_token: int
    block_size: int
    num_blocks: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float
    reserved_bytes: int
    fits: bool
    reason: str
    max_tokens: int
    predicted_decode_tokens_per_s: float | None
    #: int(working set x requested utilization): what the engine may use before weights and overhead.
    usable_bytes: int = 0
    #: Linear-attention state charged for ``max_num_seqs`` sequences (0 for pure-attention models).
    linear_state_bytes: int = 0

    def to_spec(self) -> dict[str, Any]:
        """``ModelReplica.spec.memoryPlan`` (camelCase, as docs/architecture.md names it)."""
        return {
            "weightBytes": self.weight_bytes,
            "overheadBytes": self.overhead_bytes,
            "kvBudgetBytes": self.kv_budget_bytes,
            "kvBytesPerToken": self.kv_bytes_per_token,
            "blockSize": self.block_size,
            "numBlocks": self.num_blocks,
            "maxModelLen": self.max_model_len,
            "maxNumSeqs": self.max_num_seqs,
            "maxNumBatchedTokens": self.max_num_batched_tokens,
            "gpuMemoryUtilization": self.gpu_memory_utilization,
            "reservedBytes": self.reserved_bytes,
        }

    def to_json(self) -> dict[str, Any]:
        """The stable keys of ``orchardist plan --json`` (issue 4), then the rest of the plan."""
        return {
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_budget_bytes": self.kv_budget_bytes,
            "num_blocks": self.num_blocks,
            "max_tokens": self.max_tokens,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "fits": self.fits,
            "reason": self.reason,
            "predicted_decode_tokens_per_s": self.predicted_decode_tokens_per_s,
            "weight_bytes": self.weight_bytes,
            "overhead_bytes": self.overhead_bytes,
            "block_size": self.block_size,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "reserved_bytes": self.reserved_bytes,
        }


def gib(n: int | float) -> str:
    """Bytes as GiB with one decimal, the unit every reason speaks."""
    return f"{n / GiB:.1f} GiB"


def default_max_num_batched_tokens(node: NodeCapacity) -> int:
    """vLLM's per-device default, judged on RAM (what vllm-metal reports), else the working set."""
    memory = node.total_memory_bytes or node.gpu_working_set_bytes
    return MAX_NUM_BATCHED_TOKENS_LARGE if memory >= LARGE_DEVICE_BYTES else MAX_NUM_BATCHED_TOKENS_SMALL


def default_overhead_bytes(max_num_batched_tokens: int) -> int:
    """Profiled activation overhead for a dummy batch of ``max_num_batched_tokens`` (see the constants)."""
    return OVERHEAD_BASE_BYTES + OVERHEAD_PER_BATCHED_TOKEN_BYTES * max_num_batched_tokens


def blocks_for_sequence(profile: ModelProfile, tokens: int, block_size: int) -> int:
    """Pool blocks one sequence of ``tokens`` needs: whole blocks, sliding layers capped at the window."""
    if tokens <= 0:
        return 0
    per_block = block_size * profile.kv_bytes_per_token
    if per_block == 0:
        return 0
    rounded = -(-tokens // block_size) * block_size
    return -(-profile.sequence_kv_bytes(rounded) // per_block)


def largest_context(profile: ModelProfile, num_blocks: int, block_size: int) -> int:
    """The longest single sequence (<= the model's maximum) whose blocks fit in ``num_blocks``."""
    limit = profile.max_position_embeddings
    if blocks_for_sequence(profile, limit, block_size) <= num_blocks:
        return limit
    lo, hi = 0, -(-limit // block_size)  # in blocks of tokens; lo always fits, hi never does
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if blocks_for_sequence(profile, mid * block_size, block_size) <= num_blocks:
            lo = mid
        else:
            hi = mid
    return lo * block_size


def _decode_tokens_per_s(profile: ModelProfile, node: NodeCapacity, max_model_len: int) -> float | None:
    """Upper bound for one stream: bandwidth / bytes read per token (all weights + the KV in use).

    Decode reads every weight once per step and the sequence's whole KV cache; the KV is taken at
    half of ``max_model_len`` (a sequence mid-way). MoE models read fewer weights: an underestimate.
    """
    if not node.memory_bandwidth_bytes_per_second:
        return None
    read = profile.weight_bytes + profile.sequence_kv_bytes(max_model_len // 2)
    read += profile.linear_state_bytes_per_sequence
    if read <= 0:
        return None
    return round(node.memory_bandwidth_bytes_per_second / read, 1)


def _refuse(
    profile: ModelProfile,
    node: NodeCapacity,
    request: PlanRequest,
    *,
    reason: str,
    overhead: int,
    budget: int,
    batched: int,
    usable: int,
    num_blocks: int = 0,
    max_model_len: int = 0,
) -> MemoryPlan:
    return MemoryPlan(
        weight_bytes=profile.weight_bytes,
        overhead_bytes=overhead,
        kv_budget_bytes=budget,
        kv_bytes_per_token=profile.kv_bytes_per_token,
        block_size=request.block_size,
        num_blocks=max(num_blocks, 0),
        max_model_len=max_model_len,
        max_num_seqs=0,
        max_num_batched_tokens=batched,
        gpu_memory_utilization=request.gpu_memory_utilization,
        reserved_bytes=0,
        fits=False,
        reason=reason,
        max_tokens=max(num_blocks, 0) * request.block_size,
        predicted_decode_tokens_per_s=None,
        usable_bytes=usable,
    )


def validate(request: PlanRequest) -> None:
    """Refuse requests no engine accepts (raised, not planned: they are the caller's mistake)."""
    if request.block_size not in BLOCK_SIZES:
        raise ValueError(
            f"block size {request.block_size}: Metal kernels take {', '.join(map(str, BLOCK_SIZES))}"
        )
    if not 0 < request.gpu_memory_utilization <= 1:
        raise ValueError(f"gpu memory utilization {request.gpu_memory_utilization} is not in (0, 1]")
    if request.context_length is not None and request.context_length < 1:
        raise ValueError(f"context length {request.context_length} must be >= 1")
    if request.max_num_seqs is not None and request.max_num_seqs < 1:
        raise ValueError(f"max num seqs {request.max_num_seqs} must be >= 1")
    if request.overhead_bytes is not None and request.overhead_bytes < 0:
        raise ValueError(f"overhead {request.overhead_bytes} must be >= 0")


def plan(profile: ModelProfile, node: NodeCapacity, request: PlanRequest | None = None) -> MemoryPlan:
    """Plan one replica of ``profile`` on ``node``: the vllm-metal rule, the chosen flags, the verdict."""
    request = request or PlanRequest()
    validate(request)
    ws = node.gpu_working_set_bytes
    bs = request.block_size
    batched = request.max_num_batched_tokens or default_max_num_batched_tokens(node)
    if request.max_num_seqs is not None:
        batched = max(batched, request.max_num_seqs)  # vLLM requires max_num_batched_tokens >= max_num_seqs
    overhead = (
        request.overhead_bytes if request.overhead_bytes is not None else default_overhead_bytes(batched)
    )
    usable = int(ws * request.gpu_memory_utilization)
    weights = profile.weight_bytes
    budget = usable - weights - overhead - node.reserved_bytes

    def refuse(reason: str, **kw: int) -> MemoryPlan:
        return _refuse(
            profile,
            node,
            request,
            reason=reason,
            overhead=overhead,
            budget=budget,
            batched=batched,
            usable=usable,
            **kw,
        )

    if weights > ws:
        return refuse(f"weights need {gib(weights)}; this Mac's GPU working set is {gib(ws)}")
    if budget <= 0:
        held = f" + {gib(node.reserved_bytes)} held by other replicas" if node.reserved_bytes else ""
        return refuse(
            f"no memory left for the KV cache: weights {gib(weights)} + overhead {gib(overhead)}{held} "
            f"exceed {request.gpu_memory_utilization:g} x working set {gib(ws)} = {gib(usable)} "
            f"by {gib(-budget)}"
        )

    # Linear-attention layers (Qwen3-Next, Qwen3.5) keep a constant state per sequence, charged per
    # concurrent sequence before the paged pool (vllm-metal's hybrid reservation, notes 1.6 item 7,
    # 5.1). The context is sized with room for one sequence's state; the concurrency then takes
    # state + a full-length sequence's blocks each. Pure-attention models have state 0.
    state = profile.linear_state_bytes_per_sequence
    per_block = bs * profile.kv_bytes_per_token
    if budget - state <= 0:
        return refuse(
            f"one sequence's linear-attention state ({gib(state)}) exceeds the {gib(budget)} "
            "left after weights and overhead"
        )
    one = (budget - state) // per_block if per_block else PAGED_ATTENTION_MIN_BLOCKS
    if one < PAGED_ATTENTION_MIN_BLOCKS:
        return refuse(
            f"KV budget {gib(budget - state)} holds {one} blocks of {bs} tokens; "
            f"vllm-metal needs at least {PAGED_ATTENTION_MIN_BLOCKS}",
            num_blocks=one,
        )

    fitting = largest_context(profile, one, bs)
    limit = profile.max_position_embeddings
    if request.context_length is not None:
        if request.context_length > limit:
            return refuse(
                f"context {request.context_length:,} exceeds the model's maximum {limit:,}",
                num_blocks=one,
                max_model_len=fitting,
            )
        need = blocks_for_sequence(profile, request.context_length, bs)
        if need > one:
            return refuse(
                f"one {request.context_length:,}-token sequence needs {gib(need * per_block)} of KV; "
                f"the budget holds {gib(one * per_block)} ({one * bs:,} tokens), "
                f"so the longest context that fits is {fitting:,}",
                num_blocks=one,
                max_model_len=fitting,
            )
        max_model_len = request.context_length
    else:
        max_model_len = fitting

    per_sequence = max(blocks_for_sequence(profile, max_model_len, bs), 1)
    if request.max_num_seqs is not None:
        seqs = request.max_num_seqs
    else:  # as many full-length sequences as fit at once, within vLLM's default cap
        seqs = max(1, min(DEFAULT_MAX_NUM_SEQS, budget // (state + per_sequence * per_block)))
    linear_reserve = state * seqs
    available = (budget - linear_reserve) // per_block if per_block else PAGED_ATTENTION_MIN_BLOCKS
    if available < max(per_sequence, PAGED_ATTENTION_MIN_BLOCKS):
        return refuse(
            f"linear-attention state for {seqs} sequences ({gib(linear_reserve)}) leaves "
            f"{gib(max(budget - linear_reserve, 0))} of KV, less than one {max_model_len:,}-token sequence",
            num_blocks=max(available, 0),
            max_model_len=fitting,
        )

    # Partition: a replica with a pinned context and concurrency reserves only what it can use, and
    # any replica sharing the Mac runs with its own fraction of the working set.
    pool = available
    if request.context_length is not None and request.max_num_seqs is not None:
        pool = min(available, max(PAGED_ATTENTION_MIN_BLOCKS, seqs * per_sequence))
    if node.reserved_bytes > 0 or pool < available:
        needed = weights + overhead + linear_reserve + pool * per_block
        utilization = math.ceil(needed / ws * 10_000) / 10_000
    else:
        utilization = request.gpu_memory_utilization
    reserved = int(ws * utilization)
    engine_budget = reserved - weights - overhead  # what the engine itself will compute
    num_blocks = (engine_budget - linear_reserve) // per_block if per_block else pool
    max_tokens = num_blocks * bs

    at_full = num_blocks // per_sequence
    window = (
        f"; sliding layers keep {profile.sliding_window:,} tokens"
        if profile.sliding_window is not None
        else ""
    )
    shared = (
        f"; {utilization:g} of the working set ({gib(reserved)})"
        if utilization != request.gpu_memory_utilization
        else ""
    )
    reason = (
        f"fits: KV pool {gib(num_blocks * per_block)} = {num_blocks:,} blocks = {max_tokens:,} tokens; "
        f"max context {max_model_len:,} ({at_full} at full length){window}; "
        f"max {seqs} sequence{'' if seqs == 1 else 's'} at once{shared}"
    )
    return MemoryPlan(
        weight_bytes=weights,
        overhead_bytes=overhead,
        kv_budget_bytes=engine_budget,
        kv_bytes_per_token=profile.kv_bytes_per_token,
        block_size=bs,
        num_blocks=num_blocks,
        max_model_len=max_model_len,
        max_num_seqs=seqs,
        max_num_batched_tokens=batched,
        gpu_memory_utilization=utilization,
        reserved_bytes=reserved,
        fits=True,
        reason=reason,
        max_tokens=max_tokens,
        predicted_decode_tokens_per_s=_decode_tokens_per_s(profile, node, max_model_len),
        usable_bytes=usable,
        linear_state_bytes=linear_reserve,
    )
