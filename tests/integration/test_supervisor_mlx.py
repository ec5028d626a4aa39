"""The supervisor with a real engine: mlx_lm.server (mlx[cpu]) serving the tiny Llama.

Serving through the supervisor, kill -9 -> restart with backoff, an agent killed and a new one
adopting the engine without interrupting it, and a stale record never killing an unrelated process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchardist import processes as procs
from orchardist_agent.engines import EngineSpec, Launch, Plan, Probe, Runtime
from orchardist_agent.supervisor import EngineStatus, Supervisor, SupervisorConfig, records
from tests.fixtures.wait import async_wait_for

pytestmark = pytest.mark.engine

PLAN = Plan(kv_budget_bytes=64 << 20, max_model_len=512, max_num_seqs=2, max_num_batched_tokens=512)
FAST = SupervisorConfig(
    backoff_base=0.5, backoff_max=4.0, ready_timeout=120, probe_interval=1.0, stop_timeout=10, tick=0.2
)


def mlx_spec(runtime: Runtime, model: Path) -> EngineSpec:
    return EngineSpec(
        engine="mlx-lm",
        runtime=runtime,
        model_dir=model,
        plan=PLAN,
        served_model_name="tiny",
        host="127.0.0.1",
    )


@pytest.fixture
async def sup(tmp_path: Path) -> AsyncIterator[Supervisor]:
    s = Supervisor(tmp_path / "state", tmp_path / "logs", config=FAST)
    yield s
    await s.shutdown()


async def chat(endpoint: str) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://{endpoint}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as r,
    ):
        assert r.status == 200, await r.text()
        doc: dict[str, object] = await r.json(content_type=None)
        return doc


async def test_mlx_serves_chat_through_the_supervisor(
    sup: Supervisor, mlx_runtime: Runtime, tiny_model: Path, tmp_path: Path
) -> None:
    seen: list[EngineStatus] = []
    sup.on_change = seen.append
    t0 = time.monotonic()
    first = await sup.ensure("team/tiny-0", mlx_spec(mlx_runtime, tiny_model))
    assert first.phase == "Starting"
    ready = await sup.wait("team/tiny-0", {"Ready"}, within=120)
    started_in = time.monotonic() - t0
    print(f"\nmlx-lm ready (health + one completion) through the supervisor in {started_in:.2f} s")
    assert ready.endpoint is not None and ready.pid is not None and ready.restarts == 0
    doc = await chat(ready.endpoint)
    assert doc["object"] == "chat.completion"
    assert doc["choices"]
    phases = [s.phase for s in seen]
    assert phases[0] == "Starting" and "Ready" in phases
    log = tmp_path / "logs" / "team%2Ftiny-0.log"
    assert "POST /v1/completions" in log.read_text()  # the readiness probe was a real completion
    # its own process group and session, so the agent's terminal signals never reach it
    assert os.getpgid(ready.pid) == ready.pid and os.getsid(ready.pid) == ready.pid
    rec = records.load_all(tmp_path / "state")[0]
    assert (rec.pid, rec.port) == (ready.pid, int(ready.endpoint.rsplit(":", 1)[1]))
    await sup.stop("team/tiny-0")
    assert not procs.alive(ready.pid)
    assert records.load_all(tmp_path / "state") == []
    assert sup.status("team/tiny-0") is None


async def test_kill_9_restarts_with_backoff_and_records_crashloop(
    sup: Supervisor, mlx_runtime: Runtime, tiny_model: Path
) -> None:
    key = "team/crashy"
    await sup.ensure(key, mlx_spec(mlx_runtime, tiny_model))
    ready = await sup.wait(key, {"Ready"}, within=120)
    gaps = []
    pid = ready.pid
    for n in (1, 2):
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        crashed = await sup.wait(key, {"CrashLoop"}, within=10)
        assert crashed.restarts == n
        assert crashed.last_error is not None and crashed.last_error.reason == "CrashLoop"
        assert "killed by signal 9" in crashed.last_error.message
        assert "--- last log lines ---" in crashed.last_error.message
        assert "Starting httpd" in crashed.last_error.message  # mlx_lm.server's own output
        again = await sup.wait(key, {"Starting", "Ready"}, within=30)
        gaps.append(time.monotonic() - t_kill)
        again = await sup.wait(key, {"Ready"}, within=120)
        assert again.pid != pid and again.restarts == n
        pid = again.pid
    print(f"\nkill -9 -> next start after {gaps[0]:.2f} s, then {gaps[1]:.2f} s (base 0.5 s, doubling)")
    # 1st restart waits the base, the 2nd twice that, each less up to half its jitter
    assert gaps[0] >= 0.25 and gaps[1] >= 0.5
    assert again.endpoint is not None
    assert (await chat(again.endpoint))["choices"]


async def json_line(stream: asyncio.StreamReader) -> dict[str, Any]:
    """The agent's one JSON line among its log lines."""
    while line := await stream.readline():
        if line.startswith(b"{"):
            doc: dict[str, Any] = json.loads(line)
            return doc
    raise AssertionError("the agent exited before its engine was ready")


