"""A real node for the dev cluster: containerd + runc, a CNI bridge, kubelet, kube-proxy (iptables)
and the scheduler and workload controllers that turn the chart's Deployment into a running Pod.

Nothing is pulled from outside: the node runs its own registry on loopback holding the pause image
(a static binary built with the control plane) and the operator image (``hack/build-image.sh``).
The configurations are decided in :mod:`orchardist.dev.nodeconf`; this module writes them, runs
the processes (pid records under ``<state>/node``) and takes all of it down again, including what
outlives the processes: containerd's shims, mounts, pod network namespaces, the bridge and the
iptables rules kube-proxy and the bridge plugin added. Needs root (network and mounts).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from orchardist import log
from orchardist.dev import image, nodeconf, procs
from orchardist.dev.cluster import Cluster, repo_root
from orchardist.dev.registry import Registry
from orchardist.dev.registry import stop_at as stop_registry_at

_log = log.get(__name__)

NODE_BINARIES = ("kubelet", "kube-proxy", "kube-scheduler", "pause")
HOST_TOOLS = ("containerd", "runc", "ctr", "iptables", "iptables-save", "ip", "umount")
#: Start order; stopped in reverse (containerd last: the kubelet's pods go down first).
ORDER = ("containerd", "kubelet", "kube-proxy", "kube-scheduler", "workload-controllers")
#: Deployments -> ReplicaSets -> Pods, and the node lifecycle controller, which lifts the not-ready
#: taint a kubelet registers its Node with once the Node reports Ready.
WORKLOAD_CONTROLLERS = ("deployment-controller", "replicaset-controller", "node-lifecycle-controller")
RELEASE = "orchardist"
RELEASE_NAMESPACE = "orchardist-system"


class NodeError(RuntimeError):
    """The node could not start; the message names the part and its log."""


def tag_for(state: Path) -> str:
    """A short, stable tag for a dev state dir: the names a killed run left are found again."""
    return hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:8]


def missing(bin_dir: Path) -> list[str]:
    """What this machine lacks for a node (empty when it can run one)."""
    lack = [b for b in NODE_BINARIES if not os.access(bin_dir / b, os.X_OK)]
    lack += [t for t in HOST_TOOLS if shutil.which(t) is None]
    if not (nodeconf.CNI_BIN / "bridge").is_file():
        lack.append("containernetworking-plugins")
    if os.geteuid() != 0:
        lack.append("root")
    return lack


def node_bins(root: Path) -> Path:
    """The bin dir with the node's binaries (``build-kubebins.sh --node``, cached by version)."""
    out = subprocess.run(
        ["bash", str(root / "hack" / "build-kubebins.sh"), "--node"], stdout=subprocess.PIPE, text=True
    )
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise NodeError("hack/build-kubebins.sh --node failed; its output is above")
    return Path(lines[-1])


