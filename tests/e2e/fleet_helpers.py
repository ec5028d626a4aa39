"""Helpers for the fleet test: tiny model variants sized by the memory plan, push, and the fleet itself.

The tiny Llama (``orchardist.dev.tinymodel``) holds 512 bytes of KV per token, too little for any
context to outgrow a 16 GB Mac. :func:`deep_variant` stacks copies of its layers (KV per token grows
with the layer count) and raises ``max_position_embeddings``, so a pinned ``contextLength`` decides
which Macs a deployment fits on while the engine still loads and answers on the CPU in a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchardist.dev import netns, tinymodel
from orchardist.dev.cluster import Cluster
from orchardist.planning import macs, memory, profile
from tests.fixtures.agents import (
    ORCHARDIST,
    REPO,
    Agent,
    Operator,
    alive,
    chat,
    engine_pid,
    kget,
    make_agent,
    registered,
    stop_recorded_engines,
)
from tests.fixtures.wait import wait_for

GiB = 2**30
SYSTEM = "orchardist-system"
LABEL = "orchardist.io/fleet-test"


# ---- models -------------------------------------------------------------------------------------


def deep_variant(dest: Path, *, layers: int, max_positions: int, seed: int = 0) -> Path:
    """The tiny Llama with ``layers`` layers (copies of its own) and a longer maximum context."""
    from safetensors.numpy import load_file, save_file

    tinymodel.build(dest, seed=seed)
    weights = load_file(str(dest / "model.safetensors"))
    prefix = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    per_layer: dict[int, dict[str, Any]] = {}
    for key, value in weights.items():
        if m := prefix.match(key):
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = value
    base = len(per_layer)
    for i in range(base, layers):
        for suffix, value in per_layer[i % base].items():
            weights[f"model.layers.{i}.{suffix}"] = value.copy()
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config_path = dest / "config.json"
    config = json.loads(config_path.read_text())
    config |= {"num_hidden_layers": layers, "max_position_embeddings": max_positions}
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return dest


def claims_layers(src: Path, dest: Path, *, layers: int) -> Path:
    """A copy of ``src`` whose config.json claims ``layers`` layers: a model no Mac can hold.

    Only its config is ever read (the planner refuses it everywhere, so no engine loads the
    mismatched weights); it saves pushing hundreds of MB of real layers to prove a refusal.
    """
    import shutil

    shutil.copytree(src, dest)
    config_path = dest / "config.json"
    config = json.loads(config_path.read_text())
    config["num_hidden_layers"] = layers
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return dest


def push_cli(model_dir: Path, ref: str, env: dict[str, str]) -> str:
    """``orchardist push DIR REF`` as a user runs it; returns the manifest digest it printed."""
    out = subprocess.run(
        [str(ORCHARDIST), "push", str(model_dir), ref],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, f"orchardist push failed:\n{out.stdout}\n{out.stderr}"
    m = re.search(r"@(sha256:[0-9a-f]{64})", out.stdout)
    assert m, out.stdout
    return m.group(1)


def model_profile(model_dir: Path, weight_bytes: int) -> profile.ModelProfile:
    return profile.from_config(json.loads((model_dir / "config.json").read_text()), weight_bytes)


def capacity(mac: macs.MacProfile, reserved: int = 0) -> memory.NodeCapacity:
    return memory.NodeCapacity(
        gpu_working_set_bytes=mac.gpu_working_set_bytes,
        memory_bandwidth_bytes_per_second=mac.memory_bandwidth_bytes_per_second,
        total_memory_bytes=mac.memory_bytes,
        reserved_bytes=reserved,
        name=mac.name,
    )


def fits_on(prof: profile.ModelProfile, request: memory.PlanRequest, mac_names: list[str]) -> set[str]:
    """The Mac profiles (empty Macs) on which the planner says one replica fits."""
    return {n for n in mac_names if memory.plan(prof, capacity(macs.get(n)), request).fits}


# ---- the fleet ----------------------------------------------------------------------------------


#: The fabric member that is no Mac: a client in a namespace of its own.
CLIENT = "client"


@dataclass
class Fleet:
    """One namespace, one operator, four agents (one per simulated Mac, each in its own network
    namespace on ``fabric``), and the models they serve. ``env`` is what every client of the
    fleet's registry needs (its CA)."""

    cluster: Cluster
    ns: str
    workdir: Path
    runtime: Path
    grace: float
    fabric: netns.Fabric
    env: dict[str, str] = field(default_factory=dict)
    agents: dict[str, Agent] = field(default_factory=dict)  # Mac profile -> its agent
    operator: Operator | None = None

    def node_of(self, mac: str) -> str:
        return f"{self.ns}-{mac}"

    # -- processes -------------------------------------------------------------------------------
    def start_operator(self) -> Operator:
        args = ("--namespace", self.ns, "--standalone", "--lease-grace", str(self.grace), "--resync", "1")
        op = Operator.spawn(self.cluster, *args, env=self.env)
        self.operator = op
        op.wait_started(90)
        return op

    def add_agent(self, mac: str) -> Agent:
        node = self.node_of(mac)
        extra = ("--runtime", f"mlx-lm={self.runtime}")
        agent = make_agent(
            self.cluster,
            self.workdir / mac,
            node=node,
            extra=extra,
            heartbeat=1.0,
            fabric=self.fabric,
            env=self.env,
        )
        agent.argv[agent.argv.index("--simulate") + 1] = mac  # make_agent's default is m4-pro-64gb
        self.agents[mac] = agent
        agent.start()
        return agent

    def join(self, mac: str) -> dict[str, Any]:
        """Wait for the agent's MacNode to be Ready and label it for this test's nodeSelector."""
        agent = self.agents[mac]
        node = registered(self.cluster, agent)
        self.cluster.kubectl("label", "macnode", agent.node, f"{LABEL}={self.ns}", "--overwrite")
        return node

    def mac_of(self, node: str) -> str:
        return next(mac for mac, a in self.agents.items() if a.node == node)

    def chat_from_client(self, endpoint: str) -> dict[str, Any]:
        """A chat completion sent from the client's namespace (another host, as far as it knows)."""
        code = (
            "import json, sys\nfrom tests.fixtures.agents import chat\nprint(json.dumps(chat(sys.argv[1])))"
        )
        argv = self.fabric.wrap(CLIENT, [sys.executable, "-c", code, endpoint])
        out = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False, cwd=REPO)
        assert out.returncode == 0, f"chat from the client namespace to {endpoint}: {out.stderr[-2000:]}"
        answer: dict[str, Any] = json.loads(out.stdout)
        return answer

    def slice_endpoints(self, name: str) -> set[str]:
        """``address:port`` of every endpoint in the EndpointSlices of deployment ``name``'s Service."""
        got = kget(self.cluster, "endpointslices", "-n", self.ns, f"-l=kubernetes.io/service-name={name}")
        found = set()
        for sl in (got or {}).get("items") or []:
            for port in sl.get("ports") or []:
                for ep in sl.get("endpoints") or []:
                    found |= {f"{addr}:{port['port']}" for addr in ep["addresses"]}
        return found

    # -- API -------------------------------------------------------------------------------------
    def apply(self, doc: dict[str, Any]) -> None:
        self.cluster.kubectl("apply", "-n", self.ns, "-f", "-", input=json.dumps(doc))

    def deploy(self, name: str, model: str, *, replicas: int, context: int, seqs: int) -> None:
        self.apply(
            {
                "apiVersion": "orchardist.io/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": name, "namespace": self.ns},
                "spec": {
                    "model": model,
                    "engine": "mlx-lm",
                    "replicas": replicas,
                    "contextLength": context,
                    "maxConcurrentSequences": seqs,
                    "placement": {"nodeSelector": {LABEL: self.ns}},
                },
            }
        )

    def md(self, name: str) -> dict[str, Any]:
        got = kget(self.cluster, "modeldeployment", "-n", self.ns, name)
        assert got is not None, f"no ModelDeployment {name}"
        return dict(got)

    def condition(self, name: str, ctype: str) -> dict[str, Any]:
        conds = (self.md(name).get("status") or {}).get("conditions") or []
        return next((c for c in conds if c["type"] == ctype), {})

    def replicas(self, name: str | None = None) -> list[dict[str, Any]]:
        sel = [f"-l=orchardist.io/deployment={name}"] if name else []
        got = kget(self.cluster, "modelreplicas", "-n", self.ns, *sel)
        return list((got or {}).get("items") or [])

    def live(self, name: str | None = None) -> list[dict[str, Any]]:
        """Replicas not being deleted."""
        return [r for r in self.replicas(name) if not r["metadata"].get("deletionTimestamp")]

    def ready(self, name: str, *, avoid: str | None = None) -> list[dict[str, Any]]:
        """Ready replicas (optionally: not on node ``avoid``) of deployment ``name``."""
        return [
            r
            for r in self.live(name)
            if (r.get("status") or {}).get("phase") == "Ready"
            and (r.get("status") or {}).get("endpoint")
            and r["spec"]["nodeName"] != avoid
        ]

    def wait_ready(self, name: str, count: int, timeout: float = 300.0) -> list[dict[str, Any]]:
        def probe() -> list[dict[str, Any]] | None:
            self.check_processes()
            reps = self.ready(name)
            live = self.live(name)
            return reps if len(reps) == count == len(live) else None

        return wait_for(
            probe,
            timeout=timeout,
            interval=1.0,
            message=lambda: f"{count} Ready replicas of {name}\n{self.describe()}",
        )

    def check_processes(self) -> None:
        """A test fails at once (with the log) when a process it relies on has died."""
        if self.operator is not None:
            assert self.operator.proc.poll() is None, "operator exited:\n" + "\n".join(
                self.operator.lines[-40:]
            )

    def describe(self) -> str:
        """What a person would look at after a failure: replicas, deployments' status, logs' tails."""
        lines = []
        for r in self.replicas():
            st = r.get("status") or {}
            lines.append(
                f"  {r['metadata']['name']} on {r['spec']['nodeName']} digest {r['spec']['digest'][:19]} "
                f"phase {st.get('phase')} endpoint {st.get('endpoint')} "
                f"deleting={bool(r['metadata'].get('deletionTimestamp'))} error {st.get('lastError')}"
            )
        mds = kget(self.cluster, "modeldeployments", "-n", self.ns) or {"items": []}
        for md in mds["items"]:
            st = md.get("status") or {}
            conds = [
                (c["type"], c["status"], c.get("reason"), c.get("message")) for c in st.get("conditions", [])
            ]
            lines.append(f"  md {md['metadata']['name']}: {st.get('ready')} {conds}")
        if self.operator is not None:
            lines.append("operator log:\n" + "\n".join(self.operator.lines[-40:]))
        for mac, a in self.agents.items():
            lines.append(f"agent {mac} log:\n{a.tail(15)}")
        return "\n".join(lines)

    # -- teardown --------------------------------------------------------------------------------
    def engine_pids(self) -> list[int]:
        """Every live mlx_lm process whose command line names one of this fleet's stores."""
        found = []
        root = str(self.workdir)
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
                if "mlx_lm" in cmd and root in cmd and alive(int(proc.name)):
                    found.append(int(proc.name))
        return found

    def agent_pids(self) -> list[int]:
        return [a.proc.pid for a in self.agents.values() if a.proc is not None and a.proc.poll() is None]

    def teardown(self) -> list[str]:
        """Delete the deployments (agents stop their engines), stop everything; say what was left."""
        left: list[str] = []
        self.cluster.kubectl(
            "delete", "modeldeployments", "--all", "-n", self.ns, "--wait=false", check=False
        )
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not self.replicas(), timeout=90, interval=1.0, message="the replicas deleted")
        with contextlib.suppress(AssertionError):
            wait_for(
                lambda: not self.engine_pids(),
                timeout=60,
                interval=1.0,
                message="the engines stopped by their agents",
            )
        for a in self.agents.values():
            a.stop()
        if self.operator is not None:
            self.operator.stop()
        for a in self.agents.values():
            stop_recorded_engines(a.workdir / "state")
        stray = self.engine_pids()
        if stray:
            left.append(f"engines still running after their replicas were deleted: {stray}")
            for pid in stray:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.agent_pids():
            left.append(f"agents still running: {self.agent_pids()}")
        if self.operator is not None and self.operator.proc.poll() is None:
            left.append(f"operator still running: {self.operator.proc.pid}")
        for a in self.agents.values():
            self.cluster.kubectl(
                "delete", "macnode", a.node, "--ignore-not-found", "--wait=false", check=False
            )
            self.cluster.kubectl(
                "delete", "lease", a.node, "-n", SYSTEM, "--ignore-not-found", "--wait=false", check=False
            )
        self.fabric.remove()  # after every process in it stopped
        return left


class Prober:
    """Chats with endpoints in a background thread, recording every failure (for 'keeps answering')."""

    def __init__(self, endpoints: list[str], every: float = 0.5) -> None:
        self.endpoints = endpoints
        self.every = every
        self.answers = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for ep in self.endpoints:
                try:
                    assert chat(ep)["choices"]
                    self.answers += 1
                except Exception as exc:
                    self.failures.append(f"{time.strftime('%H:%M:%S')} {ep}: {exc!r}")
            self._stop.wait(self.every)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(90)


def pids_of(replicas: list[dict[str, Any]]) -> dict[str, int]:
    return {r["metadata"]["name"]: engine_pid(r["status"]) for r in replicas}


def wait_gone(pids: Iterator[int] | list[int], timeout: float = 90.0) -> None:
    todo = list(pids)
    wait_for(
        lambda: not [p for p in todo if alive(p)],
        timeout=timeout,
        interval=0.5,
        message=lambda: f"engines {todo} to exit (still running: {[p for p in todo if alive(p)]})",
    )
