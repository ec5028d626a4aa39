"""mlx-lm: `mlx_lm.server`, the simplest MLX engine (also runs on Linux CPU with `mlx[cpu]`).

mlx-lm 0.32 has no context-length, served-name or API-key flag: the plan maps to decode concurrency
and the prompt-cache byte cap (its KV store), and requests must not name another model (the server
would try to fetch it), so readiness probes leave `model` out and the agent's proxy pins the field
and enforces the deployment's key.
"""

from __future__ import annotations

from orchardist_agent.engines.base import (
    ENGINE_HOST,
    EngineSpec,
    Launch,
    completion_probe,
)
from orchardist_agent.engines.policy import COMMON_ENV, LaunchPolicy, check_args, check_env

OWNED_FLAGS = frozenset({"--model", "--host", "--port", "--decode-concurrency", "--prompt-cache-bytes"})

#: mlx_lm.server flags a deployment may set (flag -> takes a value), from its 0.32.2 `--help`.
MLX_FLAGS: dict[str, bool] = {
    "--temp": True,
    "--top-p": True,
    "--top-k": True,
    "--min-p": True,
    "--max-tokens": True,
    "--chat-template-args": True,
    "--use-default-chat-template": False,
    "--log-level": True,
    "--pipeline": False,
}

POLICY = LaunchPolicy(
    engine="mlx-lm",
    flags=MLX_FLAGS,
    env_names=COMMON_ENV,
    code_flags={"--trust-remote-code": False, "--adapter-path": True, "--chat-template": True},
    driver_owned=OWNED_FLAGS,
)


def launch(spec: EngineSpec, port: int, *, hf_cache: str) -> Launch:
    """``hf_cache`` must be an existing (empty) directory: without one /v1/models answers an empty body."""
    extra = check_args(POLICY, spec.engine_args, allow_code_loading=spec.allow_code_loading)
    plan = spec.plan
    argv = [
        str(spec.runtime.bin("python")),
        "-m",
        "mlx_lm",
        "server",
        *extra,
        "--model",
        str(spec.model_dir),
        "--host",
        ENGINE_HOST,
        "--port",
        str(port),
        "--decode-concurrency",
        str(plan.max_num_seqs),
        "--prompt-cache-bytes",
        str(plan.kv_budget_bytes),
    ]
    user_env = check_env(POLICY, spec.env, allow_code_loading=spec.allow_code_loading)
    env = user_env | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": hf_cache}
    return Launch(
        argv=tuple(argv),
        env=env,
        host=ENGINE_HOST,
        port=port,
        probe=completion_probe(None),
        parse_log=None,
        prepare_dirs=(hf_cache,),
    )
