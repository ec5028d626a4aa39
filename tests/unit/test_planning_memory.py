"""Memory plans against hand computations.

Every expected value is written out from the config's numbers and the Mac's figures (not by calling
planner helpers): working set x 0.92, minus weights, minus overhead (1 GiB + 512 KiB per batched
token; 2048 batched tokens below 70 GiB of RAM, 8192 at or above), divided by 16 tokens x KV bytes
per token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchardist.planning import macs
from orchardist.planning.memory import MemoryPlan, NodeCapacity, PlanRequest, plan
from orchardist.planning.profile import ModelProfile, from_config

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "model-configs"
GiB = 2**30
KiB = 2**10
OVERHEAD_2048 = 1 * GiB + 512 * KiB * 2048  # = 2 GiB
OVERHEAD_8192 = 1 * GiB + 512 * KiB * 8192  # = 5 GiB

# Weight bytes of the artifacts (inputs; the planner takes them as given).
W_70B_4BIT = 39_700_000_000  # mlx-community Llama-3.3-70B-Instruct-4bit ≈ 39.7 GB (notes §5.1)
W_8B_BF16 = 16_060_556_376  # Llama-3.1-8B safetensors, bf16
W_MISTRAL_BF16 = 14_483_464_192
W_QWEN25_7B_BF16 = 15_231_233_024
W_QWEN3_8B_BF16 = 16_381_470_720
W_GEMMA3_12B_BF16 = 24_370_000_000
W_GEMMA2_9B_BF16 = 18_480_000_000
W_LLAMA2_7B_FP16 = 13_476_839_424
W_QWEN3_06B_BF16 = 1_503_300_328


def model(name: str, weights: int) -> ModelProfile:
    config: dict[str, Any] = json.loads((CONFIGS / f"{name}.json").read_text())
    return from_config(config, weights)


def on(profile_name: str, **kw: int) -> NodeCapacity:
    mac = macs.get(profile_name)
    return NodeCapacity(
        gpu_working_set_bytes=mac.gpu_working_set_bytes,
        memory_bandwidth_bytes_per_second=mac.memory_bandwidth_bytes_per_second,
        total_memory_bytes=mac.memory_bytes,
        name=mac.name,
        **kw,
    )


def check(result: MemoryPlan, *, budget: int, per_block: int, max_model_len: int, seqs: int) -> None:
    assert result.fits, result.reason
    assert result.kv_budget_bytes == budget
    assert result.num_blocks == budget // per_block
    assert result.max_tokens == (budget // per_block) * 16
    assert result.max_model_len == max_model_len
    assert result.max_num_seqs == seqs


# -- 70B 4-bit: the headline cases -------------------------------------------------------------


def test_70b_4bit_on_a_64gb_mac_fits_with_about_17k_tokens() -> None:
    """M4 Pro 64 GB: working set 48 GiB (75%); KV ≈ 5.2 GiB ≈ 17K tokens in total (notes §5.1)."""
    ws = 49_152 * 2**20
    budget = int(ws * 0.92) - W_70B_4BIT - OVERHEAD_2048
    per_block = 16 * (2 * 80 * 8 * 128 * 2)  # 16 tokens x 320 KiB
    result = plan(model("mlx-llama-3.3-70b-instruct-4bit", W_70B_4BIT), on("m4-pro-64gb"))
    check(result, budget=budget, per_block=per_block, max_model_len=(budget // per_block) * 16, seqs=1)
    assert result.max_model_len == 16_992
    assert result.overhead_bytes == OVERHEAD_2048
    assert result.max_num_batched_tokens == 2048
    assert result.gpu_memory_utilization == 0.92
    assert result.reserved_bytes == int(ws * 0.92)
    # decode bound: 273 GB/s over weights + the KV of a half-full sequence
    assert result.predicted_decode_tokens_per_s == round(273e9 / (W_70B_4BIT + (16_992 // 2) * 327_680), 1)
    assert result.reason.startswith("fits: KV pool 5.2 GiB = 1,062 blocks = 16,992 tokens")


def test_70b_4bit_on_a_128gb_mac_takes_the_full_context() -> None:
    """M4 Max 128 GB: working set 107.52 GiB (84%); 8192 batched tokens (>= 70 GiB RAM) -> 5 GiB overhead."""
    ws = int(107.52 * GiB)
    budget = int(ws * 0.92) - W_70B_4BIT - OVERHEAD_8192
    per_block = 16 * (2 * 80 * 8 * 128 * 2)
    result = plan(model("mlx-llama-3.3-70b-instruct-4bit", W_70B_4BIT), on("m4-max-128gb"))
    full_length_seqs = (budget // per_block) // (131072 // 16)
    check(result, budget=budget, per_block=per_block, max_model_len=131072, seqs=full_length_seqs)
    assert result.max_tokens == 186_592  # ≈ 182K tokens of pool (notes: ~200K with a 2 GB overhead)
    assert full_length_seqs == 1


def test_70b_4bit_on_a_48gb_mac_is_refused_with_the_reason() -> None:
    """M4 Pro 48 GB: 2/3 of 48 GiB = 32 GiB working set is below 37.0 GiB of weights."""
    result = plan(model("mlx-llama-3.3-70b-instruct-4bit", W_70B_4BIT), on("m4-pro-48gb"))
    assert not result.fits
    assert result.reason == "weights need 37.0 GiB; this Mac's GPU working set is 32.0 GiB"
    assert (result.num_blocks, result.max_model_len, result.max_num_seqs) == (0, 0, 0)


def test_70b_bf16_fits_only_the_biggest_macs() -> None:
    """141 GB of bf16 weights: too big for 128 GB, fits a 192 GB M2 Ultra (estimated 84% working set)."""
    weights = 141_107_412_992
    assert not plan(model("llama-3.3-70b-instruct", weights), on("m4-max-128gb")).fits
    ws = int(192 * GiB * 0.84)
    budget = int(ws * 0.92) - weights - OVERHEAD_8192
    per_block = 16 * (2 * 80 * 8 * 128 * 2)
    result = plan(model("llama-3.3-70b-instruct", weights), on("m2-ultra-192gb"))
    check(result, budget=budget, per_block=per_block, max_model_len=(budget // per_block) * 16, seqs=1)


# -- a negative budget --------------------------------------------------------------------------


def test_negative_budget_is_refused_with_the_shortfall() -> None:
    """Llama 3.1 8B bf16 on a 24 GB M4: weights fit the working set; weights + overhead exceed 0.92 of it."""
    ws = 19_069_665_280
    budget = int(ws * 0.92) - W_8B_BF16 - OVERHEAD_2048
    assert budget < 0
    result = plan(model("llama-3.1-8b", W_8B_BF16), on("m4-24gb"))
    assert not result.fits
    assert result.kv_budget_bytes == budget
    assert result.reason == (
        "no memory left for the KV cache: weights 15.0 GiB + overhead 2.0 GiB exceed "
        "0.92 x working set 17.8 GiB = 16.3 GiB by 0.6 GiB"
    )


def test_too_few_blocks_is_refused() -> None:
    """Fewer than PAGED_ATTENTION_MIN_BLOCKS = 16 blocks: vllm-metal's "num_blocks too low"."""
    ws = 12 * GiB
    weights = int(ws * 0.92) - OVERHEAD_2048 - 10 * 16 * 131072  # room for exactly 10 blocks
    result = plan(model("llama-3.1-8b", weights), NodeCapacity(ws))
    assert not result.fits
    assert result.num_blocks == 10
    assert "holds 10 blocks of 16 tokens; vllm-metal needs at least 16" in result.reason


