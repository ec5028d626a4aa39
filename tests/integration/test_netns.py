"""Real network namespaces (needs root): Macs on their own addresses reach each other and the host,
a registry on the bridge serves TLS to a Mac, a clash with a route is refused, and teardown (also of
a killed run's leftovers) removes everything. Without root these tests fail: they are the proof."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from orchardist.dev import netns, procs
from orchardist.dev.registry import Registry, make_tls
from tests.fixtures.wait import wait_for

GET = "import sys, urllib.request as u; print(u.urlopen(sys.argv[1], timeout=5).status)"


def leftovers(tag: str) -> list[str]:
    """Namespaces and links of fabric ``tag`` that still exist."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = json.loads(
        subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True).stdout
    )
    names = [line.split()[0] for line in ns.splitlines() if line.strip()] + [x["ifname"] for x in links]
    return [n for n in names if tag in n]


def new_fabric(names: list[str], **kw: object) -> netns.Fabric:
    tag = secrets.token_hex(3)
    subnet = netns.pick_subnet(netns.routes(), start=secrets.randbelow(256))
    return netns.create(tag, names, subnet=subnet, **kw)  # type: ignore[arg-type]


@pytest.fixture
def fabric() -> Iterator[netns.Fabric]:
    reason = netns.unavailable()
    assert reason is None, f"network namespaces are needed here: {reason}"
    fab = new_fabric(["mac-a", "mac-b", "client"], owner_pid=os.getpid())
    try:
        yield fab
    finally:
        fab.remove()


