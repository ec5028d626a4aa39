"""The agent's Prometheus metrics: this Mac's memory, its pulls, its engines and each replica's load.

Everything is read at scrape time from the state the agent already keeps (the node's status, the
pulls, the supervisor, the proxies' :class:`~orchardist_agent.proxy.ProxyStats`), on the agent's
event loop, so nothing is counted twice and nothing drifts.

Per-replica load uses the names of the Gateway API Inference Extension's model-server protocol
(``vllm:num_requests_waiting``, ``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``) so an
endpoint picker can read them from any engine. Every engine here sits behind the agent's proxy,
which measures them the same way for all: waiting = admitted requests the engine has not begun to
answer, running = the rest of those in flight; KV cache usage is an estimate, the share of the
replica's sequence slots (``memoryPlan.maxNumSeqs``) that running requests hold, since mlx-lm and
llama.cpp report none. Labels name the node and the replica, both bounded by the Mac's memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from orchardist import log

from .proxy.server import listen_socket

if TYPE_CHECKING:
    from .node import NodeAgent
    from .proxy import ProxyStats
    from .replicas import ReplicaLoop

LOG = log.get(__name__)

#: The default port of ``--metrics-port`` (OpenTelemetry's Prometheus exporter port).
DEFAULT_PORT = 9464

REPLICA_LABELS = ["node", "namespace", "replica", "deployment"]


def load(stats: ProxyStats, max_num_seqs: int) -> tuple[int, int, float]:
    """(running, waiting, KV cache usage estimate in 0..1) of one replica from its proxy's counts."""
    waiting = max(stats.waiting, 0)
    running = max(stats.in_flight - waiting, 0)
    usage = min(running / max_num_seqs, 1.0) if max_num_seqs > 0 else 0.0
    return running, waiting, usage


def memory_numbers(memory: dict[str, Any]) -> tuple[int, int, int, int]:
    """(working set, allocated, free, wired limit) in bytes from the node's status ``memory``."""
    working_set = int(memory.get("gpuWorkingSetBytes") or 0)
    allocated = int(memory.get("allocatedBytes") or 0)
    return working_set, allocated, max(working_set - allocated, 0), int(memory.get("wiredLimitBytes") or 0)


class AgentCollector(Collector):
    """Reads the agent's state when scraped; sources are attached once the agent has them."""

    def __init__(self) -> None:
        self.node: NodeAgent | None = None
        self.replicas: ReplicaLoop | None = None

    def attach(self, node: NodeAgent, replicas: ReplicaLoop | None = None) -> None:
        self.node, self.replicas = node, replicas

    def collect(self) -> Iterator[Metric]:
        if self.node is None:
            return
        name = self.node.name
        memory = dict(self.node.compose_status(None, "").get("memory") or {})
        working_set, allocated, free, wired = memory_numbers(memory)
        for metric, help_, value in (
            (
                "orchardist_agent_gpu_working_set_bytes",
                "Memory the GPU may use (the working set).",
                working_set,
            ),
            ("orchardist_agent_memory_allocated_bytes", "Working set the replicas here reserve.", allocated),
            ("orchardist_agent_memory_free_bytes", "Working set not reserved by a replica.", free),
            (
                "orchardist_agent_wired_limit_bytes",
                "iogpu.wired_limit_mb in bytes (0: the macOS default).",
                wired,
            ),
        ):
            g = GaugeMetricFamily(metric, help_, labels=["node"])
            g.add_metric([name], value)
            yield g
        if self.replicas is not None:
            yield from self._pulls(name, self.replicas)
            yield from self._engines(name, self.replicas)

    def _pulls(self, node: str, loop: ReplicaLoop) -> Iterator[Metric]:
        states = list(loop.pulls.states.values())
        done = sum(s.bytes_done for s in states)
        rate = sum(s.rate for s in states if s.task is not None)
        failures = sum(s.failures for s in states)
        running = sum(1 for s in states if s.task is not None)
        for metric, help_, value in (
            ("orchardist_agent_pull_bytes", "Bytes fetched by the model pulls the agent tracks.", done),
            ("orchardist_agent_pull_bytes_per_second", "Download rate of the pulls under way.", rate),
            ("orchardist_agent_pull_failures", "Failed attempts of pulls not yet done.", failures),
            ("orchardist_agent_pulls_running", "Model pulls under way.", running),
        ):
            g = GaugeMetricFamily(metric, help_, labels=["node"])
            g.add_metric([node], value)
            yield g

    def _engines(self, node: str, loop: ReplicaLoop) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "orchardist_agent_engine_restarts", "Engine restarts by the supervisor.", labels=REPLICA_LABELS
        )
        started = GaugeMetricFamily(
            "orchardist_agent_engine_start_time_seconds",
            "When the engine process started (Unix time).",
            labels=REPLICA_LABELS,
        )
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Requests the engine is answering.", labels=REPLICA_LABELS
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests queued in the engine.", labels=REPLICA_LABELS
        )
        kv = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc",
            "KV cache usage, 0-1 (estimated: running sequences over memoryPlan.maxNumSeqs).",
            labels=REPLICA_LABELS,
        )
        tokens = CounterMetricFamily(
            "orchardist_agent_replica_tokens",
            "Tokens the engine reported in its usage, by kind (prompt or completion).",
            labels=[*REPLICA_LABELS, "kind"],
        )
        requests = CounterMetricFamily(
            "orchardist_agent_replica_requests",
            "Requests the replica's proxy passed on, by result (completed or failed).",
            labels=[*REPLICA_LABELS, "result"],
        )
        for text, st in sorted(loop.engines.supervisor.statuses().items()):
            namespace, _, replica = text.partition("/")
            obj = loop.cache.objects.get((namespace, replica))
            deployment = obj.spec.deployment if obj is not None else ""
            labels = [node, namespace, replica, deployment]
            restarts.add_metric(labels, st.restarts)
            if st.start_time is not None:
                started.add_metric(labels, st.start_time.timestamp())
            stats = loop.engines.proxy.stats(text)
            if stats is None:
                continue
            seqs = obj.spec.memory_plan.max_num_seqs if obj is not None else 0
            r, w, usage = load(stats, seqs)
            running.add_metric(labels, r)
            waiting.add_metric(labels, w)
            kv.add_metric(labels, usage)
            tokens.add_metric([*labels, "prompt"], stats.prompt_tokens)
            tokens.add_metric([*labels, "completion"], stats.completion_tokens)
            requests.add_metric([*labels, "completed"], stats.completed)
            requests.add_metric([*labels, "failed"], stats.failed)
        yield from (restarts, started, running, waiting, kv, tokens, requests)


class AgentMetrics:
    """The agent's registry and its ``/metrics`` listener on the Mac's address."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.collector = AgentCollector()
        self.registry.register(self.collector)
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (a taken port falls back to a free one, reported in MacNode status)."""

        async def metrics(_: web.Request) -> web.Response:
            began = time.monotonic()
            body = generate_latest(self.registry)
            LOG.debug("scraped", seconds=round(time.monotonic() - began, 4))
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        try:
            sock = listen_socket(host, port)
        except OSError as exc:
            LOG.warning("metrics port taken; choosing another", port=port, error=str(exc))
            sock = listen_socket(host, 0)
        self.port = int(sock.getsockname()[1])
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.SockSite(self.runner, sock).start()
        LOG.info("metrics served", address=f"{host}:{self.port}")
        return self.port

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


__all__ = ["DEFAULT_PORT", "AgentCollector", "AgentMetrics", "load", "memory_numbers"]
