"""Simulated Macs on their own addresses: a bridge on a private subnet, one network namespace per Mac.

A fleet of Macs on one Linux machine would otherwise share 127.0.0.1, an address no EndpointSlice
may hold and no other machine can reach. Here each Mac (its agent and the engines it starts, which
inherit the namespace) gets a namespace with a veth into a bridge the project creates, an address
on a private /24, loopback up and a default route via the bridge's host address, where the host's
services (apiserver, registry) answer. This is the one module that changes the host's network; it
drives iproute2's ``ip`` through subprocess. The plans (subnet math, clash checks, the commands
to run) are pure and tested as tables; :class:`Fabric` runs them.

Every name carries the fabric's tag (``orbr-<tag>``, ``orch-<tag>-<i>``, ``orv-<tag>-<i>``), so
teardown finds what a killed run left by listing, with or without a record. A record under
:data:`RECORDS` names the owning process (tests): :func:`sweep` removes fabrics whose owner died.
Without root or network namespaces, :func:`create` falls back to loopback and says why.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from orchardist import log, processes

_log = log.get(__name__)

#: The dev fabric's subnet unless ``$ORCHARDIST_DEV_SUBNET`` names another (a private /24 that
#: home and office networks rarely use).
DEFAULT_SUBNET = IPv4Network("10.213.77.0/24")
SUBNET_ENV = "ORCHARDIST_DEV_SUBNET"
#: Where tests pick a free /24 for each run (several runs may share a machine).
TEST_POOL = IPv4Network("10.213.0.0/16")
#: Records of live fabrics (tag, subnet, owning process).
RECORDS = Path("/run/orchardist-net")
LOOPBACK = IPv4Address("127.0.0.1")
NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts a named namespace
_CLONE_NEWNET = 0x40000000
_IFNAMSIZ = 15  # the kernel's limit on an interface name


class NetnsError(RuntimeError):
    """A command that changes the host's network failed; the message has the command and stderr."""


class SubnetClashError(NetnsError):
    """The chosen subnet overlaps a route the host already has."""


# ---- pure: names, addresses, plans --------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One simulated Mac: its name, namespace, host-side veth and address (loopback in fallback)."""

    name: str
    netns: str
    veth: str
    address: IPv4Address


@dataclass(frozen=True)
class Layout:
    """Where a fabric's things are: tag-derived names and the addresses of a subnet."""

    tag: str
    subnet: IPv4Network

    def __post_init__(self) -> None:
        if not self.tag.isalnum() or len(f"orv-{self.tag}-999") > _IFNAMSIZ:
            raise ValueError(f"fabric tag {self.tag!r}: letters and digits, at most 6 of them")
        if self.subnet.prefixlen > 29:
            raise ValueError(f"subnet {self.subnet} is too small for a bridge and a Mac")

    @property
    def bridge(self) -> str:
        return f"orbr-{self.tag}"

    @property
    def host_address(self) -> IPv4Address:
        """The bridge's address: where the Macs reach the host's services."""
        return self.subnet.network_address + 1

    @property
    def netns_prefix(self) -> str:
        return f"orch-{self.tag}-"

    @property
    def veth_prefix(self) -> str:
        return f"orv-{self.tag}-"

    def members(self, names: Sequence[str]) -> list[Member]:
        """Members 0..n-1 at the host address + 1 + i; refuses more than the subnet holds."""
        room = self.subnet.num_addresses - 3  # network, host (bridge) and broadcast
        if len(names) > room:
            raise ValueError(f"{len(names)} Macs do not fit in {self.subnet} (room for {room})")
        if len(set(names)) != len(names):
            raise ValueError(f"Mac names repeat: {list(names)}")
        return [
            Member(n, f"{self.netns_prefix}{i}", f"{self.veth_prefix}{i}", self.host_address + 1 + i)
            for i, n in enumerate(names)
        ]


def clashes(subnet: IPv4Network, routes: Iterable[dict[str, Any]], *, own_bridge: str = "") -> list[str]:
    """Routes (``ip -j route`` objects) that overlap ``subnet``, described; the default route and
    routes through ``own_bridge`` (a fabric of the same tag being recreated) do not count."""
    found = []
    for r in routes:
        dst = str(r.get("dst", ""))
        if dst in ("", "default") or r.get("dev") == own_bridge:
            continue
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if isinstance(net, IPv4Network) and net.overlaps(subnet):
            found.append(f"{dst} dev {r.get('dev', '?')}")
    return found


