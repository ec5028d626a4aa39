"""Pieces shared by the three kinds: conditions, secret references, engine args and env."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from orchardist.api.launch import ENV_OWNERS, FLAG_OWNERS, OWNED_ENV_PREFIXES, WHOLE_FLAGS, sets_flag
from orchardist.api.rules import ApiModel, Rule, cel_string

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
CAMEL_CASE = r"^[A-Z][A-Za-z0-9]*$"
DIGEST = r"^sha256:[0-9a-f]{64}$"

Engine = Literal["vllm-metal", "mlx-lm", "llama.cpp", "vllm"]
ConditionStatus = Literal["True", "False", "Unknown"]

MAX_ENGINE_ARGS = 64
MAX_ENGINE_ARG_LENGTH = 512
MAX_ENV = 64


class Condition(ApiModel):
    """One observation of an aspect of the object's state, as in the Kubernetes API conventions."""

    type: str = Field(
        max_length=64,
        pattern=CAMEL_CASE,
        description="The aspect observed, in CamelCase (for example Ready, Pulled, MemoryPressure).",
    )
    status: ConditionStatus = Field(description="Whether the condition holds: True, False or Unknown.")
    reason: str = Field(
        "",
        max_length=128,
        description="A CamelCase word for why the condition has this status (for example DoesNotFit, "
        "PullProgressing); stable, for programs and alerts.",
    )
    message: str = Field(
        "", max_length=4096, description="A sentence for people saying what happened and what to do next."
    )
    last_transition_time: datetime | None = Field(
        None, description="When the status last changed (RFC 3339), not when it was last checked."
    )
    observed_generation: int | None = Field(
        None, ge=0, description="The metadata.generation of the object that this condition describes."
    )


Conditions = Annotated[
    list[Condition],
    Field(
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    ),
]


class SecretRef(ApiModel):
    """A Secret in the object's own namespace."""

    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN, description="The Secret's name.")


class SecretKeyRef(ApiModel):
    """One key of a Secret in the object's own namespace."""

    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN, description="The Secret's name.")
    key: str = Field(
        "api-key",
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="The key inside the Secret whose value is used (default api-key).",
    )


class EnvVar(ApiModel):
    """An environment variable for the engine process."""

    name: str = Field(
        max_length=128, pattern=ENV_NAME, description="The variable's name (letters, digits and _)."
    )
    value: str = Field("", max_length=4096, description="The variable's value (default empty).")


def _cel_list(items: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(cel_string(i) for i in items) + "]"


# The flag part of an item as vLLM reads it (`--max_model_len=1` -> `--max-model-len`).
_NAME = "a.split('=')[0].replace('_', '-')"


def _sets_any(flags: tuple[str, ...]) -> str:
    """CEL mirror of launch.sets_flag over a group: exact, flag=value, or a long-flag abbreviation."""
    longs = [f for f in flags if f.startswith("--")]
    exact = f"{_NAME} in {_cel_list(list(flags))}"
    if not longs:
        return f"({exact})"
    abbreviates = f"{_cel_list(longs)}.exists(f, f.startsWith({_NAME}))"
    # Whole flags that prefix one of these are not abbreviations (argparse matches exactly first).
    whole = [w for w in WHOLE_FLAGS if any(f.startswith(w) and f != w for f in longs)]
    not_whole = f"!({_NAME} in {_cel_list(whole)}) && " if whole else ""
    prefix = f"(a.startsWith('--') && size({_NAME}) > 2 && {not_whole}{abbreviates})"
    return f"({exact} || {prefix})"


def _flag_rule(flags: tuple[str, ...], hint: str) -> Rule:
    shown = ", ".join(flags[:-1]) + " or " + flags[-1] if len(flags) > 1 else flags[0]
    what = f"{shown} (exactly, as flag=value or abbreviated)"
    test = _sets_any(flags)
    return Rule(
        rule=f"self.all(a, !{test})",
        message=f"spec.engineArgs must not set {what}: {hint}",
        message_expression=(
            f"{cel_string('spec.engineArgs: ')} + self.filter(a, {test})[0] + "
            f"{cel_string(f' sets {what}: {hint}')}"
        ),
        check=lambda args: not any(sets_flag(a, f) for a in args for f in flags),
    )


_END_OF_OPTIONS = Rule(
    rule="self.all(a, a != '--')",
    message="spec.engineArgs must not contain '--': it ends the options, so every later item (the "
    "operator's flags too) would be read as a value",
    check=lambda args: "--" not in args,
)


def _env_rule(names: tuple[str, ...], hint: str) -> Rule:
    return Rule(
        rule=f"self.all(e, !(e.name in {_cel_list(names)}))",
        message=f"spec.env must not set {', '.join(names)}: {hint}",
        check=lambda env: all(e.name not in names for e in env),
    )


def _env_prefix_rule(prefixes: tuple[str, ...]) -> Rule:
    test = " || ".join(f"e.name.startsWith({cel_string(p)})" for p in prefixes)
    shown = ", ".join(p + "*" for p in prefixes)
    return Rule(
        rule=f"self.all(e, !({test}))",
        message=f"spec.env must not set {shown}: the engine reads them as the flags the operator owns",
        check=lambda env: not any(e.name.startswith(prefixes) for e in env),
    )


EngineArgs = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_ENGINE_ARG_LENGTH)]],
    Field(max_length=MAX_ENGINE_ARGS, json_schema_extra={"x-kubernetes-list-type": "atomic"}),
    _END_OF_OPTIONS,
    *(_flag_rule(flags, hint) for flags, hint in FLAG_OWNERS),
]

EnvVars = Annotated[
    list[EnvVar],
    Field(
        max_length=MAX_ENV,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    ),
    *(_env_rule(names, hint) for names, hint in ENV_OWNERS),
    _env_prefix_rule(OWNED_ENV_PREFIXES),
]

ENGINE_ARGS_DESCRIPTION = (
    "Extra command-line flags for the engine, one flag or value per item (for example "
    "['--enable-prefix-caching'] or ['--seed', '7']). Flags the operator sets itself (host, port, model, "
    "context length, memory and concurrency limits, served name, API key), their abbreviations and "
    "flag=value forms are refused; use the matching spec field instead. The agent accepts only the "
    "flags its engine's allowlist names; flags that load code need a cluster admin's and the Mac's "
    "admin's consent."
)
ENV_DESCRIPTION = (
    "Extra environment variables for the engine process. Variables the agent sets (VLLM_HOST_IP, "
    "VLLM_PORT, HF_HUB_OFFLINE, ...) are refused; the agent accepts only the names its engine's "
    "allowlist names (never PYTHON*, LD_* or DYLD_* unless code loading is allowed)."
)
