"""The agent converges ModelReplicas on the real control plane with a real registry and engine.

A tiny random Llama is pushed to the registry fixture; replicas bound to the agent's node go
Pulled -> Started -> Ready and answer a chat completion through `mlx_lm.server` (MLX on CPU).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from orchardist.dev.cluster import Cluster
from orchardist.oci.auth import Credentials
from orchardist.oci.push import push
from orchardist_agent.engines import Runtime
from tests.e2e.test_day2_status import table
from tests.fixtures.agents import (
    Agent,
    alive,
    chat,
    condition,
    engine_pid,
    kget,
    make_agent,
    registered,
    stop_recorded_engines,
    wait_for,
)
from tests.fixtures.registry import AuthRegistry

pytestmark = [pytest.mark.cluster, pytest.mark.registry, pytest.mark.engine]

MiB = 2**20
GiB = 2**30


@pytest.fixture(scope="session")
async def tiny_ref(registry: str, tiny_model: Path) -> tuple[str, str]:
    """(pinned oci:// reference, manifest digest) of the tiny model in the registry fixture."""
    digest = await push(tiny_model, f"{registry}/agent-e2e/tiny-llama:v1")
    return f"oci://{registry}/agent-e2e/tiny-llama@{digest}", digest


def replica(
    name: str, node: str, ref: tuple[str, str], *, reserved: int = 256 * MiB, **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "ModelReplica",
        "metadata": {
            "name": name,
            "labels": {"orchardist.io/deployment": "tiny", "orchardist.io/node": node},
        },
        "spec": {
            "nodeName": node,
            "deployment": "tiny",
            "model": ref[0],
            "digest": ref[1],
            "engine": "mlx-lm",
            "servedModelName": "tiny",
            "memoryPlan": {
                "weightBytes": 4 * MiB,
                "overheadBytes": 64 * MiB,
                "kvBudgetBytes": 64 * MiB,
                "kvBytesPerToken": 512,
                "blockSize": 16,
                "numBlocks": 8192,
                "maxModelLen": 2048,
                "maxNumSeqs": 2,
                "maxNumBatchedTokens": 2048,
                "gpuMemoryUtilization": 0.92,
                "reservedBytes": reserved,
            },
            **spec,
        },
    }


def apply(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def status_of(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    obj = kget(cluster, "modelreplica", "-n", namespace, name)
    return dict((obj or {}).get("status") or {})


def wait_phase(
    cluster: Cluster, agent: Agent, namespace: str, name: str, phase: str, timeout: float = 120
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        assert agent.proc is not None and agent.proc.poll() is None, f"agent exited:\n{agent.tail()}"
        st = status_of(cluster, namespace, name)
        return st if st.get("phase") == phase else None

    try:
        result: dict[str, Any] = wait_for(f"{namespace}/{name} {phase}", probe, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nagent log:\n{agent.tail(30)}") from None
    return result


@pytest.fixture
def engine_agent(cluster: Cluster, tmp_path: Path, mlx_runtime: Runtime) -> Iterator[Agent]:
    a = make_agent(cluster, tmp_path / "agent", extra=("--runtime", f"mlx-lm={mlx_runtime.prefix}"))
    try:
        yield a
    finally:
        a.stop()
        stop_recorded_engines(a.workdir / "state")
        cluster.kubectl("delete", "macnode", a.node, "--ignore-not-found", "--wait=false", check=False)


def test_replica_pulls_starts_serves_survives_an_agent_restart_and_stops_on_delete(
    cluster: Cluster, namespace: str, engine_agent: Agent, tiny_ref: tuple[str, str]
) -> None:
    agent = engine_agent.start()
    node = registered(cluster, agent)
    assert {"name": "mlx-lm", "version": "0.32.2"} in node["status"]["engines"]
    apply(cluster, namespace, replica("r1", agent.node, tiny_ref))

    st = wait_phase(cluster, agent, namespace, "r1", "Ready", timeout=180)
    for ctype in ("Scheduled", "Pulled", "Started", "Ready"):
        assert condition(st, ctype)["status"] == "True", (ctype, st)
        assert condition(st, ctype)["observedGeneration"] == 1
    assert st["observedGeneration"] == 1
    assert re.fullmatch(r"127\.0\.0\.1:\d+", st["endpoint"]), st
    assert st["restarts"] == 0
    assert "progress" not in st
    answer = chat(st["endpoint"])
    assert answer["choices"][0]["message"]["role"] == "assistant"
    pid = engine_pid(st)

    node = kget(cluster, "macnode", agent.node)
    assert node["status"]["memory"]["allocatedBytes"] == 256 * MiB
    assert [m["digest"] for m in node["status"]["cachedModels"]] == [tiny_ref[1]]
    events = kget(cluster, "events", "-n", namespace, "--field-selector", "involvedObject.name=r1")["items"]
    reasons = [e["reason"] for e in sorted(events, key=lambda e: e["metadata"]["creationTimestamp"])]
    for want in ("Scheduled", "Pulled", "Started", "Ready"):  # what `kubectl describe mr r1` shows
        assert want in reasons, reasons
    assert {e["source"]["host"] for e in events} == {agent.node}
    assert node["status"]["modelStore"]["usedBytes"] > 0
    ready_since = condition(st, "Ready")["lastTransitionTime"]

    # The agent goes away (SIGTERM): the engine keeps serving on loopback (the endpoint, the agent's
    # proxy, is back on the same port once the next agent adopts the engine).
    assert agent.signal(signal.SIGTERM) == 0, agent.tail()
    assert alive(pid)
    [rec] = [json.loads(p.read_text()) for p in (agent.workdir / "state" / "engines").glob("*.json")]
    assert chat(f"127.0.0.1:{rec['port']}")["choices"]
    agent.start()
    registered(cluster, agent)
    wait_for("the adopted engine in the agent log", lambda: "adopted engine" in agent.tail(200), timeout=30)
    st2 = wait_phase(cluster, agent, namespace, "r1", "Ready")
    assert engine_pid(st2) == pid
    assert st2["endpoint"] == st["endpoint"]
    assert condition(st2, "Ready")["lastTransitionTime"] == ready_since
    assert chat(st2["endpoint"])["choices"]
    node = kget(cluster, "macnode", agent.node)
    assert node["status"]["memory"]["allocatedBytes"] == 256 * MiB

    # Deleting the replica stops the engine and gives the memory back.
    cluster.kubectl("delete", "modelreplica", "-n", namespace, "r1", "--wait=true")
    wait_for("the engine to exit", lambda: not alive(pid), timeout=60)
    wait_for(
        "allocated memory released",
        lambda: kget(cluster, "macnode", agent.node)["status"]["memory"]["allocatedBytes"] == 0,
        timeout=30,
    )
    assert not list((agent.workdir / "state" / "engines").glob("*.json"))


def test_replica_that_does_not_fit_is_refused_and_never_started(
    cluster: Cluster, namespace: str, engine_agent: Agent, tiny_ref: tuple[str, str]
) -> None:
    agent = engine_agent.start()
    registered(cluster, agent)
    apply(cluster, namespace, replica("huge", agent.node, tiny_ref, reserved=100 * GiB))
    st = wait_phase(cluster, agent, namespace, "huge", "Failed")
    sched = condition(st, "Scheduled")
    assert (sched["status"], sched["reason"]) == ("False", "DoesNotFit")
    assert "needs 100.0 GiB of the GPU working set" in sched["message"]
    assert st["lastError"]["reason"] == "DoesNotFit"

    def admitted() -> str | None:
        """Anything the loop would do for a replica it admitted: reserve, pull, start."""
        node = kget(cluster, "macnode", agent.node)["status"]
        if node["memory"]["allocatedBytes"] != 0 or node["cachedModels"]:
            return f"memory {node['memory']['allocatedBytes']}, cached {node['cachedModels']}"
        if list((agent.workdir / "state" / "engines").glob("*.json")):
            return "an engine record"
        return "a Pulled condition" if condition(status_of(cluster, namespace, "huge"), "Pulled") else None

    # Watched over a few passes of the loop (its tick is 5 s): any admission ends the wait at once.
    with pytest.raises(AssertionError, match="the refused replica admitted"):
        wait_for("the refused replica admitted", admitted, timeout=6.0)


def test_engine_that_exits_reports_crash_loop_with_its_last_log_lines(
    cluster: Cluster, namespace: str, engine_agent: Agent, tiny_ref: tuple[str, str]
) -> None:
    agent = engine_agent.start()
    registered(cluster, agent)
    # An allowed flag with a value the engine's parser refuses: the engine starts, complains, exits.
    apply(cluster, namespace, replica("bad", agent.node, tiny_ref, engineArgs=["--max-tokens", "lots"]))

    def crash_looping() -> dict[str, Any] | None:
        st = status_of(cluster, namespace, "bad")
        return st if condition(st, "Started").get("reason") == "CrashLoop" else None

    st = wait_for("CrashLoop", crash_looping, timeout=120)
    assert condition(st, "Ready")["status"] == "False"
    assert st["lastError"]["reason"] == "CrashLoop"
    assert "--max-tokens" in st["lastError"]["message"]  # argparse's complaint, from the engine log
    assert st["restarts"] >= 1

    # While it waits, the default columns say so: CrashLoopBackOff and the restarts; the message
    # (one line, as the conditions and their Events) names the exit and the next try.
    def backing_off() -> tuple[dict[str, str], dict[str, Any], datetime] | None:
        rows = [r for r in table(cluster, "mr", "-n", namespace) if r["NAME"] == "bad"]
        if not rows or rows[0]["STATUS"] != "CrashLoopBackOff":
            return None
        seen = datetime.now(UTC)
        st = status_of(cluster, namespace, "bad")
        return (
            (rows[0], st, seen)
            if st.get("phase") == "CrashLoopBackOff" and st.get("nextRestartTime")
            else None
        )

    row, st, seen = wait_for("CrashLoopBackOff with the next try", backing_off, timeout=120)
    assert int(row["RESTARTS"]) >= 1 and int(row["RESTARTS"]) == st["restarts"]
    line = r"engine exited with code \d+; restarting in \d+ s \(at (\S+)\); (\d+) restarts?"
    m = re.fullmatch(line, st["message"])
    assert m is not None, st["message"]
    assert (m.group(1), int(m.group(2))) == (st["nextRestartTime"], st["restarts"])
    next_try = datetime.fromisoformat(st["nextRestartTime"].replace("Z", "+00:00"))
    assert next_try >= seen - timedelta(seconds=2)  # a try still ahead when the column said so
    assert {condition(st, t)["message"] for t in ("Started", "Ready")} == {st["message"]}
    cluster.kubectl("delete", "modelreplica", "-n", namespace, "bad", "--wait=true")
    wait_for(
        "the engine record removed",
        lambda: not list((agent.workdir / "state" / "engines").glob("*.json")),
        timeout=60,
    )


def test_engine_args_the_policy_refuses_never_start_an_engine(
    cluster: Cluster, namespace: str, engine_agent: Agent, tiny_ref: tuple[str, str]
) -> None:
    """Items the CRD cannot judge (not on mlx-lm's allowlist, a stray value, code loading without
    the Mac admin's consent) are refused by the agent: EngineArgsRefused, every problem named."""
    agent = engine_agent.start()
    registered(cluster, agent)
    hostile = ["--no-such-flag", "--temp", "0.5", "stray", "--trust-remote-code"]
    apply(cluster, namespace, replica("refused", agent.node, tiny_ref, engineArgs=hostile))

    def refused() -> dict[str, Any] | None:
        st = status_of(cluster, namespace, "refused")
        return st if condition(st, "Started").get("reason") == "EngineArgsRefused" else None

    st = wait_for("EngineArgsRefused", refused, timeout=120)
    message = st["lastError"]["message"]
    assert st["lastError"]["reason"] == "EngineArgsRefused" and st["phase"] == "Failed"
    assert "--no-such-flag is not an allowed mlx-lm flag" in message
    assert "bare value 'stray'" in message and "--trust-remote-code" in message
    assert not list((agent.workdir / "state" / "engines").glob("*.json"))  # nothing was started


@pytest.fixture(scope="session")
async def private_ref(auth_registry: AuthRegistry, tiny_model: Path) -> tuple[str, str]:
    """The tiny model in a registry that wants basic auth."""
    creds = Credentials(auth_registry.username, auth_registry.password)
    digest = await push(tiny_model, f"{auth_registry.host}/private/tiny:v1", auth=creds)
    return f"oci://{auth_registry.host}/private/tiny@{digest}", digest


def test_pull_secret_from_the_replicas_namespace_is_used(
    cluster: Cluster,
    namespace: str,
    engine_agent: Agent,
    auth_registry: AuthRegistry,
    private_ref: tuple[str, str],
) -> None:
    agent = engine_agent.start()
    registered(cluster, agent)
    # Without credentials the registry refuses: PullFailed, and the agent keeps the reason.
    apply(cluster, namespace, replica("anon", agent.node, private_ref))

    def pull_failed() -> dict[str, Any] | None:
        st = status_of(cluster, namespace, "anon")
        return st if condition(st, "Pulled").get("reason") == "PullFailed" else None

    st = wait_for("PullFailed", pull_failed, timeout=60)
    assert st["lastError"]["reason"] == "PullFailed"
    cluster.kubectl("delete", "modelreplica", "-n", namespace, "anon")

    token = base64.b64encode(f"{auth_registry.username}:{auth_registry.password}".encode()).decode()
    dockerconfig = json.dumps({"auths": {auth_registry.host: {"auth": token}}})
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "regcred"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(dockerconfig.encode()).decode()},
    }
    apply(cluster, namespace, secret)
    # What the controller's projection does (no operator runs here): the copy the agent may read.
    from orchardist.api.projection import node_namespace, projected_secret

    cluster.kubectl("create", "namespace", node_namespace(agent.node))
    copy = {**secret, "metadata": {"name": projected_secret(namespace, "regcred")}}
    apply(cluster, node_namespace(agent.node), copy)
    apply(cluster, namespace, replica("private", agent.node, private_ref, pullSecretRef={"name": "regcred"}))
    st = wait_phase(cluster, agent, namespace, "private", "Ready", timeout=180)
    assert condition(st, "Pulled")["status"] == "True"
    assert chat(st["endpoint"])["choices"]
    pid = engine_pid(st)
    cluster.kubectl("delete", "modelreplica", "-n", namespace, "private", "--wait=true")
    wait_for("the engine to exit", lambda: not alive(pid), timeout=60)
    cluster.kubectl("delete", "namespace", node_namespace(agent.node), "--wait=false")


def test_replica_deleted_while_the_agent_was_away_has_its_engine_stopped(
    cluster: Cluster, namespace: str, engine_agent: Agent, tiny_ref: tuple[str, str]
) -> None:
    agent = engine_agent.start()
    registered(cluster, agent)
    apply(cluster, namespace, replica("orphan", agent.node, tiny_ref))
    pid = engine_pid(wait_phase(cluster, agent, namespace, "orphan", "Ready", timeout=180))
    assert agent.signal(signal.SIGKILL) == -signal.SIGKILL
    cluster.kubectl("delete", "modelreplica", "-n", namespace, "orphan", "--wait=true")
    assert alive(pid)  # nobody stopped it yet
    agent.start()
    registered(cluster, agent)
    wait_for("the orphaned engine to be stopped", lambda: not alive(pid), timeout=60)
    wait_for(
        "allocated memory zero",
        lambda: kget(cluster, "macnode", agent.node)["status"]["memory"]["allocatedBytes"] == 0,
        timeout=30,
    )


class SlowProxy:
    """A loopback TCP proxy that sends the registry's responses at `rate` bytes/s (threads: the
    tests here block, so an asyncio proxy on the test loop would stall)."""

    def __init__(self, upstream: str, rate: int) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.rate = rate
        self.server = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.rate), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, rate: int | None) -> None:
        chunk = 16 * 1024
        with contextlib.suppress(OSError):
            while data := src.recv(chunk):
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)  # deliberate: a bandwidth cap, so progress is observable
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.closed.set()
        self.server.close()


