"""The replica loop's view of the engine supervisor, the replicas' proxies and the installed runtimes.

Engines listen on 127.0.0.1 on a port the supervisor picks; each replica is reached through its
authenticating proxy (:mod:`.proxy`) on the Mac's address, and the port in the view (hence the
replica's endpoint and the EndpointSlice) is the proxy's. A replica counts as serving only once its
proxy listens: an engine adopted after an agent restart is re-exposed by the next ``ensure``.

Supervisor keys are ``namespace/name``; its phases map onto :class:`reconcile.EngineState`. Which
runtime serves an engine (and engineVersion) is :meth:`RuntimeRegistry.resolve`'s answer, asked
over a list cached for ``RUNTIMES_TTL_S``: scanning the venvs takes a moment and every pass of the
loop asks.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING

from orchardist import log

from .engines import EngineArgsError, EngineSpec, Runtime
from .proxy import Route
from .reconcile import EngineState, EngineView

if TYPE_CHECKING:
    from orchardist.api.modelreplica import ModelReplicaSpec

    from .config import AgentConfig
    from .supervisor import EngineStatus, Supervisor

LOG = log.get(__name__)

Key = tuple[str, str]


class EngineAdapter:
    """Starts, stops and reports the engines of this Mac's replicas."""

    RUNTIMES_TTL_S = 30.0

    def __init__(
        self,
        cfg: AgentConfig,
        supervisor: Supervisor | None = None,
        *,
        listen: str | None = None,
    ) -> None:
        from .engines.runtimes import RuntimeRegistry
        from .proxy import ProxyServer
        from .supervisor import Supervisor, SupervisorConfig
        from .supervisor.users import lookup

        self.cfg = cfg
        self.registry = RuntimeRegistry(configured=cfg.runtimes)
        user = lookup(cfg.engine_user) if cfg.engine_user else None
        self.supervisor = supervisor or Supervisor(
            cfg.state_dir / "engines", cfg.log_dir, config=SupervisorConfig(engine_user=user)
        )
        self.proxy = ProxyServer(cfg.bind_address or listen or cfg.address or "127.0.0.1")
        self.routes: dict[Key, Route] = {}  # what each replica's proxy should serve
        # replicas whose engine cannot even be composed: (reason, message)
        self.failed: dict[Key, tuple[str, str]] = {}
        self._runtimes: list[Runtime] = []
        self._runtimes_at = -math.inf

    async def start(self, notify: Callable[[Key], None]) -> None:
        """Adopt the engines a previous agent left running, then report every change."""

        def changed(st: EngineStatus) -> None:
            self._reroute(split(st.key), st)
            notify(split(st.key))

        self.supervisor.on_change = changed
        for st in await self.supervisor.adopt():
            LOG.info("adopted engine", replica=st.key, pid=st.pid, phase=st.phase, endpoint=st.endpoint)

    def runtimes(self) -> list[Runtime]:
        now = time.monotonic()
        if now - self._runtimes_at > self.RUNTIMES_TTL_S:
            self._runtimes = self.registry.runtimes()
            self._runtimes_at = now
        return self._runtimes

    def runtime(self, engine: str, version: str | None) -> Runtime | None:
        return self.registry.resolve(engine, version, among=self.runtimes())

    def installed(self, engine: str, version: str | None = None) -> bool:
        return self.runtime(engine, version) is not None

    def keys(self) -> list[Key]:
        return [split(k) for k in self.supervisor.statuses()]

    def view(self, key: Key) -> EngineView | None:
        if key in self.failed:
            reason, message = self.failed[key]
            return EngineView(EngineState.FAILED, message=message, reason=reason)
        st = self.supervisor.status(join(key))
        if st is None:
            return None
        self._reroute(key, st)
        port = self.proxy.port(join(key))
        measured: dict[str, int] = {}
        if st.measured is not None:
            if st.measured.overhead_bytes is not None:
                measured["overheadBytes"] = int(st.measured.overhead_bytes)
            if st.measured.num_blocks is not None:
                measured["numBlocks"] = int(st.measured.num_blocks)
        return EngineView(
            state=PHASES[st.phase],
            port=port,
            pid=st.pid,
            restarts=st.restarts,
            message=st.last_error.message if st.last_error else "",
            started_at=st.start_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if st.start_time
            else None,
            measured=measured,
            warnings=tuple(st.warnings) + self._exposure_warnings(key),
            retry_in=st.backoff_seconds,
            retry_at=st.next_try.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if st.next_try else None,
        )

    def _exposure_warnings(self, key: Key) -> tuple[str, ...]:
        """Say on the Started condition when a replica answers anyone who reaches the Mac."""
        route = self.routes.get(key)
        if route is None or route.api_key is not None:
            return ()
        return (NO_KEY_WARNING,)

    def spec(self, replica: ModelReplicaSpec, model_dir: Path, api_key: str | None) -> EngineSpec:
        """The driver input for a replica (raises ValueError when its engine is not installed)."""
        runtime = self.runtime(replica.engine, replica.engine_version)
        if runtime is None:
            raise ValueError(f"engine {replica.engine!r} is not installed")
        return EngineSpec(
            engine=replica.engine,
            runtime=runtime,
            model_dir=model_dir,
            plan=replica.memory_plan,
            served_model_name=replica.served_model_name or replica.deployment,
            host=ENGINE_HOST,
            engine_args=tuple(replica.engine_args),
            env={e.name: e.value for e in replica.env},
            api_key=api_key,
            device="metal" if sys.platform == "darwin" else "cpu",
            allow_code_loading=self.cfg.allow_code_loading,
        )

    async def ensure(
        self,
        key: Key,
        replica: ModelReplicaSpec,
        model_dir: Path,
        api_key: str | None,
        *,
        port: int | None = None,
    ) -> None:
        """Start (or keep) the replica's engine and open (or re-route) its proxy.

        ``port`` is the public port the replica had (its status endpoint): a restarted agent
        serves an adopted engine on it again, so clients and the EndpointSlice keep working.
        """
        try:
            spec = self.spec(replica, model_dir, api_key)
            st = await self.supervisor.ensure(join(key), spec)
        except (EngineArgsError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, EngineArgsError) else ""
            self.failed[key] = (reason, f"cannot start the engine: {exc}")
            LOG.warning("engine refused", replica=join(key), error=str(exc))
            return
        served = spec.served_model_name
        self.routes[key] = Route(
            served_model=served,
            upstream_model=UPSTREAM_MODEL.get(spec.engine, served),
            upstream_port=engine_port(st) or 0,
            api_key=api_key,
            max_body_bytes=self.cfg.proxy_max_body_bytes,
        )
        await self.proxy.serve(join(key), self.routes[key], port or 0)

    def unexposed(self, key: Key) -> bool:
        """An engine runs (adopted) but no proxy serves it yet: the loop asks ``ensure`` again."""
        return self.supervisor.status(join(key)) is not None and self.proxy.port(join(key)) is None

    def _reroute(self, key: Key, st: EngineStatus) -> None:
        """Point the proxy at the engine's current port (the supervisor moves a restarted engine)."""
        route, port = self.routes.get(key), engine_port(st)
        if route is not None and port is not None and route.upstream_port != port:
            self.routes[key] = route = replace(route, upstream_port=port)
            if self.proxy.port(join(key)) is not None:
                self.proxy.reroute(join(key), route)

    async def stop(self, key: Key) -> None:
        self.failed.pop(key, None)
        self.routes.pop(key, None)
        await self.proxy.close(join(key))
        await self.supervisor.stop(join(key))

    async def close(self, *, stop_engines: bool) -> None:
        await self.proxy.close_all()
        if stop_engines:
            await self.supervisor.shutdown()
        else:
            await self.supervisor.detach()


#: Engines listen on loopback only; clients reach them through the replica's proxy.
ENGINE_HOST = "127.0.0.1"

#: The model name an engine answers to when it is not the served name: mlx-lm has no
#: served-name flag and loads whatever a request names, except ``default_model`` (its --model).
UPSTREAM_MODEL = {"mlx-lm": "default_model"}


NO_KEY_WARNING = "no apiKeySecretRef: the endpoint answers anyone who reaches it (model pinned)"


def engine_port(st: EngineStatus) -> int | None:
    return int(st.endpoint.rsplit(":", 1)[1]) if st.endpoint else None


PHASES = {
    "Starting": EngineState.STARTING,
    "Ready": EngineState.READY,
    "CrashLoop": EngineState.BACKOFF,
    "Stopped": EngineState.STOPPED,
}


def join(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


def split(text: str) -> Key:
    ns, _, name = text.partition("/")
    return (ns, name)
