"""The agent's replica loop against fakes of what it talks to: the API server, the store, engines.

The fake API server keeps objects, bumps an opaque resourceVersion on each write, applies status
patches as JSON merge patches and records every change as the watch would deliver it; ``settle``
hands those deliveries to the loop in order and awaits its pulls. No process, no network, no
clock waits.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from kubernetes.client.exceptions import ApiException

from orchardist.kube import JSON, MERGE_PATCH, Kube
from orchardist.oci.progress import PullProgress
from orchardist_agent.config import AgentConfig
from orchardist_agent.node import NodeAgent
from orchardist_agent.reconcile import EngineState, EngineView
from orchardist_agent.replicas import ReplicaLoop

GiB = 2**30
DIGEST = "sha256:" + "a" * 64
MODEL = f"oci://registry.test/models/tiny@{DIGEST}"
NS = "team"
NODE = "mac-1"
ADDRESS = "10.0.0.7"
Key = tuple[str, str]


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(out.get(k), v)
    return out


def replica(name: str, *, reserved: int = GiB, engine: str = "mlx-lm", **spec: Any) -> JSON:
    return {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "ModelReplica",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "generation": 1,
            "creationTimestamp": "2026-12-02T00:00:00Z",
        },
        "spec": {
            "nodeName": NODE,
            "deployment": "tiny",
            "model": MODEL,
            "digest": DIGEST,
            "engine": engine,
            "servedModelName": "tiny",
            "memoryPlan": {
                "weightBytes": 1,
                "overheadBytes": 1,
                "kvBudgetBytes": 1024,
                "kvBytesPerToken": 8,
                "blockSize": 16,
                "numBlocks": 16,
                "maxModelLen": 128,
                "maxNumSeqs": 1,
                "maxNumBatchedTokens": 128,
                "gpuMemoryUtilization": 0.5,
                "reservedBytes": reserved,
            },
            **spec,
        },
    }


class FakeApi:
    """The calls the loop makes: replica status patches, Secret reads, Event writes."""

    def __init__(self) -> None:
        self.replicas: dict[Key, JSON] = {}
        self.secrets: dict[Key, JSON] = {}
        self.patches: list[tuple[Key, JSON]] = []
        self.events: list[JSON] = []
        self.watch_stream: list[tuple[str, JSON]] = []  # what the informer would deliver, in order
        self._versions = itertools.count(1)

    def put(self, obj: JSON) -> JSON:
        """Store (as a user, the controller or a status patch writes); the watch sees it."""
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = f"v{next(self._versions)}x"  # opaque on purpose
        key = (stored["metadata"]["namespace"], stored["metadata"]["name"])
        kind = "MODIFIED" if key in self.replicas else "ADDED"
        self.replicas[key] = stored
        self.watch_stream.append((kind, copy.deepcopy(stored)))
        return copy.deepcopy(stored)

    def remove(self, name: str) -> JSON:
        last = self.replicas.pop((NS, name))
        self.watch_stream.append(("DELETED", copy.deepcopy(last)))
        return last

    def status(self, name: str) -> JSON:
        return dict(self.replicas[(NS, name)].get("status") or {})

    def request(self, method: str, path: str, *, body: Any = None, content_type: str = "", **_: Any) -> JSON:
        parts = path.strip("/").split("/")
        if parts[:3] == ["apis", "orchardist.io", "v1alpha1"] and parts[-1] == "status" and method == "PATCH":
            assert content_type == MERGE_PATCH
            key = (parts[4], parts[6])
            if key not in self.replicas:
                raise ApiException(status=404, reason="NotFound")
            self.patches.append((key, copy.deepcopy(body)))
            obj = merge(self.replicas[key], {"status": body["status"]})
            return self.put(obj)
        if parts[:2] == ["api", "v1"] and parts[4] == "secrets" and method == "GET":
            secret = self.secrets.get((parts[3], parts[5]))
            if secret is None:
                raise ApiException(status=404, reason="NotFound")
            return secret
        if parts[:2] == ["api", "v1"] and parts[4] == "events":
            if method == "POST":
                self.events.append(copy.deepcopy(body))
            return body or {}
        raise AssertionError(f"the loop does not call {method} {path}")

    def get(self, path: str, **query: str | int) -> JSON:
        raise AssertionError("lists come from the informer")

    def watch(self, path: str, **query: str | int) -> Iterator[JSON]:
        raise AssertionError("watches come from the informer")


class FakeStore:
    """A content store whose pulls finish when the test says so."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models: dict[str, int] = {}
        self.pins: Counter[str] = Counter()
        self.pulls: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    def get(self, digest: str) -> SimpleNamespace | None:
        if digest not in self.models:
            return None
        return SimpleNamespace(path=self.root / digest, digest=digest)

    def pin(self, digest: str) -> None:
        self.pins[digest] += 1

    def unpin(self, digest: str) -> None:
        self.pins[digest] -= 1

    def cached(self) -> list[tuple[str, int]]:
        return sorted(self.models.items())

    def usage(self) -> SimpleNamespace:
        used = sum(self.models.values())
        return SimpleNamespace(used_bytes=used, free_bytes=100 * GiB - used, budget_bytes=100 * GiB)

    async def pull(
        self, ref: str, auth: Any = None, progress: Any = None, peers: Any = None
    ) -> SimpleNamespace:
        self.pulls.append(ref)
        progress(PullProgress(ref, DIGEST, "downloading", 50, 100, 10.0, 5.0))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        digest = ref.rsplit("@", 1)[1]
        self.models[digest] = 100
        return SimpleNamespace(path=self.root / digest, digest=digest)