@pytest.fixture(scope="session")
async def padded_ref(
    registry: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, str]:
    """The tiny model plus 24 MiB of padding: the store reports progress per 4 MiB received."""
    padded = tmp_path_factory.mktemp("padded") / "tiny-padded"
    shutil.copytree(tiny_model, padded)
    (padded / "padding.bin").write_bytes(os.urandom(24 * MiB))
    digest = await push(padded, f"{registry}/agent-e2e/tiny-padded:v1")
    return f"oci://{registry}/agent-e2e/tiny-padded@{digest}", digest


def test_pull_progress_is_reported_at_most_about_once_a_second(
    cluster: Cluster, namespace: str, engine_agent: Agent, registry: str, padded_ref: tuple[str, str]
) -> None:
    proxy = SlowProxy(registry, rate=4 * MiB)  # ~6 s for the padded model
    try:
        agent = engine_agent.start()
        registered(cluster, agent)
        slow = (padded_ref[0].replace(registry, proxy.host), padded_ref[1])
        apply(cluster, namespace, replica("slow", agent.node, slow))
        seen: list[dict[str, Any]] = []

        def pulled() -> bool:
            """The pull is over; each distinct progress seen on the way is kept."""
            st = status_of(cluster, namespace, "slow")
            if st.get("progress") and st["progress"] not in seen:
                seen.append(st["progress"])
            return condition(st, "Pulled").get("status") == "True"

        t0 = time.monotonic()
        wait_for("the slow pull to finish", pulled, timeout=60, every=0.1)
        pull_seconds = time.monotonic() - t0
        assert condition(status_of(cluster, namespace, "slow"), "Pulled")["status"] == "True"
    finally:
        proxy.close()
    assert pull_seconds > 2.0, "the proxy did not slow the pull down"
    partial = [p for p in seen if 0 < p["bytesDone"] < p["bytesTotal"]]
    assert partial, seen
    for p in partial:
        assert p["percent"] == f"{100 * p['bytesDone'] // p['bytesTotal']}%"
        assert p["bytesPerSecond"] > 0
        assert p["etaSeconds"] >= 0
    assert len(seen) <= pull_seconds + 2, (len(seen), pull_seconds)  # throttled: ~1 patch per second
    st = wait_phase(cluster, agent, namespace, "slow", "Ready", timeout=120)
    assert "progress" not in st  # cleared once the model is in the store
    cluster.kubectl("delete", "modelreplica", "-n", namespace, "slow", "--wait=true")


