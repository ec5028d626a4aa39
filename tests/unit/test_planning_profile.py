"""Model profiles from real config.json files; each expected number is written from the config's values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchardist.planning.profile import ModelProfile, ProfileError, from_config, from_gguf_metadata

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "model-configs"
BF16 = 2
FP16 = 2


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CONFIGS / f"{name}.json").read_text())
    return data


def profile(name: str, weights: int = 1) -> ModelProfile:
    return from_config(load(name), weights)


# (config, full/sliding layers, KV heads, head_dim, KV bytes/token = 2 x layers x kv_heads x head_dim x dtype)
CASES = [
    ("llama-3.1-8b", 32, 0, 8, 4096 // 32, 2 * 32 * 8 * 128 * BF16),
    ("llama-3.3-70b-instruct", 80, 0, 8, 128, 2 * 80 * 8 * 128 * BF16),
    ("mlx-llama-3.3-70b-instruct-4bit", 80, 0, 8, 128, 2 * 80 * 8 * 128 * BF16),  # 4-bit weights, bf16 KV
    ("qwen2.5-7b", 28, 0, 4, 3584 // 28, 2 * 28 * 4 * 128 * BF16),  # use_sliding_window: false
    ("qwen3-8b", 36, 0, 8, 128, 2 * 36 * 8 * 128 * BF16),
    ("qwen3-0.6b", 28, 0, 8, 128, 2 * 28 * 8 * 128 * BF16),  # head_dim 128, not 1024 / 16 = 64
    ("mistral-7b-v0.1", 0, 32, 8, 4096 // 32, 2 * 32 * 8 * 128 * BF16),  # every layer slides (4096)
    ("gemma-2-9b-it", 21, 21, 8, 256, 2 * 42 * 8 * 256 * BF16),  # alternating
    ("gemma-3-12b-it", 48 // 6, 48 - 48 // 6, 8, 256, 2 * 48 * 8 * 256 * BF16),  # 5 sliding : 1 full
    ("llama-2-7b-hf", 32, 0, 32, 4096 // 32, 2 * 32 * 32 * 128 * FP16),  # MHA
]


@pytest.mark.parametrize(("name", "full", "sliding", "kv_heads", "head_dim", "kv_per_token"), CASES)
def test_kv_bytes_per_token_from_real_configs(
    name: str, full: int, sliding: int, kv_heads: int, head_dim: int, kv_per_token: int
) -> None:
    """KV bytes per token = 2 x attention layers x KV heads x head_dim x dtype bytes."""
    p = profile(name)
    assert (p.full_attention_layers, p.sliding_attention_layers) == (full, sliding)
    assert (p.num_kv_heads, p.head_dim) == (kv_heads, head_dim)
    assert p.kv_bytes_per_token == kv_per_token


def test_worked_numbers_match_the_notes() -> None:
    """Notes §5.1: Qwen3-0.6B 112 KiB (1,835,008 B per 16-token block), Qwen2.5-7B 56 KiB, Llama 128 KiB."""
    assert profile("qwen3-0.6b").kv_bytes_per_token == 112 * 1024
    assert 16 * profile("qwen3-0.6b").kv_bytes_per_token == 1_835_008
    assert profile("qwen2.5-7b").kv_bytes_per_token == 56 * 1024
    assert profile("llama-3.1-8b").kv_bytes_per_token == 128 * 1024
    assert profile("llama-3.3-70b-instruct").kv_bytes_per_token == 320 * 1024


def test_quantized_checkpoint_keeps_kv_in_the_compute_dtype() -> None:
    """The MLX 4-bit 70B has the same KV per token as the bf16 70B; only weights and the label differ."""
    q = profile("mlx-llama-3.3-70b-instruct-4bit", 39_700_000_000)
    assert (q.dtype, q.dtype_bytes) == ("bfloat16", 2)
    assert q.quantization == "mlx-4bit-g64"
    assert q.bits_per_weight == 4 + 32 / 64  # packed 4-bit + fp16 scale and bias per 64 weights
    assert q.parameters == round(39_700_000_000 * 8 / 4.5)  # ≈ 70.6e9


def test_dense_profile_fields() -> None:
    p = profile("llama-3.1-8b", 16_060_556_376)
    assert (p.architecture, p.model_type, p.format) == ("LlamaForCausalLM", "llama", "safetensors")
    assert (p.num_layers, p.num_attention_heads, p.max_position_embeddings) == (32, 32, 131072)
    assert p.quantization is None
    assert p.parameters == 16_060_556_376 // 2  # bf16: 2 bytes per parameter
    assert p.sliding_window is None


def test_sliding_layers_cap_at_the_window() -> None:
    """Mistral 7B v0.1: a 32,768-token sequence holds only the last 4,096 tokens in every layer."""
    p = profile("mistral-7b-v0.1")
    assert p.max_position_embeddings == 32768
    assert p.sliding_window == 4096
    assert p.sequence_kv_bytes(32768) == 4096 * (2 * 32 * 8 * 128 * BF16)
    assert p.sequence_kv_bytes(1000) == 1000 * (2 * 32 * 8 * 128 * BF16)


def test_hybrid_gemma3_full_layers_grow_and_sliding_layers_stop_at_the_window() -> None:
    """Gemma 3 12B: 8 full layers pay for every token, 40 sliding layers for at most 1,024."""
    p = profile("gemma-3-12b-it")
    per_layer = 2 * 8 * 256 * BF16
    assert p.sliding_window == 1024
    assert p.sequence_kv_bytes(131072) == 131072 * 8 * per_layer + 1024 * 40 * per_layer
    assert p.architecture == "Gemma3ForConditionalGeneration"
    assert p.model_type == "gemma3_text"  # the nested text_config is the language model


def test_layer_types_list_with_linear_attention() -> None:
    """A Qwen3-Next-style hybrid: linear layers keep a per-sequence state, not per-token KV."""
    config = {
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "max_position_embeddings": 262144,
        "full_attention_interval": 4,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "torch_dtype": "bfloat16",
    }
    p = from_config(config, 1)
    assert (p.full_attention_layers, p.linear_attention_layers) == (2, 6)
    assert p.kv_bytes_per_token == 2 * 2 * 2 * 256 * BF16
    conv_dim = 2 * 16 * 128 + 32 * 128
    assert p.linear_state_bytes_per_sequence == 6 * ((4 - 1) * conv_dim * BF16 + 32 * 128 * 128 * 4)


def test_explicit_layer_types() -> None:
    config = {
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "hidden_size": 512,
        "max_position_embeddings": 8192,
        "sliding_window": 512,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "dtype": "float16",
    }
    p = from_config(config, 1)
    assert (p.full_attention_layers, p.sliding_attention_layers, p.sliding_window) == (2, 2, 512)
    assert p.head_dim == 512 // 8


def test_awq_label_and_dtype() -> None:
    config = {**load("qwen2.5-7b"), "torch_dtype": "float16"}
    config["quantization_config"] = {"bits": 4, "group_size": 128, "quant_method": "awq", "version": "gemm"}
    p = from_config(config, 5_580_000_000)
    assert p.quantization == "awq-4bit-g128"
    assert p.dtype_bytes == 2
    assert p.kv_bytes_per_token == 2 * 28 * 4 * 128 * FP16


def test_mla_latent_cache() -> None:
    """DeepSeek-style MLA keeps one (kv_lora_rank + qk_rope_head_dim) latent per token per layer."""
    config = {
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "hidden_size": 2048,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "max_position_embeddings": 163840,
        "torch_dtype": "bfloat16",
    }
    assert from_config(config, 1).kv_bytes_per_token == 27 * (512 + 64) * BF16


@pytest.mark.parametrize(
    ("drop", "named"),
    [
        ("num_hidden_layers", "'num_hidden_layers'"),
        ("num_attention_heads", "'num_attention_heads'"),
        ("max_position_embeddings", "'max_position_embeddings'"),
    ],
)
def test_missing_keys_are_named(drop: str, named: str) -> None:
    config = load("llama-3.1-8b")
    del config[drop]
    with pytest.raises(ProfileError, match=named):
        from_config(config, 1)


def test_missing_hidden_size_without_head_dim_is_named() -> None:
    config = load("llama-3.1-8b")
    del config["hidden_size"]
    with pytest.raises(ProfileError, match="'hidden_size'"):
        from_config(config, 1)


def test_unknown_dtype_and_layer_kind_are_named() -> None:
    with pytest.raises(ProfileError, match="'torch_dtype'"):
        from_config({**load("llama-3.1-8b"), "torch_dtype": "int3"}, 1)
    bad = {**load("llama-3.1-8b"), "layer_types": ["mystery"] * 32}
    with pytest.raises(ProfileError, match="mystery"):
        from_config(bad, 1)


def test_gguf_metadata() -> None:
    """The GGUF header keys of a Llama 3.1 8B Q4_K_M file."""
    meta = {
        "general.architecture": "llama",
        "general.file_type": 15,
        "llama.block_count": 32,
        "llama.context_length": 131072,
        "llama.embedding_length": 4096,
        "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 8,
        "llama.rope.dimension_count": 128,
    }
    p = from_gguf_metadata(meta, 4_920_734_016)
    assert (p.format, p.architecture, p.quantization) == ("gguf", "llama", "Q4_K_M")
    assert p.kv_bytes_per_token == 2 * 32 * 8 * (4096 // 32) * 2  # llama.cpp's f16 cache
    assert p.max_position_embeddings == 131072


def test_gguf_gemma2_and_explicit_key_length() -> None:
    meta = {
        "general.architecture": "gemma2",
        "gemma2.block_count": 42,
        "gemma2.context_length": 8192,
        "gemma2.embedding_length": 3584,
        "gemma2.attention.head_count": 16,
        "gemma2.attention.head_count_kv": 8,
        "gemma2.attention.key_length": 256,
        "gemma2.attention.value_length": 256,
        "gemma2.attention.sliding_window": 4096,
    }
    p = from_gguf_metadata(meta, 1)
    assert (p.full_attention_layers, p.sliding_attention_layers, p.sliding_window) == (21, 21, 4096)
    assert p.kv_bytes_per_token == 42 * 8 * (256 + 256) * 2


def test_gguf_missing_key_is_named() -> None:
    with pytest.raises(ProfileError, match=r"'qwen3\.block_count'"):
        from_gguf_metadata({"general.architecture": "qwen3"}, 1)
    with pytest.raises(ProfileError, match=r"general\.architecture"):
        from_gguf_metadata({}, 1)


def test_status_fields() -> None:
    p = profile("qwen3-8b", 16_381_470_720)
    assert p.to_status(max_context=32768) == {
        "format": "safetensors",
        "architecture": "Qwen3ForCausalLM",
        "weightBytes": 16_381_470_720,
        "kvBytesPerToken": 147_456,
        "maxContext": 32768,
        "parameters": 16_381_470_720 // 2,
        "quantization": None,
    }


def test_real_linear_attention_config() -> None:
    """Qwen3-Coder-Next: 48 layers, every 4th full attention (2 KV heads x 256), 36 gated-delta-net layers."""
    p = profile("qwen3-coder-next")
    assert (p.full_attention_layers, p.sliding_attention_layers, p.linear_attention_layers) == (12, 0, 36)
    assert p.kv_bytes_per_token == 2 * 12 * 2 * 256 * BF16
    conv_dim = 2 * 16 * 128 + 32 * 128  # 2 x key heads x key dim + value heads x value dim
    assert p.linear_state_bytes_per_sequence == 36 * ((4 - 1) * conv_dim * BF16 + 32 * 128 * 128 * 4)
    assert p.linear_state_bytes_per_sequence == 77_266_944  # ≈ 73.7 MiB per sequence