class FakeEngines:
    """Engines that are Ready as soon as they are asked for."""

    def __init__(self) -> None:
        self.running: dict[Key, EngineView] = {}
        self.ensured: list[tuple[Key, Any, Path, str | None]] = []
        self.ports: list[int | None] = []  # the public port each ensure asked to keep
        self.hidden: set[Key] = set()  # adopted engines no proxy serves yet
        self.stopped: list[Key] = []

    async def start(self, notify: Any) -> None:
        self.notify = notify

    def view(self, key: Key) -> EngineView | None:
        return self.running.get(key)

    def installed(self, engine: str, version: str | None = None) -> bool:
        return engine == "mlx-lm"

    def keys(self) -> list[Key]:
        return list(self.running)

    def unexposed(self, key: Key) -> bool:
        return key in self.hidden

    async def ensure(
        self, key: Key, spec: Any, model_dir: Path, api_key: str | None, *, port: int | None = None
    ) -> None:
        self.ensured.append((key, spec, model_dir, api_key))
        self.ports.append(port)
        self.hidden.discard(key)
        self.running[key] = EngineView(
            EngineState.READY, port=8001, pid=4242, started_at="2026-12-02T01:00:00Z"
        )

    async def stop(self, key: Key) -> None:
        self.stopped.append(key)
        self.running.pop(key, None)

    async def close(self, *, stop_engines: bool) -> None:
        self.closed = stop_engines


class Rig(SimpleNamespace):
    api: FakeApi
    store: FakeStore
    engines: FakeEngines
    node: NodeAgent
    loop: ReplicaLoop


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    api, store, engines = FakeApi(), FakeStore(tmp_path / "store"), FakeEngines()
    kube = Kube(api)
    node = NodeAgent(kube, NODE, dict, address=ADDRESS)
    node._host = {"memory": {"gpuWorkingSetBytes": 48 * GiB}}
    cfg = AgentConfig(node_name=NODE, store=tmp_path / "store", state_dir=tmp_path / "state")
    loop = ReplicaLoop(kube, node, cfg, ADDRESS, cast(Any, store), cast(Any, engines))
    return Rig(api=api, store=store, engines=engines, node=node, loop=loop)


async def settle(rig: Rig) -> None:
    """Deliver the watch's events, finish the pulls the test lets finish, until the loop is idle."""
    loop = rig.loop
    while True:
        for item in rig.api.watch_stream:
            loop.queue.put_nowait(item)
        rig.api.watch_stream.clear()
        pulls = [s.task for s in loop.pulls.states.values() if s.task is not None]
        if pulls and rig.store.gate.is_set():
            await asyncio.gather(*pulls, return_exceptions=True)
        await asyncio.sleep(0)  # run the callbacks a pull scheduled on the loop
        if loop.queue.empty():
            break
        while not loop.queue.empty():
            await loop.handle(loop.queue.get_nowait())
    await asyncio.gather(*loop._background)


def conditions(status: JSON) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions") or []}


async def test_a_new_replica_is_reserved_pulled_started_and_reported_ready(rig: Rig) -> None:
    rig.store.gate.clear()  # hold the pull so its first status can be seen
    await rig.loop.handle(("relist", []))
    rig.api.put(replica("r1"))
    await settle(rig)
    assert rig.loop.reservations == {(NS, "r1"): GiB}
    assert rig.node.state.allocated_bytes == GiB
    assert rig.store.pulls == [MODEL]
    pulling = rig.api.status("r1")
    assert pulling["phase"] == "Pulling"
    assert conditions(pulling) == {
        "Scheduled": ("True", "Scheduled"),
        "Pulled": ("False", "PullProgressing"),
        "Ready": ("False", "PullProgressing"),
    }

    rig.store.gate.set()
    await settle(rig)
    ready = rig.api.status("r1")
    assert ready["phase"] == "Ready"
    assert ready["endpoint"] == f"{ADDRESS}:8001"
    assert ready["observedGeneration"] == 1
    assert conditions(ready)["Ready"] == ("True", "Ready")
    assert "progress" not in ready  # cleared once the model is in the store
    [(key, spec, model_dir, api_key)] = rig.engines.ensured
    assert (key, spec.engine, spec.memory_plan.reserved_bytes, model_dir.name, api_key) == (
        (NS, "r1"),
        "mlx-lm",
        GiB,
        DIGEST,
        None,
    )
    assert rig.store.pins[DIGEST] == 1
    assert rig.node.state.cached_models == [{"digest": DIGEST, "sizeBytes": 100}]
    assert ("Normal", "Ready") in {(e["type"], e["reason"]) for e in rig.api.events}


