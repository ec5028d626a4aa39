"""Model profiles: the few numbers of a checkpoint that decide its memory on a Mac.

A profile is read from a model's ``config.json`` (Hugging Face / MLX layout) or from a GGUF header,
plus the exact weight bytes of the artifact (the sum of its weight files, known from the OCI manifest
without downloading anything). The KV cache is what the planner sizes, so the profile's main output
is how many bytes one token costs in each kind of attention layer:

* full attention: ``2 (K and V) x kv_heads x head_dim x dtype_bytes`` per layer, for every token;
* sliding-window attention: the same per token, but a sequence never holds more than the window;
* linear attention (Qwen3-Next / Qwen3.5 gated delta nets, Mamba-like layers): no per-token cache,
  a constant state per sequence instead;
* MLA (DeepSeek-style latent attention): one ``kv_lora_rank + qk_rope_head_dim`` latent per token
  per layer (no separate K and V).

A quantized checkpoint (MLX ``quantization`` block, AWQ/GPTQ ``quantization_config``) still keeps its
KV cache in the compute dtype (``torch_dtype`` / ``dtype``), so quantization changes the weight bytes
and never the KV bytes (notes 1.6 item 12, 5.1). Facts: shared/notes/vllm-metal-and-model-artifacts.md §5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

#: Bytes per element of the dtypes a config names. float32 checkpoints are served in 16 bits:
#: vLLM's ``--dtype auto`` downcasts float32 models to a 16-bit type (vllm/config/model.py), and the
#: KV cache follows the serving dtype.
DTYPE_BYTES: Final[dict[str, int]] = {
    "bfloat16": 2,
    "float16": 2,
    "half": 2,
    "float32": 2,
    "float": 2,
    "float8_e4m3fn": 1,
}

#: The dtype assumed when a config names none (older exports): 16-bit, what vLLM serves by default.
DEFAULT_DTYPE: Final = "float16"

#: GGUF ``general.file_type`` codes (llama.cpp's ``llama_ftype``) -> label, for display only.
GGUF_FILE_TYPES: Final[dict[int, str]] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    30: "IQ4_XS",
    32: "BF16",
    38: "MXFP4_MOE",
}

#: llama.cpp keeps its KV cache in f16 unless told otherwise (``--cache-type-k/v``, default f16).
GGUF_KV_DTYPE_BYTES: Final = 2

LayerKind = Literal["full", "sliding", "linear"]


class ProfileError(ValueError):
    """The config cannot be profiled; the message names the key that is missing or unusable."""


@dataclass(frozen=True)
class ModelProfile:
    """What the memory planner needs to know about one model artifact."""

    architecture: str
    model_type: str
    format: str  # "safetensors" | "gguf"
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    dtype_bytes: int
    full_attention_layers: int
    sliding_attention_layers: int
    linear_attention_layers: int
    sliding_window: int | None
    max_position_embeddings: int
    weight_bytes: int
    quantization: str | None
    #: KV elements per token per attention layer (``2 x kv_heads x head_dim``, or the MLA latent).
    kv_elements_per_layer: int = 0
    #: Constant state of all linear-attention layers for one sequence (bytes); 0 when there are none.
    linear_state_bytes_per_sequence: int = 0
    #: Bits per weight of a quantized checkpoint (MLX affine counts its scales and biases), if known.
    bits_per_weight: float | None = None

    @property
    def attention_layers(self) -> int:
        """Layers that keep a per-token KV cache (full + sliding)."""
        return self.full_attention_layers + self.sliding_attention_layers

    @property
    def full_kv_bytes_per_token(self) -> int:
        """Bytes each token costs in the full-attention layers, for the whole sequence."""
        return self.full_attention_layers * self.kv_elements_per_layer * self.dtype_bytes

    @property
    def sliding_kv_bytes_per_token(self) -> int:
        """Bytes each token costs in the sliding-window layers, while it is inside the window."""
        return self.sliding_attention_layers * self.kv_elements_per_layer * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token costs across every attention layer: the paged pool's per-token rate.

        vllm-metal sizes a block as ``block_size x Σ_layers(2 x kv_heads x head_dim x dtype)``
        over all SDPA layers (notes 1.6 item 8); sliding layers only limit how many tokens a
        sequence keeps (see :meth:`sequence_kv_bytes`).
        """
        return self.full_kv_bytes_per_token + self.sliding_kv_bytes_per_token

    def sequence_kv_bytes(self, tokens: int) -> int:
        """KV bytes one sequence of ``tokens`` tokens holds: sliding layers cap at the window."""
        held_in_window = tokens if self.sliding_window is None else min(tokens, self.sliding_window)
        return tokens * self.full_kv_bytes_per_token + held_in_window * self.sliding_kv_bytes_per_token

    @property
    def parameters(self) -> int | None:
        """Parameter count estimated from the exact weight bytes and the bits per weight."""
        bits = self.bits_per_weight if self.bits_per_weight is not None else self._dense_bits()
        if bits is None or bits <= 0:
            return None
        return round(self.weight_bytes * 8 / bits)

    def _dense_bits(self) -> float | None:
        if self.quantization is not None:
            return None
        return float(DTYPE_BYTES.get(self.dtype, 2) * 8)

    def to_status(self, max_context: int | None = None) -> dict[str, Any]:
        """The ``ModelDeployment.status.modelProfile`` fields (camelCase, as the API contract names them)."""
        return {
            "format": self.format,
            "architecture": self.architecture,
            "weightBytes": self.weight_bytes,
            "kvBytesPerToken": self.kv_bytes_per_token,
            "maxContext": max_context if max_context is not None else self.max_position_embeddings,
            "parameters": self.parameters,
            "quantization": self.quantization,
        }


