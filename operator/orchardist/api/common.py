"""Pieces shared by the three kinds: conditions, secret references, engine args and env."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from orchardist.api.constants import ENV_OWNERS, FLAG_OWNERS, flag_forms, owned_flag
from orchardist.api.rules import ApiModel, Rule

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


def _flag_rule(flags: tuple[str, ...], hint: str) -> Rule:
    forms = [form for flag in flags for form in flag_forms(flag)]
    listed = ", ".join(f"'{f}'" for f in forms)
    prefixes = " || ".join(f"a.startsWith('{f}=')" for f in forms)
    shown = ", ".join(flags[:-1]) + " or " + flags[-1] if len(flags) > 1 else flags[0]
    return Rule(
        rule=f"self.all(a, !(a in [{listed}] || {prefixes}))",
        message=f"spec.engineArgs must not contain {shown} (as a flag or as flag=value): {hint}",
        check=lambda args: all(owned_flag(a) not in flags for a in args),
    )


def _env_rule(names: tuple[str, ...], hint: str) -> Rule:
    listed = ", ".join(f"'{n}'" for n in names)
    return Rule(
        rule=f"self.all(e, !(e.name in [{listed}]))",
        message=f"spec.env must not set {', '.join(names)}: {hint}",
        check=lambda env: all(e.name not in names for e in env),
    )


EngineArgs = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_ENGINE_ARG_LENGTH)]],
    Field(max_length=MAX_ENGINE_ARGS, json_schema_extra={"x-kubernetes-list-type": "atomic"}),
    *(_flag_rule(flags, hint) for flags, hint in FLAG_OWNERS),
]

EnvVars = Annotated[
    list[EnvVar],
    Field(
        max_length=MAX_ENV,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    ),
    *(_env_rule(names, hint) for names, hint in ENV_OWNERS),
]

ENGINE_ARGS_DESCRIPTION = (
    "Extra command-line flags for the engine, one flag or value per item (for example "
    "['--enable-prefix-caching'] or ['--seed', '7']). Flags the operator sets itself (host, port, model, "
    "context length, memory and concurrency limits, served name, API key) are refused; use the matching "
    "spec field instead."
)
ENV_DESCRIPTION = (
    "Extra environment variables for the engine process. Variables the agent sets (VLLM_HOST_IP, "
    "VLLM_PORT, HF_HUB_OFFLINE, ...) are refused."
)
