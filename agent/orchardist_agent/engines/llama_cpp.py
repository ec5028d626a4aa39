"""llama.cpp: `llama-server` for GGUF models, every layer offloaded to the GPU (Metal on a Mac).

`-c` is the total KV context shared by the `-np` slots, so it is max_model_len x max_num_seqs.
"""

from __future__ import annotations

import re
from pathlib import Path

from orchardist_agent.engines.base import (
    EngineArgsError,
    EngineSpec,
    Launch,
    completion_probe,
)
from orchardist_agent.engines.owned import check_engine_args, check_env

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
    extra = check_engine_args(spec.engine_args, OWNED_FLAGS)
    plan = spec.plan
    gguf = spec.model_dir / pick_gguf(model_files)
    argv = [
        str(spec.runtime.bin("llama-server")),
        "-m",
        str(gguf),
        "-c",
        str(plan.max_model_len * plan.max_num_seqs),
        "-np",
        str(plan.max_num_seqs),
        "-ngl",
        "999",
        "--host",
        spec.host,
        "--port",
        str(port),
        "--alias",
        spec.served_model_name,
    ]
    if spec.api_key:
        argv += ["--api-key", spec.api_key]
    return Launch(
        argv=(*argv, *extra),
        env=check_env(spec.env),
        host=spec.host,
        port=port,
        probe=completion_probe(spec.served_model_name),
        api_key=spec.api_key,
    )
