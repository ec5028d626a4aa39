"""The HTTP routes: ``/v1/models``, the four proxied endpoints, health, readiness and metrics.

A proxied request goes: key (401) -> model (404/403) -> limits (429) -> a ready replica, held while
none is (503 when the hold ends) -> the picker -> the replica, and on to another replica when the
chosen one fails before anything reached the client.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from orchardist import log
from orchardist.gateway import keys, upstream
from orchardist.gateway.catalog import Served, Upstream
from orchardist.gateway.demand import DemandBoard
from orchardist.gateway.errors import error
from orchardist.gateway.limits import Limiter
from orchardist.gateway.metering import Metrics
from orchardist.gateway.picker import Candidate, pick, prefix_of
from orchardist.gateway.resolve import listed, resolve
from orchardist.gateway.state import State

LOG = log.get(__name__)

PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@dataclass(frozen=True)
class Settings:
    #: Requests held per deployment while no replica is ready; more are answered 503 at once.
    max_held: int = 1024
    #: Replicas tried for one request before it fails.
    attempts: int = 4
    #: Characters of the conversation's start that choose its replica.
    prefix_chars: int = 256
    #: Retry-After when nothing could serve (seconds).
    retry_after_s: int = 5
    #: Route by prefix (False: least outstanding requests only; the benchmark's baseline).
    prefix_routing: bool = True
    #: Gateway instances sharing each key's rate limits (each enforces ceil(limit / instances)).
    instances: int = 1


class Gateway:
    def __init__(self, state: State, session: aiohttp.ClientSession, settings: Settings) -> None:
        self.state = state
        self.session = session
        self.settings = settings
        self.metrics = Metrics()
        self.limiter = Limiter(settings.instances)
        self.board = DemandBoard()
        self.outstanding: Counter[str] = Counter()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        for path in PROXIED:
            app.router.add_post(path, self.proxy)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.prometheus)

    # -- plain routes ----------------------------------------------------------------------------
    async def healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok") if self.state.ready else web.Response(status=503, text="syncing")

    async def prometheus(self, _: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    def _key(self, request: web.Request) -> keys.ApiKey | None:
        token = keys.bearer(request.headers.get("Authorization"))
        return self.state.keyring.lookup(token) if token else None

    async def models(self, request: web.Request) -> web.Response:
        key = self._key(request)
        if key is None:
            return error(401, "Missing or unknown API key")
        ids = listed(key, self.state.catalog.deployments)
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": i, "object": "model", "created": 0, "owned_by": "orchardist"} for i in ids],
            }
        )

    # -- the proxy -------------------------------------------------------------------------------
    async def proxy(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        key = self._key(request)
        if key is None:
            return self._count(error(401, "Missing or unknown API key"), "", "")
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return self._count(error(400, "The request body must be a JSON object"), key.name, "")
        found = resolve(body.get("model"), key, self.state.catalog.deployments)
        if found.served is None:
            return self._count(error(found.status, found.message), key.name, "")
        served = found.served
        model = "/".join(served.key)
        wait = self.limiter.admit(key.name, key.requests_per_minute, key.tokens_per_minute, started)
        if wait is not None:
            return self._count(
                error(429, "Rate limit reached for this key", retry_after=wait), key.name, model
            )
        self.board.arrive(served.key)
        try:
            response, outcome = await self._forward(request, body, served, str(body["model"]), started)
        finally:
            self.board.leave(served.key)
        if outcome is not None:
            self.metrics.meter(key.name, model, outcome.usage)
            if outcome.usage is not None:
                self.limiter.charge(key.name, key.tokens_per_minute, outcome.usage.total, time.monotonic())
            if outcome.first_token_at is not None:
                self.metrics.ttft.labels(model).observe(outcome.first_token_at - started)
        self.metrics.duration.labels(model).observe(time.monotonic() - started)
        return self._count(response, key.name, model, outcome.status if outcome else None)

    def _count(
        self, response: web.StreamResponse, key: str, model: str, status: int | None = None
    ) -> web.StreamResponse:
        self.metrics.requests.labels(key, model, str(status or response.status)).inc()
        return response

    async def _ready(self, served: Served, deadline: float) -> list[Upstream] | None:
        """The deployment's ready replicas, holding the request while there are none."""
        ups = self.state.catalog.upstreams(served.key)
        if ups:
            return ups
        if self.board.held(served.key) >= self.settings.max_held:
            return None
        model = "/".join(served.key)
        self.board.hold(served.key)
        self.metrics.held.labels(model).inc()
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                await self.state.changed(remaining)
                ups = self.state.catalog.upstreams(served.key)
                if ups:
                    return ups
            return None
        finally:
            self.board.release(served.key)
            self.metrics.held.labels(model).dec()

    def _unavailable(self, served: Served) -> web.Response:
        return error(
            503,
            f"No replica of {'/'.join(served.key)} became ready in time; try again",
            retry_after=self.settings.retry_after_s,
        )

    async def _forward(
        self, request: web.Request, body: dict[str, Any], served: Served, asked: str, started: float
    ) -> tuple[web.StreamResponse, upstream.Outcome | None]:
        deadline = started + served.hold_timeout_s
        sent, asked_usage = upstream.pinned(body, served)
        hdrs = upstream.headers(await self.state.upstream_key(served))
        prefix = prefix_of(body, self.settings.prefix_chars) if self.settings.prefix_routing else None
        failed: set[str] = set()
        for attempt in range(self.settings.attempts):
            ups = await self._ready(served, deadline)
            if ups is None:
                return self._unavailable(served), None
            weights = {u.id: (u, self.state.catalog.weight(u.node)) for u in ups}
            candidates = [Candidate(i, w, self.outstanding[i]) for i, (_, w) in weights.items()]
            chosen = pick(candidates, prefix, exclude=failed)
            if chosen is None:
                # Every ready replica failed this request: give the catalog a moment to drop the dead.
                await self.state.changed(min(2.0, max(0.0, deadline - time.monotonic())))
                failed.clear()
                continue
            target = weights[chosen.id][0]
            url = f"http://{target.address}{request.path}"
            self.outstanding[target.id] += 1
            try:
                if sent.get("stream"):
                    return await upstream.call_stream(
                        request,
                        self.session,
                        url,
                        sent,
                        hdrs,
                        asked_usage=asked_usage,
                        served_as=upstream.served_model(served),
                        asked_model=asked,
                        replica=target.id,
                        clock=time.monotonic,
                    )
                return await upstream.call_json(self.session, url, sent, hdrs, asked, target.id)
            except upstream.RetryableError as exc:
                LOG.info(
                    "replica failed; trying another", replica=target.id, attempt=attempt + 1, error=str(exc)
                )
                failed.add(target.id)
            finally:
                self.outstanding[target.id] -= 1
                if self.outstanding[target.id] <= 0:
                    del self.outstanding[target.id]
        return error(
            502,
            f"Every replica of {'/'.join(served.key)} tried failed",
            retry_after=self.settings.retry_after_s,
        ), None