def pick_subnet(
    routes: Sequence[dict[str, Any]], *, pool: IPv4Network = TEST_POOL, start: int = 0
) -> IPv4Network:
    """The first /24 of ``pool`` (from index ``start``, wrapping) that no route overlaps."""
    nets = list(pool.subnets(new_prefix=24))
    for k in range(len(nets)):
        net = nets[(start + k) % len(nets)]
        if not clashes(net, routes):
            return net
    raise SubnetClashError(f"every /24 of {pool} overlaps a route of this host")


def plan_up(layout: Layout, members: Sequence[Member]) -> list[list[str]]:
    """The ``ip`` commands that build the bridge and one namespace per member, in order."""
    prefix = layout.subnet.prefixlen
    br = layout.bridge
    cmds = [
        ["ip", "link", "add", br, "type", "bridge"],
        ["ip", "addr", "add", f"{layout.host_address}/{prefix}", "dev", br],
        ["ip", "link", "set", br, "up"],
    ]
    for m in members:
        cmds += [
            ["ip", "netns", "add", m.netns],
            ["ip", "link", "add", m.veth, "type", "veth", "peer", "name", "eth0", "netns", m.netns],
            ["ip", "link", "set", m.veth, "master", br],
            ["ip", "link", "set", m.veth, "up"],
            ["ip", "-n", m.netns, "addr", "add", f"{m.address}/{prefix}", "dev", "eth0"],
            ["ip", "-n", m.netns, "link", "set", "lo", "up"],
            ["ip", "-n", m.netns, "link", "set", "eth0", "up"],
            ["ip", "-n", m.netns, "route", "add", "default", "via", str(layout.host_address)],
        ]
    return cmds


def plan_down(tag: str, netns: Iterable[str], links: Iterable[str]) -> list[list[str]]:
    """The commands that remove every namespace and link of fabric ``tag`` among those listed.

    Deleting a namespace deletes the veth pair inside it; a host-side veth left by a run killed
    between two steps and the bridge go last.
    """
    layout_ns, layout_veth, bridge = f"orch-{tag}-", f"orv-{tag}-", f"orbr-{tag}"
    cmds = [["ip", "netns", "delete", n] for n in sorted(netns) if n.startswith(layout_ns)]
    cmds += [["ip", "link", "delete", x] for x in sorted(links) if x.startswith(layout_veth)]
    if bridge in links:
        cmds.append(["ip", "link", "delete", bridge])
    return cmds


def guest_kubeconfig(text: str, server: str, *, tls_server_name: str = "localhost") -> str:
    """A kubeconfig (YAML text written by the dev cluster) whose server is ``server``.

    The apiserver's self-signed certificate names ``localhost`` but not the bridge address, so a
    Mac in a namespace verifies it under that name (``tls-server-name``): the CA check still holds.
    """
    out = []
    for line in text.splitlines():
        key = line.strip()
        if key.startswith("server:"):
            indent = line[: len(line) - len(line.lstrip())]
            out += [f"{indent}server: {server}", f"{indent}tls-server-name: {tls_server_name}"]
        elif not key.startswith("tls-server-name:"):
            out.append(line)
    return "\n".join(out) + "\n"


# ---- acting --------------------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _run(cmd: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed (exit {out.returncode}): {out.stderr.strip()}")
    return out


def routes() -> list[dict[str, Any]]:
    """The host's IPv4 routes (``ip -j route``)."""
    data: list[dict[str, Any]] = json.loads(_ip("-j", "route").stdout or "[]")
    return data


def _listing() -> tuple[list[str], list[str]]:
    ns = [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]
    links = [str(x["ifname"]) for x in json.loads(_ip("-j", "link", "show").stdout or "[]")]
    return ns, links


