"""The gateway's routes in front of a real `mlx_lm.server`, with the watch fed by hand.

No control plane here: the catalog and key ring receive the deliveries an informer would make
(the seam the server uses), so the hold, the 503 after it and the retry on another replica are
exercised to the second. The engine is real (mlx-lm on the CPU, the tiny Llama); the client is the
`openai` SDK (async). The cluster path is tests/e2e/test_gateway.py.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiohttp import web

from orchardist.dev.procs import free_port
from orchardist.gateway.routes import Gateway, Settings
from orchardist.gateway.state import State
from orchardist_agent.engines import Runtime
from tests.fixtures.agents import stop_process
from tests.fixtures.wait import async_wait_for, wait_for

pytestmark = [pytest.mark.engine, pytest.mark.timeout(300)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TOKEN = "sk-proxy-test"


class NoApi:
    """The API server is not part of this test: any call to it is a failure."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the API server was called ({name})")


@pytest.fixture(scope="module")
def engine(mlx_runtime: Runtime, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                str(mlx_runtime.bin("python")),
                *("-m", "mlx_lm", "server", "--model", str(tiny_model)),
                *("--host", "127.0.0.1", "--port", str(port)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def answers() -> bool:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    try:
        wait_for(answers, timeout=120, message="mlx_lm.server answering")
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc)


def deployment(name: str, hold_s: int) -> dict[str, Any]:
    md: dict[str, Any] = yaml.safe_load((EXAMPLES / "modeldeployment-minimal.yaml").read_text())
    md["metadata"] = {"name": name, "namespace": "team"}
    md["spec"]["engine"] = "mlx-lm"
    md["spec"]["scaling"] = {"minReplicas": 0, "maxReplicas": 2, "holdTimeoutSeconds": hold_s}
    return md


def replica(name: str, deployment: str, endpoint: str, node: str = "mac-1") -> dict[str, Any]:
    mr: dict[str, Any] = copy.deepcopy(yaml.safe_load((EXAMPLES / "modelreplica.yaml").read_text()))
    mr["metadata"] = {"name": name, "namespace": "team"}
    mr["spec"] |= {"deployment": deployment, "nodeName": node, "engine": "mlx-lm"}
    mr["status"] = {"phase": "Ready", "endpoint": endpoint}
    return mr


def key_secret() -> dict[str, Any]:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "metadata": {"name": "k", "namespace": "keys"},
        "data": {"key": b64(TOKEN), "namespaces": b64("team")},
    }


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[Gateway, str]]:
    state = State(NoApi(), NoApi(), "keys")  # type: ignore[arg-type]
    for kind in ("md", "mr", "node"):
        state.apply(kind, ("relist", []))
    state.apply("keys", ("relist", [key_secret()]))
    async with aiohttp.ClientSession() as session:
        gw = Gateway(state, session, Settings(retry_after_s=3))
        app = web.Application()
        gw.add_routes(app)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            yield gw, f"http://127.0.0.1:{port}/v1"
        finally:
            await runner.cleanup()


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key=TOKEN, max_retries=0, timeout=60)


async def chat(url: str, model: str, text: str = "Hello") -> Any:
    return await client(url).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=3, temperature=0
    )


async def test_held_requests_wait_for_the_first_replica_and_signal_once(
    gateway: tuple[Gateway, str], engine: str
) -> None:
    gw, url = gateway
    gw.state.apply("md", ("ADDED", deployment("lazy", hold_s=60)))
    calls = [asyncio.create_task(chat(url, "lazy", f"request {i}")) for i in range(32)]
    await async_wait_for(lambda: gw.board.held(("team", "lazy")) == 32, timeout=10, message="32 held")
    assert gw.board.urgent.is_set()  # one immediate demand write for the whole wave
    assert gw.board.demand[("team", "lazy")].in_flight == 32
    assert not any(c.done() for c in calls)
    gw.state.apply("mr", ("ADDED", replica("lazy-0", "lazy", engine)))
    answers = await asyncio.gather(*calls)
    assert all(a.parse().choices and a.headers["x-orchardist-replica"] == "team/lazy-0" for a in answers)
    assert gw.board.held(("team", "lazy")) == 0 and gw.board.demand[("team", "lazy")].in_flight == 0


async def test_the_hold_ends_in_503_with_retry_after(gateway: tuple[Gateway, str]) -> None:
    gw, url = gateway
    gw.state.apply("md", ("ADDED", deployment("never", hold_s=1)))
    with pytest.raises(openai.InternalServerError) as failed:
        await chat(url, "never")
    assert failed.value.status_code == 503
    assert failed.value.response.headers["retry-after"] == "3"
    assert gw.board.held(("team", "never")) == 0


async def test_a_dead_replica_is_passed_over_without_an_error(
    gateway: tuple[Gateway, str], engine: str
) -> None:
    gw, url = gateway
    gw.state.apply("md", ("ADDED", deployment("pair", hold_s=30)))
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    gw.state.apply("mr", ("ADDED", replica("pair-dead", "pair", dead, node="mac-1")))
    gw.state.apply("mr", ("ADDED", replica("pair-live", "pair", engine, node="mac-2")))
    served = {
        (await chat(url, "pair", f"conversation {i}")).headers["x-orchardist-replica"] for i in range(12)
    }
    assert served == {"team/pair-live"}


async def test_streams_pass_through_with_usage_metered(gateway: tuple[Gateway, str], engine: str) -> None:
    gw, url = gateway
    gw.state.apply("md", ("ADDED", deployment("stream", hold_s=30)))
    gw.state.apply("mr", ("ADDED", replica("stream-0", "stream", engine)))
    stream = await client(url).chat.completions.create(
        model="stream", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True
    )
    chunks = [c async for c in stream]
    assert chunks and all(c.choices for c in chunks) and all(c.model == "stream" for c in chunks)
    sample = gw.metrics.registry.get_sample_value(
        "orchardist_gateway_tokens_total", {"key": "keys/k", "model": "team/stream", "kind": "completion"}
    )
    assert sample is not None and sample > 0


async def test_a_client_that_leaves_mid_stream_frees_its_replica(
    gateway: tuple[Gateway, str], engine: str
) -> None:
    gw, url = gateway
    gw.state.apply("md", ("ADDED", deployment("leaver", hold_s=30)))
    gw.state.apply("mr", ("ADDED", replica("leaver-0", "leaver", engine)))
    stream = await client(url).chat.completions.create(
        model="leaver", messages=[{"role": "user", "content": "Talk"}], max_tokens=200, stream=True
    )
    async for chunk in stream:
        if chunk.choices:
            break
    await stream.close()

    def counted() -> float | None:
        labels = {"key": "keys/k", "model": "team/leaver", "code": "499"}
        return gw.metrics.registry.get_sample_value("orchardist_gateway_requests_total", labels)

    await async_wait_for(counted, timeout=30, message="the abandoned stream counted as 499")
    assert not gw.outstanding and gw.board.demand[("team", "leaver")].in_flight == 0
