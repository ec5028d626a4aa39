"""Autoscaling and gateway names of a ModelDeployment: aliases, spec.scaling, status.autoscaling.

Also the demand signal's names, shared by the gateway (which writes the demand Lease) and the
controller (which reads it): both import them from here so the contract has one spelling.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Annotated

from pydantic import Field

from orchardist.api.common import CAMEL_CASE
from orchardist.api.rules import ApiModel, Rule

# A name a client may send as `model`: lowercase, dots allowed (qwen3-0.6b); no '/' (that is namespace/name).
ALIAS = r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$"
MAX_ALIASES = 16

Alias = Annotated[
    str,
    Field(min_length=1, max_length=63),
    Rule(
        rule=f"self.matches('{ALIAS}')",
        message="each of spec.aliases must be lowercase letters, digits, '.', '_' and '-', starting and "
        "ending with a letter or digit, at most 63 characters (no '/': namespace/name is how a client "
        "names a deployment in another namespace)",
        check=lambda v: re.search(ALIAS, v) is not None,
    ),
]


def _unique(values: list[str]) -> bool:
    return len(set(values)) == len(values)


Aliases = Annotated[
    list[Alias],
    Field(max_length=MAX_ALIASES),
    Rule(
        rule="self.all(a, self.exists_one(b, b == a))",
        message="spec.aliases must not name the same alias twice",
        check=_unique,
    ),
]

# The demand signal: each gateway instance keeps one coordination.k8s.io/v1 Lease per deployment, in
# the deployment's namespace, named `<deployment>-demand-<instance hash>` and labelled
# LABEL_DEMAND_FOR=<deployment> and LABEL_GATEWAY_INSTANCE=<instance hash>; spec.renewTime is the last
# request's time and the two annotations hold integer strings: the requests in flight (held ones
# included) and those held, waiting for a ready replica. The controller sums over every Lease with the
# label, the older single `<deployment>-demand` included.
LABEL_DEMAND_FOR = "orchardist.io/demand-for"
LABEL_GATEWAY_INSTANCE = "orchardist.io/gateway-instance"
ANNOTATION_IN_FLIGHT = "orchardist.io/in-flight"
ANNOTATION_HELD = "orchardist.io/held"
DEMAND_LEASE_SUFFIX = "-demand"
_MAX_NAME = 253


def _hex8(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def instance_hash(instance: str) -> str:
    """A gateway instance's short, label-safe name: 8 hex digits of its id's SHA-256."""
    return _hex8(instance)


def demand_lease_name(deployment: str, instance: str | None = None) -> str:
    """The demand Lease's name for a deployment (same namespace) and gateway instance.

    Without an instance: the older single-Lease name. A name that would pass 253 characters keeps a
    prefix of the deployment's name plus a hash of all of it, so two long names never share a Lease.
    """
    tail = DEMAND_LEASE_SUFFIX if instance is None else f"{DEMAND_LEASE_SUFFIX}-{instance_hash(instance)}"
    if len(deployment) + len(tail) <= _MAX_NAME:
        return f"{deployment}{tail}"
    keep = _MAX_NAME - len(tail) - 9
    return f"{deployment[:keep].rstrip('.-')}-{_hex8(deployment)}{tail}"


SCALING_DESCRIPTION = (
    "Autoscaling on the requests in flight through the gateway, from and to zero when minReplicas is 0. "
    "When set, the controller chooses the replica count between minReplicas and maxReplicas and writes it "
    "to status.autoscaling (never to spec, so GitOps shows no drift); spec.replicas is then only the count "
    "to start with, clamped into that range, before the first demand is seen. `kubectl scale` writes "
    "spec.replicas, so with scaling set it changes nothing that is running: change minReplicas and "
    "maxReplicas instead, or remove spec.scaling to set the count by hand."
)


class Scaling(ApiModel):
    """How many replicas to run as demand changes, and how long a request may wait for one."""

    __rules__ = (
        Rule(
            rule="(has(self.minReplicas) ? self.minReplicas : 1) <= self.maxReplicas",
            message="spec.scaling.minReplicas must not be larger than spec.scaling.maxReplicas",
            check=lambda s: s.min_replicas <= s.max_replicas,
        ),
    )

    min_replicas: int = Field(
        1,
        ge=0,
        le=1024,
        description="The fewest replicas to run (default 1). 0 lets an idle deployment go to zero; the "
        "next request is then held while one replica starts.",
    )
    max_replicas: int = Field(ge=1, le=1024, description="The most replicas to run.")
    target_in_flight: int = Field(
        4,
        ge=1,
        le=4096,
        description="Requests in flight per ready replica to aim for (default 4); more in flight adds "
        "replicas, fewer removes them after the scale-down window.",
    )
    idle_timeout_seconds: int = Field(
        600,
        ge=1,
        le=604800,
        description="With minReplicas 0: go to zero after this many seconds without a request (default 600).",
    )
    hold_timeout_seconds: int = Field(
        300,
        ge=1,
        le=3600,
        description="How long the gateway holds a request while no replica is ready (default 300) before it "
        "answers 503 with Retry-After; long enough to pull and load the model on a Mac.",
    )
    scale_up_stabilization_seconds: int = Field(
        0,
        ge=0,
        le=3600,
        description="Scale up only to the lowest count recommended over this many seconds (default 0: at "
        "once). Going from zero with requests held is always at once.",
    )
    scale_down_stabilization_seconds: int = Field(
        300,
        ge=0,
        le=3600,
        description="Scale down only to the highest count recommended over this many seconds (default 300), "
        "so a short lull does not stop a replica that a model load made expensive.",
    )


class Recommendation(ApiModel):
    """One count the autoscaler recommended, and since when (kept while a stabilization window needs it)."""

    replicas: int = Field(ge=0, description="The recommended replica count.")
    time: datetime = Field(description="When this count was first recommended (RFC 3339).")


class Autoscaling(ApiModel):
    """The autoscaler's choice and why (spec.scaling set); spec.replicas is left as the user wrote it."""

    desired_replicas: int | None = Field(
        None, ge=0, description="The replica count the controller runs, in place of spec.replicas."
    )
    reason: str | None = Field(
        None,
        max_length=64,
        pattern=CAMEL_CASE,
        description="Why, in one CamelCase word: Starting, ScaleFromZero, ScaleUp, ScaleDown, Idle, "
        "Limits (minReplicas or maxReplicas changed), Stabilizing, Steady.",
    )
    message: str | None = Field(None, max_length=1024, description="Why, as a sentence for people.")
    last_scale_time: datetime | None = Field(
        None, description="When desiredReplicas last changed (RFC 3339)."
    )
    in_flight: int | None = Field(
        None, ge=0, description="Requests in flight at the gateway (held ones included) when last read."
    )
    held: int | None = Field(
        None, ge=0, description="Requests the gateway held, waiting for a ready replica, when last read."
    )
    last_request_time: datetime | None = Field(
        None, description="When the gateway last received a request for this deployment."
    )
    recommendations: list[Recommendation] = Field(
        default_factory=list,
        max_length=64,
        description="Recent recommendations, oldest first, each kept while a stabilization window covers it.",
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
    )
