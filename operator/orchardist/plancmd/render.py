"""How ``orchardist plan`` prints: the model's facts and one plan as aligned lines, a table over
the standard Mac profiles, or JSON with stable keys."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TextIO

from orchardist.planning.macs import MacProfile
from orchardist.planning.memory import MemoryPlan, NodeCapacity, gib
from orchardist.planning.profile import ModelProfile


def _describe(model: ModelProfile) -> list[tuple[str, str]]:
    layers = f"{model.num_layers}"
    if model.sliding_attention_layers or model.linear_attention_layers:
        parts = [f"{model.full_attention_layers} full"]
        if model.sliding_attention_layers:
            parts.append(f"{model.sliding_attention_layers} sliding (window {model.sliding_window:,})")
        if model.linear_attention_layers:
            parts.append(f"{model.linear_attention_layers} linear")
        layers += f" ({', '.join(parts)})"
    params = model.parameters
    return [
        ("model", f"{model.architecture} ({model.model_type})"),
        ("quantization", model.quantization or f"none ({model.dtype})"),
        ("parameters", _count(params) if params else "unknown"),
        ("weights", f"{gib(model.weight_bytes)} ({model.weight_bytes:,} B)"),
        ("layers", layers),
        (
            "attention",
            f"{model.num_attention_heads} heads, {model.num_kv_heads} KV heads, head_dim {model.head_dim}",
        ),
        ("kv dtype", _kv_dtype(model)),
        ("kv bytes/token", f"{model.kv_bytes_per_token:,} ({model.kv_bytes_per_token / 1024:g} KiB)"),
        ("model max context", f"{model.max_position_embeddings:,}"),
    ]


def _print_pairs(pairs: Sequence[tuple[str, str]], out: TextIO) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        print(f"{key:<{width}}  {value}", file=out)


def _count(n: int) -> str:
    """~70.6B, ~854M, ~12K: a parameter count at the scale it has."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"~{n / scale:.1f}{unit}"
    return f"{n}"


_BITS = {"float32": 32, "float": 32}


def _kv_dtype(model: ModelProfile) -> str:
    if model.dtype_bytes * 8 < _BITS.get(model.dtype, 16):  # a float32 checkpoint is served in 16 bits
        return f"{model.dtype} checkpoint, KV in 16 bits ({model.dtype_bytes} B)"
    return f"{model.dtype} ({model.dtype_bytes} B)"


def print_plan(model: ModelProfile, node: NodeCapacity, result: MemoryPlan, out: TextIO) -> None:
    """One plan as readable lines."""
    decode = result.predicted_decode_tokens_per_s
    pairs = [
        *_describe(model),
        ("mac", node.name or "(given working set)"),
        ("gpu working set", f"{gib(node.gpu_working_set_bytes)} ({node.gpu_working_set_bytes:,} B)"),
        ("usable", f"{result.gpu_memory_utilization:g} x working set = {gib(result.reserved_bytes)}"),
        (
            "overhead",
            f"{gib(result.overhead_bytes)} (max_num_batched_tokens {result.max_num_batched_tokens})",
        ),
        ("kv budget", f"{gib(result.kv_budget_bytes)} ({result.kv_budget_bytes:,} B)"),
        ("blocks", f"{result.num_blocks:,} x {result.block_size} tokens = {result.max_tokens:,} tokens"),
        ("max model len", f"{result.max_model_len:,}"),
        ("max num seqs", f"{result.max_num_seqs}"),
        ("decode (1 stream)", f"<= {decode:g} tokens/s" if decode is not None else "unknown (no bandwidth)"),
        ("fits", "yes" if result.fits else "NO"),
        ("reason", result.reason),
    ]
    _print_pairs(pairs, out)


def print_table(model: ModelProfile, rows: list[tuple[MacProfile, MemoryPlan]], out: TextIO) -> None:
    """A plan per standard Mac profile, then where it fits."""
    _print_pairs(_describe(model), out)
    print(file=out)
    header = (
        "PROFILE",
        "CHIP",
        "MEMORY",
        "WORKING SET",
        "FITS",
        "MAX CONTEXT",
        "SEQS",
        "KV TOKENS",
        "DECODE TOK/S",
    )
    table = [header]
    for mac, result in rows:
        decode = result.predicted_decode_tokens_per_s
        table.append(
            (
                mac.name,
                mac.chip_name.removeprefix("Apple "),
                f"{mac.memory_bytes >> 30}Gi",
                f"{mac.gpu_working_set_bytes / (1 << 30):.1f}Gi",
                "yes" if result.fits else "no",
                f"{result.max_model_len:,}" if result.fits else "-",
                str(result.max_num_seqs) if result.fits else "-",
                f"{result.max_tokens:,}" if result.fits else "-",
                f"{decode:g}" if decode is not None and result.fits else "-",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip(), file=out)
    print(file=out)
    fitting = [(m, r) for m, r in rows if r.fits]
    if fitting:
        names = ", ".join(f"{m.name} (max context {r.max_model_len:,})" for m, r in fitting)
        print(f"fits on {names}", file=out)
    else:
        print("fits on none of the standard Macs", file=out)
    for mac, result in rows:
        if not result.fits:
            print(f"  {mac.name}: {result.reason}", file=out)


def print_json(data: Any, out: TextIO) -> None:
    """Indented JSON and a final newline."""
    json.dump(data, out, indent=2)
    print(file=out)
