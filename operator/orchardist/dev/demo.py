"""`orchardist dev up --demo` / `orchardist dev down`: the whole product on one machine.

Up: a real control plane, Debian's registry, the operator and one agent (a simulated Mac on
Linux), a tiny model pushed with `orchardist push`, `examples/quickstart.yaml` applied, `kubectl
wait` for Ready, then a real chat completion printed. Down: stops every process it started
(the agent stops its engines on the way out) and removes the state. Each step says what it is
doing, so a cold machine shows progress rather than silence.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from orchardist.dev import procs
from orchardist.dev.cluster import Cluster, repo_root
from orchardist.dev.cluster import down as cluster_down

DEMO_REGISTRY_PORT = 5001
DEMO_MODEL_REF = f"oci://127.0.0.1:{DEMO_REGISTRY_PORT}/orchardist/tiny-llama:v1"
DEMO_NODE = "demo-mac-1"
DEMO_DEPLOYMENT = "quickstart"


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


class _Steps:
    def __init__(self, total: int) -> None:
        self.total = total
        self.n = 0
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        self.n += 1
        print(f"[{self.n}/{self.total}] {text}", flush=True)

    def note(self, text: str) -> None:
        print(f"      {text}", flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def _root() -> Path:
    root = repo_root()
    if root is None:
        raise DemoError("run the demo from an Orchardist checkout (it uses hack/ and examples/)")
    return root


def _orchardist() -> list[str]:
    return [sys.executable, "-m", "orchardist"]


def _runtime(root: Path, name: str) -> Path:
    out = subprocess.run(
        ["bash", str(root / "hack" / "install-runtimes.sh"), name], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise DemoError(f"installing the {name} runtime failed:\n{out.stderr[-2000:]}")
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        if key == name:
            return Path(value)
    raise DemoError(f"hack/install-runtimes.sh printed no {name}= line")


def _json(cluster: Cluster, *args: str) -> dict[str, Any]:
    out = cluster.kubectl(*args, "-o", "json", check=False)
    if out.returncode != 0:
        return {}
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def _describe_progress(md: dict[str, Any], replicas: list[dict[str, Any]]) -> str:
    status = md.get("status") or {}
    parts = [f"deployment {status.get('phase', 'Pending')} {status.get('ready', '0/?')}"]
    for r in replicas:
        rs = r.get("status") or {}
        prog = (rs.get("progress") or {}).get("percent")
        parts.append(
            f"{r['metadata']['name']} on {r['spec'].get('nodeName')}: {rs.get('phase', 'Pending')}"
            + (f" {prog}" if prog else "")
        )
    for c in status.get("conditions") or []:
        if c.get("type") == "Stalled" and c.get("status") == "True":
            parts.append(f"STALLED {c.get('reason')}: {c.get('message')}")
    return "; ".join(parts)


def _wait_ready(cluster: Cluster, steps: _Steps, timeout: float) -> dict[str, Any]:
    """`kubectl wait --for=condition=Ready`, printing the deployment's progress while it waits."""
    waiter = subprocess.Popen(
        [
            str(cluster.bin("kubectl")),
            f"--kubeconfig={cluster.kubeconfig}",
            "wait",
            "--for=condition=Ready",
            f"modeldeployment/{DEMO_DEPLOYMENT}",
            f"--timeout={int(timeout)}s",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    last = ""
    while waiter.poll() is None:
        md = _json(cluster, "get", "modeldeployment", DEMO_DEPLOYMENT)
        reps = _json(cluster, "get", "modelreplicas", "-l", f"orchardist.io/deployment={DEMO_DEPLOYMENT}")
        line = _describe_progress(md, reps.get("items", [])) if md else "waiting for the deployment"
        if line != last:
            steps.note(line)
            last = line
        time.sleep(1)
    output = (waiter.stdout.read() if waiter.stdout else "").strip()
    if waiter.returncode != 0:
        raise DemoError(f"kubectl wait failed: {output}\nlast status: {last}")
    steps.note(output)
    return _json(cluster, "get", "modeldeployment", DEMO_DEPLOYMENT)


def _chat(endpoint: str) -> tuple[str, float]:
    base = f"http://{endpoint}"
    model: str | None = None
    try:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as resp:
            body = resp.read()
            if body:
                ids = [m.get("id") for m in json.loads(body).get("data", [])]
                model = next((i for i in ids if i), None)
    except (OSError, ValueError):
        model = None
    payload: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Say hello to the orchard."}],
        "max_tokens": 24,
        "temperature": 0.7,
    }
    if model:
        payload["model"] = model
    req = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer = json.loads(resp.read())
    text = str(answer["choices"][0]["message"]["content"])
    return text, time.monotonic() - t0


def _endpoint(md: dict[str, Any]) -> str:
    for r in (md.get("status") or {}).get("replicaStatuses") or []:
        if r.get("endpoint") and r.get("phase") == "Ready":
            return str(r["endpoint"])
    raise DemoError(f"the deployment is Ready but lists no ready endpoint: {md.get('status')}")


def run_up(args: argparse.Namespace) -> int:
    """Start everything and serve the quickstart model; prints a real completion."""
    from orchardist.dev.registry import Registry
    from orchardist.dev.tinymodel import build as build_tiny_model

    root = _root()
    state = _state_dir(args)
    demo = state / "demo"
    steps = _Steps(total=7 if args.demo else 5)
    try:
        _stop_all(state, quiet=True)
        steps("control plane: etcd, kube-apiserver, kube-controller-manager (built from Go modules)")
        # The CRDs go in before the controller-manager starts, so its garbage collector knows them
        # at once; the operator runs --standalone, so no kopf peering CRDs are needed.
        cluster = Cluster.start(state, crds=root / "crds")
        steps.note(f"ready in {cluster.ready_seconds:.1f} s at {cluster.server}")
        cluster.kubectl("create", "namespace", "orchardist-system", check=False)
        demo.mkdir(parents=True, exist_ok=True)

        steps(f"OCI registry (Debian's docker-registry) on 127.0.0.1:{DEMO_REGISTRY_PORT}")
        registry = Registry.start(demo / "registry", port=DEMO_REGISTRY_PORT)
        procs.save([registry.record], demo / "pids")

        steps("engine runtime: mlx-lm" + (" (CPU build on Linux)" if sys.platform != "darwin" else ""))
        mlx = _runtime(root, "mlx-lm")
        steps.note(str(mlx))

        steps("operator (kopf) and one agent" + (f" simulating {args.simulate}" if args.simulate else ""))
        env = cluster.env()
        operator = procs.start(
            "operator",
            [
                *_orchardist(),
                "operator",
                "run",
                "--kubeconfig",
                str(cluster.kubeconfig),
                "--standalone",
                "--all-namespaces",
                "--log-format",
                "json",
            ],
            demo / "logs" / "operator.log",
            env=env,
        )
        procs.save([operator], demo / "pids")
        agent_argv = [
            *_orchardist(),
            "agent",
            "run",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--node-name",
            DEMO_NODE,
            "--store",
            str(demo / "store"),
            "--state-dir",
            str(demo / "agent"),
            "--address",
            "127.0.0.1",
            "--bind-address",
            "127.0.0.1",
            "--runtime",
            f"mlx-lm={mlx}",
            "--stop-engines-on-exit",
            "--log-format",
            "json",
        ]
        if args.simulate and not (sys.platform == "darwin" and platform.machine() == "arm64"):
            agent_argv += ["--simulate", args.simulate]
        agent = procs.start("agent", agent_argv, demo / "logs" / "agent.log", env=env)
        procs.save([agent], demo / "pids")
        _wait_node(cluster, steps, agent)

        if not args.demo:
            steps("ready: apply a ModelDeployment (see examples/quickstart.yaml)")
            _print_next(state)
            return 0

        steps(f"tiny model: build it and `orchardist push` it to {DEMO_MODEL_REF}")
        model_dir = build_tiny_model(demo / "tiny-llama")
        push = subprocess.run(
            [*_orchardist(), "push", str(model_dir), DEMO_MODEL_REF], capture_output=True, text=True, env=env
        )
        if push.returncode != 0:
            raise DemoError(f"orchardist push failed:\n{push.stdout}\n{push.stderr}")
        steps.note(push.stdout.strip().splitlines()[-1] if push.stdout.strip() else "pushed")

        steps("kubectl apply -f examples/quickstart.yaml; kubectl wait --for=condition=Ready")
        cluster.kubectl("apply", "-f", str(root / "examples" / "quickstart.yaml"))
        md = _wait_ready(cluster, steps, timeout=float(getattr(args, "timeout", 300)))

        steps("a chat completion through the deployment's endpoint")
        endpoint = _endpoint(md)
        text, seconds = _chat(endpoint)
        print(f"\n  POST http://{endpoint}/v1/chat/completions  ({seconds * 1000:.0f} ms)")
        print(f"  assistant: {text!r}")
        print("  (a tiny random-weight Llama: the words are noise, the serving path is real)\n")
        print(
            "  Note: on one machine engines listen on 127.0.0.1, which a Service's EndpointSlice may not\n"
            "  list, so `kubectl get md` says Degraded (EndpointNotRoutable). On your Macs the agent\n"
            "  reports each Mac's LAN address and the Service routes to it.\n"
        )
        print(f"demo ready in {steps.elapsed():.0f} s")
        _print_next(state)
        return 0
    except (DemoError, procs.ProcessError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else ""
        print(f"\norchardist dev up failed: {exc}\n{detail}", file=sys.stderr)
        print(f"logs: {demo / 'logs'} and {state / 'logs'}; stop with `orchardist dev down`", file=sys.stderr)
        return 1


def _wait_node(cluster: Cluster, steps: _Steps, agent: procs.ProcRecord, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not procs.is_running(agent):
            raise DemoError(f"the agent exited; log {agent.log}:\n{procs.tail(agent.log)}")
        node = _json(cluster, "get", "macnode", DEMO_NODE)
        conds = {c.get("type"): c.get("status") for c in (node.get("status") or {}).get("conditions") or []}
        if conds.get("Ready") == "True":
            st = node["status"]
            mem = st.get("memory", {})
            steps.note(
                f"MacNode {DEMO_NODE}: {st.get('chip', {}).get('name')}, "
                f"{mem.get('total')} RAM, GPU working set {mem.get('gpuWorkingSet')}"
            )
            return
        time.sleep(0.5)
    raise DemoError(f"the agent did not register a Ready MacNode in {timeout:.0f} s; log {agent.log}")


def _state_dir(args: argparse.Namespace) -> Path:
    from orchardist.dev.cli import default_state_dir

    given: Path | None = args.state_dir
    return (given if given is not None else default_state_dir()).resolve()


def _print_next(state: Path) -> None:
    rel = os.path.relpath(state)
    from orchardist.dev.cli import default_state_dir

    state_arg = "" if state == default_state_dir().resolve() else f" --state-dir {rel}"
    print(
        "\nLook around:\n"
        f'  eval "$(.venv/bin/orchardist dev cluster env{state_arg})"\n'
        "  kubectl get md,mr,mn\n"
        f"  kubectl describe md {DEMO_DEPLOYMENT}\n"
        f"Logs: {rel}/demo/logs/\n"
        "Stop everything:\n"
        f"  .venv/bin/orchardist dev down{state_arg}\n"
    )


def _stop_all(state: Path, *, quiet: bool = False) -> list[str]:
    stopped: list[str] = []
    pids = state / "demo" / "pids"
    if pids.is_dir():
        # Agent first (it stops its engines), then the operator, then the registry.
        order = {"agent": 0, "operator": 1, "registry": 2}
        for rec in sorted(procs.load(pids), key=lambda r: order.get(r.name, 9)):
            if procs.stop(rec, grace=30 if rec.name == "agent" else 10):
                stopped.append(rec.name)
    stopped += cluster_down(state)
    if stopped and not quiet:
        print("stopped: " + ", ".join(stopped))
    return stopped


def run_down(args: argparse.Namespace) -> int:
    """Stop everything `dev up` started and remove its state."""
    state = _state_dir(args)
    stopped = _stop_all(state)
    if not stopped:
        print("nothing was running")
    return 0
