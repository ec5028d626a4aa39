"""The gateway's cost and its routing gain, against calling the engines directly, in one run.

A real control plane, registry and operator; four simulated Macs (`orchardist agent run`) each
serving one replica of a deeper tiny Llama through a real `mlx_lm.server` (prompt cache on, its
size from the memory plan) behind the agent's authenticating proxy; one `orchardist gateway`.
Clients are the `openai` SDK, measured here:

- added latency: the same one-token request alternately through the gateway and straight to the
  replica the gateway chose; p50 and p99 of each, and their difference;
- streamed tokens/s through the gateway over tokens/s straight from the replica, in paired rounds
  (the median of the pairs' ratios, their range, and the ratio of the means; goal >= 0.95);
- mean time to first token with the gateway's prefix-aware routing against round-robin over the
  four replicas (what a Service does), on conversations sharing long system prompts (goal: >= 40 %
  lower). Each arm gets its own system prompts so neither inherits the other's warm caches.
"""

from __future__ import annotations

import base64
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MACS = ["m4-pro-64gb", "m4-pro-64gb", "m4-max-128gb", "m4-max-128gb"]
LAYERS = 8
CONTEXT = 4096
LATENCY_ROUNDS = 40
STREAM_ROUNDS = 8
STREAM_TOKENS = 256
PREFIXES = 5
REQUESTS_PER_ARM = 20
PREFIX_WORDS = 200


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _system_prompts(arm: str, rng: random.Random) -> list[str]:
    words = [
        "orchard",
        "apple",
        "pear",
        "plum",
        "cherry",
        "quince",
        "branch",
        "root",
        "leaf",
        "bloom",
        "harvest",
        "cider",
        "press",
    ]
    return [
        f"[{arm} {p}] " + " ".join(rng.choice(words) for _ in range(PREFIX_WORDS)) for p in range(PREFIXES)
    ]


def run() -> list[str]:
    import openai
    from tests.e2e.fleet_helpers import deep_variant, push_cli
    from tests.fixtures.agents import Operator, bench_stack, kget, make_agent, registered, stop_process
    from tests.fixtures.engines import install_runtime
    from tests.fixtures.wait import wait_for

    from orchardist.dev.procs import free_port

    runtime = install_runtime("mlx-lm")
    with bench_stack("orchardist-bench-gateway-") as (work, cluster, registry):
        ns, keys_ns, key, upstream_key = "bench", "bench-keys", "sk-bench", "bench-upstream"
        for name in (ns, keys_ns):
            cluster.kubectl("create", "namespace", name)
        agents = []
        gateway: subprocess.Popen[bytes] | None = None
        operator: Operator | None = None
        try:
            for i, mac in enumerate(MACS):
                agent = make_agent(
                    cluster, work / f"mac{i}", node=f"mac{i}", extra=("--runtime", f"mlx-lm={runtime.prefix}")
                )
                agent.argv[agent.argv.index("--simulate") + 1] = mac
                agents.append(agent.start())
            model_dir = deep_variant(work / "model", layers=LAYERS, max_positions=CONTEXT)
            ref = f"oci://{registry.host}/bench/deep:v1"
            push_cli(model_dir, ref, cluster.env())
            for agent in agents:
                registered(cluster, agent)
            operator = Operator.spawn(cluster, "--namespace", ns, "--standalone", "--resync", "1")
            operator.wait_started(90)
            cluster.kubectl(
                "create", "secret", "generic", "upstream", "-n", ns, f"--from-literal=key={upstream_key}"
            )
            secret = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": "bench",
                    "namespace": keys_ns,
                    "labels": {"orchardist.io/gateway-key": "true"},
                },
                "data": {"key": _b64(key), "namespaces": _b64(ns)},
            }
            cluster.kubectl("apply", "-f", "-", input=json.dumps(secret))
            md = {
                "apiVersion": "orchardist.io/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": "deep", "namespace": ns},
                "spec": {
                    "model": ref,
                    "engine": "mlx-lm",
                    "replicas": len(MACS),
                    "contextLength": CONTEXT,
                    "maxConcurrentSequences": 4,
                    "apiKeySecretRef": {"name": "upstream", "key": "key"},
                    "placement": {"spread": "Required"},
                },
            }
            cluster.kubectl("apply", "-f", "-", input=json.dumps(md))
            port = free_port()
            log = work / "gateway.log"
            with log.open("ab") as out:
                gateway = subprocess.Popen(
                    [
                        str(Path(sys.executable).with_name("orchardist")),
                        "gateway",
                        "--kubeconfig",
                        str(cluster.kubeconfig),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--key-namespace",
                        keys_ns,
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )

            def endpoints() -> dict[str, str] | None:
                got = kget(cluster, "modelreplicas", "-n", ns) or {}
                ready = {
                    f"{ns}/{r['metadata']['name']}": r["status"]["endpoint"]
                    for r in got.get("items") or []
                    if (r.get("status") or {}).get("phase") == "Ready"
                }
                return ready if len(ready) == len(MACS) else None

            replicas = wait_for(endpoints, timeout=900, interval=1.0, message="four Ready replicas")
            through = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=300
            )
            wait_for(
                lambda: "deep" in [m.id for m in through.models.list()],
                timeout=60,
                message="gateway lists deep",
            )
            direct = {
                rid: openai.OpenAI(
                    base_url=f"http://{ep}/v1", api_key=upstream_key, max_retries=0, timeout=300
                )
                for rid, ep in replicas.items()
            }
            return _measure(through, direct)
        finally:
            if gateway is not None:
                stop_process(gateway)
            cluster.kubectl("delete", "modeldeployments", "--all", "-n", ns, "--wait=false", check=False)
            wait_for(
                lambda: not (kget(cluster, "modelreplicas", "-n", ns) or {}).get("items"),
                timeout=120,
                message="replicas deleted",
            )
            if operator is not None:
                operator.stop()
            for agent in agents:
                agent.stop()


