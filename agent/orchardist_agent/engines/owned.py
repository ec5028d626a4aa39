"""What the operator owns on an engine's command line and in its environment (orchardist.api's lists,
the same ones its CEL rules refuse), plus what each driver writes itself."""

from __future__ import annotations

from collections.abc import Mapping

from orchardist.api import AGENT_OWNED_ENV, OPERATOR_OWNED_FLAGS
from orchardist.api.constants import owned_flag
from orchardist_agent.engines.base import EngineArgsError, flag_name


def _norm(flag: str) -> str:
    """vLLM accepts `--max_model_len` for `--max-model-len`."""
    return "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag


def check_engine_args(args: tuple[str, ...] | list[str], driver_owned: frozenset[str]) -> tuple[str, ...]:
    """Refuse engineArgs that set an operator-owned flag or one this driver writes; else return them."""
    own = {_norm(f) for f in driver_owned}
    refused = sorted(
        {
            name
            for a in args
            if (name := flag_name(a)) is not None and (owned_flag(a) is not None or _norm(name) in own)
        }
    )
    if refused:
        raise EngineArgsError(f"engineArgs set operator-owned flags: {', '.join(refused)}")
    return tuple(args)


def check_env(env: Mapping[str, str]) -> dict[str, str]:
    refused = sorted(n for n in env if n in AGENT_OWNED_ENV)
    if refused:
        raise EngineArgsError(f"env sets variables the agent owns: {', '.join(refused)}")
    return dict(env)


__all__ = ["OPERATOR_OWNED_FLAGS", "check_engine_args", "check_env"]
