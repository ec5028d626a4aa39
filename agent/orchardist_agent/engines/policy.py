"""The engine launch policy: which of a replica's engineArgs and env may reach an engine.

An allowlist per engine (flag -> takes a value, variable names and prefixes), read from the engines'
recorded ``--help`` (tests/data/engines; a test keeps the two in step), on top of the API's lists of
owned and code-loading flags (`orchardist.api.launch`, the same lists the CRD's CEL refuses). The
drivers emit their own flags after the user's, so a user's trailing item cannot join one of them;
bare values are accepted only right after an allowed flag that takes one (argparse would otherwise
add them to the option before, or to a positional). Pure: a table of args in, refusals out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from orchardist.api.launch import (
    CODE_LOADING_HINT,
    FLAG_OWNERS,
    code_loading_env,
    code_loading_flag,
    owned_env,
    owned_flag,
    sets_flag,
)
from orchardist_agent.engines.base import EngineArgsError

#: argparse reads these as values, not flags (it has no option that looks like a negative number).
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")

_HINTS = {flag: hint for flags, hint in FLAG_OWNERS for flag in flags}

REASON = "EngineArgsRefused"


class LaunchPolicyError(EngineArgsError):
    """The replica's engineArgs or env break the launch policy; `problems` lists each refusal."""

    reason = REASON

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class LaunchPolicy:
    """What one engine accepts from a deployment. ``flags`` maps each allowed flag to whether it
    takes a value; ``code_flags`` are the engine's code-loading flags (same mapping), accepted only
    when code loading is allowed; ``driver_owned`` are flags the driver writes beyond FLAG_OWNERS."""

    engine: str
    flags: Mapping[str, bool]
    env_names: frozenset[str] = frozenset()
    env_prefixes: tuple[str, ...] = ()
    code_flags: Mapping[str, bool] = field(default_factory=dict)
    driver_owned: frozenset[str] = frozenset()


def is_value(arg: str) -> bool:
    """Whether an engine's parser reads `arg` as a value rather than as a flag."""
    return not arg.startswith("-") or arg == "-" or bool(_NEGATIVE_NUMBER.match(arg))


def _owner(arg: str, policy: LaunchPolicy) -> str | None:
    owned = owned_flag(arg)
    if owned is not None:
        return owned
    return next((f for f in sorted(policy.driver_owned) if sets_flag(arg, f)), None)


def _refuse_flag(arg: str, policy: LaunchPolicy, allow_code_loading: bool) -> str | None:
    """Why `arg` (a flag, possibly flag=value) may not be used, or None when it may."""
    name = arg.split("=", 1)[0]
    if arg == "--":
        return "'--' ends the options: every later item (the operator's flags too) would be a value"
    owned = _owner(arg, policy)
    if owned is not None:
        how = "" if name == owned else f" ({name} is read as {owned})"
        hint = _HINTS.get(owned, "the engine driver sets it itself")
        return f"{arg!r} sets {owned}, which the operator owns{how}: {hint}"
    code = code_loading_flag(arg)
    if code is not None and not (allow_code_loading and name in policy.code_flags):
        return f"{arg!r} sets {code}: {CODE_LOADING_HINT}"
    known = policy.flags.get(name, policy.code_flags.get(name) if allow_code_loading else None)
    if known is None:
        return f"{name} is not an allowed {policy.engine} flag (write allowed flags in full)"
    if "=" in arg and not known:
        return f"{name} takes no value, so {arg!r} is refused"
    if "=" in arg and not arg.split("=", 1)[1]:
        return f"{arg!r} has an empty value"
    return None


def check_args(
    policy: LaunchPolicy, args: Iterable[str], *, allow_code_loading: bool = False
) -> tuple[str, ...]:
    """The args unchanged when every item is allowed; else LaunchPolicyError naming each refusal."""
    items = tuple(args)
    problems: list[str] = []
    wants_value: str | None = None  # the allowed flag the next item must be the value of
    for arg in items:
        if wants_value is not None:
            if not is_value(arg):
                problems.append(f"{wants_value} needs a value, but {arg!r} follows it")
                wants_value = None
            else:
                wants_value = None
                continue
        if is_value(arg):
            problems.append(
                f"bare value {arg!r} does not follow a flag that takes a value "
                "(it would join the option before it)"
            )
            continue
        refusal = _refuse_flag(arg, policy, allow_code_loading)
        if refusal is not None:
            problems.append(refusal)
            continue
        takes = policy.flags.get(arg, policy.code_flags.get(arg, False))
        if takes and "=" not in arg:
            wants_value = arg
    if wants_value is not None:
        problems.append(f"{wants_value} needs a value, but it is the last item")
    if problems:
        raise LaunchPolicyError(f"engineArgs: {p}" for p in problems)
    return items


def check_env(
    policy: LaunchPolicy, env: Mapping[str, str], *, allow_code_loading: bool = False
) -> dict[str, str]:
    """The variables unchanged when each is on the engine's allowlist; else LaunchPolicyError."""
    problems: list[str] = []
    for name in sorted(env):
        if owned_env(name):
            problems.append(f"{name} is set by the agent (or a spec field), not by env")
        elif code_loading_env(name):
            if not allow_code_loading:
                problems.append(f"{name}: {CODE_LOADING_HINT}")
        elif name not in policy.env_names and not name.startswith(policy.env_prefixes):
            problems.append(f"{name} is not an allowed {policy.engine} variable")
    if problems:
        raise LaunchPolicyError(f"env: {p}" for p in problems)
    return dict(env)


#: Variables every engine may get: thread counts and quiet, offline-safe library knobs.
COMMON_ENV = frozenset(
    {
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "TOKENIZERS_PARALLELISM",
        "HF_HUB_DISABLE_TELEMETRY",
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "TRANSFORMERS_VERBOSITY",
        "NO_COLOR",
    }
)