def _measure(through: Any, direct: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    # -- added latency ---------------------------------------------------------------------------
    msg = [{"role": "user", "content": "ping"}]
    raw = through.chat.completions.with_raw_response.create(model="deep", messages=msg, max_tokens=1)
    home = direct[raw.headers["x-orchardist-replica"]]
    via: list[float] = []
    straight: list[float] = []
    for _ in range(LATENCY_ROUNDS):
        for client, out, model in ((through, via, "deep"), (home, straight, "default_model")):
            t0 = time.perf_counter()
            client.chat.completions.create(model=model, messages=msg, max_tokens=1, temperature=0)
            out.append(time.perf_counter() - t0)
    p50 = (_pct(via, 0.5) - _pct(straight, 0.5)) * 1000
    p99 = (_pct(via, 0.99) - _pct(straight, 0.99)) * 1000
    lines.append(
        f"added latency (gateway - direct, {LATENCY_ROUNDS} one-token requests each): p50 {p50:+.1f} ms, "
        f"p99 {p99:+.1f} ms (direct p50 {_pct(straight, 0.5) * 1000:.1f} ms)"
    )
    # -- streamed tokens/s ---------------------------------------------------------------------------
    # Paired rounds, the same prompt through both, the arm going first alternating: the engine's
    # speed drifts with what else runs on the machine, and a pair sees the same drift.
    rates: dict[str, list[float]] = {"via": [], "direct": []}
    arms = [("via", through, "deep"), ("direct", home, "default_model")]
    for i in range(STREAM_ROUNDS):
        text = [{"role": "user", "content": f"Tell a long story number {i}"}]
        for arm, client, model in arms if i % 2 == 0 else arms[::-1]:
            rates[arm].append(_stream_rate(client, model, text))
    paired = sorted(v / d for v, d in zip(rates["via"], rates["direct"], strict=True))
    rate_via, rate_direct = statistics.mean(rates["via"]), statistics.mean(rates["direct"])
    lines.append(
        f"streamed tokens/s ({STREAM_ROUNDS} paired {STREAM_TOKENS}-token streams): gateway "
        f"{rate_via:.0f}, direct {rate_direct:.0f}; ratio median {statistics.median(paired):.3f} "
        f"(pairs {paired[0]:.3f}..{paired[-1]:.3f}, of the means {rate_via / rate_direct:.3f}) (goal >= 0.95)"
    )
    # -- TTFT: prefix-aware vs round-robin -------------------------------------------------------
    rng = random.Random(7)
    order = [rng.randrange(PREFIXES) for _ in range(REQUESTS_PER_ARM)]
    prefix_prompts, rr_prompts = _system_prompts("prefix", rng), _system_prompts("rr", rng)
    clients = list(direct.values())
    ttft_prefix, ttft_rr = [], []
    for i, p in enumerate(order):
        question = [{"role": "user", "content": f"Question {i}: what grows here?"}]
        ttft_prefix.append(
            _ttft(through, "deep", [{"role": "system", "content": prefix_prompts[p]}, *question])
        )
        ttft_rr.append(
            _ttft(
                clients[i % len(clients)],
                "default_model",
                [{"role": "system", "content": rr_prompts[p]}, *question],
            )
        )
    gain = 1 - statistics.mean(ttft_prefix) / statistics.mean(ttft_rr)
    lines.append(
        f"mean TTFT over {REQUESTS_PER_ARM} requests on {PREFIXES} shared ~{PREFIX_WORDS}-word system "
        "prompts, "
        f"{len(clients)} mlx-lm replicas: prefix-aware {statistics.mean(ttft_prefix) * 1000:.0f} ms, "
        f"round-robin {statistics.mean(ttft_rr) * 1000:.0f} ms -> {gain * 100:.0f} % lower (goal >= 40 %)"
    )
    return lines


def _stream_rate(client: Any, model: str, messages: list[dict[str, str]]) -> float:
    first = last = None
    count = 0
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=STREAM_TOKENS, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            count += 1
    if first is None or last is None or count < 2 or last == first:
        raise RuntimeError(f"the stream carried too few tokens to time ({count})")
    return (count - 1) / (last - first)


def _ttft(client: Any, model: str, messages: list[dict[str, str]]) -> float:
    t0 = time.perf_counter()
    first = None
    with client.chat.completions.create(model=model, messages=messages, max_tokens=2, stream=True) as stream:
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content is not None:
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("the stream carried no token")
    return first