AGENT = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from orchardist_agent.engines import EngineSpec, Plan, Runtime
    from orchardist_agent.supervisor import Supervisor, SupervisorConfig

    async def main() -> None:
        state, logs, prefix, version, model = sys.argv[1:6]
        sup = Supervisor(Path(state), Path(logs), config=SupervisorConfig(probe_interval=1.0, tick=0.2))
        plan = Plan(kv_budget_bytes=64 << 20, max_model_len=512, max_num_seqs=2, max_num_batched_tokens=512)
        spec = EngineSpec(engine="mlx-lm", runtime=Runtime("mlx-lm", version, Path(prefix)),
                          model_dir=Path(model), plan=plan, served_model_name="tiny", host="127.0.0.1")
        await sup.ensure("team/adopt-me", spec)
        st = await sup.wait("team/adopt-me", {"Ready"}, within=120)
        print(json.dumps({"pid": st.pid, "endpoint": st.endpoint}), flush=True)
        await asyncio.sleep(3600)  # deliberate: this stand-in agent lives until the test kills it

    asyncio.run(main())
    """
)


async def test_a_new_agent_adopts_the_running_engine_without_interrupting_it(
    mlx_runtime: Runtime, tiny_model: Path, tmp_path: Path
) -> None:
    state, logs = tmp_path / "state", tmp_path / "logs"
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", AGENT, str(state), str(logs), str(mlx_runtime.prefix), mlx_runtime.version,
        str(tiny_model), stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert agent.stdout is not None
        first = await asyncio.wait_for(json_line(agent.stdout), timeout=150)
        endpoint, pid = first["endpoint"], first["pid"]

        # Requests keep flowing while the agent dies and a new one adopts the engine.
        failures: list[str] = []
        served = 0
        stop_traffic = asyncio.Event()

        async def traffic() -> None:
            nonlocal served
            while not stop_traffic.is_set():
                try:
                    await chat(endpoint)
                    served += 1
                except (AssertionError, aiohttp.ClientError, TimeoutError) as e:
                    failures.append(repr(e))
                await asyncio.sleep(0.05)  # deliberate: pacing of the client traffic

        traffic_task = asyncio.create_task(traffic())
        await async_wait_for(lambda: served > 0, timeout=30, message="no chat served before the kill")
        agent.kill()  # kill -9 of the agent
        await asyncio.wait_for(agent.wait(), timeout=10)
        await asyncio.sleep(1.0)  # deliberate: a window after the agent's death in which the engine must live
        assert procs.alive(pid), "the engine must outlive its agent"

        t0 = time.monotonic()
        new = Supervisor(state, logs, config=FAST)
        try:
            adopted = await new.adopt()
            adopt_s = time.monotonic() - t0
            assert [(a.key, a.pid, a.phase, a.adopted) for a in adopted] == [
                ("team/adopt-me", pid, "Ready", True)
            ]
            # The agent loop then ensures the same replica: same launch -> kept, not restarted.
            kept = await new.ensure("team/adopt-me", mlx_spec(mlx_runtime, tiny_model))
            assert (kept.pid, kept.endpoint, kept.restarts) == (pid, endpoint, 0)
            await asyncio.sleep(2.5)  # a couple of liveness probes by the new agent
            assert new.status("team/adopt-me") == kept
            stop_traffic.set()
            await traffic_task
            print(f"\nadoption took {adopt_s * 1000:.0f} ms; {served} chats served across the agent restart, "
                  f"{len(failures)} failed")  # fmt: skip
            assert failures == [] and served > 5

            await new.stop("team/adopt-me")  # an adopted engine is stopped like one of ours
            assert not procs.alive(pid)
        finally:
            await new.shutdown()
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
        for rec in records.load_all(state):  # never leave an engine behind when the test fails
            if procs.same(procs.Identity(rec.pid, rec.start_time, rec.cmdline_sha256)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(rec.pid, signal.SIGKILL)


async def test_a_stale_record_never_kills_another_process(tmp_path: Path) -> None:
    state = tmp_path / "state"
    other = await asyncio.create_subprocess_exec("sleep", "300", start_new_session=True)
    try:
        real = procs.settle(other.pid, ["sleep", "300"])
        assert real is not None
        template = records.Record(
            key="",
            pid=other.pid,
            start_time=real.started,
            cmdline_sha256=real.digest,
            fingerprint="f",
            argv=["/engines/bin/python", "-m", "mlx_lm", "server"],
            env={},
            host="127.0.0.1",
            port=1,
            health_path="/health",
            probe_path="/v1/completions",
            probe_body={},
            api_key=None,
            log_path=str(tmp_path / "x.log"),
            started_at="2026-11-26T12:00:00+00:00",
        )
        # pid reused: a different start stamp; or the same stamp but another command line; or gone.
        for rec in (
            replace(template, key="a/pid-reused", start_time="other-boot:1"),
            replace(template, key="a/other-cmd", cmdline_sha256=procs.argv_digest(template.argv)),
            replace(template, key="a/gone", pid=2**22 - 1),
        ):
            records.write(state, rec)
        sup = Supervisor(state, tmp_path / "logs", config=FAST)
        assert await sup.adopt() == []
        assert records.load_all(state) == []
        await sup.stop("a/pid-reused")  # nothing known under that key: must not signal anything
        await asyncio.sleep(0.3)  # deliberate: a window in which a wrong signal would have landed
        assert other.returncode is None and procs.alive(other.pid)
        await sup.shutdown()
    finally:
        other.kill()
        await other.wait()


async def test_a_hung_engine_fails_liveness_and_is_replaced(
    mlx_runtime: Runtime, tiny_model: Path, tmp_path: Path
) -> None:
    seen: list[EngineStatus] = []
    cfg = SupervisorConfig(
        backoff_base=0.5,
        probe_interval=0.5,
        probe_timeout=0.5,
        liveness_failures=3,
        stop_timeout=1.0,
        tick=0.2,
    )
    sup = Supervisor(tmp_path / "state", tmp_path / "logs", config=cfg, on_change=seen.append)
    try:
        await sup.ensure("team/hung", mlx_spec(mlx_runtime, tiny_model))
        ready = await sup.wait("team/hung", {"Ready"}, within=120)
        assert ready.pid is not None
        os.kill(ready.pid, signal.SIGSTOP)  # alive, but answers nothing
        crashed = await sup.wait("team/hung", {"CrashLoop"}, within=30)
        assert (
            crashed.last_error is not None and "/health failed 3 times in a row" in crashed.last_error.message
        )
        again = await sup.wait("team/hung", {"Ready"}, within=120)
        assert again.pid != ready.pid and again.restarts == 1
        assert not procs.alive(ready.pid)  # the stopped process was killed, not left behind
        phases = [s.phase for s in seen]
        assert phases[:1] == ["Starting"] and "CrashLoop" in phases and phases[-1] == "Ready"
    finally:
        await sup.shutdown()


async def test_a_changed_launch_replaces_the_engine(
    sup: Supervisor, mlx_runtime: Runtime, tiny_model: Path
) -> None:
    spec = mlx_spec(mlx_runtime, tiny_model)
    await sup.ensure("team/change", spec)
    first = await sup.wait("team/change", {"Ready"}, within=120)
    same = await sup.ensure("team/change", spec)
    assert same.pid == first.pid  # an unchanged launch is left alone
    changed = replace(spec, engine_args=("--temp", "0.5"))
    await sup.ensure("team/change", changed)
    second = await sup.wait("team/change", {"Ready"}, within=120)
    assert second.pid != first.pid and first.pid is not None and not procs.alive(first.pid)
    assert second.restarts == 0  # a replacement is not a crash


async def test_a_restart_moves_when_its_port_was_taken(
    mlx_runtime: Runtime, tiny_model: Path, tmp_path: Path
) -> None:
    cfg = SupervisorConfig(backoff_base=1.0, probe_interval=1.0, stop_timeout=5, tick=0.2)
    sup = Supervisor(tmp_path / "state", tmp_path / "logs", config=cfg)
    squatter = socket.socket()
    try:
        await sup.ensure("team/moved", mlx_spec(mlx_runtime, tiny_model))
        first = await sup.wait("team/moved", {"Ready"}, within=120)
        assert first.pid is not None and first.endpoint is not None
        host, port = first.endpoint.rsplit(":", 1)
        os.kill(first.pid, signal.SIGKILL)
        await sup.wait("team/moved", {"CrashLoop"}, within=10)
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((host, int(port)))
        squatter.listen()
        again = await sup.wait("team/moved", {"Ready"}, within=120)
        assert again.endpoint is not None and again.endpoint != first.endpoint
        assert (await chat(again.endpoint))["choices"]
    finally:
        squatter.close()
        await sup.shutdown()


class BadProbe:
    """mlx-lm whose readiness completion names a model the server cannot load (offline)."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.host = spec.host

    def launch(self, port: int) -> Launch:
        good = self.spec.launch(port)
        return replace(
            good, probe=Probe(path=good.probe.path, body={**good.probe.body, "model": "no/such-model"})
        )


