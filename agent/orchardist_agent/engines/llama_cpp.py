"""llama.cpp: `llama-server` for GGUF models, every layer offloaded to the GPU (Metal on a Mac).

`-c` is the total KV context shared by the `-np` slots, so it is max_model_len x max_num_seqs.
llama-server matches flags exactly (no abbreviations) and a later flag overrides an earlier one, so
the operator's come last; the API key goes by LLAMA_API_KEY (the variable llama.cpp's argument table
binds to --api-key), never argv.
"""

from __future__ import annotations

import re
from pathlib import Path

from orchardist_agent.engines.base import (
    ENGINE_HOST,
    EngineArgsError,
    EngineSpec,
    Launch,
    completion_probe,
)
from orchardist_agent.engines.policy import COMMON_ENV, LaunchPolicy, check_args, check_env

OWNED_FLAGS = frozenset(
    {
        "-m",
        "--model",
        "-c",
        "--ctx-size",
        "-np",
        "--parallel",
        "-ngl",
        "--gpu-layers",
        "--n-gpu-layers",
        "--host",
        "--port",
        "-a",
        "--alias",
        "--api-key",
        "--api-key-file",
    }
)

#: llama-server flags a deployment may set (flag -> takes a value), from its server README's tables
#: (tests/data/engines/llama-server-flags.txt).
LLAMA_FLAGS: dict[str, bool] = {
    "-t": True,
    "--threads": True,
    "-tb": True,
    "--threads-batch": True,
    "-n": True,
    "--predict": True,
    "--n-predict": True,
    "--keep": True,
    "-fa": True,
    "--flash-attn": True,
    "-s": True,
    "--seed": True,
    "--temp": True,
    "--temperature": True,
    "-cb": False,
    "--cont-batching": False,
    "-nocb": False,
    "--no-cont-batching": False,
    "-to": True,
    "--timeout": True,
    "--threads-http": True,
    "--cache-prompt": False,
    "--no-cache-prompt": False,
    "--metrics": False,
    "--slots": False,
    "--no-slots": False,
    "--jinja": False,
    "--no-jinja": False,
    "-v": False,
    "--verbose": False,
    "--log-verbose": False,
    "--log-disable": False,
}

POLICY = LaunchPolicy(
    engine="llama.cpp",
    flags=LLAMA_FLAGS,
    env_names=COMMON_ENV
    | {"LLAMA_LOG_VERBOSITY", "LLAMA_LOG_COLORS", "LLAMA_LOG_TIMESTAMPS", "LLAMA_LOG_PREFIX"},
    code_flags={"--chat-template": True, "--chat-template-file": True},
    driver_owned=OWNED_FLAGS,
)

_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def pick_gguf(files: list[str]) -> str:
    """The file llama-server loads: the only .gguf, or shard 1 of a split model (it finds the rest).

    Multimodal projectors (mmproj*) are not the model.
    """
    ggufs = sorted(f for f in files if f.endswith(".gguf") and not Path(f).name.startswith("mmproj"))
    if not ggufs:
        raise EngineArgsError("no .gguf file in the model directory")
    firsts = [f for f in ggufs if (m := _SHARD.search(f)) and int(m.group(1)) == 1]
    if firsts:
        return firsts[0]
    if len(ggufs) > 1:
        raise EngineArgsError(f"several .gguf files and no split set: {', '.join(ggufs)}")
    return ggufs[0]


def launch(spec: EngineSpec, port: int, *, model_files: list[str]) -> Launch:
    extra = check_args(POLICY, spec.engine_args, allow_code_loading=spec.allow_code_loading)
    env = check_env(POLICY, spec.env, allow_code_loading=spec.allow_code_loading)
    if spec.api_key:
        env["LLAMA_API_KEY"] = spec.api_key
    plan = spec.plan
    gguf = spec.model_dir / pick_gguf(model_files)
    argv = [
        str(spec.runtime.bin("llama-server")),
        *extra,
        "-m",
        str(gguf),
        "-c",
        str(plan.max_model_len * plan.max_num_seqs),
        "-np",
        str(plan.max_num_seqs),
        "-ngl",
        "999",
        "--host",
        ENGINE_HOST,
        "--port",
        str(port),
        "--alias",
        spec.served_model_name,
    ]
    return Launch(
        argv=tuple(argv),
        env=env,
        host=ENGINE_HOST,
        port=port,
        probe=completion_probe(spec.served_model_name),
        api_key=spec.api_key,
    )
