"""`orchardist dev up --demo` / `orchardist dev down`: the whole product on one machine.

Up: a real control plane, Debian's registry, the operator and one agent (a simulated Mac on
Linux), a tiny model pushed with `orchardist push`, `examples/quickstart.yaml` applied, `kubectl
wait` for Ready, then a real chat completion printed. Down: stops every process it started
(the agent stops its engines on the way out), removes the Macs' network and the state. Each step
says what it is doing, so a cold machine shows progress rather than silence.

The simulated Mac lives in its own network namespace on a bridge (:mod:`orchardist.dev.netns`), so
its engines have an address an EndpointSlice may hold and the deployment ends Ready, not Degraded.
It reaches the apiserver and the registry (TLS from its own CA) at the bridge's host address.
Without root or namespaces it shares loopback, and the demo says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from orchardist.dev import netns, procs
from orchardist.dev.cluster import Cluster, repo_root
from orchardist.dev.cluster import down as cluster_down
from orchardist.dev.gateway import start_gateway
from orchardist.dev.prometheus import Targets as PrometheusTargets
from orchardist.dev.prometheus import start as start_prometheus

DEMO_REGISTRY_PORT = 5001
#: The model reference examples/quickstart.yaml names; on a bridge the host part is the bridge's.
QUICKSTART_REGISTRY = f"127.0.0.1:{DEMO_REGISTRY_PORT}"
DEMO_MODEL_PATH = "orchardist/tiny-llama:v1"
DEMO_NODE = "demo-mac-1"
DEMO_CLIENT = "demo-client"  # a namespace that is no Mac: reaches the deployment like another host
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


def _chat(base: str, key: str | None = None) -> tuple[str, float]:
    """One completion; the model is named as clients name it: the deployment (its served name)."""
    payload: dict[str, Any] = {
        "model": DEMO_DEPLOYMENT,
        "messages": [{"role": "user", "content": "Say hello to the orchard."}],
        "max_tokens": 24,
        "temperature": 0.7,
    }
    req = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {}),
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


def fabric_tag(state: Path) -> str:
    """The network fabric's tag for a state dir: stable, so `dev down` (or the next `dev up`) of the
    same state dir finds what a killed run left."""
    return hashlib.sha256(str(state).encode()).hexdigest()[:6]


def _network(state: Path, steps: _Steps) -> netns.Fabric:
    steps("network: a bridge and a namespace per simulated Mac (ip netns)")
    fabric = netns.create(fabric_tag(state), [DEMO_NODE, DEMO_CLIENT])
    if fabric.loopback:
        steps.note(
            f"network namespaces unavailable ({fabric.fallback_reason}): the Mac shares loopback, so its "
            "deployment will be Degraded (EndpointNotRoutable)"
        )
    else:
        assert fabric.layout is not None
        steps.note(f"bridge {fabric.layout.bridge} {fabric.host_address}/{fabric.layout.subnet.prefixlen}")
        for m in fabric.members.values():
            steps.note(f"{m.name} lives in namespace {m.netns} at {m.address}")
    return fabric


def _agent_kubeconfig(cluster: Cluster, fabric: netns.Fabric, dest: Path) -> Path:
    if fabric.loopback:
        return cluster.kubeconfig
    text = netns.guest_kubeconfig(
        cluster.kubeconfig.read_text(), f"https://{fabric.host_address}:{cluster.api_port}"
    )
    dest.write_text(text)
    dest.chmod(0o600)
    return dest


def run_up(args: argparse.Namespace) -> int:
    """Start everything and serve the quickstart model; prints a real completion."""
    from orchardist.dev.registry import Registry, make_tls
    from orchardist.dev.tinymodel import build as build_tiny_model

    root = _root()
    state = _state_dir(args)
    demo = state / "demo"
    steps = _Steps(total=8 if args.demo else 6)
    try:
        _stop_all(state, quiet=True)
        fabric = _network(state, steps)
        steps("control plane: etcd, kube-apiserver, kube-controller-manager (built from Go modules)")
        # The CRDs go in before the controller-manager starts, so its garbage collector knows them
        # at once; the operator runs --standalone, so no kopf peering CRDs are needed. On a bridge the
        # apiserver listens on every address, so the Mac's namespace reaches it.
        bind = "127.0.0.1" if fabric.loopback else "0.0.0.0"
        cluster = Cluster.start(state, crds=root / "crds", bind_address=bind)
        steps.note(f"ready in {cluster.ready_seconds:.1f} s at {cluster.server}")
        cluster.kubectl("create", "namespace", "orchardist-system", check=False)
        demo.mkdir(parents=True, exist_ok=True)

        host = fabric.host_address
        steps(f"OCI registry (Debian's docker-registry) on {host}:{DEMO_REGISTRY_PORT}")
        tls = None if fabric.loopback else make_tls(demo / "registry-tls", host)
        registry = Registry.start(demo / "registry", port=DEMO_REGISTRY_PORT, bind=host, tls=tls)
        procs.save([registry.record], demo / "pids")
        if tls is not None:
            steps.note(f"TLS from its own CA ({tls.ca}); its clients get SSL_CERT_FILE={tls.bundle}")
        model_ref = f"oci://{registry.host}/{DEMO_MODEL_PATH}"

        steps("engine runtime: mlx-lm" + (" (CPU build on Linux)" if sys.platform != "darwin" else ""))
        mlx = _runtime(root, "mlx-lm")
        steps.note(str(mlx))

        steps("operator (kopf) and one agent" + (f" simulating {args.simulate}" if args.simulate else ""))
        env = cluster.env() | registry.client_env()
        operator_metrics = None
        if getattr(args, "in_cluster", False):  # the chart's operator Pod on a real node
            from orchardist.dev import incluster

            incluster.run_operator(cluster, registry_ca=tls.ca if tls else None, note=steps.note)
        else:
            operator_metrics = f"127.0.0.1:{procs.free_port()}"
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
                    "--metrics-port",
                    operator_metrics.rpartition(":")[2],
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
            str(_agent_kubeconfig(cluster, fabric, demo / "agent-kubeconfig")),
            "--node-name",
            DEMO_NODE,
            "--store",
            str(demo / "store"),
            "--state-dir",
            str(demo / "agent"),
            "--address",
            fabric.address(DEMO_NODE),
            "--bind-address",
            "127.0.0.1" if fabric.loopback else "0.0.0.0",  # 0.0.0.0 of the Mac's own namespace
            "--runtime",
            f"mlx-lm={mlx}",
            "--stop-engines-on-exit",
            "--log-format",
            "json",
        ]
        if args.simulate and not (sys.platform == "darwin" and platform.machine() == "arm64"):
            agent_argv += ["--simulate", args.simulate]
        agent = procs.start(
            "agent", agent_argv, demo / "logs" / "agent.log", env=env, before_exec=fabric.enter(DEMO_NODE)
        )
        procs.save([agent], demo / "pids")
        _wait_node(cluster, steps, agent)
        gateway, key = start_gateway(cluster, demo)
        steps.note(f"gateway: {gateway}")
        steps.note(f"key: {key}")
        prometheus_url, prometheus = start_prometheus(
            demo / "prometheus",
            PrometheusTargets(operator_metrics, gateway.removeprefix("http://")),
        )
        procs.save([prometheus], demo / "pids")
        steps.note(f"prometheus: {prometheus_url}")

        if not args.demo:
            steps("ready: apply a ModelDeployment (see examples/quickstart.yaml)")
            _print_next(state)
            return 0

        steps(f"tiny model: build it and `orchardist push` it to {model_ref}")
        model_dir = build_tiny_model(demo / "tiny-llama")
        push = subprocess.run(
            [*_orchardist(), "push", str(model_dir), model_ref], capture_output=True, text=True, env=env
        )
        if push.returncode != 0:
            raise DemoError(f"orchardist push failed:\n{push.stdout}\n{push.stderr}")
        steps.note(push.stdout.strip().splitlines()[-1] if push.stdout.strip() else "pushed")

        steps("kubectl apply -f examples/quickstart.yaml; kubectl wait --for=condition=Ready")
        manifest = (root / "examples" / "quickstart.yaml").read_text()
        if registry.host != QUICKSTART_REGISTRY:
            steps.note(f"(its model's registry is {registry.host} here, where the Mac reaches it)")
            manifest = manifest.replace(f"oci://{QUICKSTART_REGISTRY}/", f"oci://{registry.host}/")
        cluster.kubectl("apply", "-f", "-", input=manifest)
        md = _wait_ready(cluster, steps, timeout=float(getattr(args, "timeout", 300)))

        steps("a chat completion through the gateway")
        endpoint = _endpoint(md)
        text, seconds = _chat(gateway, key)
        print(f"\n  POST {gateway}/v1/chat/completions  ({seconds * 1000:.0f} ms)")
        print(f"  assistant: {text!r}")
        print("  (a tiny random-weight Llama: the words are noise, the serving path is real)\n")
        _report_exposure(cluster, fabric, endpoint)
        if getattr(args, "in_cluster", False) and not fabric.loopback:
            from orchardist.dev import incluster

            address = incluster.service_address(cluster, "default", DEMO_DEPLOYMENT)
            answer = incluster.chat(address, lambda argv: fabric.wrap(DEMO_CLIENT, argv))
            print(f"  through Service {DEMO_DEPLOYMENT}'s ClusterIP {address} from {DEMO_CLIENT}: {answer}\n")
        print(f"demo ready in {steps.elapsed():.0f} s")
        _print_next(state)
        return 0
    except (DemoError, procs.ProcessError, netns.NetnsError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else ""
        print(f"\norchardist dev up failed: {exc}\n{detail}", file=sys.stderr)
        print(f"logs: {demo / 'logs'} and {state / 'logs'}; stop with `orchardist dev down`", file=sys.stderr)
        return 1


def _report_exposure(cluster: Cluster, fabric: netns.Fabric, endpoint: str) -> None:
    """Say what the Service routes to and whether the deployment is Degraded; on a bridge, chat once
    more from a namespace that is no Mac (another host, as far as it can tell)."""
    slices = _json(cluster, "get", "endpointslices", "-l", f"kubernetes.io/service-name={DEMO_DEPLOYMENT}")
    held = sorted(
        f"{a}:{p['port']}"
        for sl in slices.get("items", [])
        for p in sl.get("ports") or []
        for e in sl.get("endpoints") or []
        for a in e.get("addresses") or []
    )
    md = _json(cluster, "get", "modeldeployment", DEMO_DEPLOYMENT)
    degraded = [
        c
        for c in (md.get("status") or {}).get("conditions") or []
        if c["type"] == "Degraded" and c["status"] == "True"
    ]
    print(f"  EndpointSlice {DEMO_DEPLOYMENT}: {', '.join(held) or '(empty)'}")
    if degraded:
        print(f"  Degraded: {degraded[0].get('reason')}: {degraded[0].get('message')}")
    else:
        print("  Degraded: no")
    if fabric.loopback:
        print(
            f"  Note: network namespaces were unavailable here ({fabric.fallback_reason}), so the engine\n"
            "  listens on 127.0.0.1, which an EndpointSlice may not list (EndpointNotRoutable). On your\n"
            "  Macs the agent reports each Mac's LAN address and the Service routes to it.\n"
        )
        return
    code = (
        "import json, sys, urllib.request as u\n"
        "body = json.dumps({'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 4}).encode()\n"
        "req = u.Request(sys.argv[1], data=body, headers={'Content-Type': 'application/json'})\n"
        "print(u.urlopen(req, timeout=60).status)\n"
    )
    url = f"http://{endpoint}/v1/chat/completions"
    out = subprocess.run(
        fabric.wrap(DEMO_CLIENT, [sys.executable, "-c", code, url]),
        capture_output=True,
        text=True,
        timeout=90,
    )
    answered = out.returncode == 0 and out.stdout.strip() == "200"
    where = f"from namespace {fabric.members[DEMO_CLIENT].netns} ({fabric.address(DEMO_CLIENT)})"
    print(f"  {where}: POST {url} -> {'200' if answered else out.stderr.strip()[-300:]}\n")
    if not answered:
        raise DemoError(f"the deployment did not answer {where}")


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
        order = {"agent": 0, "gateway": 1, "prometheus": 1, "operator": 2, "registry": 3}
        for rec in sorted(procs.load(pids), key=lambda r: order.get(r.name, 9)):
            if procs.stop(rec, grace=30 if rec.name == "agent" else 10):
                stopped.append(rec.name)
    from orchardist.dev.node import down_at as node_down

    stopped += node_down(state / "node")  # before the control plane: its pods' state is under it
    stopped += cluster_down(state)
    if netns.unavailable() is None and netns.teardown(fabric_tag(state)):
        stopped.append("network namespaces")
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
