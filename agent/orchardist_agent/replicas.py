"""Watch the ModelReplicas bound to this Mac and converge each one (the agent's "kubelet" loop).

One queue, one consumer: watch events, engine changes, pull progress and a slow tick all land
in the queue and each replica is converged by the pure `reconcile.decide` + `status_patch`. Side
effects go to three adapters: the API server (`orchardist.kube.RawApi`), the content store (pulls, pins) and
the engine supervisor. The watch uses the server-side field selector `spec.nodeName=<node>` (the
CRD lists it in `selectableFields`), resumes from its resourceVersion and relists on 410 Gone.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubernetes.client.exceptions import ApiException

from orchardist import log
from orchardist.kube import GROUP, VERSION
from orchardist.oci.auth import Credentials
from orchardist.oci.progress import PullProgress
from orchardist.oci.store import ContentStore

from .engines import EngineArgsError, EngineSpec, Runtime
from .reconcile import (
    JSON,
    Act,
    EngineState,
    EngineView,
    Observed,
    ProgressThrottle,
    PullView,
    ReplicaView,
    condition_events,
    decide,
    free_bytes,
    now_iso,
    status_patch,
)

if TYPE_CHECKING:
    from orchardist.kube import RawApi

    from .config import AgentConfig
    from .node import NodeAgent
    from .supervisor import Supervisor

LOG = log.get(__name__)

#: Every replica is looked at again this often even without events (pull retries, engine states
#: the supervisor reports without a notification).
TICK_S = 5.0
#: A failed pull is tried again after this long, doubling up to PULL_RETRY_MAX_S.
PULL_RETRY_S = 10.0
PULL_RETRY_MAX_S = 300.0
#: Server-side watch timeout: the watch thread wakes up this often even on a quiet cluster.
WATCH_TIMEOUT_S = 240

Key = tuple[str, str]


def default_budget(store: Path) -> int:
    """Without --store-budget: 80 % of the store's file system, leaving room for the OS and swap."""
    store.mkdir(parents=True, exist_ok=True)
    return int(shutil.disk_usage(store).total * 0.8)


def replicas_path(namespace: str | None = None, name: str = "") -> str:
    base = f"/apis/{GROUP}/{VERSION}"
    path = f"{base}/namespaces/{namespace}/modelreplicas" if namespace else f"{base}/modelreplicas"
    return f"{path}/{name}" if name else path


@dataclass
class PullState:
    task: asyncio.Task[Any] | None = None
    digest: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    started: float = field(default_factory=time.monotonic)
    rate: float = 0.0
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    throttle: ProgressThrottle = field(default_factory=ProgressThrottle)
    progress_due: bool = False

    def view(self, now: float) -> PullView:
        return PullView(
            bytes_done=self.bytes_done,
            bytes_total=self.bytes_total,
            bytes_per_second=self.rate,
            error=self.error,
            retry_due=self.error is not None and now >= self.retry_at,
        )