def operator_layout(root: Path) -> Path:
    """The operator image's OCI layout (``hack/build-image.sh``: built once per set of inputs)."""
    out = subprocess.run(["bash", str(root / "hack" / "build-image.sh")], stdout=subprocess.PIPE, text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise NodeError("hack/build-image.sh failed; its output is above")
    return Path(lines[-1])


@dataclass
class Node:
    """A started node; everything it owns is under ``layout.state`` and ``layout.run``."""

    cluster: Cluster
    layout: nodeconf.NodeLayout
    registry: Registry
    records: list[procs.ProcRecord]
    ready_seconds: float = 0.0

    @classmethod
    def start(
        cls, cluster: Cluster, *, bin_dir: Path, die_with_parent: bool = False, timeout: float = 120.0
    ) -> Node:
        """Start the node's parts against ``cluster`` (whose apiserver listens on 0.0.0.0) and wait
        until its Node is Ready. On failure everything started so far is taken down."""
        lack = missing(bin_dir)
        if lack:
            raise NodeError(f"this machine cannot run a dev node; missing: {', '.join(lack)}")
        if cluster.bind_address not in ("0.0.0.0", ""):
            raise NodeError("the node's pods reach the apiserver at the bridge: start it with bind 0.0.0.0")
        state = cluster.state_dir / "node"
        down_at(state)  # what an earlier run of the same state dir left
        layout = nodeconf.NodeLayout(tag_for(cluster.state_dir), state, nodeconf.pod_subnet())
        t0 = time.monotonic()
        state.mkdir(parents=True, exist_ok=True)
        (state / "node.json").write_text(json.dumps({"tag": layout.tag, "subnet": str(layout.pod_subnet)}))
        registry = Registry.start(state / "registry", die_with_parent=die_with_parent)
        node = cls(cluster, layout, registry, [])
        try:
            node._network()
            pause = f"{registry.host}/orchardist/pause:{_short(_push_pause(bin_dir, state, registry))}"
            node._containerd(pause, die_with_parent)
            node._kubelet(bin_dir, die_with_parent)
            node._control(bin_dir, die_with_parent)
            cluster.kubectl("apply", "-f", "-", input=json.dumps(_apiserver_slice(cluster, layout)))
            node._wait_ready(timeout)
        except BaseException:
            node.stop()
            raise
        node.ready_seconds = time.monotonic() - t0
        _log.info("dev node ready", node=nodeconf.NODE_NAME, seconds=round(node.ready_seconds, 1))
        return node

    # ---- parts -----------------------------------------------------------------------------------
    def _network(self) -> None:
        br, gw = self.layout.bridge, self.layout.gateway
        _run(["ip", "link", "add", br, "type", "bridge"])
        _run(["ip", "addr", "add", f"{gw}/{self.layout.pod_subnet.prefixlen}", "dev", br])
        _run(["ip", "link", "set", br, "up"])
        # Pods reach the Macs' fabric and the host through the kernel's forwarding; bridged traffic
        # passes iptables (br_netfilter), so a pod reaches a Service backed by a pod on its bridge.
        for key in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
            path = Path("/proc/sys") / key
            if path.exists() and path.read_text().strip() != "1":
                path.write_text("1\n")
        conf = self.layout.cni_conf_dir
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "10-orchardist.conflist").write_text(nodeconf.dumps(nodeconf.cni_conflist(self.layout)))

    def _containerd(self, pause: str, die_with_parent: bool) -> None:
        self.layout.run.mkdir(parents=True, exist_ok=True)
        config = self.layout.state / "containerd.toml"
        config.write_text(nodeconf.containerd_config(self.layout, self.registry.host, pause))
        rec = self._start("containerd", ["containerd", "--config", str(config)], die_with_parent)
        _wait(lambda: self.ctr("version", check=False).returncode == 0, 30, rec, "containerd answers")

    def _kubelet(self, bin_dir: Path, die_with_parent: bool) -> None:
        st = self.layout.state
        (st / "kubelet" / "pki").mkdir(parents=True, exist_ok=True)
        _self_signed(st / "kubelet" / "pki", str(self.layout.gateway))
        health = procs.free_port()
        cfg = nodeconf.kubelet_config(self.layout, port=procs.free_port(), healthz_port=health)
        cfg["podLogsDir"] = str(st / "pod-logs")
        (st / "kubelet.json").write_text(nodeconf.dumps(cfg))
        argv = [
            str(bin_dir / "kubelet"),
            f"--config={st / 'kubelet.json'}",
            f"--kubeconfig={self.cluster.kubeconfig}",
            f"--hostname-override={nodeconf.NODE_NAME}",
            f"--node-ip={self.layout.gateway}",
            f"--root-dir={st / 'kubelet' / 'root'}",
            "--v=1",
        ]
        rec = self._start("kubelet", argv, die_with_parent)
        procs.wait_http(f"http://127.0.0.1:{health}/healthz", timeout=60, proc=rec, expect="ok")

    def _control(self, bin_dir: Path, die_with_parent: bool) -> None:
        st, kc = self.layout.state, self.cluster.kubeconfig
        health = procs.free_port()
        proxy_cfg = nodeconf.kube_proxy_config(
            self.layout, kc, healthz_port=health, metrics_port=procs.free_port()
        )
        (st / "kube-proxy.json").write_text(nodeconf.dumps(proxy_cfg))
        self._start(
            "kube-proxy",
            [str(bin_dir / "kube-proxy"), f"--config={st / 'kube-proxy.json'}", "--v=1"],
            die_with_parent,
        )
        common = [f"--kubeconfig={kc}", "--leader-elect=false", "--secure-port=0", "--v=1"]
        self._start("kube-scheduler", [str(bin_dir / "kube-scheduler"), *common], die_with_parent)
        kcm = [str(self.cluster.bin("kube-controller-manager")), *common]
        kcm.append(f"--controllers={','.join(WORKLOAD_CONTROLLERS)}")
        self._start("workload-controllers", kcm, die_with_parent)

    def _wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            out = self.cluster.kubectl("get", "node", nodeconf.NODE_NAME, "-o", "json", check=False)
            if out.returncode != 0:
                return False
            conds = json.loads(out.stdout).get("status", {}).get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

        kubelet = next(r for r in self.records if r.name == "kubelet")
        _wait(ready, timeout, kubelet, f"node {nodeconf.NODE_NAME} Ready")

    def _start(self, name: str, argv: list[str], die_with_parent: bool) -> procs.ProcRecord:
        rec = procs.start(
            name, argv, self.layout.state / "logs" / f"{name}.log", die_with_parent=die_with_parent
        )
        self.records.append(rec)
        procs.save([rec], self.layout.state / "pids")
        return rec

    # ---- use -------------------------------------------------------------------------------------
    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["ctr", "--address", str(self.layout.containerd_socket), "-n", nodeconf.CRI_NAMESPACE, *args]
        return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)

    def push_operator(self, layout_dir: Path) -> str:
        """Push the operator image to the node's registry; returns ``repository:tag`` for the chart."""
        index = json.loads((layout_dir / "index.json").read_text())
        digest = str(index["manifests"][0]["digest"])
        repo, tag = "orchardist/operator", _short(digest)
        image.push(layout_dir, self.registry.host, repo, tag)
        return f"{self.registry.host}/{repo}:{tag}"

    def install_operator(
        self,
        image_ref: str,
        *,
        values: dict[str, Any] | None = None,
        extra_sets: tuple[str, ...] = (),
        timeout: float = 180,
    ) -> str:
        """`helm upgrade --install` the chart with ``image_ref`` (and ``values``); wait for its Pod
        Ready; return its name.

        CRDs a `kubectl apply` put there first are adopted: ``--take-ownership`` for Helm's
        ownership marks, ``--force-conflicts`` for the fields kubectl's server-side apply owns.
        """
        root = repo_root()
        if root is None:
            raise NodeError("installing the chart needs an Orchardist checkout (charts/orchardist)")
        repository, _, tag = image_ref.rpartition(":")
        sets = [
            f"image.repository={repository}",
            f"image.tag={tag}",
            "image.pullPolicy=IfNotPresent",
            *extra_sets,
        ]
        args = ["upgrade", "--install", RELEASE, str(root / "charts" / "orchardist"), "-n", RELEASE_NAMESPACE]
        args += [
            "--create-namespace",
            "--take-ownership",
            "--force-conflicts",
            "--wait",
            f"--timeout={int(timeout)}s",
        ]
        if values:
            path = self.layout.state / "values.json"
            path.write_text(json.dumps(values))
            args += ["-f", str(path)]
        self.cluster.helm(*args, *[a for s in sets for a in ("--set", s)], timeout=timeout + 30)
        return self.operator_pod()

    def operator_pod(self) -> str:
        out = self.cluster.kubectl(
            "get", "pods", "-n", RELEASE_NAMESPACE, "-l", "app.kubernetes.io/component=operator", "-o", "json"
        )
        pods = [p for p in json.loads(out.stdout)["items"] if not p["metadata"].get("deletionTimestamp")]
        if len(pods) != 1:
            raise NodeError(f"expected one operator pod, found {[p['metadata']['name'] for p in pods]}")
        return str(pods[0]["metadata"]["name"])

    # ---- teardown --------------------------------------------------------------------------------
    def stop(self) -> list[str]:
        return down_at(self.layout.state)


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def _push_pause(bin_dir: Path, state: Path, registry: Registry) -> str:
    layout = state / "pause-layout"
    shutil.rmtree(layout, ignore_errors=True)
    blob = image.pause_layout(bin_dir / "pause", layout)
    image.push(layout, registry.host, "orchardist/pause", _short(blob.digest))
    return blob.digest


