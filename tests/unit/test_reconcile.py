"""Reconcile plan tables: what one ModelDeployment needs done, given what is. Pure, no cluster."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from orchardist.api.modeldeployment import ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus
from orchardist.api.modelreplica import ModelReplica
from orchardist.controller import plan as P  # noqa: N812 - short, reads like a namespace
from orchardist.controller import world as W  # noqa: N812
from orchardist.controller.fitting import fit_for, plan_request
from orchardist.controller.outcome import Plan
from orchardist.controller.scheduler import GIB, Fit, Mac, Misfit, Taint
from orchardist.planning.profile import from_config

D1 = "sha256:" + "11" * 32
D2 = "sha256:" + "22" * 32
NOW = "2026-11-26T12:00:00Z"


def memory_plan(reserved: int) -> dict[str, Any]:
    """A memory plan the ModelReplica type accepts, holding ``reserved`` bytes of the working set."""
    return {
        "weightBytes": reserved // 2,
        "overheadBytes": reserved // 8,
        "kvBudgetBytes": reserved // 4,
        "kvBytesPerToken": 1024,
        "blockSize": 16,
        "numBlocks": 256,
        "maxModelLen": 4096,
        "maxNumSeqs": 4,
        "maxNumBatchedTokens": 4096,
        "gpuMemoryUtilization": 0.5,
        "reservedBytes": reserved,
    }


def fixed(size_gib: float) -> Any:
    need = int(size_gib * GIB)

    def fit(mac: Mac, free: int) -> Fit | Misfit:
        if free >= need:
            return Fit(memory_plan(need), need)
        return Misfit(need, free, f"weights need {size_gib:.1f} GiB")

    return fit


def pin(digest: str = D1, size: float = 4) -> W.Pin:
    return W.Pin(digest, f"oci://127.0.0.1:5000/m@{digest}", {"weightBytes": int(size * GIB)}, fixed(size))


def mac(name: str, ws: float = 48, **kw: Any) -> Mac:
    return replace(Mac(name=name, working_set_bytes=int(ws * GIB), engines={"vllm-metal": "0.2.0"}), **kw)


def spec(**kw: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate({"model": "oci://127.0.0.1:5000/m:v1", **kw})


def observed(
    s: ModelDeploymentSpec, macs: list[Mac], replicas: list[W.Replica] | None = None, **kw: Any
) -> W.Observed:
    base = W.Observed(
        name="qwen",
        namespace="ns",
        uid="uid-1",
        generation=1,
        spec=s,
        status=ModelDeploymentStatus(),
        replicas=replicas or [],
        macs=macs,
        pin=pin(),
        now=NOW,
    )
    return replace(base, **kw)


def rep(
    name: str,
    node: str,
    s: ModelDeploymentSpec,
    digest: str = D1,
    phase: str | None = "Ready",
    endpoint: str | None = None,
    **kw: Any,
) -> W.Replica:
    return W.Replica(
        name=name,
        node=node,
        revision=P.revision(s, digest),
        phase=phase,
        endpoint=endpoint,
        reserved_bytes=4 * GIB,
        **kw,
    )


def apply(obs: W.Observed, plan: Plan) -> W.Observed:
    """What the adapter does with a plan, on the simulated world (replicas come up Pending).

    Created bodies and the written status go through the API types, as the API server and the
    watch would take them.
    """
    deleted = {n for n, _ in plan.delete}
    replicas = [r for r in obs.replicas if r.name not in deleted]
    replicas += [W.replica_from(ModelReplica.model_validate(body)) for body in plan.create]
    slices = {s["metadata"]["name"]: s for s in obs.slices}
    for s in plan.slices:
        slices[s["metadata"]["name"]] = s
    for n in plan.delete_slices:
        slices.pop(n, None)
    return replace(
        obs,
        replicas=replicas,
        status=ModelDeploymentStatus.model_validate(plan.status) if plan.status else obs.status,
        service=plan.service or obs.service,
        slices=list(slices.values()),
    )


def test_new_deployment_binds_replicas_and_exposes_them() -> None:
    """Two replicas on two Macs, owned and labelled; a selector-less Service and its slice."""
    s = spec(replicas=2)
    plan = P.decide(observed(s, [mac("a"), mac("b"), mac("c", ready=False)]))
    assert [c["spec"]["nodeName"] for c in plan.create] == ["a", "b"]
    body = plan.create[0]
    rev = P.revision(s, D1)
    assert body["metadata"]["name"] == f"qwen-{rev[:6]}-0"
    assert body["metadata"]["labels"] == {
        "orchardist.io/deployment": "qwen",
        "orchardist.io/node": "a",
        "orchardist.io/revision": rev,
        "app.kubernetes.io/managed-by": "orchardist-controller",
    }
    assert body["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "orchardist.io/v1alpha1",
            "kind": "ModelDeployment",
            "name": "qwen",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert body["spec"]["model"] == f"oci://127.0.0.1:5000/m@{D1}"
    assert body["spec"]["memoryPlan"]["reservedBytes"] == 4 * GIB
    assert body["spec"]["engineVersion"] == "0.2.0"
    assert plan.service is not None and "selector" not in plan.service["spec"]
    assert plan.service["spec"]["ports"] == [{"name": "http", "port": 8000, "protocol": "TCP"}]
    assert [sl["metadata"]["labels"]["kubernetes.io/service-name"] for sl in plan.slices] == ["qwen"]
    assert plan.status is not None and plan.status["ready"] == "0/2"
    assert plan.status["selector"] == "orchardist.io/deployment=qwen"
    assert "endpoint" not in plan.status  # nothing serves yet
    assert [e.reason for e in plan.events if e.reason == "Scheduled"] == ["Scheduled", "Scheduled"]


def test_a_second_run_on_the_result_does_nothing() -> None:
    """Idempotent: decide(apply(decide(x))) asks for no writes."""
    obs = observed(spec(replicas=3), [mac("a"), mac("b")])
    after = apply(obs, P.decide(obs))
    again = P.decide(after)
    assert again.empty, again
    assert again.events == ()


def test_ready_replicas_fill_the_slice_and_ready_condition() -> None:
    """Ready replicas with an IPv4 endpoint are listed; others are not; Ready turns True."""
    s = spec(replicas=2)
    reps = [
        rep("r0", "a", s, endpoint="10.0.0.1:8001"),
        rep("r1", "b", s, endpoint="mac-b.local:8001"),
        rep("r2", "c", s, endpoint="127.0.0.1:8001"),  # the API server refuses loopback in slices
    ]
    plan = P.decide(observed(s.model_copy(update={"replicas": 3}), [mac("a"), mac("b"), mac("c")], reps))
    (sl,) = plan.slices
    assert sl["addressType"] == "IPv4"
    assert sl["ports"] == [{"name": "http", "port": 8001, "protocol": "TCP"}]
    assert [e["addresses"] for e in sl["endpoints"]] == [["10.0.0.1"]]
    assert plan.status is not None and plan.status["readyReplicas"] == 3
    degraded = next(c for c in plan.status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "EndpointNotRoutable"
    assert "r1 at mac-b.local:8001, r2 at 127.0.0.1:8001" in degraded["message"]


def test_different_ports_get_one_slice_each() -> None:
    """An EndpointSlice has one port list, so replicas on different ports get separate slices."""
    s = spec(replicas=2)
    reps = [rep("r0", "a", s, endpoint="10.0.0.1:8001"), rep("r1", "b", s, endpoint="10.0.0.2:9000")]
    plan = P.decide(observed(s, [mac("a"), mac("b")], reps))
    assert [(x["metadata"]["name"], x["ports"][0]["port"]) for x in plan.slices] == [
        ("qwen", 8001),
        ("qwen-9000", 9000),
    ]


def test_scale_down_removes_not_ready_first() -> None:
    """3 -> 1: the pulling and the failed replica go, the ready one stays."""
    s = spec(replicas=1)
    reps = [rep("r0", "a", s, phase="Pulling"), rep("r1", "b", s), rep("r2", "c", s, phase="Failed")]
    plan = P.decide(observed(s, [mac("a"), mac("b"), mac("c")], reps))
    assert sorted(n for n, _ in plan.delete) == ["r0", "r2"]
    assert plan.create == ()


def test_scale_down_among_ready_prefers_crowded_macs() -> None:
    """Among ready replicas, the one sharing a Mac with a sibling goes first."""
    s = spec(replicas=2)
    reps = [rep("r0", "a", s), rep("r1", "a", s), rep("r2", "b", s)]
    plan = P.decide(observed(s, [mac("a"), mac("b")], reps))
    assert len(plan.delete) == 1 and plan.delete[0][0] in {"r0", "r1"}


def test_notready_mac_replicas_are_replaced_and_kept() -> None:
    """A Mac whose Lease expired: its replica is replaced elsewhere but not deleted yet."""
    s = spec(replicas=1)
    plan = P.decide(observed(s, [mac("a", ready=False), mac("b")], [rep("r0", "a", s)]))
    assert [c["spec"]["nodeName"] for c in plan.create] == ["b"]
    assert plan.delete == ()
    assert plan.status is not None
    degraded = next(c for c in plan.status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "NodeNotReady")


def test_lost_replicas_are_marked_once() -> None:
    """The fact that a replica was replaced is kept on it (an annotation), not in memory."""
    s = spec(replicas=1)
    plan = P.decide(observed(s, [mac("a", ready=False), mac("b")], [rep("r0", "a", s)]))
    assert plan.mark == (("r0", True),)
    again = P.decide(observed(s, [mac("a", ready=False), mac("b")], [rep("r0", "a", s, lost_mark=True)]))
    assert again.mark == ()


def test_returning_mac_replaced_replica_goes_once_the_replacement_serves() -> None:
    """The Mac is back: its replaced replica serves until the replacement is Ready, then goes."""
    s = spec(replicas=1)
    macs = [mac("a"), mac("b")]
    old = rep("r0", "a", s, endpoint="10.0.0.1:8001", lost_mark=True)
    pulling = P.decide(observed(s, macs, [old, rep("r1", "b", s, phase="Pulling")]))
    assert pulling.delete == () and pulling.create == () and pulling.mark == ()
    assert [e["addresses"] for e in pulling.slices[0]["endpoints"]] == [["10.0.0.1"]]
    ready = P.decide(observed(s, macs, [old, rep("r1", "b", s, phase="Ready", endpoint="10.0.0.2:8001")]))
    assert [n for n, _ in ready.delete] == ["r0"]


def test_returning_mac_without_replacement_serves_again() -> None:
    """Nothing replaced it (no room elsewhere): the mark is cleared and the replica simply serves."""
    s = spec(replicas=1)
    plan = P.decide(observed(s, [mac("a")], [rep("r0", "a", s, lost_mark=True)]))
    assert plan.delete == () and plan.mark == (("r0", False),)


def test_returning_mac_surplus_is_trimmed_not_ready_first() -> None:
    """The Mac is back: two replicas for one wanted; the one not serving goes."""
    s = spec(replicas=1)
    reps = [rep("r0", "a", s, phase="Ready"), rep("r1", "b", s, phase="Pulling")]
    plan = P.decide(observed(s, [mac("a"), mac("b")], reps))
    assert [n for n, _ in plan.delete] == ["r1"]


def test_replicas_on_deleted_macs_are_deleted_and_replaced() -> None:
    """A MacNode that no longer exists: its replica is deleted and replaced."""
    s = spec(replicas=1)
    plan = P.decide(observed(s, [mac("b")], [rep("r0", "gone", s)]))
    assert [n for n, _ in plan.delete] == ["r0"]
    assert [c["spec"]["nodeName"] for c in plan.create] == ["b"]


def test_no_execute_taint_evicts_and_replaces() -> None:
    """A NoExecute taint the deployment does not tolerate: the replica goes and is placed elsewhere."""
    s = spec(replicas=1)
    tainted = mac("a", taints=(Taint("maintenance", "", "NoExecute"),))
    plan = P.decide(observed(s, [tainted, mac("b")], [rep("r0", "a", s)]))
    assert [n for n, _ in plan.delete] == ["r0"]
    assert [c["spec"]["nodeName"] for c in plan.create] == ["b"]
    tolerant = spec(replicas=1, placement={"tolerations": [{"key": "maintenance", "operator": "Exists"}]})
    kept = P.decide(observed(tolerant, [tainted, mac("b")], [rep("r0", "a", tolerant)]))
    assert kept.delete == () and kept.create == ()


def test_rollout_surges_first_and_keeps_the_ready_count() -> None:
    """New digest: one new replica first (maxSurge 1); the old one stays until the new one is Ready."""
    s = spec(replicas=2)
    old = [rep("o0", "a", s, D1), rep("o1", "b", s, D1)]
    obs = observed(s, [mac("a"), mac("b"), mac("c")], old, pin=pin(D2))
    plan = P.decide(obs)
    assert len(plan.create) == 1 and plan.delete == ()
    ready_floor = 2
    world = apply(obs, plan)
    for _ in range(12):  # the agent makes each new replica Ready; the controller runs again
        world = replace(world, replicas=[replace(r, phase="Ready") for r in world.replicas])
        assert sum(r.ready for r in world.replicas) >= ready_floor
        step = P.decide(world)
        world = apply(world, step)
        survivors_ready = sum(r.ready for r in world.replicas)
        assert survivors_ready >= ready_floor, step
        assert len(world.replicas) <= 3
    assert {r.revision for r in world.replicas} == {P.revision(s, D2)}
    assert len(world.replicas) == 2


def test_rollout_with_max_unavailable_removes_old_first() -> None:
    """maxSurge 0 / maxUnavailable 1 (no room for two): an old replica goes before the new starts."""
    s = spec(replicas=1, rollout={"maxSurge": 0, "maxUnavailable": 1})
    plan = P.decide(observed(s, [mac("a", ws=6)], [rep("o0", "a", s, D1)], pin=pin(D2)))
    assert [n for n, _ in plan.delete] == ["o0"]


def test_new_engine_args_are_a_new_revision() -> None:
    """engineArgs, env, engine and plan inputs change the revision label; replicas count does not."""
    a = spec()
    assert P.revision(a, D1) != P.revision(spec(engineArgs=["--seed", "7"]), D1)
    assert P.revision(a, D1) != P.revision(spec(contextLength=4096), D1)
    assert P.revision(a, D1) != P.revision(a, D2)
    assert P.revision(a, D1) == P.revision(spec(replicas=5), D1)


def test_unschedulable_sets_stalled_with_the_message() -> None:
    """Nothing fits: no replica, Ready False reason Unschedulable with the closest Mac named."""
    s = spec()
    plan = P.decide(
        observed(s, [mac("studio-1", ws=36, chip="M3 Ultra", total_bytes=192 * GIB)], pin=pin(size=41.2))
    )
    assert plan.create == ()
    assert plan.status is not None
    ready = next(c for c in plan.status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "Unschedulable"
    assert ready["message"].startswith(
        "no Mac fits: closest is studio-1 (M3 Ultra, 192 GiB): weights need 41.2 GiB"
    )
    assert [e.type for e in plan.events] == ["Warning"]


def test_without_a_pin_nothing_is_created_and_resolution_is_stalled() -> None:
    """The tag does not resolve: Stalled/ResolveFailed, no replicas created, existing ones kept."""
    s = spec()
    plan = P.decide(
        observed(s, [mac("a")], [rep("r0", "a", s)], pin=None, resolve_error="manifest unknown: v9")
    )
    assert plan.create == () and plan.delete == ()
    assert plan.status is not None
    stalled = next(c for c in plan.status["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"], stalled["message"]) == (
        "True",
        "ResolveFailed",
        "manifest unknown: v9",
    )


def test_status_only_written_when_it_changes() -> None:
    """The second run sees its own status and writes none (no churn on timers)."""
    obs = observed(spec(), [mac("a")])
    world = apply(obs, P.decide(obs))
    assert P.decide(world).status is None
    assert P.decide(replace(world, now="2026-11-26T13:00:00Z")).status is None


def test_real_memory_planner_binds_the_engine_plan() -> None:
    """With orchardist.planning: the replica carries the planner's memoryPlan for that Mac."""
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_size": 1024,
        "max_position_embeddings": 40960,
        "torch_dtype": "bfloat16",
    }
    profile = from_config(config, weight_bytes=1_200_000_000)
    s = spec(contextLength=8192, maxConcurrentSequences=4)
    fit = fit_for(profile, plan_request(s))
    p = W.Pin(D1, f"oci://127.0.0.1:5000/m@{D1}", profile.to_status(), fit)
    plan = P.decide(observed(s, [mac("mini", ws=16, total_bytes=24 * GIB, bandwidth=120 * 10**9)], pin=p))
    (body,) = plan.create
    mp = body["spec"]["memoryPlan"]
    assert mp["maxModelLen"] == 8192 and mp["maxNumSeqs"] == 4
    assert mp["kvBytesPerToken"] == profile.kv_bytes_per_token
    assert 0 < mp["reservedBytes"] <= 16 * GIB