class ReplicaLoop:
    """Converges every ModelReplica bound to this node; owns the node's memory reservations."""

    def __init__(
        self,
        kube: RawApi,
        node: NodeAgent,
        cfg: AgentConfig,
        address: str,
        store: ContentStore,
        engines: EngineAdapter,
    ) -> None:
        self.kube = kube
        self.node = node
        self.cfg = cfg
        self.address = address
        self.store = store
        self.engines = engines
        self.selector = f"spec.nodeName={node.name}"
        self.objects: dict[Key, JSON] = {}
        self.reservations: dict[Key, int] = {}
        self.pulls: dict[Key, PullState] = {}
        self.pinned: dict[Key, str] = {}  # the digest each replica holds a store pin on
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._stop_thread = threading.Event()
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    def create(cls, kube: RawApi, node: NodeAgent, cfg: AgentConfig, address: str) -> ReplicaLoop:
        budget = cfg.store_budget if cfg.store_budget is not None else default_budget(cfg.store)
        store = ContentStore(cfg.store, budget)
        return cls(kube, node, cfg, address, store, EngineAdapter(cfg))

    # -- the watch (a daemon thread: the kubernetes client blocks) --------------------------

    def _put(self, loop: asyncio.AbstractEventLoop, item: tuple[str, Any]) -> None:
        loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _watch_thread(self, loop: asyncio.AbstractEventLoop, rv: str | None = None) -> None:
        """List, then watch from the list's resourceVersion; relist when the server says 410 Gone."""
        path = replicas_path()
        while not self._stop_thread.is_set():
            try:
                if rv is None:
                    listed = self.kube.get(path, fieldSelector=self.selector)
                    rv = str(listed["metadata"]["resourceVersion"])
                    self._put(loop, ("relist", listed.get("items") or []))
                for event in self.kube.watch(
                    path,
                    fieldSelector=self.selector,
                    resourceVersion=rv,
                    allowWatchBookmarks="true",
                    timeoutSeconds=WATCH_TIMEOUT_S,
                ):
                    if self._stop_thread.is_set():
                        return
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            LOG.info("watch expired; relisting", rv=rv)
                            rv = None
                            break
                        raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                    rv = str(obj.get("metadata", {}).get("resourceVersion") or rv)
                    if kind != "BOOKMARK":
                        self._put(loop, (str(kind), obj))
            except ApiException as exc:
                if exc.status == 410:
                    rv = None
                    continue
                LOG.warning("replica watch failed; retrying", error=f"{exc.status} {exc.reason}")
                self._stop_thread.wait(2.0)
            except Exception as exc:
                LOG.warning("replica watch failed; retrying", error=repr(exc))
                self._stop_thread.wait(2.0)

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        await self.engines.start(lambda key: self._put(loop, ("engine", key)))
        self._publish_cache()
        threading.Thread(target=self._watch_thread, args=(loop,), name="replica-watch", daemon=True).start()
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                getter = asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait(
                    {getter, stopper}, timeout=TICK_S, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                    if not stop.is_set():
                        await self._converge_all()
                    continue
                try:
                    await self._handle(getter.result())
                except Exception as exc:  # one bad event must not end the loop
                    LOG.exception("replica event failed", error=repr(exc))
        finally:
            stopper.cancel()
            self._stop_thread.set()

    async def _handle(self, item: tuple[str, Any]) -> None:
        kind, payload = item
        if kind == "relist":
            fresh = {_key(o): o for o in payload}
            gone = [k for k in self.objects if k not in fresh]
            self.objects = fresh
            for key in gone:
                await self._converge(key, gone=True)
            await self._forget_orphans()
            await self._converge_all()
        elif kind in ("ADDED", "MODIFIED"):
            key = _key(payload)
            old = self.objects.get(key)
            if old is None or _rv(payload) >= _rv(old):
                self.objects[key] = payload
            await self._converge(key)
        elif kind == "DELETED":
            key = _key(payload)
            self.objects.pop(key, None)
            await self._converge(key, gone=True, last=payload)
        elif kind in ("engine", "progress"):
            key = payload
            if key in self.objects or key in self.reservations:
                await self._converge(key)

    async def _converge_all(self) -> None:
        # Replicas whose engine already runs first (adopted after a restart: they hold their
        # memory), then the oldest first, so admission is first come, first served.
        order = sorted(
            self.objects,
            key=lambda k: (
                self.engines.view(k) is None,
                str(self.objects[k]["metadata"].get("creationTimestamp", "")),
            ),
        )
        for key in order:
            await self._converge(key)

    async def _forget_orphans(self) -> None:
        """Engines recorded for replicas that no longer exist (deleted while the agent was away)."""
        for key in list(self.engines.keys()):
            if key not in self.objects:
                LOG.info("stopping the engine of a vanished replica", replica="/".join(key))
                await self.engines.stop(key)
                self._unpin(key)
                self.reservations.pop(key, None)
        self._publish_memory()

    # -- one replica ------------------------------------------------------------------------

    def observe(self, replica: ReplicaView) -> Observed:
        key = replica.key
        pull = self.pulls.get(key)
        now = time.monotonic()
        cached = bool(replica.digest) and self.store.get(replica.digest) is not None
        return Observed(
            free_bytes=free_bytes(self.node.working_set(), self.reservations, key),
            reserved=key in self.reservations,
            cached=cached,
            pull=None
            if cached or pull is None or (pull.task is None and pull.error is None)
            else pull.view(now),
            engine=self.engines.view(key),
            engine_installed=self.engines.installed(replica.engine, replica.engine_version),
            address=self.address,
        )

    async def _converge(self, key: Key, *, gone: bool = False, last: JSON | None = None) -> None:
        obj = self.objects.get(key)
        if obj is None and not gone:
            return
        view = ReplicaView.from_object(obj if obj is not None else (last or _stub(key)))
        if gone:
            view = _deleting(view)
        try:
            observed = self.observe(view)
            for act in decide(view, observed):
                await self._act(act, view)
            if gone or obj is None:
                return
            observed = self.observe(view)
            await self._patch_status(view, obj, observed)
        except Exception as exc:
            LOG.exception("converge failed", replica=f"{key[0]}/{key[1]}", error=repr(exc))

    async def _patch_status(self, view: ReplicaView, obj: JSON, observed: Observed) -> None:
        pull = self.pulls.get(view.key)
        with_progress = pull is not None and pull.progress_due
        patch = status_patch(view, observed, obj.get("status"), now_iso(), with_progress=with_progress)
        if pull is not None:
            pull.progress_due = False
        if not patch:
            return
        path = replicas_path(view.namespace, view.name) + "/status"
        try:
            updated = await asyncio.to_thread(self.kube.merge_patch, path, {"status": patch})
        except ApiException as exc:
            if exc.status == 404:
                return  # deleted meanwhile; the watch says so next
            raise
        cur = self.objects.get(view.key)
        if cur is not None and _rv(updated) >= _rv(cur):
            self.objects[view.key] = updated
        if "phase" in patch:
            LOG.info("replica status", replica=f"{view.namespace}/{view.name}", phase=patch["phase"])
        for kind, reason, message in condition_events(
            (obj.get("status") or {}).get("conditions"), patch.get("conditions")
        ):
            self._spawn(self._event(updated, kind, reason, message))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _event(self, obj: JSON, kind: str, reason: str, message: str) -> None:
        """A core/v1 Event on the replica, for `kubectl describe` (best effort: status is the record)."""
        meta = obj.get("metadata") or {}
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": meta.get("namespace")},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "ModelReplica",
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "orchardist-agent", "host": self.node.name},
            "reportingComponent": "orchardist.io/agent",
            "reportingInstance": self.node.name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await asyncio.to_thread(
                self.kube.create, f"/api/v1/namespaces/{meta.get('namespace')}/events", body
            )
        except Exception as exc:
            LOG.debug("event not recorded", reason=reason, error=str(exc))

    async def _act(self, act: Act, view: ReplicaView) -> None:
        key = view.key
        if act is Act.RESERVE:
            self.reservations[key] = view.reserved_bytes
            if view.digest and self.store.get(view.digest) is not None:
                self._pin(key, view.digest)  # an adopted engine's model: pins do not survive a restart
            self._publish_memory()
        elif act is Act.PULL:
            await self._start_pull(view)
        elif act is Act.START:
            model = self.store.get(view.digest)
            if model is None:
                return  # evicted meanwhile: the next pass pulls again
            self._pin(key, view.digest)
            api_key = await self._api_key(view)
            await self.engines.ensure(key, self.objects.get(key) or {}, model.path, api_key)
            LOG.info("engine started", replica=f"{key[0]}/{key[1]}", engine=view.engine)
        elif act is Act.STOP:
            await self.engines.stop(key)
            LOG.info("engine stopped", replica=f"{key[0]}/{key[1]}")
        elif act is Act.RELEASE:
            pull = self.pulls.pop(key, None)
            if pull is not None and pull.task is not None:
                pull.task.cancel()
            self._unpin(key)
            self.reservations.pop(key, None)
            self._publish_memory()
        elif act is Act.FORGET:
            self._unpin(key)
            self.pulls.pop(key, None)
            self.reservations.pop(key, None)
            self._publish_memory()

    def _pin(self, key: Key, digest: str) -> None:
        if self.pinned.get(key) == digest:
            return
        self._unpin(key)
        self.store.pin(digest)
        self.pinned[key] = digest

    def _unpin(self, key: Key) -> None:
        digest = self.pinned.pop(key, None)
        if digest is not None:
            self.store.unpin(digest)

    def _publish_cache(self) -> None:
        cached = [{"digest": d, "sizeBytes": n} for d, n in self.store.cached()]
        usage = self.store.usage()
        self.node.set_store(used=usage.used_bytes, free=usage.free_bytes, budget=usage.budget_bytes)
        self.node.state.cached_models = cached
        self.node.changed()

    def _publish_memory(self) -> None:
        total = sum(self.reservations.values())
        if self.node.state.allocated_bytes != total:
            self.node.state.allocated_bytes = total
            self.node.changed()

    # -- pulls -------------------------------------------------------------------------------

    async def _start_pull(self, view: ReplicaView) -> None:
        key = view.key
        state = self.pulls.get(key) or PullState()
        state.error = None
        state.digest = view.digest
        state.started = time.monotonic()
        self.pulls[key] = state
        loop = asyncio.get_running_loop()

        def progress(p: PullProgress) -> None:
            now = time.monotonic()
            state.bytes_done, state.bytes_total, state.rate = p.bytes_done, p.bytes_total, p.bytes_per_second
            if state.throttle.due(now, p.bytes_done, p.bytes_total):
                state.progress_due = True
                loop.call_soon_threadsafe(self.queue.put_nowait, ("progress", key))

        async def pull() -> None:
            try:
                auth = await self._pull_auth(view)
                self._pin(key, view.digest)
                model = await self.store.pull(view.model, auth=auth, progress=progress)
                if view.digest and model.digest != view.digest:
                    raise ValueError(
                        f"{view.model} resolved to {model.digest}, not spec.digest {view.digest}"
                    )
                state.failures = 0
                LOG.info("pulled", replica=f"{key[0]}/{key[1]}", digest=view.digest, bytes=state.bytes_total)
                self._publish_cache()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                state.failures += 1
                state.error = f"{type(exc).__name__}: {exc}"
                state.retry_at = time.monotonic() + min(
                    PULL_RETRY_S * 2 ** (state.failures - 1), PULL_RETRY_MAX_S
                )
                LOG.warning("pull failed", replica=f"{key[0]}/{key[1]}", error=state.error)
            finally:
                state.task = None
                self.queue.put_nowait(("progress", key))

        state.task = asyncio.create_task(pull(), name=f"pull {key[0]}/{key[1]}")

    async def _secret(self, namespace: str, name: str) -> JSON:
        path = f"/api/v1/namespaces/{namespace}/secrets/{name}"
        secret: JSON = await asyncio.to_thread(self.kube.get, path)
        return secret

    async def _pull_auth(self, view: ReplicaView) -> Credentials | None:
        if not view.pull_secret:
            return None
        from orchardist.oci import auth, reference

        secret = await self._secret(view.namespace, view.pull_secret)
        return auth.from_secret_data(secret.get("data") or {}, reference.parse(view.model))

    async def _api_key(self, view: ReplicaView) -> str | None:
        if view.api_key_secret is None:
            return None
        import base64

        name, item = view.api_key_secret
        secret = await self._secret(view.namespace, name)
        raw = (secret.get("data") or {}).get(item)
        return base64.b64decode(raw).decode() if raw else None

    async def shutdown(self, *, stop_engines: bool) -> None:
        self._stop_thread.set()
        for pull in self.pulls.values():
            if pull.task is not None:
                pull.task.cancel()
        await self.engines.close(stop_engines=stop_engines)


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def _rv(obj: Mapping[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _stub(key: Key) -> JSON:
    return {"metadata": {"namespace": key[0], "name": key[1]}, "spec": {}}


def _deleting(view: ReplicaView) -> ReplicaView:
    from dataclasses import replace

    return replace(view, deleting=True)


class EngineAdapter:
    """The replica loop's view of the engine supervisor and the installed runtimes.

    Supervisor keys are `namespace/name`; its phases map onto `reconcile.EngineState`.
    """

    RUNTIMES_TTL_S = 30.0

    def __init__(self, cfg: AgentConfig, supervisor: Supervisor | None = None) -> None:
        from .engines.runtimes import RuntimeRegistry
        from .supervisor import Supervisor

        self.cfg = cfg
        self.registry = RuntimeRegistry(configured=cfg.runtimes)
        self.supervisor = supervisor or Supervisor(cfg.state_dir / "engines", cfg.log_dir)
        self.failed: dict[Key, str] = {}  # replicas whose engine cannot even be composed
        self._runtimes: list[Runtime] = []
        self._runtimes_at = -math.inf

    async def start(self, notify: Callable[[Key], None]) -> None:
        """Adopt the engines a previous agent left running, then report every change."""
        self.supervisor.on_change = lambda st: notify(_split(st.key))
        for st in await self.supervisor.adopt():
            LOG.info("adopted engine", replica=st.key, pid=st.pid, phase=st.phase, endpoint=st.endpoint)

    def runtimes(self) -> list[Runtime]:
        now = time.monotonic()
        if now - self._runtimes_at > self.RUNTIMES_TTL_S:
            self._runtimes = self.registry.runtimes()
            self._runtimes_at = now
        return self._runtimes

    def runtime(self, engine: str, version: str | None) -> Runtime | None:
        found = [r for r in self.runtimes() if r.name == engine]
        if version:
            found = [r for r in found if r.version == version or r.version.startswith(version + "+")]
        if not found:
            return None
        # As RuntimeRegistry.resolve, over the cached list: the configured one, else the newest.
        configured = self.cfg.runtimes.get(engine)
        for r in found:
            if configured is not None and configured.expanduser().resolve() == r.prefix:
                return r
        return max(found, key=lambda r: tuple(int(x) for x in re.findall(r"\d+", r.version)[:4]))

    def installed(self, engine: str, version: str | None = None) -> bool:
        return self.runtime(engine, version) is not None

    def keys(self) -> list[Key]:
        return [_split(k) for k in self.supervisor.statuses()]

    def view(self, key: Key) -> EngineView | None:
        if key in self.failed:
            return EngineView(EngineState.FAILED, message=self.failed[key])
        st = self.supervisor.status(_join(key))
        if st is None:
            return None
        port = int(st.endpoint.rsplit(":", 1)[1]) if st.endpoint else None
        measured: dict[str, int] = {}
        if st.measured is not None:
            if st.measured.overhead_bytes is not None:
                measured["overheadBytes"] = int(st.measured.overhead_bytes)
            if st.measured.num_blocks is not None:
                measured["numBlocks"] = int(st.measured.num_blocks)
        return EngineView(
            state=_PHASES[st.phase],
            port=port,
            pid=st.pid,
            restarts=st.restarts,
            message=st.last_error.message if st.last_error else "",
            started_at=st.start_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if st.start_time
            else None,
            measured=measured,
            warnings=tuple(st.warnings),
        )

    def spec(self, replica: JSON, model_dir: Path, api_key: str | None) -> EngineSpec:
        """The driver input for a replica (raises EngineArgsError or ValueError when it cannot run)."""
        from orchardist.api.modelreplica import MemoryPlan

        spec = replica.get("spec") or {}
        engine = str(spec.get("engine") or "vllm-metal")
        runtime = self.runtime(engine, spec.get("engineVersion"))
        if runtime is None:
            raise ValueError(f"engine {engine!r} is not installed")
        return EngineSpec(
            engine=engine,
            runtime=runtime,
            model_dir=model_dir,
            plan=MemoryPlan.model_validate(spec.get("memoryPlan") or {}),
            served_model_name=str(spec.get("servedModelName") or spec.get("deployment") or ""),
            host=self.cfg.bind_address,
            engine_args=tuple(str(a) for a in spec.get("engineArgs") or ()),
            env={str(e["name"]): str(e.get("value", "")) for e in spec.get("env") or ()},
            api_key=api_key,
            device="metal" if sys.platform == "darwin" else "cpu",
        )

    async def ensure(self, key: Key, replica: JSON, model_dir: Path, api_key: str | None) -> None:
        try:
            spec = self.spec(replica, model_dir, api_key)
            await self.supervisor.ensure(_join(key), spec)
        except (EngineArgsError, ValueError) as exc:
            self.failed[key] = f"cannot start the engine: {exc}"
            LOG.warning("engine refused", replica=_join(key), error=str(exc))

    async def stop(self, key: Key) -> None:
        self.failed.pop(key, None)
        await self.supervisor.stop(_join(key))

    async def close(self, *, stop_engines: bool) -> None:
        if stop_engines:
            await self.supervisor.shutdown()
        else:
            await self.supervisor.detach()


_PHASES = {
    "Starting": EngineState.STARTING,
    "Ready": EngineState.READY,
    "CrashLoop": EngineState.BACKOFF,
    "Stopped": EngineState.STOPPED,
}


def _join(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


def _split(text: str) -> Key:
    ns, _, name = text.partition("/")
    return (ns, name)
