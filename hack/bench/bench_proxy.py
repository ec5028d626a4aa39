"""What the replica proxy costs: added p50 latency and streamed tokens/s, against the engine itself.

A real mlx_lm.server (mlx[cpu]) serves the tiny Llama through the supervisor; the proxy runs in its
own process (as in the agent, it does not share the client's event loop) in front of it. Requests
alternate between the engine directly and the proxy, in the same run, so both see the same machine:
- latency: ``GET /health`` (the proxy's whole cost: key check, connect, relay) and a one-token
  ``/v1/completions`` (what a client sees), p50 of each path;
- streaming: a 64-token streamed chat, tokens (SSE events) per second, median of each path and
  the proxy/direct ratio. The tiny model decodes fast, so per-chunk overhead weighs more here than
  with a real model: a worst case.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KEY = "bench-key"
LATENCY_ROUNDS = 200
STREAM_ROUNDS = 12
STREAM_TOKENS = 64

PROXY_MAIN = """
import asyncio, sys
from orchardist import log
from orchardist_agent.proxy import ProxyServer, Route

async def main() -> None:
    log.configure("WARNING", "console")
    proxy = ProxyServer("127.0.0.1")
    route = Route(served_model="tiny", upstream_model="default_model", upstream_port=int(sys.argv[1]),
                  api_key=sys.argv[2])
    print(await proxy.serve("bench/tiny", route), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def mlx_runtime() -> Path:
    out = subprocess.run(
        ["bash", str(REPO / "hack" / "install-runtimes.sh"), "mlx-lm"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)["mlx-lm"])


async def timed(http: object, method: str, url: str, body: dict[str, object] | None) -> float:
    import aiohttp

    assert isinstance(http, aiohttp.ClientSession)
    t0 = time.perf_counter()
    async with http.request(method, url, json=body) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url} answered {r.status}")
    return time.perf_counter() - t0


async def stream_rate(http: object, base: str) -> float:
    """Tokens (SSE data events before [DONE]) per second of one streamed chat, first byte to last."""
    import aiohttp

    assert isinstance(http, aiohttp.ClientSession)
    body = {
        "model": "default_model",
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": STREAM_TOKENS,
        "stream": True,
        "temperature": 0,
    }
    events = 0
    t0 = time.perf_counter()
    first: float | None = None
    async with http.post(base + "/v1/chat/completions", json=body) as r:
        async for line in r.content:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                doc = json.loads(line[6:])
                if doc.get("choices") and doc["choices"][0].get("delta", {}).get("content"):
                    events += 1
                    first = first or time.perf_counter()
    end = time.perf_counter()
    if events < 2 or first is None:
        raise RuntimeError(f"the stream carried {events} tokens")
    return (events - 1) / max(end - first, 1e-9) if end > t0 else 0.0


async def measure(engine: str, proxy: str) -> list[str]:
    import aiohttp

    one_token = {"prompt": "Hi", "max_tokens": 1, "temperature": 0}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        for base in (engine, proxy):  # warm both paths (connection pools, the engine's first decode)
            await timed(http, "POST", base + "/v1/completions", one_token)
        lat: dict[str, dict[str, list[float]]] = {
            "health": {"d": [], "p": []},
            "complete": {"d": [], "p": []},
        }
        for _ in range(LATENCY_ROUNDS):
            for name, method, path, body in (
                ("health", "GET", "/health", None),
                ("complete", "POST", "/v1/completions", one_token),
            ):
                lat[name]["d"].append(await timed(http, method, engine + path, body))
                lat[name]["p"].append(await timed(http, method, proxy + path, body))
        rates: dict[str, list[float]] = {"d": [], "p": []}
        for _ in range(STREAM_ROUNDS):
            rates["d"].append(await stream_rate(http, engine))
            rates["p"].append(await stream_rate(http, proxy))
    lines = []
    for name, label in (("health", "GET /health"), ("complete", "1-token completion")):
        d, p = statistics.median(lat[name]["d"]) * 1e3, statistics.median(lat[name]["p"]) * 1e3
        lines.append(f"{label}: p50 direct {d:.2f} ms, through the proxy {p:.2f} ms (+{p - d:.2f} ms)")
    d_rate, p_rate = statistics.median(rates["d"]), statistics.median(rates["p"])
    lines.append(
        f"streamed chat ({STREAM_TOKENS} tokens): direct {d_rate:.0f} tok/s, through the proxy "
        f"{p_rate:.0f} tok/s (ratio {p_rate / d_rate:.3f}, median of {STREAM_ROUNDS} each)"
    )
    lines.append(f"({LATENCY_ROUNDS} rounds per latency, alternating direct/proxy, same run)")
    return lines


async def bench(work: Path) -> list[str]:
    from orchardist.dev import tinymodel
    from orchardist_agent.engines import EngineSpec, Plan, Runtime
    from orchardist_agent.engines.runtimes import engine_in
    from orchardist_agent.supervisor import Supervisor, SupervisorConfig

    prefix = mlx_runtime()
    found = engine_in(prefix)
    if found is None:
        raise RuntimeError(f"{prefix} holds no engine")
    runtime = Runtime(name=found[0], version=found[1], prefix=prefix)
    plan = Plan(kv_budget_bytes=64 << 20, max_model_len=512, max_num_seqs=2, max_num_batched_tokens=512)
    spec = EngineSpec(
        engine="mlx-lm",
        runtime=runtime,
        model_dir=tinymodel.build(work / "tiny"),
        plan=plan,
        served_model_name="tiny",
    )
    sup = Supervisor(
        work / "state", work / "logs", config=SupervisorConfig(ready_timeout=120, probe_interval=5)
    )
    proxy: asyncio.subprocess.Process | None = None
    try:
        await sup.ensure("bench/tiny", spec)
        ready = await sup.wait("bench/tiny", {"Ready"}, within=180)
        assert ready.endpoint is not None
        port = ready.endpoint.rsplit(":", 1)[1]
        proxy = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PROXY_MAIN, port, KEY, stdout=asyncio.subprocess.PIPE, cwd=REPO
        )
        assert proxy.stdout is not None
        public = (await asyncio.wait_for(proxy.stdout.readline(), 30)).decode().strip()
        if not public.isdigit():
            raise RuntimeError("the proxy process did not start")
        return await measure(f"http://{ready.endpoint}", f"http://127.0.0.1:{public}")
    finally:
        if proxy is not None:
            proxy.terminate()
            await asyncio.wait_for(proxy.wait(), 10)
        await sup.shutdown()


def run() -> list[str]:
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        return asyncio.run(bench(Path(tmp)))


if __name__ == "__main__":
    for line in run():
        print(line)