def _apiserver_slice(cluster: Cluster, layout: nodeconf.NodeLayout) -> dict[str, Any]:
    return nodeconf.apiserver_endpointslice(layout.gateway, cluster.api_port)


def _self_signed(pki: Path, ip: str) -> None:
    """The kubelet's serving certificate (logs and exec go through it); self-signed for its IP."""
    if (pki / "kubelet.crt").is_file():
        return
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=orchardist-dev-node",
            "-addext",
            f"subjectAltName=IP:{ip}",
            "-keyout",
            str(pki / "kubelet.key"),
            "-out",
            str(pki / "kubelet.crt"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _run(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise NodeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return out


def _wait(fact: Any, timeout: float, rec: procs.ProcRecord, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not fact():
        if not procs.is_running(rec):
            raise NodeError(f"{rec.name} exited before {what}; log {rec.log}:\n{procs.tail(rec.log)}")
        if time.monotonic() > deadline:
            raise NodeError(f"no {what} after {timeout:.0f} s; log {rec.log}:\n{procs.tail(rec.log)}")
        time.sleep(0.3)


def down_at(state: Path) -> list[str]:
    """Take down the node recorded under ``state`` (``<dev state>/node``) and remove it.

    Order: the kubelet and the other node processes; every container task and container (their
    shims exit with them; a shim still serving our socket is killed by pid); containerd; the mounts
    under the node's dirs and the pods' network namespaces; kube-proxy's and the bridge plugin's
    iptables rules; the bridge; the registry.
    """
    meta = state / "node.json"
    if not meta.is_file():
        shutil.rmtree(state, ignore_errors=True)
        return []
    info = json.loads(meta.read_text())
    layout = nodeconf.NodeLayout(str(info["tag"]), state)
    recs = {r.name: r for r in procs.load(state / "pids")} if (state / "pids").is_dir() else {}
    stopped = [
        n for n in reversed(ORDER) if n != "containerd" and n in recs and procs.stop(recs[n], grace=15)
    ]
    netns = (
        _remove_containers(layout) if "containerd" in recs and procs.is_running(recs["containerd"]) else []
    )
    if "containerd" in recs and procs.stop(recs["containerd"], grace=15):
        stopped.append("containerd")
    _kill_shims(layout)
    _unmount_under([layout.state, layout.run, *netns])
    for ns in netns:
        Path(ns).unlink(missing_ok=True)
    _remove_rules(layout, recs.get("kube-proxy"))
    _run(["ip", "link", "delete", layout.bridge], check=False)
    if stop_registry_at(state / "registry"):
        stopped.append("registry")
    shutil.rmtree(layout.run, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    return stopped


def _remove_containers(layout: nodeconf.NodeLayout) -> list[str]:
    """Kill and delete every task and container; return the sandboxes' network namespace paths."""
    base = ["ctr", "--address", str(layout.containerd_socket), "-n", nodeconf.CRI_NAMESPACE]
    listed = subprocess.run([*base, "containers", "ls", "-q"], capture_output=True, text=True, timeout=30)
    netns: list[str] = []
    for cid in listed.stdout.split():
        info = subprocess.run([*base, "containers", "info", cid], capture_output=True, text=True, timeout=30)
        try:
            spec = json.loads(info.stdout).get("Spec") or {}
        except ValueError:
            spec = {}
        for ns in (spec.get("linux") or {}).get("namespaces") or []:
            path = os.path.realpath(str(ns.get("path", "")))  # /var/run is a link to /run
            if ns.get("type") == "network" and Path(path).name.startswith("cni-"):
                netns.append(path)
        subprocess.run([*base, "tasks", "kill", "-s", "SIGKILL", cid], capture_output=True, timeout=30)
        subprocess.run([*base, "tasks", "rm", "-f", cid], capture_output=True, timeout=30)
        subprocess.run([*base, "containers", "rm", cid], capture_output=True, timeout=30)
    return sorted(set(netns))


def _kill_shims(layout: nodeconf.NodeLayout) -> None:
    """containerd's shims outlive it by design; ours are the ones given our socket's address."""
    sock = str(layout.containerd_socket)
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if cmd and Path(cmd[0]).name.startswith("containerd-shim") and sock in cmd:
            with contextlib.suppress(psutil.Error):
                p.kill()


def _unmount_under(prefixes: list[Path | str]) -> None:
    roots = [str(p).rstrip("/") for p in prefixes]
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].replace("\\040", " ")
        if any(mp == r or mp.startswith(r + "/") for r in roots):
            points.append(mp)
    for mp in sorted(set(points), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, timeout=30)


def _remove_rules(layout: nodeconf.NodeLayout, proxy: procs.ProcRecord | None) -> None:
    """kube-proxy's own cleanup, then whatever kubelet and kube-proxy left in either family, then the
    bridge plugin's masquerade rules for our pods."""
    if proxy is not None and proxy.argv:
        subprocess.run([proxy.argv[0], "--cleanup"], capture_output=True, timeout=60)
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            saved = subprocess.run([f"{tool}-save", "-t", table], capture_output=True, text=True, timeout=30)
            rules = nodeconf.kube_rules_to_delete(saved.stdout)
            if table == "nat" and tool == "iptables":
                rules = nodeconf.cni_rules_to_delete(saved.stdout) + rules
            for args in rules:
                subprocess.run([tool, "-t", table, *args], capture_output=True, timeout=30)


__all__ = ["Node", "NodeError", "down_at", "missing", "node_bins", "operator_layout", "tag_for"]
