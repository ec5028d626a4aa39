"""mlx-lm: `mlx_lm.server`, the simplest MLX engine (also runs on Linux CPU with `mlx[cpu]`).

mlx-lm 0.32 has no context-length, served-name or API-key flag: the plan maps to decode concurrency
and the prompt-cache byte cap (its KV store), and requests must not name another model (the server
would try to fetch it), so readiness probes leave `model` out.
"""

from __future__ import annotations

from orchardist_agent.engines.base import (
    EngineSpec,
    Launch,
    completion_probe,
)
from orchardist_agent.engines.owned import check_engine_args, check_env

OWNED_FLAGS = frozenset({"--model", "--host", "--port", "--decode-concurrency", "--prompt-cache-bytes"})


def launch(spec: EngineSpec, port: int, *, hf_cache: str) -> Launch:
    """``hf_cache`` must be an existing (empty) directory: without one /v1/models answers an empty body."""
    extra = check_engine_args(spec.engine_args, OWNED_FLAGS)
    plan = spec.plan
    argv = [
        str(spec.runtime.bin("python")),
        "-m",
        "mlx_lm",
        "server",
        "--model",
        str(spec.model_dir),
        "--host",
        spec.host,
        "--port",
        str(port),
        "--decode-concurrency",
        str(plan.max_num_seqs),
        "--prompt-cache-bytes",
        str(plan.kv_budget_bytes),
        *extra,
    ]
    env = check_env(spec.env) | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": hf_cache}
    warnings = ("mlx-lm has no --api-key; the key is not enforced by the engine",) if spec.api_key else ()
    return Launch(
        argv=tuple(argv),
        env=env,
        host=spec.host,
        port=port,
        probe=completion_probe(None),
        parse_log=None,
        warnings=warnings,
        prepare_dirs=(hf_cache,),
    )
