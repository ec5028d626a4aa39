"""What the dev node's parts are told, decided purely: containerd's, the CNI network's, kubelet's and
kube-proxy's configuration, and the `kubernetes` Service's endpoint. :mod:`orchardist.dev.node`
writes these and runs the processes; here every choice is a value a table test can check.

The machine (a VM with cgroup v1 and no systemd) shapes several choices, each said where it is made.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

#: The pod network unless ``$ORCHARDIST_DEV_POD_SUBNET`` names another private /24; next to, and
#: distinct from, the simulated Macs' fabric (10.213.0.0/16).
DEFAULT_POD_SUBNET = IPv4Network("10.214.0.0/24")
POD_SUBNET_ENV = "ORCHARDIST_DEV_POD_SUBNET"
#: The dev apiserver's --service-cluster-ip-range (orchardist.dev.cluster).
SERVICE_SUBNET = IPv4Network("10.0.0.0/24")
NODE_NAME = "orchardist-dev-node"
CNI_NETWORK = "orchardist-pods"
CNI_BIN = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
CRI_NAMESPACE = "k8s.io"


@dataclass(frozen=True)
class NodeLayout:
    """Where a node's things live, from its tag (derived from the dev state dir) and pod subnet.

    Sockets go under a short ``/run`` path: a unix socket's path is limited to 107 bytes and test
    state dirs are long.
    """

    tag: str
    state: Path
    pod_subnet: IPv4Network = DEFAULT_POD_SUBNET

    def __post_init__(self) -> None:
        if not self.tag.isalnum() or len(self.bridge) > 15:
            raise ValueError(f"node tag {self.tag!r}: letters and digits, at most 9 of them")
        if self.pod_subnet.prefixlen > 28:
            raise ValueError(f"pod subnet {self.pod_subnet} is too small")

    @property
    def bridge(self) -> str:
        return f"orpod-{self.tag}"

    @property
    def gateway(self) -> IPv4Address:
        """The bridge's host address: the node's InternalIP, where pods reach the host's services."""
        return self.pod_subnet.network_address + 1

    @property
    def run(self) -> Path:
        return Path("/run") / f"orchardist-node-{self.tag}"

    @property
    def containerd_socket(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def cni_conf_dir(self) -> Path:
        return self.state / "cni" / "net.d"


def containerd_config(layout: NodeLayout, registry: str, pause_image: str) -> str:
    """containerd 1.6's config (TOML, version 2) for the CRI the kubelet talks to.

    ``restrict_oom_score_adj``: this machine refuses lowering a process's oom_score_adj, which the
    sandbox's runc otherwise does. ``registry`` (host:port on loopback) is plain HTTP: the node's own.
    """
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    lines = [
        "version = 2",
        f'root = "{layout.state / "containerd" / "root"}"',
        f'state = "{layout.run / "state"}"',
        "[grpc]",
        f'  address = "{layout.containerd_socket}"',
        "[ttrpc]",
        f'  address = "{layout.run / "containerd.sock.ttrpc"}"',
        "[debug]",
        f'  address = "{layout.run / "debug.sock"}"',
        '[plugins."io.containerd.internal.v1.opt"]',
        f'  path = "{layout.state / "containerd" / "opt"}"',
        f"[{cri}]",
        f'  sandbox_image = "{pause_image}"',
        "  restrict_oom_score_adj = true",
        "  disable_apparmor = true",
        f"[{cri}.containerd]",
        '  snapshotter = "overlayfs"',
        '  default_runtime_name = "runc"',
        f"[{cri}.containerd.runtimes.runc]",
        '  runtime_type = "io.containerd.runc.v2"',
        f"[{cri}.containerd.runtimes.runc.options]",
        "  SystemdCgroup = false",  # no systemd here: cgroupfs, like the kubelet
        f"[{cri}.cni]",
        f'  bin_dir = "{CNI_BIN}"',
        f'  conf_dir = "{layout.cni_conf_dir}"',
        f'[{cri}.registry.mirrors."{registry}"]',
        f'  endpoint = ["http://{registry}"]',
    ]
    return "\n".join(lines) + "\n"


def cni_conflist(layout: NodeLayout) -> dict[str, Any]:
    """A bridge with the pods' gateway on it, addresses from host-local (state under the node's
    dir, so removing it frees them), masquerade for traffic leaving the pod subnet, and hairpin so a
    pod reaches itself through a Service."""
    return {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": layout.bridge,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(layout.pod_subnet), "gateway": str(layout.gateway)}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(layout.state / "cni" / "ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(layout: NodeLayout, *, port: int, healthz_port: int) -> dict[str, Any]:
    """The KubeletConfiguration; JSON is YAML, so it is written as JSON.

    cgroup v1 with a nested hierarchy and no systemd: ``failCgroupV1: false``, cgroupfs, no QoS
    cgroups and no enforced allocatable. Swap and local-storage isolation off (the VM's disk stats
    are partial). Eviction thresholds low, so a busy shared disk evicts nothing mid-test.
    """
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": str(layout.gateway),
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "containerRuntimeEndpoint": f"unix://{layout.containerd_socket}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "failSwapOn": False,
        "localStorageCapacityIsolation": False,
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "clusterDomain": "cluster.local",
        "resolvConf": "/etc/resolv.conf",
        "staticPodPath": "",
        "podLogsDir": str(layout.state / "pod-logs"),  # removed with the node
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "tlsCertFile": str(layout.state / "kubelet" / "pki" / "kubelet.crt"),
        "tlsPrivateKeyFile": str(layout.state / "kubelet" / "pki" / "kubelet.key"),
        "syncFrequency": "10s",
        "nodeStatusReportFrequency": "10s",
    }


def kube_proxy_config(
    layout: NodeLayout, kubeconfig: Path, *, healthz_port: int, metrics_port: int
) -> dict[str, Any]:
    """kube-proxy in iptables mode for this node. ``conntrack.maxPerCore: 0`` leaves the host's
    conntrack table size alone."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": str(layout.pod_subnet),
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "conntrack": {"maxPerCore": 0, "min": 0},
        "iptables": {"localhostNodePorts": False, "syncPeriod": "10s", "minSyncPeriod": "0s"},
    }


def apiserver_endpointslice(address: IPv4Address, port: int) -> dict[str, Any]:
    """The `kubernetes` Service's endpoint: the apiserver at the pods' gateway. The dev apiserver runs
    with ``--endpoint-reconciler-type=none``, so nobody else writes it; in-cluster clients dial the
    Service IP, which its self-signed certificate names."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "labels": {
                "kubernetes.io/service-name": "kubernetes",
                "endpointslice.kubernetes.io/managed-by": "orchardist-dev-node",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [str(address)], "conditions": {"ready": True}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    }


