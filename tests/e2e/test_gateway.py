"""The gateway on the real everything, driven by a client nobody here wrote (the ``openai`` SDK).

The real control plane, the operator, two `orchardist agent run` processes (simulated Macs of
different memory bandwidth) whose replicas are real `mlx_lm.server` engines behind the agents'
authenticating proxies, and one `orchardist gateway`. Two namespaces, three keys:

- each key lists and uses only its models; a wrong key is 401, another namespace 403, an unknown
  model 404, a key over its request limit 429 with Retry-After;
- streamed answers pass through and their usage is metered per key and model;
- a conversation keeps landing on one replica while different conversations spread over both;
- a killed engine's non-streamed requests are answered by the other replica without an error;
- a deployment at zero replicas: 32 concurrent requests start exactly one replica and all succeed,
  and it goes back to zero after its idle timeout.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from orchardist.dev import tinymodel
from orchardist.dev.cluster import Cluster
from orchardist.dev.procs import free_port
from orchardist_agent.engines import Runtime
from tests.fixtures.agents import (
    ORCHARDIST,
    Agent,
    Operator,
    alive,
    engine_pid,
    gateway_argv,
    kget,
    make_agent,
    registered,
    stop_process,
)
from tests.fixtures.wait import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.registry, pytest.mark.engine, pytest.mark.timeout(1500)]

LABEL = "orchardist.io/gateway-test"
# Memory bandwidth 273 vs 546 GB/s: the faster Mac owns about two thirds of the prefixes.
MACS = {"m4-pro-48gb": "mac-pro", "m4-max-128gb": "mac-max"}
UPSTREAM_KEY = "upstream-secret-key"
IDLE_S = 15


@dataclass
class World:
    cluster: Cluster
    url: str
    ns_a: str
    ns_b: str
    keys_ns: str
    tag: str
    keys: dict[str, str]  # role -> token
    log: Path
    agents: list[Agent] = field(default_factory=list)
    operator: Operator | None = None

    def client(self, role: str, **kw: Any) -> openai.OpenAI:
        token = self.keys.get(role, role)
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=token, max_retries=0, timeout=120, **kw)

    def replicas(self, ns: str, name: str) -> list[dict[str, Any]]:
        got = kget(self.cluster, "modelreplicas", "-n", ns, f"-l=orchardist.io/deployment={name}")
        return [r for r in (got or {}).get("items") or [] if not r["metadata"].get("deletionTimestamp")]

    def ready(self, ns: str, name: str) -> list[dict[str, Any]]:
        return [r for r in self.replicas(ns, name) if (r.get("status") or {}).get("phase") == "Ready"]

    def check(self) -> None:
        for agent in self.agents:
            assert agent.proc is None or agent.proc.poll() is None, f"agent died:\n{agent.tail()}"
        if self.operator is not None:
            assert self.operator.proc.poll() is None, "\n".join(self.operator.lines[-40:])

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            return str(resp.read().decode())


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def key_secret(name: str, ns: str, token: str, **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns, "labels": {"orchardist.io/gateway-key": "true"}},
        "data": {"key": b64(token), **{k: b64(v) for k, v in data.items()}},
    }


def deployment(name: str, ns: str, model: str, tag: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": model,
            "engine": "mlx-lm",
            "contextLength": 1024,
            "maxConcurrentSequences": 4,
            "placement": {"nodeSelector": {LABEL: tag}},
            **spec,
        },
    }


def apply(cluster: Cluster, doc: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))


def push(model_dir: Path, ref: str, env: dict[str, str]) -> None:
    out = subprocess.run(
        [str(ORCHARDIST), "push", str(model_dir), ref], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, f"orchardist push failed:\n{out.stdout}\n{out.stderr}"


@pytest.fixture(scope="module")
def world(
    cluster: Cluster, registry: str, mlx_runtime: Runtime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    tag = os.urandom(3).hex()
    work = tmp_path_factory.mktemp("gateway")
    ns_a, ns_b, ns_keys = f"gw-a-{tag}", f"gw-b-{tag}", f"gw-keys-{tag}"
    for ns in (ns_a, ns_b, ns_keys):
        cluster.kubectl("create", "namespace", ns)
    keys = {"a": f"sk-a-{tag}", "b": f"sk-b-{tag}", "limited": f"sk-l-{tag}"}
    apply(cluster, key_secret("team-a", ns_keys, keys["a"], namespaces=ns_a))
    apply(cluster, key_secret("team-b", ns_keys, keys["b"], models=f"{ns_b}/other"))
    apply(cluster, key_secret("limited", ns_keys, keys["limited"], namespaces=ns_a, requestsPerMinute="2"))
    log = work / "gateway.log"
    port = free_port()
    world = World(cluster, f"http://127.0.0.1:{port}", ns_a, ns_b, ns_keys, tag, keys, log)
    gateway: subprocess.Popen[bytes] | None = None
    try:
        for mac, node in MACS.items():
            agent = make_agent(
                cluster,
                work / node,
                node=f"{node}-{tag}",
                extra=("--runtime", f"mlx-lm={mlx_runtime.prefix}"),
            )
            agent.argv[agent.argv.index("--simulate") + 1] = mac
            world.agents.append(agent.start())
        model_dir = tinymodel.build(work / "tiny")
        model = f"oci://{registry}/gateway/tiny:v1"
        push(model_dir, model, cluster.env())
        for agent in world.agents:
            registered(cluster, agent)
            cluster.kubectl("label", "macnode", agent.node, f"{LABEL}={tag}", "--overwrite")
        world.operator = Operator.spawn(
            cluster,
            "--namespace",
            ns_a,
            "--namespace",
            ns_b,
            "--standalone",
            "--lease-grace",
            "15",
            "--resync",
            "1",
        )
        world.operator.wait_started(90)
        cluster.kubectl(
            "create", "secret", "generic", "upstream", "-n", ns_a, f"--from-literal=key={UPSTREAM_KEY}"
        )
        apply(
            cluster,
            deployment(
                "chat",
                ns_a,
                model,
                tag,
                replicas=2,
                aliases=["tiny-chat"],
                apiKeySecretRef={"name": "upstream", "key": "key"},
                placement={"nodeSelector": {LABEL: tag}, "spread": "Required"},
            ),
        )
        apply(cluster, deployment("other", ns_b, model, tag, replicas=1))
        with log.open("ab") as out:
            gateway = subprocess.Popen(
                gateway_argv(cluster, port, ns_keys, "--instance", "gw-test"),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            world.check()
            assert gateway is not None and gateway.poll() is None, log.read_text()[-3000:]
            return len(world.ready(ns_a, "chat")) == 2 and len(world.ready(ns_b, "other")) == 1

        wait_for(ready, timeout=600, interval=1.0, message="chat x2 and other x1 Ready")
        yield world
    finally:
        if gateway is not None:
            stop_process(gateway)
            print("gateway log:\n" + log.read_text(errors="replace")[-4000:])
        for ns in (ns_a, ns_b):
            cluster.kubectl("delete", "modeldeployments", "--all", "-n", ns, "--wait=false", check=False)

        def no_replicas() -> bool:
            return not any(
                (kget(cluster, "modelreplicas", "-n", ns) or {}).get("items") for ns in (ns_a, ns_b)
            )

        wait_for(no_replicas, timeout=120, message="every replica deleted with its deployment")
        if world.operator is not None:
            world.operator.stop()
        for agent in world.agents:
            agent.stop()
        for ns in (ns_a, ns_b, ns_keys):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)


def ask(client: openai.OpenAI, model: str, text: str = "Hello", **kw: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=4, temperature=0, **kw
    )


def served_by(client: openai.OpenAI, model: str, messages: list[Any]) -> tuple[str, str]:
    """(the replica that answered, the answer's text), through the SDK's raw response."""
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=messages,
        max_tokens=4,
        temperature=0,
    )
    answer = raw.parse()
    return raw.headers["x-orchardist-replica"], answer.choices[0].message.content or ""


# ---- keys and tenancy ------------------------------------------------------------------------------


def test_each_key_lists_and_uses_only_its_models(world: World) -> None:
    a, b = world.client("a"), world.client("b")
    assert [m.id for m in a.models.list()] == ["chat"]
    assert [m.id for m in b.models.list()] == ["other"]
    answer = ask(a, "chat")
    assert answer.model == "chat" and answer.choices[0].message.content is not None
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert ask(a, "tiny-chat").model == "tiny-chat"  # the alias the deployment declares
    assert ask(a, f"{world.ns_a}/chat").choices
    assert ask(b, "other").choices

    with pytest.raises(openai.AuthenticationError) as no_key:
        ask(world.client("sk-nobody"), "chat")
    assert no_key.value.status_code == 401 and no_key.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        world.client("sk-nobody").models.list()
    with pytest.raises(openai.PermissionDeniedError) as other_ns:
        ask(a, f"{world.ns_b}/other")
    assert other_ns.value.status_code == 403
    with pytest.raises(openai.PermissionDeniedError):
        ask(b, f"{world.ns_a}/chat")
    with pytest.raises(openai.NotFoundError) as unknown:
        ask(a, "no-such-model")
    assert unknown.value.status_code == 404 and unknown.value.code == "model_not_found"


def test_over_the_request_limit_is_429_with_retry_after(world: World) -> None:
    limited = world.client("limited")
    assert ask(limited, "chat").choices
    assert ask(limited, "chat").choices
    with pytest.raises(openai.RateLimitError) as over:
        ask(limited, "chat")
    assert over.value.status_code == 429
    retry_after = int(over.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 30
    assert ask(world.client("a"), "chat").choices  # another key is not limited by it


def test_streaming_passes_through_and_is_metered(world: World) -> None:
    b = world.client("b")
    before = tokens(world.metrics(), f"{world.keys_ns}/team-b", f"{world.ns_b}/other")
    stream = b.chat.completions.create(
        model="other", messages=[{"role": "user", "content": "Count to five"}], max_tokens=8, stream=True
    )
    chunks = list(stream)
    assert chunks and all(c.choices for c in chunks)  # the usage chunk nobody asked for is dropped
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    with_usage = list(
        b.chat.completions.create(
            model="other",
            messages=[{"role": "user", "content": "Count to five"}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = with_usage[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    after = tokens(world.metrics(), f"{world.keys_ns}/team-b", f"{world.ns_b}/other")
    # Both streams were metered, the one whose usage chunk was dropped included.
    assert after["completion"] - before["completion"] >= 2 and after["prompt"] - before["prompt"] >= 2
    assert (
        'orchardist_gateway_time_to_first_token_seconds_count{model="' + f"{world.ns_b}/other"
        in world.metrics()
    )


def tokens(metrics: str, key: str, model: str) -> dict[str, float]:
    out = {"prompt": 0.0, "completion": 0.0}
    for kind in out:
        labels = f'key="{re.escape(key)}",kind="{kind}",model="{re.escape(model)}"'
        pattern = rf"orchardist_gateway_tokens_total\{{{labels}\}} (\S+)"
        found = re.search(pattern, metrics)
        out[kind] = float(found.group(1)) if found else 0.0
    return out


# ---- routing ---------------------------------------------------------------------------------------


def test_a_conversation_stays_on_its_replica_while_conversations_spread(world: World) -> None:
    a = world.client("a")
    homes: dict[int, str] = {}
    for c in range(16):
        messages = [
            {"role": "system", "content": f"You are assistant number {c}; answer briefly."},
            {"role": "user", "content": f"Conversation {c}: hello"},
        ]
        seen = set()
        for turn in range(2):
            replica, text = served_by(a, "chat", messages)
            seen.add(replica)
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": f"turn {turn}"}]
        assert len(seen) == 1, f"conversation {c} moved between replicas: {seen}"
        homes[c] = seen.pop()
    assert len(set(homes.values())) == 2, f"every conversation landed on one replica: {homes}"


def test_a_killed_engines_requests_go_to_the_other_replica(world: World) -> None:
    a = world.client("a")
    messages = [{"role": "user", "content": "Conversation about a killed engine"}]
    home, _ = served_by(a, "chat", messages)
    ns, name = home.split("/")
    victim = next(r for r in world.ready(ns, "chat") if r["metadata"]["name"] == name)
    pid = engine_pid(victim["status"])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), timeout=30, message=f"engine {pid} gone")
    answered = [served_by(a, "chat", messages)[0] for _ in range(4)]  # none raises
    assert answered[0] != home, f"the first request after the kill went to the dead engine: {answered}"
    world.check()


# ---- hold and scale from zero ----------------------------------------------------------------------


def test_from_zero_32_requests_start_one_replica_then_idle_returns_to_zero(world: World) -> None:
    model = kget(world.cluster, "modeldeployment", "-n", world.ns_a, "chat")["spec"]["model"]
    scaling = {
        "minReplicas": 0,
        "maxReplicas": 2,
        "targetInFlight": 64,
        "idleTimeoutSeconds": IDLE_S,
        "holdTimeoutSeconds": 300,
        "scaleDownStabilizationSeconds": 0,
    }
    apply(world.cluster, deployment("lazy", world.ns_a, model, world.tag, replicas=0, scaling=scaling))
    a = world.client("a")
    wait_for(lambda: "lazy" in [m.id for m in a.models.list()], timeout=30, message="lazy listed")
    assert world.replicas(world.ns_a, "lazy") == []
    started: set[str] = set()

    def one(i: int) -> str:
        replica, _ = served_by(a, "lazy", [{"role": "user", "content": f"request {i}"}])
        return replica

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(one, i) for i in range(32)]
        while not all(f.done() for f in futures):
            started |= {r["metadata"]["uid"] for r in world.replicas(world.ns_a, "lazy")}
            world.check()
            concurrent.futures.wait(futures, timeout=0.5)
        served = [f.result() for f in futures]  # every one succeeded (result() re-raises otherwise)
    started |= {r["metadata"]["uid"] for r in world.replicas(world.ns_a, "lazy")}
    print(f"32 held requests answered in {time.monotonic() - t0:.1f} s by {set(served)}")
    assert len(started) == 1, f"{len(started)} replicas started for one wave of requests"
    assert len(set(served)) == 1
    [lease] = kget(world.cluster, "lease", "-n", world.ns_a, "-l", "orchardist.io/demand-for=lazy")["items"]
    assert lease["metadata"]["name"].startswith("lazy-demand-")  # this gateway instance's own Lease
    assert lease["spec"]["holderIdentity"] == "gw-test"
    wait_for(
        lambda: world.replicas(world.ns_a, "lazy") == [],
        timeout=IDLE_S + 120,
        interval=1.0,
        message="lazy back to zero after its idle timeout",
    )
    spec = kget(world.cluster, "modeldeployment", "-n", world.ns_a, "lazy")["spec"]
    assert spec["replicas"] == 0  # the autoscaler never writes the user's spec


def test_metrics_name_keys_by_secret_never_by_token(world: World) -> None:
    text = world.metrics()
    assert "orchardist_gateway_requests_total" in text and "orchardist_gateway_hold_queue_length" in text
    assert 'code="401"' in text and 'code="429"' in text
    assert all(token not in text for token in world.keys.values())
    assert f'key="{world.keys_ns}/team-a"' in text
