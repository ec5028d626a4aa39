"""The pure parts of the simulated Macs' network: names and addresses, route clashes, the choice of a
free subnet, the commands that build and remove a fabric, and the kubeconfig a namespaced agent reads.
(tests/integration/test_netns.py builds real namespaces.)"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from orchardist.dev import netns
from orchardist.dev.netns import Layout, Member

NET = IPv4Network("10.213.77.0/24")
HOST_ROUTES: list[dict[str, Any]] = [
    {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"},
    {"dst": "192.0.2.0/24", "dev": "eth0", "protocol": "kernel"},
    {"dst": "10.213.0.0/24", "dev": "orbr-other"},  # another run's fabric
    {"dst": "10.213.2.128/25", "dev": "cni0"},
]


def test_layout_names_and_addresses() -> None:
    """Tag-derived names; the bridge holds .1, Mac i holds .2+i, in the order given."""
    layout = Layout("ab12", NET)
    assert (layout.bridge, str(layout.host_address)) == ("orbr-ab12", "10.213.77.1")
    assert layout.members(["mac-a", "mac-b"]) == [
        Member("mac-a", "orch-ab12-0", "orv-ab12-0", IPv4Address("10.213.77.2")),
        Member("mac-b", "orch-ab12-1", "orv-ab12-1", IPv4Address("10.213.77.3")),
    ]


@pytest.mark.parametrize(
    ("tag", "subnet", "names", "error"),
    [
        ("toolong7", NET, ["a"], "at most 6"),  # orv-toolong7-999 exceeds the kernel's 15 characters
        ("a-b", NET, ["a"], "letters and digits"),
        ("ab", IPv4Network("10.0.0.0/30"), ["a"], "too small"),
        ("ab", IPv4Network("10.0.0.0/29"), list("abcdef"), "do not fit"),  # 8 - network, bridge, broadcast
        ("ab", NET, ["a", "a"], "repeat"),
    ],
)
def test_layout_refuses(tag: str, subnet: IPv4Network, names: list[str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Layout(tag, subnet).members(names)


def test_the_largest_fleet_a_29_holds() -> None:
    assert [str(m.address) for m in Layout("ab", IPv4Network("10.0.0.0/29")).members(list("abcde"))] == [
        "10.0.0.2",
        "10.0.0.3",
        "10.0.0.4",
        "10.0.0.5",
        "10.0.0.6",
    ]


@pytest.mark.parametrize(
    ("subnet", "own", "expected"),
    [
        ("10.213.77.0/24", "", []),
        ("10.213.0.0/24", "", ["10.213.0.0/24 dev orbr-other"]),
        ("10.213.0.0/24", "orbr-other", []),  # the same fabric being recreated
        ("10.213.2.0/24", "", ["10.213.2.128/25 dev cni0"]),  # partial overlap counts
        ("10.0.0.0/8", "", ["10.213.0.0/24 dev orbr-other", "10.213.2.128/25 dev cni0"]),
        ("192.0.2.0/28", "", ["192.0.2.0/24 dev eth0"]),  # the host's own LAN
    ],
)
def test_clashes(subnet: str, own: str, expected: list[str]) -> None:
    """Any overlapping route clashes, except the default route and the fabric's own bridge."""
    assert netns.clashes(IPv4Network(subnet), HOST_ROUTES, own_bridge=own) == expected


@pytest.mark.parametrize(
    ("start", "expected"),
    [(0, "10.213.1.0/24"), (2, "10.213.3.0/24"), (255, "10.213.255.0/24"), (256, "10.213.1.0/24")],
)
def test_pick_subnet_skips_used_ones(start: int, expected: str) -> None:
    """From the start index, the first /24 of the pool that no route overlaps (wrapping around)."""
    assert netns.pick_subnet(HOST_ROUTES, start=start) == IPv4Network(expected)


def test_pick_subnet_when_all_are_taken() -> None:
    with pytest.raises(netns.SubnetClashError, match="every /24"):
        netns.pick_subnet([{"dst": "10.213.0.0/16", "dev": "x"}])