async def test_a_converged_replica_costs_no_more_writes(rig: Rig) -> None:
    rig.api.put(replica("r1"))
    await settle(rig)
    assert rig.api.status("r1")["phase"] == "Ready"
    patches, events = len(rig.api.patches), len(rig.api.events)
    for _ in range(3):
        await rig.loop.converge_all()
    await settle(rig)
    assert (len(rig.api.patches), len(rig.api.events)) == (patches, events)


async def test_status_patch_content_for_a_replica_that_does_not_fit(rig: Rig) -> None:
    rig.api.put(replica("huge", reserved=100 * GiB))
    await settle(rig)
    [(key, body)] = rig.api.patches
    status = body["status"]
    for c in status["conditions"]:
        assert c.pop("lastTransitionTime")
    message = "needs 100.0 GiB of the GPU working set; mac-1 has 48.0 GiB free"
    assert (key, status) == (
        (NS, "huge"),
        {
            "phase": "Failed",
            "observedGeneration": 1,
            "conditions": [
                {
                    "type": "Scheduled",
                    "status": "False",
                    "reason": "DoesNotFit",
                    "message": message,
                    "observedGeneration": 1,
                },
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "DoesNotFit",
                    "message": message,
                    "observedGeneration": 1,
                },
            ],
            "lastError": {"reason": "DoesNotFit", "message": message},
            "message": message,
        },
    )
    assert rig.loop.reservations == {} and rig.store.pulls == [] and rig.engines.ensured == []
    assert [(e["type"], e["reason"], e["involvedObject"]["name"]) for e in rig.api.events] == [
        ("Warning", "DoesNotFit", "huge")
    ]


async def test_deletion_stops_the_engine_and_gives_memory_and_pins_back(rig: Rig) -> None:
    rig.api.put(replica("r1"))
    await settle(rig)
    patches = len(rig.api.patches)
    rig.api.remove("r1")
    await settle(rig)
    assert rig.engines.stopped == [(NS, "r1")]
    assert rig.loop.reservations == {} and rig.node.state.allocated_bytes == 0
    assert rig.store.pins[DIGEST] == 0
    assert rig.loop.cache.objects == {}
    assert len(rig.api.patches) == patches  # nothing is written about an object that is gone


async def test_a_deletion_timestamp_reports_terminating_and_stops_the_engine(rig: Rig) -> None:
    rig.api.put(replica("r1"))
    await settle(rig)
    held = copy.deepcopy(rig.api.replicas[(NS, "r1")])
    held["metadata"]["deletionTimestamp"] = "2026-12-02T02:00:00Z"
    held["metadata"]["finalizers"] = ["example.com/hold"]
    rig.api.put(held)
    await settle(rig)
    assert rig.engines.stopped == [(NS, "r1")]
    assert rig.api.status("r1")["phase"] == "Terminating"
    assert rig.loop.reservations == {} and rig.store.pins[DIGEST] == 0


async def test_a_relist_tears_down_what_vanished_and_converges_what_is_new(rig: Rig) -> None:
    rig.api.put(replica("old"))
    await settle(rig)
    rig.engines.running[(NS, "orphan")] = EngineView(EngineState.READY, port=9, pid=1)  # adopted, no object
    del rig.api.replicas[(NS, "old")]  # deleted while the watch was down: no DELETED event
    rig.api.put(replica("new"))
    rig.api.watch_stream.clear()  # ...and the history is gone: the informer relists
    await rig.loop.handle(("relist", list(rig.api.replicas.values())))
    await settle(rig)
    assert sorted(rig.engines.stopped) == [(NS, "old"), (NS, "orphan")]
    assert set(rig.loop.cache.objects) == {(NS, "new")}
    assert rig.loop.reservations == {(NS, "new"): GiB}
    assert rig.api.status("new")["phase"] == "Ready"