# -- the other real configs --------------------------------------------------------------------


def test_llama_8b_bf16_on_a_32gb_mac() -> None:
    ws = 26_800_000_000
    budget = int(ws * 0.92) - W_8B_BF16 - OVERHEAD_2048
    per_block = 16 * (2 * 32 * 8 * (4096 // 32) * 2)
    result = plan(model("llama-3.1-8b", W_8B_BF16), on("m2-pro-32gb"))
    check(result, budget=budget, per_block=per_block, max_model_len=(budget // per_block) * 16, seqs=1)
    assert result.max_model_len == 49_184


def test_llama_8b_bf16_does_not_fit_a_16gb_mac() -> None:
    result = plan(model("llama-3.1-8b", W_8B_BF16), on("m4-16gb"))
    assert result.reason == "weights need 15.0 GiB; this Mac's GPU working set is 11.5 GiB"


def test_qwen25_7b_on_a_64gb_mac_serves_full_context_to_several_sequences() -> None:
    ws = 49_152 * 2**20
    budget = int(ws * 0.92) - W_QWEN25_7B_BF16 - OVERHEAD_2048
    per_block = 16 * (2 * 28 * 4 * (3584 // 28) * 2)
    seqs = (budget // per_block) // (131072 // 16)
    result = plan(model("qwen2.5-7b", W_QWEN25_7B_BF16), on("m4-pro-64gb"))
    check(result, budget=budget, per_block=per_block, max_model_len=131072, seqs=seqs)
    assert seqs == 3


def test_qwen3_8b_explicit_head_dim_with_a_requested_context() -> None:
    ws = 26_800_000_000
    budget = int(ws * 0.92) - W_QWEN3_8B_BF16 - OVERHEAD_2048
    per_block = 16 * (2 * 36 * 8 * 128 * 2)
    result = plan(model("qwen3-8b", W_QWEN3_8B_BF16), on("m2-pro-32gb"), PlanRequest(context_length=8192))
    check(
        result,
        budget=budget,
        per_block=per_block,
        max_model_len=8192,
        seqs=(budget // per_block) // (8192 // 16),
    )


def test_qwen3_06b_on_an_8gb_mac() -> None:
    """The smallest Mac: 2/3 of 8 GiB leaves 1.5 GiB of KV: about 14K tokens, one sequence."""
    ws = int(8 * GiB * 2 / 3)
    budget = int(ws * 0.92) - W_QWEN3_06B_BF16 - OVERHEAD_2048
    per_block = 16 * (2 * 28 * 8 * 128 * 2)  # head_dim 128 from the config, not 1024 / 16
    result = plan(model("qwen3-0.6b", W_QWEN3_06B_BF16), on("m1-8gb"))
    check(result, budget=budget, per_block=per_block, max_model_len=(budget // per_block) * 16, seqs=1)
    assert result.max_model_len == 14_096


def test_mistral_sliding_window_lets_the_whole_context_fit() -> None:
    """Every Mistral v0.1 layer slides over 4,096 tokens: 32,768 tokens need 4096/16 = 256 blocks."""
    ws = 26_800_000_000
    budget = int(ws * 0.92) - W_MISTRAL_BF16 - OVERHEAD_2048
    per_block = 16 * (2 * 32 * 8 * 128 * 2)
    result = plan(model("mistral-7b-v0.1", W_MISTRAL_BF16), on("m2-pro-32gb"))
    check(
        result,
        budget=budget,
        per_block=per_block,
        max_model_len=32768,
        seqs=(budget // per_block) // (4096 // 16),
    )
    assert result.max_num_seqs == 14


def test_gemma3_hybrid_layers() -> None:
    """Gemma 3 12B on 64 GB: 131,072 tokens = 8 full layers x 131,072 + 40 sliding x 1,024 tokens."""
    ws = 49_152 * 2**20
    layer = 2 * 8 * 256 * 2
    budget = int(ws * 0.92) - W_GEMMA3_12B_BF16 - OVERHEAD_2048
    per_block = 16 * 48 * layer
    blocks_per_full_sequence = -(-(131072 * 8 * layer + 1024 * 40 * layer) // per_block)  # ceil
    assert blocks_per_full_sequence == 1419
    result = plan(model("gemma-3-12b-it", W_GEMMA3_12B_BF16), on("m4-pro-64gb"))
    check(
        result,
        budget=budget,
        per_block=per_block,
        max_model_len=131072,
        seqs=(budget // per_block) // blocks_per_full_sequence,
    )


def test_gemma2_alternating_layers() -> None:
    ws = 26_800_000_000
    layer = 2 * 8 * 256 * 2
    budget = int(ws * 0.92) - W_GEMMA2_9B_BF16 - OVERHEAD_2048
    per_block = 16 * 42 * layer
    blocks_for_8192 = -(-(8192 * 21 * layer + 4096 * 21 * layer) // per_block)
    result = plan(model("gemma-2-9b-it", W_GEMMA2_9B_BF16), on("m2-pro-32gb"))
    check(
        result,
        budget=budget,
        per_block=per_block,
        max_model_len=8192,
        seqs=(budget // per_block) // blocks_for_8192,
    )


def test_llama2_mha_costs_four_times_the_kv_of_gqa() -> None:
    """Llama 2 7B: 32 KV heads (MHA) = 512 KiB per token, fp16; max context 4,096."""
    ws = 26_800_000_000
    budget = int(ws * 0.92) - W_LLAMA2_7B_FP16 - OVERHEAD_2048
    per_block = 16 * (2 * 32 * 32 * 128 * 2)
    result = plan(model("llama-2-7b-hf", W_LLAMA2_7B_FP16), on("m2-pro-32gb"))
    check(
        result,
        budget=budget,
        per_block=per_block,
        max_model_len=4096,
        seqs=(budget // per_block) // (4096 // 16),
    )
    assert result.kv_bytes_per_token == 512 * KiB


# -- requests -----------------------------------------------------------------------------------


def test_requested_context_that_does_not_fit_is_refused_with_the_largest_that_does() -> None:
    result = plan(
        model("mlx-llama-3.3-70b-instruct-4bit", W_70B_4BIT),
        on("m4-pro-64gb"),
        PlanRequest(context_length=32768),
    )
    assert not result.fits
    assert result.max_model_len == 16_992
    assert result.reason == (
        "one 32,768-token sequence needs 10.0 GiB of KV; the budget holds 5.2 GiB (16,992 tokens), "
        "so the longest context that fits is 16,992"
    )


def test_context_beyond_the_model_maximum_is_refused() -> None:
    result = plan(
        model("llama-2-7b-hf", W_LLAMA2_7B_FP16), on("m4-max-128gb"), PlanRequest(context_length=8192)
    )
    assert not result.fits
    assert result.reason == "context 8,192 exceeds the model's maximum 4,096"


def test_overhead_block_size_and_utilization_overrides() -> None:
    ws = 49_152 * 2**20
    overhead = 2 * GiB + 512 * 2**20
    budget = int(ws * 0.88) - W_70B_4BIT - overhead
    per_block = 32 * (2 * 80 * 8 * 128 * 2)
    request = PlanRequest(gpu_memory_utilization=0.88, block_size=32, overhead_bytes=overhead)
    result = plan(model("mlx-llama-3.3-70b-instruct-4bit", W_70B_4BIT), on("m4-pro-64gb"), request)
    assert result.kv_budget_bytes == budget
    assert result.num_blocks == budget // per_block
    assert result.max_tokens == (budget // per_block) * 32


def test_max_num_batched_tokens_moves_the_overhead() -> None:
    request = PlanRequest(max_num_batched_tokens=1024)
    result = plan(model("llama-3.1-8b", W_8B_BF16), on("m2-pro-32gb"), request)
    assert result.overhead_bytes == 1 * GiB + 512 * KiB * 1024
    assert result.max_num_batched_tokens == 1024


def test_co_located_replicas_partition_the_working_set() -> None:
    """A second replica on a 128 GB Mac: others hold 60 GiB; this one pins 8K context x 4 sequences."""
    ws = int(107.52 * GiB)
    held = 60 * GiB
    per_block = 16 * (2 * 32 * 8 * 128 * 2)
    request = PlanRequest(context_length=8192, max_num_seqs=4)
    result = plan(model("llama-3.1-8b", W_8B_BF16), on("m4-max-128gb", reserved_bytes=held), request)
    assert result.fits, result.reason
    needed = W_8B_BF16 + OVERHEAD_8192 + 4 * (8192 // 16) * per_block
    utilization = -(-needed * 10_000 // ws) / 10_000  # rounded up to 4 decimals
    assert result.gpu_memory_utilization == utilization
    assert result.reserved_bytes == int(ws * utilization)
    assert result.kv_budget_bytes == int(ws * utilization) - W_8B_BF16 - OVERHEAD_8192
    assert result.num_blocks == (int(ws * utilization) - W_8B_BF16 - OVERHEAD_8192) // per_block
    assert result.num_blocks >= 4 * 8192 // 16
    assert held + result.reserved_bytes <= int(ws * 0.92)


def test_what_others_hold_comes_off_the_budget() -> None:
    ws = 49_152 * 2**20
    held = 10 * GiB
    result = plan(model("qwen3-8b", W_QWEN3_8B_BF16), on("m4-pro-64gb", reserved_bytes=held))
    budget = int(ws * 0.92) - W_QWEN3_8B_BF16 - OVERHEAD_2048 - held
    assert result.kv_budget_bytes // (16 * 147_456) == budget // (16 * 147_456)
    assert result.gpu_memory_utilization < 0.92


def test_spec_fields_are_the_api_names() -> None:
    result = plan(model("qwen3-8b", W_QWEN3_8B_BF16), on("m4-pro-64gb"))
    assert set(result.to_spec()) == {
        "weightBytes",
        "overheadBytes",
        "kvBudgetBytes",
        "kvBytesPerToken",
        "blockSize",
        "numBlocks",
        "maxModelLen",
        "maxNumSeqs",
        "maxNumBatchedTokens",
        "gpuMemoryUtilization",
        "reservedBytes",
    }
    assert result.to_spec()["numBlocks"] == result.num_blocks


def test_unknown_bandwidth_gives_no_prediction() -> None:
    result = plan(model("qwen3-8b", W_QWEN3_8B_BF16), NodeCapacity(48 * GiB))
    assert result.fits
    assert result.predicted_decode_tokens_per_s is None


@pytest.mark.parametrize(
    "request_",
    [PlanRequest(block_size=24), PlanRequest(gpu_memory_utilization=1.5), PlanRequest(context_length=0)],
)
def test_invalid_requests_raise(request_: PlanRequest) -> None:
    with pytest.raises(ValueError):
        plan(model("qwen3-8b", W_QWEN3_8B_BF16), NodeCapacity(48 * GiB), request_)


def test_linear_attention_state_is_charged_per_sequence() -> None:
    """Qwen3-Coder-Next 4-bit (≈ 45 GB) on 128 GB: each sequence costs 73.7 MiB of state + its KV blocks."""
    weights = 44_900_000_000
    ws = int(107.52 * GiB)
    budget = int(ws * 0.92) - weights - OVERHEAD_8192
    per_block = 16 * (2 * 12 * 2 * 256 * 2)
    state = 77_266_944
    blocks_per_sequence = 262144 // 16  # the model's whole context fits one sequence
    seqs = min(256, budget // (state + blocks_per_sequence * per_block))
    result = plan(model("qwen3-coder-next", weights), on("m4-max-128gb"))
    assert result.fits, result.reason
    assert result.max_model_len == 262144
    assert result.max_num_seqs == seqs
    assert result.linear_state_bytes == seqs * state
    assert result.num_blocks == (budget - seqs * state) // per_block
    assert result.kv_budget_bytes == budget  # the engine's own budget; it reserves the state itself


def test_too_many_requested_sequences_of_linear_state_is_refused() -> None:
    result = plan(
        model("qwen3-coder-next", 44_900_000_000), on("m4-max-128gb"), PlanRequest(max_num_seqs=2000)
    )
    assert not result.fits
    assert result.reason.startswith(
        "linear-attention state for 2000 sequences (143.9 GiB) leaves 0.0 GiB of KV"
    )
