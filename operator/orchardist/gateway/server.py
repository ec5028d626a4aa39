"""The gateway process: watched state, the demand writer and the aiohttp server, until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from orchardist import log
from orchardist.gateway import demand
from orchardist.gateway.catalog import Key
from orchardist.gateway.routes import Gateway, Settings
from orchardist.gateway.state import State
from orchardist.kube import GATEWAY, Kube, RawApi, api_client

LOG = log.get(__name__)


@dataclass(frozen=True)
class Options:
    host: str = "0.0.0.0"
    port: int = 8080
    kubeconfig: str | None = None
    #: Where key Secrets are watched (None: every namespace).
    key_namespace: str | None = "orchardist-system"
    #: This gateway's name in the demand Leases.
    instance: str = "orchardist-gateway"
    settings: Settings = field(default_factory=Settings)


async def serve(options: Options, stop: asyncio.Event) -> None:
    client = api_client(options.kubeconfig, manager=GATEWAY)
    raw = RawApi(client)
    state = State(raw, Kube(raw), options.key_namespace)
    state.start()
    connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        gateway = Gateway(state, session, options.settings)
        app = web.Application(client_max_size=32 * 1024 * 1024)
        gateway.add_routes(app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, options.host, options.port)
        await site.start()

        def owner(key: Key) -> str:
            served = state.catalog.deployments.get(key)
            return served.uid if served is not None else ""

        writer = asyncio.create_task(demand.run(state.kube, gateway.board, options.instance, owner=owner))
        LOG.info(
            "gateway serving", host=options.host, port=options.port, keys_in=options.key_namespace or "*"
        )
        try:
            await stop.wait()
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            # Before the requests still running drain: a stopping pod's grace period may not outlast them.
            await demand.remove(state.kube, gateway.board.demand, options.instance)
            await runner.cleanup()
            state.stop()
            client.close()  # type: ignore[no-untyped-call]


def run(options: Options) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(options, stop)

    asyncio.run(main())
    return 0