def test_stop_engines_on_exit_takes_the_engines_down_with_the_agent(
    cluster: Cluster, namespace: str, tmp_path: Path, mlx_runtime: Runtime, tiny_ref: tuple[str, str]
) -> None:
    extra = ("--runtime", f"mlx-lm={mlx_runtime.prefix}", "--stop-engines-on-exit")
    agent = make_agent(cluster, tmp_path / "agent", extra=extra)
    try:
        agent.start()
        registered(cluster, agent)
        apply(cluster, namespace, replica("r", agent.node, tiny_ref))
        pid = engine_pid(wait_phase(cluster, agent, namespace, "r", "Ready", timeout=180))
        assert agent.signal(signal.SIGTERM) == 0, agent.tail()
        assert not alive(pid)
        assert not list((agent.workdir / "state" / "engines").glob("*.json"))
    finally:
        agent.stop()
        stop_recorded_engines(agent.workdir / "state")


def test_replica_with_a_deletion_timestamp_is_stopped_and_reported_terminating(
    cluster: Cluster, namespace: str, engine_agent: Agent, tiny_ref: tuple[str, str]
) -> None:
    agent = engine_agent.start()
    registered(cluster, agent)
    held = replica("held", agent.node, tiny_ref)
    held["metadata"]["finalizers"] = ["example.com/hold"]  # another party still has work to do
    apply(cluster, namespace, held)
    pid = engine_pid(wait_phase(cluster, agent, namespace, "held", "Ready", timeout=180))
    cluster.kubectl("delete", "modelreplica", "-n", namespace, "held", "--wait=false")
    st = wait_phase(cluster, agent, namespace, "held", "Terminating", timeout=60)
    assert condition(st, "Ready")["status"] == "False"
    wait_for("the engine to exit", lambda: not alive(pid), timeout=60)
    wait_for(
        "allocated memory released",
        lambda: kget(cluster, "macnode", agent.node)["status"]["memory"]["allocatedBytes"] == 0,
        timeout=30,
    )
    assert "endpoint" not in status_of(cluster, namespace, "held")
    cluster.kubectl(
        "patch",
        "modelreplica",
        "-n",
        namespace,
        "held",
        "--type=merge",
        "-p",
        '{"metadata":{"finalizers":null}}',
    )
