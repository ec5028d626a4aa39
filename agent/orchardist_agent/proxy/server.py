"""The replicas' authenticating proxies: one listener per replica on the Mac's address.

Engines listen on 127.0.0.1 only; what clients (and the EndpointSlice) reach is this proxy, which
checks the key and pins the model (`policy`), then forwards to the engine and passes the answer
back as it arrives: every chunk the engine sends is written on at once, so streamed tokens are
not held back. A listener outlives engine restarts (its route's upstream port is replaced), so a
replica keeps its public port while the supervisor moves the engine.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from orchardist import log
from orchardist_agent.proxy import policy
from orchardist_agent.proxy.policy import Forward, Refusal, Route
from orchardist_agent.proxy.stats import ProxyStats

_log = log.get(__name__)

#: Connecting to an engine on loopback takes microseconds; longer means it is not listening.
CONNECT_TIMEOUT_S = 5.0
READ_CHUNK = 64 * 1024
#: A client that takes longer than this to send a request body holds a connection for nothing.
BODY_TIMEOUT_S = 60.0


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0: a free port the kernel picks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(256)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class _Listener:
    key: str
    route: Route
    port: int
    runner: web.ServerRunner
    stats: ProxyStats = field(default_factory=ProxyStats)


class ProxyServer:
    """Every replica's proxy on one address; ``serve`` opens or re-routes, ``close`` ends one."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._listeners: dict[str, _Listener] = {}
        self._session: aiohttp.ClientSession | None = None

    def port(self, key: str) -> int | None:
        listener = self._listeners.get(key)
        return listener.port if listener else None

    def route(self, key: str) -> Route | None:
        listener = self._listeners.get(key)
        return listener.route if listener else None

    def stats(self, key: str) -> ProxyStats | None:
        listener = self._listeners.get(key)
        return listener.stats if listener else None

    def keys(self) -> list[str]:
        return list(self._listeners)

    def reroute(self, key: str, route: Route) -> None:
        """Send `key`'s next requests by `route` (requests under way finish on the old one)."""
        listener = self._listeners.get(key)
        if listener is not None and listener.route != route:
            listener.route = route
            _log.info("proxy re-routed", key=key, port=listener.port, upstream=route.upstream_port)

    async def serve(self, key: str, route: Route, port: int = 0) -> int:
        """Serve `key` by `route` on `port` (0: any free one), or re-route its open listener.

        Returns the listening port. A wanted port that is taken falls back to a free one.
        """
        listener = self._listeners.get(key)
        if listener is not None:
            self.reroute(key, route)
            return listener.port
        try:
            sock = listen_socket(self.host, port)
        except OSError as exc:
            if port == 0:
                raise
            _log.info("proxy port taken; choosing another", key=key, wanted=port, error=str(exc))
            sock = listen_socket(self.host, 0)
        bound = int(sock.getsockname()[1])
        holder: list[_Listener] = []

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            return await self._handle(holder[0], request)

        runner = web.ServerRunner(web.Server(handle), handle_signals=False, access_log=None)
        await runner.setup()
        holder.append(_Listener(key, route, bound, runner))
        await web.SockSite(runner, sock).start()
        self._listeners[key] = holder[0]
        _log.info("proxy serving", key=key, address=f"{self.host}:{bound}", upstream=route.upstream_port)
        return bound

    async def close(self, key: str) -> None:
        listener = self._listeners.pop(key, None)
        if listener is not None:
            await listener.runner.cleanup()
            _log.info("proxy closed", key=key, port=listener.port)

    async def close_all(self) -> None:
        for key in list(self._listeners):
            await self.close(key)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- one request ------------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,  # bytes pass through as the engine encoded them
                connector=aiohttp.TCPConnector(limit=0),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
            )
        return self._session

    async def _handle(self, listener: _Listener, request: web.BaseRequest) -> web.StreamResponse:
        route, stats = listener.route, listener.stats
        if not policy.authorized(request.headers.get("Authorization"), route.api_key):
            stats.refuse(policy.UNAUTHORIZED.code)
            reply = _refused(policy.UNAUTHORIZED)
            reply.headers["WWW-Authenticate"] = "Bearer"
            return reply
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                body = await _read_body(request, route.max_body_bytes)
        except TimeoutError:
            slow = Refusal(
                408,
                f"The request body did not arrive within {BODY_TIMEOUT_S:g} s.",
                "invalid_request_error",
                "request_timeout",
            )
            stats.refuse(slow.code)
            reply = _refused(slow)
            reply.force_close()
            return reply
        if body is None:
            refusal = policy.too_large(route.max_body_bytes)
            stats.refuse(refusal.code)
            reply = _refused(refusal)
            reply.force_close()  # the rest of the body is not read
            return reply
        decision = policy.admit(body, request.headers.get("Content-Type", ""), route)
        if isinstance(decision, Refusal):
            stats.refuse(decision.code)
            return _refused(decision)
        stats.in_flight += 1
        try:
            return await self._forward(route, stats, request, body, decision)
        finally:
            stats.in_flight -= 1

    async def _forward(
        self, route: Route, stats: ProxyStats, request: web.BaseRequest, body: bytes, decision: Forward
    ) -> web.StreamResponse:
        data = decision.body if decision.body is not None else body
        headers = policy.forwarded_headers(request.headers, request.headers.get("Connection"))
        host = f"[{route.upstream_host}]" if ":" in route.upstream_host else route.upstream_host
        url = f"http://{host}:{route.upstream_port}{request.raw_path}"
        stats.waiting += 1
        waiting = True
        try:
            async with self._http().request(
                request.method, url, headers=headers, data=data or None, allow_redirects=False
            ) as upstream:
                stats.waiting -= 1
                waiting = False
                return await self._relay(stats, request, upstream)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            stats.failed += 1
            _log.warning("engine unreachable through the proxy", url=url, error=str(exc))
            return _refused(
                Refusal(502, f"The engine did not answer: {exc}", "server_error", "engine_unavailable")
            )
        finally:
            if waiting:
                stats.waiting -= 1

    async def _relay(
        self, stats: ProxyStats, request: web.BaseRequest, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        reply = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in policy.forwarded_headers(
            upstream.headers, upstream.headers.get("Connection")
        ).items():
            reply.headers.add(name, value)
        content_type = upstream.headers.get("Content-Type", "")
        scanner = (
            policy.UsageScanner(sse="event-stream" in content_type)
            if "Content-Encoding" not in upstream.headers
            else None
        )
        await reply.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                if scanner is not None:
                    scanner.feed(chunk)
                await reply.write(chunk)
            await reply.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            return reply  # the client left; closing the upstream response cancels the generation
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            stats.failed += 1
            _log.warning("engine broke off an answer", error=str(exc))
            reply.force_close()
            return reply
        stats.completed += 1
        if scanner is not None:
            stats.add_usage(scanner.close())
        return reply


async def _read_body(request: web.BaseRequest, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` bytes (declared or actually sent)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    buf = bytearray()
    while True:
        chunk = await request.content.read(READ_CHUNK)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            return None


def _refused(refusal: Refusal) -> web.Response:
    return web.Response(status=refusal.status, body=refusal.body(), content_type="application/json")