# ---------------------------------------------------------------------------------------------
# config.json


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Multimodal wrappers (Gemma 3, Mistral 3, Llama 4) nest the language model's keys."""
    nested = config.get("text_config")
    if isinstance(nested, Mapping):
        merged = dict(config)
        merged.update(nested)
        return merged
    return config


def _int(config: Mapping[str, Any], key: str, *, what: str) -> int:
    value = config.get(key)
    if value is None:
        raise ProfileError(f"config.json has no {key!r} ({what})")
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value <= 0:
        raise ProfileError(f"config.json {key!r} must be a positive integer, got {value!r}")
    return int(value)


def _optional_int(config: Mapping[str, Any], key: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value <= 0:
        raise ProfileError(f"config.json {key!r} must be a positive integer or null, got {value!r}")
    return int(value)


def _dtype(config: Mapping[str, Any], top: Mapping[str, Any]) -> str:
    for source in (config, top):
        for key in ("torch_dtype", "dtype"):
            value = source.get(key)
            if isinstance(value, str):
                name = value.removeprefix("torch.")
                if name not in DTYPE_BYTES:
                    raise ProfileError(f"config.json {key!r} is {value!r}; known: {', '.join(DTYPE_BYTES)}")
                return name
    return DEFAULT_DTYPE


def _quantization(top: Mapping[str, Any]) -> tuple[str | None, float | None]:
    """A label and the bits per weight, from an MLX ``quantization`` block or a HF ``quantization_config``."""
    mlx = top.get("quantization")
    if isinstance(mlx, Mapping) and "bits" in mlx:
        bits = int(mlx["bits"])
        group = int(mlx.get("group_size", 64))
        mode = str(mlx.get("mode", "affine"))
        if mode == "affine":
            # MLX affine: one fp16 scale and one fp16 bias per group (notes 5.1: 4-bit g64 ≈ 4.5 bpw).
            return f"mlx-{bits}bit-g{group}", bits + 32 / group
        return f"mlx-{mode}", None
    hf = top.get("quantization_config")
    if isinstance(hf, Mapping):
        method = str(hf.get("quant_method", "")).lower()
        bits_value = hf.get("bits", hf.get("w_bit"))
        group_value = hf.get("group_size", hf.get("q_group_size"))
        if method in ("awq", "gptq") and bits_value is not None:
            bits = int(bits_value)
            label = f"{method}-{bits}bit" + (f"-g{int(group_value)}" if group_value else "")
            # packed weights + one fp16 scale and one packed zero point per group (≈ bits + 16.x/group).
            bpw = bits + (16 + bits) / int(group_value) if group_value and int(group_value) > 0 else None
            return label, bpw
        if method:
            return method, None
        if bits_value is not None:  # an MLX export that also writes quantization_config
            bits = int(bits_value)
            group = int(group_value or 64)
            return f"mlx-{bits}bit-g{group}", bits + 32 / group
    return None, None


def _layer_kinds(
    config: Mapping[str, Any], num_layers: int, max_pos: int
) -> tuple[list[LayerKind], int | None]:
    """Which layers are full, sliding-window or linear attention, and the window if any."""
    window = _optional_int(config, "sliding_window")
    model_type = str(config.get("model_type", ""))

    layer_types = config.get("layer_types")
    if isinstance(layer_types, Sequence) and not isinstance(layer_types, str) and layer_types:
        if len(layer_types) != num_layers:
            raise ProfileError(
                f"config.json 'layer_types' lists {len(layer_types)} layers; "
                f"'num_hidden_layers' is {num_layers}"
            )
        kinds: list[LayerKind] = []
        for entry in layer_types:
            name = str(entry)
            if name in ("full_attention", "attention", "global"):
                kinds.append("full")
            elif name in ("sliding_attention", "local", "sliding_window"):
                kinds.append("sliding")
            elif name in ("linear_attention", "mamba", "delta_net", "gated_delta_net"):
                kinds.append("linear")
            else:
                raise ProfileError(
                    f"config.json 'layer_types' has {name!r}, a layer kind the planner does not know"
                )
        if "sliding" in kinds and window is None:
            raise ProfileError("config.json has sliding layers in 'layer_types' but no 'sliding_window'")
        return kinds, window

    interval = _optional_int(config, "full_attention_interval")
    if interval is not None:  # Qwen3-Next: every interval-th layer is full attention, the rest linear
        return ["full" if (i + 1) % interval == 0 else "linear" for i in range(num_layers)], None

    if window is None or window >= max_pos:
        return ["full"] * num_layers, None

    if model_type == "gemma2":  # Gemma 2 alternates, starting with a sliding layer (HF Gemma2 is_sliding)
        return ["sliding" if i % 2 == 0 else "full" for i in range(num_layers)], window
    if model_type.startswith("gemma3"):
        pattern = _optional_int(config, "sliding_window_pattern") or _optional_int(
            config, "_sliding_window_pattern"
        )
        pattern = pattern or 6  # Gemma3TextConfig's default: five local layers, then one global
        return ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers)], window
    if (
        "use_sliding_window" in config
    ):  # Qwen2/Qwen3: off unless asked; then only layers past max_window_layers
        if not config.get("use_sliding_window"):
            return ["full"] * num_layers, None
        first = _optional_int(config, "max_window_layers") or 0
        return ["sliding" if i >= first else "full" for i in range(num_layers)], window
    # Mistral 7B v0.1, Phi-3 and friends: one window on every layer.
    return ["sliding"] * num_layers, window