def cni_rules_to_delete(iptables_save: str, network: str = CNI_NETWORK) -> list[list[str]]:
    """``iptables -t nat`` arguments that remove the bridge plugin's masquerade rules for pods of
    ``network``, from ``iptables-save -t nat`` output: the POSTROUTING jumps (commented with the
    network's name) and the per-pod chains they jump to."""
    marker = f'name: \\"{network}\\"'
    jumps: list[list[str]] = []
    chains: list[str] = []
    for line in iptables_save.splitlines():
        if not line.startswith("-A POSTROUTING ") or marker not in line:
            continue
        rule = shlex.split(line[3:])
        target = rule[rule.index("-j") + 1] if "-j" in rule else ""
        if target.startswith("CNI-"):
            jumps.append(["-D", *rule])
            chains.append(target)
    return jumps + [[op, c] for c in chains for op in ("-F", "-X")]


def kube_rules_to_delete(iptables_save: str) -> list[list[str]]:
    """Arguments (for the same table) that remove what a kubelet and kube-proxy left in one table of
    ``iptables-save`` output: jumps from built-in chains into ``KUBE-*`` chains, then those chains
    (flushed first, since they reference each other). Only the dev node runs them on this machine."""
    chains = [ln[1:].split()[0] for ln in iptables_save.splitlines() if ln.startswith(":KUBE-")]
    jumps = []
    for line in iptables_save.splitlines():
        if not line.startswith("-A "):
            continue
        rule = shlex.split(line[3:])
        if (
            not rule[0].startswith("KUBE-")
            and "-j" in rule
            and rule[rule.index("-j") + 1].startswith("KUBE-")
        ):
            jumps.append(["-D", *rule])
    return jumps + [["-F", c] for c in chains] + [["-X", c] for c in chains]


def pod_subnet() -> IPv4Network:
    return IPv4Network(os.environ.get(POD_SUBNET_ENV) or str(DEFAULT_POD_SUBNET))


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2) + "\n"