def unavailable() -> str | None:
    """Why namespaces cannot be used here (None when they can): root, ``ip``, and a trial namespace."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    trial = f"orch-trial-{os.getpid()}"
    made = _ip("netns", "add", trial, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "delete", trial, check=False)
    return None


def teardown(tag: str) -> int:
    """Remove fabric ``tag`` (whatever of it exists) and its record; the count of things removed."""
    ns, links = _listing()
    cmds = plan_down(tag, ns, links)
    for cmd in cmds:
        _run(cmd, check=False)  # idempotent: a veth may have gone with its namespace already
    (RECORDS / f"{tag}.json").unlink(missing_ok=True)
    if cmds:
        _log.info("network fabric removed", tag=tag, removed=len(cmds))
    return len(cmds)


def sweep() -> list[str]:
    """Remove fabrics whose recorded owner process is gone (runs killed before their teardown)."""
    removed = []
    for rec in sorted(RECORDS.glob("*.json")) if RECORDS.is_dir() else []:
        try:
            owner = json.loads(rec.read_text()).get("owner")
        except (OSError, ValueError):
            owner = None
        if owner is None:
            continue  # `dev up`'s fabric lives until `dev down`
        ident = processes.Identity(int(owner["pid"]), str(owner["started"]), str(owner["digest"]))
        if not processes.same(ident):
            teardown(rec.stem)
            removed.append(rec.stem)
    return removed


@dataclass
class Fabric:
    """A built fabric (or its loopback stand-in): where each Mac lives and how to run in it."""

    layout: Layout | None  # None: loopback fallback
    members: dict[str, Member] = field(default_factory=dict)
    fallback_reason: str = ""

    @property
    def loopback(self) -> bool:
        return self.layout is None

    @property
    def host_address(self) -> str:
        """Where a Mac reaches the host's services."""
        return str(self.layout.host_address) if self.layout else str(LOOPBACK)

    def address(self, name: str) -> str:
        return str(self.members[name].address)

    def wrap(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside Mac ``name``'s namespace (``ip netns exec`` keeps the pid)."""
        if self.layout is None:
            return list(argv)
        return ["ip", "netns", "exec", self.members[name].netns, *argv]

    def enter(self, name: str) -> Callable[[], None] | None:
        """A function that moves the calling process into Mac ``name``'s namespace: a child's
        ``preexec_fn``, for a process whose record must show its own command line (``wrap``'s
        ``ip netns exec`` execs, so the line first seen is ``ip``'s). None on loopback."""
        if self.layout is None:
            return None
        path = str(NETNS_DIR / self.members[name].netns)

        def enter() -> None:  # runs in the child between fork and exec
            import ctypes

            fd = os.open(path, os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {path}")
            finally:
                os.close(fd)

        return enter

    def limit_host_egress(self, rate: str | None) -> None:
        """Cap what the host's services send to the Macs at ``rate`` (tc's form, e.g. ``1gbit``),
        or lift the cap (None): a registry across a WAN link. The queue sits on the bridge's own
        device, which carries only traffic the host sends; Mac-to-Mac traffic is bridged between
        ports and never crosses it, so the Macs keep their LAN speed among themselves."""
        if self.layout is None:
            raise NetnsError("a link can be shaped only between network namespaces")
        br = self.layout.bridge
        _run(["tc", "qdisc", "del", "dev", br, "root"], check=False)
        if rate is not None:
            _run(
                [
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    br,
                    "root",
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    "1mb",
                    "latency",
                    "100ms",
                ]
            )

    def remove(self) -> int:
        return teardown(self.layout.tag) if self.layout else 0


def create(
    tag: str,
    names: Sequence[str],
    *,
    subnet: IPv4Network | None = None,
    owner_pid: int | None = None,
) -> Fabric:
    """Build fabric ``tag`` for Macs ``names`` (after removing any leftover of the same tag).

    ``subnet``: default ``$ORCHARDIST_DEV_SUBNET`` or :data:`DEFAULT_SUBNET`; a clash with a route
    of the host is refused. ``owner_pid``: the process whose death lets :func:`sweep` remove it.
    Without root or namespace support the Macs share loopback, and one log line says so.
    """
    reason = unavailable()
    if reason is not None:
        _log.warning("network namespaces unavailable; simulated Macs share loopback", reason=reason)
        shared = {n: Member(n, "", "", LOOPBACK) for n in names}
        return Fabric(None, shared, fallback_reason=reason)
    chosen = subnet or IPv4Network(os.environ.get(SUBNET_ENV) or str(DEFAULT_SUBNET))
    layout = Layout(tag, chosen)
    teardown(tag)
    clash = clashes(chosen, routes(), own_bridge=layout.bridge)
    if clash:
        raise SubnetClashError(
            f"subnet {chosen} overlaps this host's route(s) {', '.join(clash)}; "
            f"choose another private /24 with ${SUBNET_ENV}"
        )
    members = layout.members(names)
    RECORDS.mkdir(parents=True, exist_ok=True)
    owner = processes.identify(owner_pid) if owner_pid else None
    record = {"tag": tag, "subnet": str(chosen), "owner": asdict(owner) if owner else None}
    (RECORDS / f"{tag}.json").write_text(json.dumps(record))
    try:
        for cmd in plan_up(layout, members):
            _run(cmd)
    except NetnsError:
        teardown(tag)
        raise
    _log.info(
        "network fabric up", tag=tag, subnet=str(chosen), macs={m.name: str(m.address) for m in members}
    )
    return Fabric(layout, {m.name: m for m in members})


__all__ = [
    "DEFAULT_SUBNET",
    "SUBNET_ENV",
    "Fabric",
    "Layout",
    "Member",
    "NetnsError",
    "SubnetClashError",
    "clashes",
    "create",
    "guest_kubeconfig",
    "pick_subnet",
    "plan_down",
    "plan_up",
    "sweep",
    "teardown",
    "unavailable",
]
