"""The agent's metrics listener: a taken port falls back to a free one, which it reports."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

from orchardist_agent.metrics import AgentMetrics


async def test_a_taken_port_falls_back_and_the_real_port_answers() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        metrics = AgentMetrics()
        port = await metrics.start("127.0.0.1", busy)
        try:
            assert port != busy and metrics.port == port
            status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
        finally:
            await metrics.close()
    assert status == 200
    assert b"orchardist_agent_" not in body  # nothing attached yet: no made-up numbers


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read()