def test_macs_reach_each_other_and_the_host_and_teardown_removes_all(
    fabric: netns.Fabric, tmp_path: Path
) -> None:
    assert fabric.layout is not None
    tag = fabric.layout.tag
    assert sorted(leftovers(tag)) == sorted(
        [m.netns for m in fabric.members.values()]
        + [m.veth for m in fabric.members.values()]
        + [fabric.layout.bridge]
    )
    port = procs.free_port()
    server = subprocess.Popen(
        fabric.wrap("mac-a", [sys.executable, "-m", "http.server", "--bind", "0.0.0.0", str(port)]),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://{fabric.address('mac-a')}:{port}/"

        def answers(argv: list[str]) -> bool:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            return out.returncode == 0 and out.stdout.strip() == "200"

        wait_for(
            lambda: answers([sys.executable, "-c", GET, url]), timeout=20, message=f"{url} from the host"
        )
        assert answers(fabric.wrap("client", [sys.executable, "-c", GET, url]))  # another namespace
        # Inside a Mac, 127.0.0.1 is its own loopback: the server in mac-a is not there for mac-b.
        assert not answers(fabric.wrap("mac-b", [sys.executable, "-c", GET, f"http://127.0.0.1:{port}/"]))
        routes = subprocess.run(
            fabric.wrap("mac-b", ["ip", "-j", "route"]), capture_output=True, text=True, check=True
        )
        default = [r for r in json.loads(routes.stdout) if r["dst"] == "default"]
        assert [r["gateway"] for r in default] == [fabric.host_address]
    finally:
        server.terminate()
        server.wait(10)
    assert fabric.remove() > 0
    assert leftovers(tag) == []
    assert not (netns.RECORDS / f"{tag}.json").exists()
    assert fabric.remove() == 0  # idempotent


def test_registry_on_the_bridge_serves_tls_to_a_mac(fabric: netns.Fabric, tmp_path: Path) -> None:
    """The registry listens on the host's bridge address with a certificate from its own CA; a Mac
    verifies it through SSL_CERT_FILE (what the demo and the fleet give agents and the operator)."""
    tls = make_tls(tmp_path / "tls", fabric.host_address)
    try:
        reg = Registry.start(tmp_path / "reg", bind=fabric.host_address, tls=tls, die_with_parent=True)
    except procs.ProcessError as exc:
        pytest.fail(str(exc))
    try:
        url = f"https://{reg.host}/v2/"
        env = {**os.environ, **reg.client_env()}
        out = subprocess.run(
            fabric.wrap("mac-b", [sys.executable, "-c", GET, url]), capture_output=True, text=True, env=env
        )
        assert (out.returncode, out.stdout.strip()) == (0, "200"), out.stderr
        untrusted = subprocess.run(
            fabric.wrap("mac-b", [sys.executable, "-c", GET, url]), capture_output=True, text=True
        )
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr  # without the CA it is refused
    finally:
        reg.stop()


def test_a_subnet_that_overlaps_a_route_is_refused(fabric: netns.Fabric) -> None:
    assert fabric.layout is not None
    overlapping = IPv4Network(f"{fabric.layout.subnet.network_address}/25")
    tag = secrets.token_hex(3)
    with pytest.raises(netns.SubnetClashError, match=str(fabric.layout.subnet)):
        netns.create(tag, ["x"], subnet=overlapping)
    assert leftovers(tag) == []


def test_sweep_removes_a_fabric_whose_owner_died() -> None:
    """A run killed before its teardown leaves namespaces; the next run's sweep removes them, and
    leaves alone fabrics whose owner lives."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = new_fabric(["m"], owner_pid=owner.pid)
        alive = new_fabric(["m"], owner_pid=os.getpid())
    finally:
        owner.kill()
        owner.wait()
    assert dead.layout is not None and alive.layout is not None
    try:
        removed = netns.sweep()
        assert dead.layout.tag in removed and alive.layout.tag not in removed
        assert leftovers(dead.layout.tag) == []
        assert leftovers(alive.layout.tag) != []
    finally:
        dead.remove()
        alive.remove()


def test_a_recorded_process_runs_in_a_macs_namespace(fabric: netns.Fabric, tmp_path: Path) -> None:
    """``Fabric.enter`` as a child's pre-exec step: the process is in the Mac's namespace and its
    record (pid, start, command line) stays checkable, unlike a process behind ``ip netns exec``."""
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    rec = procs.start("in-a-mac", argv, tmp_path / "in-a-mac.log", before_exec=fabric.enter("mac-a"))
    try:
        assert procs.is_running(rec)
        inside = Path(f"/proc/{rec.pid}/ns/net").stat().st_ino
        assert inside == (netns.NETNS_DIR / fabric.members["mac-a"].netns).stat().st_ino
        assert inside != Path("/proc/self/ns/net").stat().st_ino
    finally:
        assert procs.stop(rec, grace=5)


def _shaper(fabric: netns.Fabric) -> dict[str, Any] | None:
    """The bridge's root queue (kind, rate, bytes sent), or None when it has none of ours."""
    assert fabric.layout is not None
    out = subprocess.run(
        ["tc", "-j", "-s", "qdisc", "show", "dev", fabric.layout.bridge],
        capture_output=True,
        text=True,
        check=True,
    )
    found = [q for q in json.loads(out.stdout) if q.get("kind") == "tbf" and q.get("root")]
    return found[0] if found else None


def test_a_shaped_host_link_carries_the_hosts_traffic_but_not_the_macs(
    fabric: netns.Fabric, tmp_path: Path
) -> None:
    """The registry-across-a-WAN arm of the benchmark: what the host serves crosses the cap, what one
    Mac sends another (bridged between ports) does not."""
    (tmp_path / "blob").write_bytes(os.urandom(4 << 20))
    fabric.limit_host_egress("200mbit")
    shaper = _shaper(fabric)
    assert shaper is not None and shaper["options"]["rate"] == 25_000_000
    port = procs.free_port()
    servers = [
        subprocess.Popen(
            [*argv, sys.executable, "-m", "http.server", "--bind", address, str(port)],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for argv, address in (([], fabric.host_address), (fabric.wrap("mac-a", []), "0.0.0.0"))
    ]
    try:
        fetch = "import sys, urllib.request as u; print(len(u.urlopen(sys.argv[1], timeout=20).read()))"

        def fetched(url: str) -> bool:
            out = subprocess.run(
                fabric.wrap("mac-b", [sys.executable, "-c", fetch, url]), capture_output=True, text=True
            )
            return out.returncode == 0 and out.stdout.strip() == str(4 << 20)

        def sent() -> int:
            found = _shaper(fabric)
            assert found is not None
            return int(found["bytes"])

        before = sent()
        wait_for(
            lambda: fetched(f"http://{fabric.address('mac-a')}:{port}/blob"),
            timeout=20,
            message="mac-a's server",
        )
        assert sent() - before < 1 << 20  # 4 MiB from one Mac to another: not through the cap
        before = sent()
        wait_for(
            lambda: fetched(f"http://{fabric.host_address}:{port}/blob"),
            timeout=20,
            message="the host's server",
        )
        assert sent() - before >= 4 << 20  # the host's answer crossed it
    finally:
        for s in servers:
            s.terminate()
            s.wait(10)
    fabric.limit_host_egress(None)
    assert _shaper(fabric) is None