async def test_healthy_but_not_generating_is_not_ready(
    mlx_runtime: Runtime, tiny_model: Path, tmp_path: Path
) -> None:
    cfg = SupervisorConfig(backoff_base=30, ready_timeout=8, probe_interval=1.0, stop_timeout=5, tick=0.2)
    sup = Supervisor(tmp_path / "state", tmp_path / "logs", config=cfg)
    try:
        await sup.ensure("team/mute", BadProbe(mlx_spec(mlx_runtime, tiny_model)))
        st = await async_wait_for(
            lambda: (s := sup.status("team/mute")) is not None and s.last_error is not None and s,
            timeout=10,
            message="no readiness error reported",
        )
        assert st is not None and st.phase == "Starting"
        assert st.last_error is not None and st.last_error.reason == "Starting"
        assert "readiness completion failed: /v1/completions answered" in st.last_error.message
        crashed = await sup.wait("team/mute", {"CrashLoop"}, within=30)
        assert crashed.last_error is not None and "not ready after 8 s" in crashed.last_error.message
    finally:
        await sup.shutdown()


async def test_a_missing_engine_binary_is_a_crashloop_not_a_dead_loop(
    tiny_model: Path, tmp_path: Path
) -> None:
    cfg = SupervisorConfig(backoff_base=0.2, backoff_max=0.4, tick=0.2)
    sup = Supervisor(tmp_path / "state", tmp_path / "logs", config=cfg)
    try:
        missing = Runtime("mlx-lm", "0.32.2", tmp_path / "no-venv")
        await sup.ensure("team/missing", mlx_spec(missing, tiny_model))
        st = await sup.wait("team/missing", {"CrashLoop"}, within=10)
        assert st.last_error is not None and "cannot start" in st.last_error.message
        assert "no-venv/bin/python" in st.last_error.message
        await asyncio.sleep(1.0)  # deliberate: a window in which a dead retry loop would have ended
        task = sup._entries["team/missing"].task
        assert task is not None and not task.done()  # still retrying with backoff
    finally:
        await sup.shutdown()


async def test_detach_leaves_the_engine_running_for_the_next_supervisor(
    mlx_runtime: Runtime, tiny_model: Path, tmp_path: Path
) -> None:
    state, logs = tmp_path / "state", tmp_path / "logs"
    old = Supervisor(state, logs, config=FAST)
    await old.ensure("team/upgrade", mlx_spec(mlx_runtime, tiny_model))
    ready = await old.wait("team/upgrade", {"Ready"}, within=120)
    assert ready.pid is not None and ready.endpoint is not None
    await old.detach()  # an agent shutting down for an upgrade
    assert old.statuses() == {} and procs.alive(ready.pid)
    new = Supervisor(state, logs, config=FAST)
    try:
        [adopted] = await new.adopt()
        assert (adopted.pid, adopted.endpoint, adopted.phase) == (ready.pid, ready.endpoint, "Ready")
        assert (await chat(ready.endpoint))["choices"]
    finally:
        await new.shutdown()
    assert not procs.alive(ready.pid)