def test_plan_up() -> None:
    """Bridge with the host address, then per Mac: namespace, veth into the bridge, address, lo,
    default route via the host."""
    layout = Layout("ab12", NET)
    (mac,) = layout.members(["mac-a"])
    assert netns.plan_up(layout, [mac]) == [
        ["ip", "link", "add", "orbr-ab12", "type", "bridge"],
        ["ip", "addr", "add", "10.213.77.1/24", "dev", "orbr-ab12"],
        ["ip", "link", "set", "orbr-ab12", "up"],
        ["ip", "netns", "add", "orch-ab12-0"],
        ["ip", "link", "add", "orv-ab12-0", "type", "veth", "peer", "name", "eth0", "netns", "orch-ab12-0"],
        ["ip", "link", "set", "orv-ab12-0", "master", "orbr-ab12"],
        ["ip", "link", "set", "orv-ab12-0", "up"],
        ["ip", "-n", "orch-ab12-0", "addr", "add", "10.213.77.2/24", "dev", "eth0"],
        ["ip", "-n", "orch-ab12-0", "link", "set", "lo", "up"],
        ["ip", "-n", "orch-ab12-0", "link", "set", "eth0", "up"],
        ["ip", "-n", "orch-ab12-0", "route", "add", "default", "via", "10.213.77.1"],
    ]


@pytest.mark.parametrize(
    ("present_ns", "present_links", "expected"),
    [
        ([], [], []),  # nothing left: nothing to do (teardown is idempotent)
        (
            ["orch-ab12-1", "orch-ab12-0", "orch-ab1-0", "other"],
            ["lo", "eth0", "orbr-ab12", "orbr-ab1"],
            [
                ["ip", "netns", "delete", "orch-ab12-0"],
                ["ip", "netns", "delete", "orch-ab12-1"],
                ["ip", "link", "delete", "orbr-ab12"],
            ],
        ),
        (  # a run killed between creating a veth and moving it: the host side is still there
            [],
            ["orv-ab12-3", "orbr-ab12", "orv-ab1-0"],
            [["ip", "link", "delete", "orv-ab12-3"], ["ip", "link", "delete", "orbr-ab12"]],
        ),
    ],
)
def test_plan_down_removes_only_the_tags_things(
    present_ns: list[str], present_links: list[str], expected: list[list[str]]
) -> None:
    assert netns.plan_down("ab12", present_ns, present_links) == expected


def test_guest_kubeconfig_points_at_the_bridge_and_keeps_the_ca() -> None:
    text = (
        "apiVersion: v1\nkind: Config\nclusters:\n- name: dev\n  cluster:\n"
        "    server: https://127.0.0.1:6443\n    certificate-authority: /s/pki/apiserver.crt\n"
        "users:\n- name: admin\n  user:\n    token: t\n"
    )
    out = netns.guest_kubeconfig(text, "https://10.213.77.1:6443")
    assert "    server: https://10.213.77.1:6443\n    tls-server-name: localhost\n" in out
    assert "certificate-authority: /s/pki/apiserver.crt" in out and "127.0.0.1" not in out
    assert netns.guest_kubeconfig(out, "https://10.213.77.1:6443") == out  # applying twice changes nothing


def test_loopback_fabric_runs_commands_as_they_are() -> None:
    """The fallback: every Mac at 127.0.0.1, commands not wrapped, services on loopback."""
    fab = netns.Fabric(None, {"a": Member("a", "", "", netns.LOOPBACK)}, fallback_reason="not root")
    assert (fab.loopback, fab.host_address, fab.address("a")) == (True, "127.0.0.1", "127.0.0.1")
    assert fab.wrap("a", ["orchardist", "agent"]) == ["orchardist", "agent"]
    layout = Layout("ab12", NET)
    real = netns.Fabric(layout, {m.name: m for m in layout.members(["a"])})
    assert real.wrap("a", ["orchardist"]) == ["ip", "netns", "exec", "orch-ab12-0", "orchardist"]
    assert (real.loopback, real.host_address, real.address("a")) == (False, "10.213.77.1", "10.213.77.2")


def test_without_root_create_falls_back_to_loopback_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """No root: nothing is run, every Mac is 127.0.0.1, and one warning names the reason."""
    from structlog.testing import capture_logs

    monkeypatch.setattr("orchardist.dev.netns.os.geteuid", lambda: 1000)
    monkeypatch.setattr(netns, "_run", lambda *a, **k: pytest.fail(f"ran {a}"))
    with capture_logs() as logs:
        fab = netns.create("ab12", ["mac-a", "mac-b"])
    assert (fab.loopback, fab.fallback_reason) == (True, "not root")
    assert {fab.address("mac-a"), fab.address("mac-b")} == {"127.0.0.1"}
    assert [(e["log_level"], e["reason"]) for e in logs] == [("warning", "not root")]