async def test_watch_events_older_than_the_agents_own_write_are_not_taken_for_news(rig: Rig) -> None:
    rig.store.gate.clear()
    added = rig.api.put(replica("r1"))
    rig.api.watch_stream.clear()
    await rig.loop.handle(("ADDED", added))  # writes Pulling
    await asyncio.gather(*rig.loop._background)
    patches, events = len(rig.api.patches), len(rig.api.events)
    # Delivered late, the pre-write copy (no status yet) must not undo what was written.
    await rig.loop.handle(("MODIFIED", copy.deepcopy(added)))
    await asyncio.gather(*rig.loop._background)
    later = [body["status"] for _, body in rig.api.patches[patches:]]
    assert all(set(st) == {"progress"} for st in later), later  # the pull's progress, nothing re-sent
    assert len(rig.api.events) == events
    # Until the watch catches up with the agent's last write, the cache waits for that version.
    assert rig.loop.cache.pending == {(NS, "r1"): rig.api.replicas[(NS, "r1")]["metadata"]["resourceVersion"]}
    await settle(rig)  # the write's own echo
    assert rig.loop.cache.pending == {}
    rig.store.gate.set()
    await settle(rig)
    assert rig.api.status("r1")["phase"] == "Ready"


async def test_a_failed_pull_is_reported_and_tried_again_only_when_due(rig: Rig) -> None:
    rig.store.fail = ConnectionError("registry unreachable")
    rig.api.put(replica("r1"))
    await settle(rig)
    st = rig.api.status("r1")
    assert conditions(st)["Pulled"] == ("False", "PullFailed")
    assert st["lastError"] == {"reason": "PullFailed", "message": "ConnectionError: registry unreachable"}
    assert ("Warning", "PullFailed") in {(e["type"], e["reason"]) for e in rig.api.events}
    await rig.loop.converge_all()
    await settle(rig)
    assert rig.store.pulls == [MODEL]  # not due yet: the retry waits by its backoff
    state = rig.loop.pulls.get((NS, "r1"))
    assert state is not None and state.failures == 1
    state.retry_at = 0.0  # the backoff has passed
    rig.store.fail = None
    await rig.loop.converge_all()
    await settle(rig)
    assert rig.store.pulls == [MODEL, MODEL]
    assert rig.api.status("r1")["phase"] == "Ready"
    assert "lastError" not in rig.api.status("r1")


async def test_an_engine_that_is_not_installed_is_refused_without_a_reservation(rig: Rig) -> None:
    rig.api.put(replica("r1", engine="llama.cpp"))
    await settle(rig)
    st = rig.api.status("r1")
    assert (st["phase"], st["lastError"]["reason"]) == ("Failed", "EngineNotInstalled")
    assert rig.loop.reservations == {} and rig.store.pulls == []


async def test_an_object_this_agent_cannot_read_is_left_alone(rig: Rig) -> None:
    bad = replica("bad")
    bad["spec"]["digest"] = "sha256:" + "b" * 64  # not the digest spec.model is pinned to
    rig.api.put(bad)
    await settle(rig)
    assert rig.loop.cache.objects == {}
    assert rig.api.patches == [] and rig.store.pulls == [] and rig.loop.reservations == {}


async def test_the_api_key_secret_is_read_from_the_nodes_projection(rig: Rig) -> None:
    from orchardist.api.projection import node_namespace, projected_secret

    rig.api.secrets[(NS, "keys")] = {"data": {"token": "ZXZpbA=="}}  # the source: not the agent's to read
    copy = (node_namespace(NODE), projected_secret(NS, "keys"))
    rig.api.secrets[copy] = {"data": {"token": "czNjcjN0"}}  # base64 of s3cr3t
    rig.api.put(replica("r1", apiKeySecretRef={"name": "keys", "key": "token"}))
    await settle(rig)
    assert [api_key for *_, api_key in rig.engines.ensured] == ["s3cr3t"]


async def test_an_adopted_engine_is_served_again_on_the_port_it_had(rig: Rig) -> None:
    """After an agent restart the engine runs but no proxy listens: the loop re-exposes it, asking
    for the port in the replica's endpoint so clients and the EndpointSlice keep working."""
    rig.store.models[DIGEST] = 100
    rig.engines.running[(NS, "r1")] = EngineView(EngineState.READY, port=None, pid=4242)
    rig.engines.hidden.add((NS, "r1"))
    obj = replica("r1") | {"status": {"phase": "Ready", "endpoint": f"{ADDRESS}:8123"}}
    await rig.loop.handle(("relist", [obj]))
    await settle(rig)
    assert [key for key, *_ in rig.engines.ensured] == [(NS, "r1")]
    assert rig.engines.ports == [8123]
    assert not rig.engines.unexposed((NS, "r1"))
    await rig.loop.converge_all()
    assert len(rig.engines.ensured) == 1  # exposed once, not on every pass