def deployment(want: int = 2, generation: int = 3, **status: Any) -> ModelDeployment:
    """spec.replicas = ``want``; ``status`` as the last reconcile wrote it."""
    return ModelDeployment.model_validate(
        {
            "metadata": {"name": "qwen", "namespace": "ns", "generation": generation},
            "spec": {"model": "oci://127.0.0.1:5000/m:v1", "replicas": want},
            "status": status,
        }
    )


def stalled(reason: str) -> dict[str, Any]:
    return {"type": "Stalled", "status": "True", "reason": reason}


PLACEMENT = [
    # (case, deployment, whether a new or changed Mac should trigger its reconcile)
    ("never reconciled", deployment(), True),
    ("spec changed since the last status", deployment(observedGeneration=2, replicas=2), True),
    ("fewer replicas than asked for", deployment(observedGeneration=3, replicas=1), True),
    ("all there", deployment(observedGeneration=3, replicas=2), False),
    (
        "all there, display phase says Pending",  # the phase is a display word: it decides nothing
        deployment(observedGeneration=3, replicas=2, phase="Pending"),
        False,
    ),
    (
        "stalled: no Mac fits",
        deployment(observedGeneration=3, replicas=2, conditions=[stalled("Unschedulable")]),
        True,
    ),
    (
        "stalled on a failed pull (display phase Failed): another Mac does not help",
        deployment(observedGeneration=3, replicas=2, phase="Failed", conditions=[stalled("PullFailed")]),
        False,
    ),
    (
        "stalled on the registry, nothing created yet",  # once it resolves, a new Mac may take them
        deployment(observedGeneration=3, replicas=0, conditions=[stalled("ResolveFailed")]),
        True,
    ),
    (
        "stalled on the registry, all replicas there: another Mac does not help",
        deployment(observedGeneration=3, replicas=2, conditions=[stalled("ResolveFailed")]),
        False,
    ),
    ("scaled to zero", deployment(want=0), False),
    (
        "Unschedulable cleared",
        deployment(
            observedGeneration=3,
            replicas=2,
            conditions=[{"type": "Stalled", "status": "False", "reason": "Unschedulable"}],
        ),
        False,
    ),
]


@pytest.mark.parametrize(("case", "md", "expected"), PLACEMENT, ids=[p[0] for p in PLACEMENT])
def test_needs_placement(case: str, md: ModelDeployment, expected: bool) -> None:
    """A Mac appearing or changing retries the deployments it may help, decided on spec and conditions."""
    assert P.needs_placement(md) is expected


def test_a_deployment_being_deleted_needs_no_placement() -> None:
    """Going away: a new Mac must not bring it replicas."""
    md = deployment()
    md.metadata["deletionTimestamp"] = NOW
    assert P.needs_placement(md) is False
