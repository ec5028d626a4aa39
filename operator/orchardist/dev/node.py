"""A real node for the dev cluster: containerd + runc, a CNI bridge, kubelet, kube-proxy (iptables)
and the scheduler and workload controllers that turn the chart's Deployment into a running Pod.

Nothing is pulled from outside: the node runs its own registry on loopback holding the pause image
(a static binary built with the control plane) and the operator image (``hack/build-image.sh``).
The configurations are decided in :mod:`orchardist.dev.nodeconf`; this module writes them and runs
the processes (pid records under ``<state>/node``); :mod:`orchardist.dev.nodedown` takes all of it
down again. Needs root (network and mounts).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchardist import log
from orchardist.dev import image, nodeconf, procs
from orchardist.dev.cluster import Cluster, repo_root
from orchardist.dev.nodedown import down_at
from orchardist.dev.registry import Registry
from orchardist.dev.tls import self_signed

_log = log.get(__name__)

NODE_BINARIES = ("kubelet", "kube-proxy", "kube-scheduler", "pause")
HOST_TOOLS = ("containerd", "runc", "ctr", "iptables", "iptables-save", "ip", "umount")
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
    self_signed(pki / "kubelet.crt", pki / "kubelet.key", common_name="orchardist-dev-node", ip=ip, days=30)


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


__all__ = ["Node", "NodeError", "down_at", "missing", "node_bins", "operator_layout", "tag_for"]
