"""The operator's probe endpoint: ``/healthz`` (liveness) and ``/readyz`` (listed), on ``--health-port``.

``/healthz`` answers 200 while the event loop runs: a stalled loop stops answering and the pod is
restarted. ``/readyz`` answers 200 once a first MacNode or ModelDeployment was handled (kopf calls
handlers only after all its indexes are filled), 503 before; a cluster with neither stays 503, so
a readiness probe that an install waits on should use ``/healthz``. kopf's own health endpoint is not used
for this: it stops the whole operator when its port is taken, and a second operator on one
machine (development, tests) would then die; here a taken port is reported and the operator runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from orchardist import log

LOG = log.get(__name__)


class Probes:
    """Serves the two probe paths on ``host:port`` until cancelled."""

    def __init__(self, port: int, ready: Callable[[], bool], host: str = "0.0.0.0") -> None:
        self.port = port
        self.ready = ready
        self.host = host
        self.bound = asyncio.Event()  # set once listening (tests, and the log line)

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"alive": True, "listed": self.ready()})

    async def _readyz(self, _: web.Request) -> web.Response:
        ready = self.ready()
        return web.json_response({"listed": ready}, status=200 if ready else 503)

    async def run(self) -> None:
        app = web.Application()
        app.add_routes([web.get("/healthz", self._healthz), web.get("/readyz", self._readyz)])
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            try:
                await web.TCPSite(runner, self.host, self.port).start()
            except OSError as exc:
                LOG.warning("health port in use: probes not served", port=self.port, error=str(exc))
                return
            LOG.info(
                "probes served", address=f"http://{self.host}:{self.port}", paths=["/healthz", "/readyz"]
            )
            self.bound.set()
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(runner.cleanup())


__all__ = ["Probes"]
