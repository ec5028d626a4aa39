"""The reconcile plan of one ModelDeployment: from what is, to what to do. Pure.

``decide(Observed) -> Plan``: which ModelReplicas to create (bound, with their memory plans) and
delete, the Service and EndpointSlices to have (``exposure``), the status to write (``status``) and
the Events to post. The adapter (``kube.py``) executes the plan; running ``decide`` again on the
result asks for nothing.

Rules, level-based (no memory of earlier runs):
- Replicas on a Mac that is gone, or that has a NoExecute taint they do not tolerate, are deleted
  (and replaced); on a NotReady Mac (Lease older than the grace) they are *lost*: not counted,
  replaced elsewhere, marked (annotation ``orchardist.io/lost``, so the fact survives restarts) and
  kept until the Mac returns (then they go, if the others cover the deployment) or is deleted.
- Scale down removes, in order: replicas on NotReady Macs, old revisions, not-ready replicas (least
  progress first), then those on the most crowded and most loaded Macs.
- A rollout (new digest, engine, version, args, env or plan inputs = a new revision label) creates
  new replicas first, up to ``replicas + maxSurge`` in all, and removes a ready old replica only
  while the ready count stays at or above ``replicas - maxUnavailable``.
- With ``spec.scaling``, "replicas" above is the autoscaler's count (``autoscale.decide``, passed
  in as ``scaled``); it is written to ``status.autoscaling`` with an Event when it changes, and
  ``spec.replicas`` is never written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from orchardist.api.constants import API_VERSION, LABEL_DEPLOYMENT, LABEL_NODE, LABEL_REVISION
from orchardist.api.modeldeployment import ModelDeployment, ModelDeploymentSpec
from orchardist.controller import autoscale, peers, scheduler, status
from orchardist.controller.exposure import exposure
from orchardist.controller.outcome import Event, Plan
from orchardist.controller.scheduler import Fit, Mac
from orchardist.controller.world import (
    LABEL_MANAGED_BY,
    LOST,
    MANAGED_BY,
    SERVICE_NAME_LABEL,
    SLICE_MANAGED_BY,
    Observed,
    Replica,
    owner_reference,
)

# The adapter (kube.py) reads these names from here.
__all__ = [
    "LOST",
    "MANAGED_BY",
    "SERVICE_NAME_LABEL",
    "SLICE_MANAGED_BY",
    "Plan",
    "decide",
    "needs_placement",
    "revision",
]


def revision(spec: ModelDeploymentSpec, digest: str) -> str:
    """The hash of what a rollout replaces: digest, engine, version, args, env and the plan inputs."""
    material = {
        "digest": digest,
        "engine": spec.engine,
        "engineVersion": spec.engine_version,
        "engineArgs": list(spec.engine_args),
        "env": [[e.name, e.value] for e in spec.env],
        "apiKey": spec.api_key_secret_ref.model_dump() if spec.api_key_secret_ref else None,
        "contextLength": spec.context_length,
        "maxConcurrentSequences": spec.max_concurrent_sequences,
        "kvCache": spec.kv_cache.model_dump(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:10]


def _free_names(base: str, taken: set[str], count: int) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < count:
        candidate = f"{base}-{i}"
        if candidate not in taken:
            out.append(candidate)
            taken.add(candidate)
        i += 1
    return out


# ------------------------------------------------------------------------------------------------
# The decision


def _progress_key(r: Replica) -> tuple[int, float]:
    order = {"Failed": 0, None: 1, "Pending": 1, "Pulling": 2, "Starting": 3, "Ready": 4}
    done = 0.0
    if r.progress and r.progress.bytes_total:
        done = (r.progress.bytes_done or 0) / r.progress.bytes_total
    return order.get(r.phase, 1), done


def decide(obs: Observed, scaled: autoscale.Decision | None = None) -> Plan:
    """Everything to do for one deployment, given what is (and the autoscaler's count, if it has one)."""
    if scaled is not None:
        obs = replace(obs, spec=obs.spec.model_copy(update={"replicas": scaled.desired}))
    spec = obs.spec
    macs = {m.name: m for m in obs.macs}
    desired = spec.replicas
    events: list[Event] = []
    if scaled is not None and scaled.changed:
        events.append(
            Event(
                "Normal", scaled.reason, f"{scaled.previous} -> {scaled.desired} replicas: {scaled.message}"
            )
        )
    deletes: dict[str, str] = {}

    alive = [r for r in obs.replicas if not r.terminating]
    tolerations = [
        scheduler.Toleration(t.key, t.operator, t.value, t.effect) for t in spec.placement.tolerations
    ]
    for r in alive:
        if r.node not in macs:
            deletes[r.name] = f"its Mac {r.node} is gone"
            continue
        for taint in macs[r.node].taints:
            if taint.effect == "NoExecute" and not scheduler.tolerated(taint, tolerations):
                deletes[r.name] = f"its Mac {r.node} has the NoExecute taint {taint.key}"
    placed = [r for r in alive if r.name not in deletes]
    lost = [r for r in placed if not macs[r.node].ready]
    live = [r for r in placed if macs[r.node].ready]
    marks: list[tuple[str, bool]] = [(r.name, True) for r in lost if not r.lost_mark]

    rev = revision(spec, obs.pin.digest) if obs.pin else None
    # Back from NotReady: a replica that was replaced goes once its replacements serve; until then
    # it keeps serving, held aside from scaling. Without replacements it is simply live again.
    held: list[Replica] = []
    returned = [r for r in live if r.lost_mark]
    if returned:
        others = [r for r in live if not r.lost_mark and (rev is None or r.revision == rev)]
        if len(others) >= desired and sum(r.ready for r in others) >= desired:
            for r in returned:
                deletes[r.name] = "replaced while its Mac was NotReady"
        elif len(others) >= desired:
            held = returned
        else:
            marks += [(r.name, False) for r in returned]
        live = [r for r in live if r.name not in deletes and r not in held]

    new = [r for r in live if rev is None or r.revision == rev]
    old = [r for r in live if rev is not None and r.revision != rev]
    crowd: dict[str, int] = {}
    for r in live:
        crowd[r.node] = crowd.get(r.node, 0) + 1

    def load(r: Replica) -> tuple[int, float, str, str]:
        m = macs[r.node]
        used = (
            1.0 - (m.working_set_bytes - m.reserved_bytes) / m.working_set_bytes
            if m.working_set_bytes
            else 1.0
        )
        return (-crowd.get(r.node, 0), -used, _neg(r.created), r.name)

    def removal_order(rs: Iterable[Replica]) -> list[Replica]:
        return sorted(rs, key=lambda r: (r.ready, _progress_key(r), load(r)))

    creates: list[dict[str, Any]] = []
    unschedulable: scheduler.Unschedulable | None = None
    if obs.pin is not None and rev is not None:
        surge, unavailable = spec.rollout.max_surge, spec.rollout.max_unavailable
        ready_total = sum(r.ready for r in live)
        # Old revision: not-ready ones go at once; ready ones while availability allows.
        if old:
            allowed_drop = ready_total - max(0, desired - unavailable)
            for r in removal_order(old):
                if not r.ready:
                    deletes[r.name] = "replaced by the new revision"
                elif allowed_drop > 0:
                    deletes[r.name] = "replaced by the new revision"
                    allowed_drop -= 1
        remaining_old = [r for r in old if r.name not in deletes]
        # Too many of the new revision (scale down).
        if len(new) > desired:
            for r in removal_order(new)[: len(new) - desired]:
                deletes[r.name] = "scaled down"
        room = desired + surge - len(remaining_old) - len(new) if remaining_old else desired - len(new)
        want = max(0, min(desired - len(new), room))
        if want:
            creates, unschedulable, ev = _place(obs, rev, want, live + lost, macs)
            events.extend(ev)
    elif desired == 0:
        for r in live:
            deletes[r.name] = "scaled down"
    # Lost replicas stay (marked) while their Mac is NotReady; when it returns the marked ones go if
    # the others cover the deployment, and when its MacNode is deleted they go with it.

    for name, why in sorted(deletes.items()):
        events.append(
            Event("Normal", "ScaledDown" if why == "scaled down" else "Replacing", f"deleting {name}: {why}")
        )

    survivors = [r for r in live if r.name not in deletes]
    service, slices, delete_slices = exposure(obs, survivors + held)
    st, st_events = status.report(
        obs, rev, survivors, lost + held, creates, unschedulable, scaled.status() if scaled else None
    )
    events.extend(st_events)
    return Plan(
        create=tuple(creates),
        delete=tuple(sorted(deletes.items())),
        service=service,
        slices=tuple(slices),
        delete_slices=tuple(delete_slices),
        status=st,
        events=tuple(events),
        mark=tuple(marks),
    )


def _neg(created: str) -> str:
    """Newest first when sorted ascending (RFC 3339 strings sort by time)."""
    return "".join(chr(0x10FFFF - ord(c)) for c in created)


def _place(
    obs: Observed, rev: str, want: int, mine: Sequence[Replica], macs: Mapping[str, Mac]
) -> tuple[list[dict[str, Any]], scheduler.Unschedulable | None, list[Event]]:
    assert obs.pin is not None
    spec = obs.spec
    placement = spec.placement
    request = scheduler.Request(
        engine=spec.engine,
        fit=obs.pin.fit,
        digest=obs.pin.digest,
        engine_version=spec.engine_version,
        weight_bytes=int(obs.pin.profile.get("weightBytes") or 1),
        node_selector=dict(placement.node_selector),
        tolerations=tuple(
            scheduler.Toleration(t.key, t.operator, t.value, t.effect) for t in placement.tolerations
        ),
        spread=placement.spread,
        prefer_cached=placement.prefer_cached_nodes,
    )
    existing: dict[str, int] = {}
    for r in mine:
        existing[r.node] = existing.get(r.node, 0) + 1
    result = scheduler.Fleet(macs.values()).place(request, want, existing)
    taken = {r.name for r in obs.replicas}
    names = _free_names(f"{obs.name}-{rev[:6]}", taken, len(result.bindings))
    creates = [
        _replica_body(obs, rev, name, b.node, b.fit, macs[b.node])
        for name, b in zip(names, result.bindings, strict=True)
    ]
    peers.annotate(creates, obs.pin.digest, macs, (r.node for r in mine if r.revision == rev))
    events = [
        Event("Normal", "Scheduled", f"{name} bound to {b.node}: {_plan_words(b.fit)}")
        for name, b in zip(names, result.bindings, strict=True)
    ]
    return creates, result.unschedulable, events


def _plan_words(fit: Fit) -> str:
    p = fit.plan
    return (
        f"context {int(p.get('maxModelLen', 0)):,} tokens, {int(p.get('maxNumSeqs', 0))} sequences, "
        f"{scheduler.gib(fit.reserved_bytes)} of the working set"
    )


def _replica_body(obs: Observed, rev: str, name: str, node: str, fit: Fit, mac: Mac) -> dict[str, Any]:
    assert obs.pin is not None
    spec = obs.spec
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "ModelReplica",
        "metadata": {
            "name": name,
            "namespace": obs.namespace,
            "labels": {
                LABEL_DEPLOYMENT: obs.name,
                LABEL_NODE: node,
                LABEL_REVISION: rev,
                LABEL_MANAGED_BY: MANAGED_BY,
            },
            "ownerReferences": [owner_reference(obs)],
        },
        "spec": {
            "nodeName": node,
            "deployment": obs.name,
            "model": obs.pin.model,
            "digest": obs.pin.digest,
            "engine": spec.engine,
            "engineVersion": spec.engine_version or mac.engines.get(spec.engine) or None,
            "memoryPlan": dict(fit.plan),
            "engineArgs": list(spec.engine_args),
            "env": [{"name": e.name, "value": e.value} for e in spec.env],
            "servedModelName": obs.name,
        },
    }
    if spec.pull_secret_ref:
        body["spec"]["pullSecretRef"] = {"name": spec.pull_secret_ref.name}
    if spec.api_key_secret_ref:
        body["spec"]["apiKeySecretRef"] = {
            "name": spec.api_key_secret_ref.name,
            "key": spec.api_key_secret_ref.key,
        }
    if body["spec"]["engineVersion"] is None:
        del body["spec"]["engineVersion"]
    return body


def needs_placement(md: ModelDeployment) -> bool:
    """Whether a new or changed Mac may let in replicas this deployment still lacks.

    Decided on the spec and the conditions the last reconcile wrote, never on the display phase:
    a spec not reconciled yet, fewer replicas than asked for, or Stalled because no Mac fits.
    Failures the agents report (a pull, an engine) are not helped by another Mac.
    """
    desired = autoscale.desired_replicas(md)
    if desired == 0 or md.metadata.get("deletionTimestamp"):
        return False
    st = md.status
    if st.observed_generation != md.metadata.get("generation") or (st.replicas or 0) < desired:
        return True
    stalled = next((c for c in st.conditions if c.type == "Stalled"), None)
    return stalled is not None and stalled.status == "True" and stalled.reason == "Unschedulable"