def _linear_state_bytes(config: Mapping[str, Any], linear_layers: int) -> int:
    """Per-sequence state of linear-attention layers (vllm-metal ``linear_cache_bytes_per_slot``, notes 5.1).

    ``L_linear x ((conv_kernel - 1) x conv_dim x dtype + v_heads x v_head_dim x k_head_dim x 4 B)``
    with ``conv_dim = 2 x k_heads x k_head_dim + v_heads x v_head_dim`` (Qwen3-Next naming).
    """
    if linear_layers == 0:
        return 0
    what = "needed for linear-attention state"
    k_heads = _int(config, "linear_num_key_heads", what=what)
    v_heads = _int(config, "linear_num_value_heads", what=what)
    k_dim = _int(config, "linear_key_head_dim", what=what)
    v_dim = _int(config, "linear_value_head_dim", what=what)
    kernel = _int(config, "linear_conv_kernel_dim", what=what)
    dtype_bytes = DTYPE_BYTES[_dtype(config, config)]
    conv_dim = 2 * k_heads * k_dim + v_heads * v_dim
    per_layer = (kernel - 1) * conv_dim * dtype_bytes + v_heads * v_dim * k_dim * 4
    return linear_layers * per_layer


def from_config(config: Mapping[str, Any], weight_bytes: int, *, format: str = "safetensors") -> ModelProfile:
    """Profile a model from its ``config.json`` (as a dict) and the exact bytes of its weight files."""
    if weight_bytes < 0:
        raise ProfileError(f"weight bytes must be >= 0, got {weight_bytes}")
    text = _text_config(config)
    architectures = config.get("architectures") or text.get("architectures") or []
    architecture = str(architectures[0]) if architectures else str(text.get("model_type", "unknown"))
    model_type = str(text.get("model_type", config.get("model_type", "unknown")))

    num_layers = _int(text, "num_hidden_layers", what="the number of transformer layers")
    heads = _int(text, "num_attention_heads", what="the number of attention heads")
    # HF convention: no num_key_value_heads means multi-head attention (one KV head per query head).
    kv_heads = _optional_int(text, "num_key_value_heads") or heads
    head_dim = _optional_int(text, "head_dim")
    if head_dim is None:
        hidden = _int(text, "hidden_size", what="needed for head_dim = hidden_size / num_attention_heads")
        if hidden % heads:
            raise ProfileError(
                f"config.json 'hidden_size' {hidden} is not a multiple of 'num_attention_heads' {heads}"
            )
        head_dim = hidden // heads
    max_pos = _int(text, "max_position_embeddings", what="the model's maximum context")
    dtype = _dtype(text, config)
    quantization, bpw = _quantization(config)

    kv_lora = _optional_int(text, "kv_lora_rank")
    if kv_lora is not None:  # MLA: one latent (+ the decoupled RoPE key) per token per layer
        rope_dim = _int(text, "qk_rope_head_dim", what="needed for the MLA latent cache")
        kv_elements = kv_lora + rope_dim
    else:
        kv_elements = 2 * kv_heads * head_dim

    kinds, window = _layer_kinds(text, num_layers, max_pos)
    linear = kinds.count("linear")
    return ModelProfile(
        architecture=architecture,
        model_type=model_type,
        format=format,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        dtype_bytes=DTYPE_BYTES[dtype],
        full_attention_layers=kinds.count("full"),
        sliding_attention_layers=kinds.count("sliding"),
        linear_attention_layers=linear,
        sliding_window=window if "sliding" in kinds else None,
        max_position_embeddings=max_pos,
        weight_bytes=weight_bytes,
        quantization=quantization,
        kv_elements_per_layer=kv_elements,
        linear_state_bytes_per_sequence=_linear_state_bytes(text, linear),
        bits_per_weight=bpw,
    )


