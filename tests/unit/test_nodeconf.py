"""The dev node's configuration, decided purely: names and paths from a tag, what containerd, the CNI
bridge, kubelet and kube-proxy are told, and which iptables rules teardown removes."""

from __future__ import annotations

import tomllib
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from orchardist.dev import nodeconf

STATE = Path("/tmp/x/state/node")


def _layout(tag: str = "ab12cd34", subnet: str = "10.214.0.0/24") -> nodeconf.NodeLayout:
    return nodeconf.NodeLayout(tag, STATE, IPv4Network(subnet))


@pytest.mark.parametrize(
    ("tag", "subnet", "bridge", "gateway"),
    [
        ("ab12cd34", "10.214.0.0/24", "orpod-ab12cd34", "10.214.0.1"),
        ("z9", "10.99.8.0/26", "orpod-z9", "10.99.8.1"),
    ],
)
def test_layout_names(tag: str, subnet: str, bridge: str, gateway: str) -> None:
    lay = _layout(tag, subnet)
    assert lay.bridge == bridge and len(lay.bridge) <= 15
    assert lay.gateway == IPv4Address(gateway)
    assert lay.run == Path(f"/run/orchardist-node-{tag}")
    assert len(str(lay.containerd_socket)) < 108, "a unix socket path must fit sun_path"


@pytest.mark.parametrize(
    ("tag", "subnet"), [("toolongtag", "10.1.0.0/24"), ("a-b", "10.1.0.0/24"), ("ok", "10.1.0.0/30")]
)
def test_layout_refuses(tag: str, subnet: str) -> None:
    with pytest.raises(ValueError):
        _layout(tag, subnet)


def test_containerd_config() -> None:
    lay = _layout()
    cfg = tomllib.loads(
        nodeconf.containerd_config(lay, "127.0.0.1:5000", "127.0.0.1:5000/orchardist/pause:1")
    )
    cri = cfg["plugins"]["io.containerd.grpc.v1.cri"]
    assert cfg["grpc"]["address"] == str(lay.containerd_socket)
    assert cfg["root"].startswith(str(STATE)) and cfg["state"].startswith(str(lay.run))
    assert cri["sandbox_image"] == "127.0.0.1:5000/orchardist/pause:1"
    assert cri["restrict_oom_score_adj"] is True
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    assert cri["cni"] == {"bin_dir": "/usr/lib/cni", "conf_dir": str(lay.cni_conf_dir)}
    assert cri["registry"]["mirrors"]["127.0.0.1:5000"]["endpoint"] == ["http://127.0.0.1:5000"]


def test_cni_conflist() -> None:
    lay = _layout()
    conf = nodeconf.cni_conflist(lay)
    bridge = conf["plugins"][0]
    assert [p["type"] for p in conf["plugins"]] == ["bridge", "portmap"]
    assert bridge["bridge"] == lay.bridge and bridge["isGateway"] and bridge["ipMasq"]
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.214.0.0/24", "gateway": "10.214.0.1"}]]
    assert bridge["ipam"]["dataDir"].startswith(str(STATE)), "freed with the node's state"


def test_kubelet_config_fits_this_machine() -> None:
    cfg = nodeconf.kubelet_config(_layout(), port=1, healthz_port=2)
    assert cfg["failCgroupV1"] is False and cfg["cgroupDriver"] == "cgroupfs"
    assert cfg["cgroupsPerQOS"] is False and cfg["enforceNodeAllocatable"] == []
    assert cfg["containerRuntimeEndpoint"] == f"unix://{_layout().containerd_socket}"
    assert cfg["authentication"]["anonymous"]["enabled"] is False
    assert cfg["podLogsDir"] == str(STATE / "pod-logs")
    assert (cfg["address"], cfg["port"], cfg["healthzPort"], cfg["readOnlyPort"]) == ("10.214.0.1", 1, 2, 0)


def test_kube_proxy_config() -> None:
    cfg = nodeconf.kube_proxy_config(_layout(), Path("/k"), healthz_port=3, metrics_port=4)
    assert cfg["mode"] == "iptables" and cfg["clusterCIDR"] == "10.214.0.0/24"
    assert cfg["hostnameOverride"] == nodeconf.NODE_NAME
    assert cfg["conntrack"]["maxPerCore"] == 0, "the host's conntrack table left alone"
    assert (cfg["healthzBindAddress"], cfg["metricsBindAddress"]) == ("127.0.0.1:3", "127.0.0.1:4")


def test_apiserver_endpointslice() -> None:
    body = nodeconf.apiserver_endpointslice(IPv4Address("10.214.0.1"), 6443)
    assert body["metadata"]["labels"]["kubernetes.io/service-name"] == "kubernetes"
    assert body["endpoints"] == [{"addresses": ["10.214.0.1"], "conditions": {"ready": True}}]
    assert body["ports"] == [{"name": "https", "port": 6443, "protocol": "TCP"}]


NAT = """*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-0f1e2d - [0:0]
:CNI-aaaa - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 10.214.0.2/32 -m comment --comment "name: \\"orchardist-pods\\" id: \\"c1\\"" -j CNI-0f1e2d
-A POSTROUTING -s 10.88.0.2/32 -m comment --comment "name: \\"someone-else\\" id: \\"c2\\"" -j CNI-aaaa
-A POSTROUTING -s 10.213.7.0/24 -j MASQUERADE
-A KUBE-POSTROUTING -j MASQUERADE
COMMIT
"""


def test_cni_rules_to_delete_only_ours() -> None:
    rules = nodeconf.cni_rules_to_delete(NAT)
    assert rules == [
        [
            "-D", "POSTROUTING", "-s", "10.214.0.2/32", "-m", "comment", "--comment",
            'name: "orchardist-pods" id: "c1"', "-j", "CNI-0f1e2d",
        ],
        ["-F", "CNI-0f1e2d"],
        ["-X", "CNI-0f1e2d"],
    ]  # fmt: skip


def test_kube_rules_to_delete() -> None:
    rules = nodeconf.kube_rules_to_delete(NAT)
    assert rules == [
        [
            "-D",
            "PREROUTING",
            "-m",
            "comment",
            "--comment",
            "kubernetes service portals",
            "-j",
            "KUBE-SERVICES",
        ],
        [
            "-D",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "kubernetes postrouting rules",
            "-j",
            "KUBE-POSTROUTING",
        ],
        ["-F", "KUBE-SERVICES"],
        ["-F", "KUBE-POSTROUTING"],
        ["-X", "KUBE-SERVICES"],
        ["-X", "KUBE-POSTROUTING"],
    ]
    assert nodeconf.kube_rules_to_delete("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n") == []