# ---------------------------------------------------------------------------------------------
# GGUF


def _gguf_int(meta: Mapping[str, Any], key: str, *, required: bool = True) -> int | None:
    value = meta.get(key)
    if value is None:
        if required:
            raise ProfileError(f"GGUF metadata has no {key!r}")
        return None
    if isinstance(value, Sequence) and not isinstance(value, str):
        # Per-layer arrays (e.g. head_count_kv on models with varying heads): the planner takes the
        # largest, an upper bound on the cache.
        numbers = [int(v) for v in value]
        if not numbers:
            raise ProfileError(f"GGUF metadata {key!r} is an empty array")
        return max(numbers)
    return int(value)


def from_gguf_metadata(meta: Mapping[str, Any], weight_bytes: int) -> ModelProfile:
    """Profile a GGUF model from its header keys (``general.architecture``, ``<arch>.block_count``, ...)."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ProfileError("GGUF metadata has no 'general.architecture'")
    layers = _gguf_int(meta, f"{arch}.block_count")
    heads = _gguf_int(meta, f"{arch}.attention.head_count")
    assert layers is not None and heads is not None
    kv_heads = _gguf_int(meta, f"{arch}.attention.head_count_kv", required=False) or heads
    head_dim = _gguf_int(meta, f"{arch}.attention.key_length", required=False)
    if head_dim is None:
        embedding = _gguf_int(meta, f"{arch}.embedding_length")
        assert embedding is not None
        head_dim = embedding // heads
    value_dim = _gguf_int(meta, f"{arch}.attention.value_length", required=False) or head_dim
    context = _gguf_int(meta, f"{arch}.context_length")
    assert context is not None
    window = _gguf_int(meta, f"{arch}.attention.sliding_window", required=False)
    pattern = _gguf_int(meta, f"{arch}.attention.sliding_window_pattern", required=False)
    if window is None or window >= context:
        kinds: list[LayerKind] = ["full"] * layers
        window = None
    elif arch == "gemma2":
        kinds = ["sliding" if i % 2 == 0 else "full" for i in range(layers)]
    elif arch.startswith("gemma3") or pattern:
        every = pattern or 6
        kinds = ["full" if (i + 1) % every == 0 else "sliding" for i in range(layers)]
    else:
        kinds = ["sliding"] * layers
    file_type = meta.get("general.file_type")
    quantization = (
        GGUF_FILE_TYPES.get(int(file_type), f"gguf-type-{file_type}") if file_type is not None else None
    )
    return ModelProfile(
        architecture=arch,
        model_type=arch,
        format="gguf",
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        dtype="float16",
        dtype_bytes=GGUF_KV_DTYPE_BYTES,
        full_attention_layers=kinds.count("full"),
        sliding_attention_layers=kinds.count("sliding"),
        linear_attention_layers=0,
        sliding_window=window,
        max_position_embeddings=context,
        weight_bytes=weight_bytes,
        quantization=None if quantization in ("F16", "BF16", "F32") else quantization,
        kv_elements_per_layer=kv_heads * (head_dim + value_dim),
        bits_per_weight=None,
    )
