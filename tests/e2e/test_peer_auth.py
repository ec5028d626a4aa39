"""Peers authenticate with their node identity, on the real apiserver with the chart installed.

Mac A's peer server checks callers with a TokenReview made with A's own chart token (so the chart's
agent RBAC suffices and the authorization webhook lets it through); Mac B presents a peer token it
minted for its own ServiceAccount. Hostile callers: no token, garbage, B's API token (the API
server's audience), a peers-audience token of a ServiceAccount that is not an agent, one of an
agent-named ServiceAccount in another namespace, one of a deleted Mac. One token costs one
TokenReview however often it is presented; with the API server unreachable a known caller is
still served and an unknown one is told to come back (503).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from orchardist.dev import procs
from orchardist.dev.cluster import Cluster
from orchardist.kube import Kube, api_client
from orchardist.oci.peering import BLOB_PATH, Claims
from orchardist_agent.peer_auth import TokenReviewer
from orchardist_agent.peer_identity import AUDIENCE, AgentIdentity, PeerToken, discover
from orchardist_agent.peer_server import PeerServer
from tests.e2e.test_agent_identity import Agent

CHART = Path(__file__).resolve().parents[2] / "charts" / "orchardist"
SYSTEM_NS = "orchardist-system"
RELEASE = "peerauth"
A, B, C = "mac-p-a", "mac-p-b", "mac-p-c"
ELSEWHERE = "peerauth-elsewhere"
INTRUDER = "peerauth-intruder"
BLOB = b"weights" * 1000
DIGEST = "sha256:" + "ab" * 32

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def chart(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Agent]]:
    """The chart with three Macs, a ServiceAccount that is no agent beside them, and one named like
    an agent in another namespace; kubeconfigs holding A's and B's chart tokens."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "files" / "kopf"))
    cluster.helm(
        "install", RELEASE, str(CHART), "-n", SYSTEM_NS, "--create-namespace",
        "--set", "crds.enabled=false", "--set", f"agents.nodes={{{A},{B},{C}}}",
    )  # fmt: skip
    cluster.kubectl("create", "serviceaccount", INTRUDER, "-n", SYSTEM_NS)
    cluster.kubectl("create", "namespace", ELSEWHERE)
    cluster.kubectl("create", "serviceaccount", f"orchardist-agent-{B}", "-n", ELSEWHERE)
    try:
        directory = tmp_path_factory.mktemp("peerauth")
        yield {node: Agent(cluster, node, directory) for node in (A, B)}
    finally:
        cluster.helm("uninstall", RELEASE, "-n", SYSTEM_NS, check=False)
        cluster.kubectl(
            "delete", "serviceaccount", INTRUDER, "-n", SYSTEM_NS, "--ignore-not-found", check=False
        )
        cluster.kubectl("delete", "namespace", ELSEWHERE, "--wait=false", "--ignore-not-found", check=False)


@dataclass
class Served:
    """Mac A's peer server and its verifier, and where to ask it."""

    server: PeerServer
    verify: TokenReviewer
    url: str

    async def status(self, token: str | None) -> tuple[int, str | None]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with aiohttp.ClientSession() as s, s.head(self.url, headers=headers) as r:
            return r.status, r.headers.get("Retry-After")


@pytest.fixture
async def served(chart: dict[str, Agent], tmp_path: Path) -> AsyncIterator[Served]:
    """A's peer server holding one blob, its verifier asking the API server with A's own token."""
    blob = tmp_path / "blob"
    blob.write_bytes(BLOB)
    kube = Kube(api_client(chart[A].kubeconfig))
    identity = await discover(kube, A, asyncio.Event())
    assert identity == AgentIdentity(SYSTEM_NS, A)
    verify = TokenReviewer(kube, identity.namespace)
    server = PeerServer(verify, lambda _: blob, lambda d: len(BLOB) if d == DIGEST else None, Claims())
    port = await server.start("127.0.0.1", 0)
    try:
        yield Served(server, verify, f"http://127.0.0.1:{port}{BLOB_PATH}{DIGEST}")
    finally:
        await server.close()


async def peer_token(agent: Agent, node: str) -> str:
    """A peer token as the agent mints it: with its own chart token, for its own ServiceAccount."""
    token = PeerToken(Kube(api_client(agent.kubeconfig)), AgentIdentity(SYSTEM_NS, node))
    await token.mint()
    current = token.current()
    assert current is not None
    return current


def minted(cluster: Cluster, account: str, namespace: str = SYSTEM_NS, *audience: str) -> str:
    args = [a for aud in audience for a in ("--audience", aud)]
    return cluster.kubectl("create", "token", account, "-n", namespace, *args).stdout.strip()


async def test_only_the_fleets_agents_are_served(
    cluster: Cluster, chart: dict[str, Agent], served: Served
) -> None:
    hostile = {
        "no token": None,
        "garbage": "garbage",
        "a JWT of nobody": "eyJhbGciOiJub25lIn0.eyJhdWQiOlsib3JjaGFyZGlzdC5pby9wZWVycyJdfQ.eA",
        "B's API token": minted(cluster, f"orchardist-agent-{B}"),
        "B's token for another audience": minted(cluster, f"orchardist-agent-{B}", SYSTEM_NS, "https://x"),
    }
    for what, token in hostile.items():
        assert await served.status(token) == (401, None), what
    not_agents = {
        "a ServiceAccount that is no agent": minted(cluster, INTRUDER, SYSTEM_NS, AUDIENCE),
        "an agent's name in another namespace": minted(cluster, f"orchardist-agent-{B}", ELSEWHERE, AUDIENCE),
    }
    for what, token in not_agents.items():
        assert await served.status(token) == (403, None), what

    with capture_logs() as logs:
        token = await peer_token(chart[B], B)
        before = served.verify.reviews
        assert [(await served.status(token))[0] for _ in range(25)] == [200] * 25
        assert served.verify.reviews - before == 1  # one TokenReview for 25 requests
    assert [e["node"] for e in logs if e["event"] == "peer authenticated"] == [B]
    async with (
        aiohttp.ClientSession() as s,
        s.get(served.url, headers={"Authorization": f"Bearer {token}", "Range": "bytes=7-13"}) as r,
    ):
        assert (r.status, await r.read()) == (206, BLOB[7:14])


async def test_a_deleted_macs_token_is_refused(cluster: Cluster, served: Served) -> None:
    """Cutting a Mac off (its ServiceAccount deleted) voids its peer tokens for servers that have
    not seen them; one that has keeps it at most the cache's cap (10 min)."""
    token = minted(cluster, f"orchardist-agent-{C}", SYSTEM_NS, AUDIENCE)
    cluster.kubectl("delete", "serviceaccount", f"orchardist-agent-{C}", "-n", SYSTEM_NS)
    assert await served.status(token) == (401, None)


async def test_with_the_api_server_unreachable_known_callers_are_served(
    chart: dict[str, Agent], served: Served, tmp_path: Path
) -> None:
    known, unknown = await peer_token(chart[B], B), await peer_token(chart[B], B)
    assert known != unknown
    assert (await served.status(known))[0] == 200
    nowhere = json.loads(chart[A].kubeconfig.read_text())
    nowhere["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{procs.free_port()}"  # nothing listens
    dead = tmp_path / "dead.kubeconfig"
    dead.write_text(json.dumps(nowhere))
    served.verify.kube = Kube(api_client(dead))
    assert await served.status(known) == (200, None)
    assert await served.status(unknown) == (503, "5")


async def test_other_credentials_leave_peer_transfer_off(cluster: Cluster) -> None:
    with capture_logs() as logs:
        assert await discover(Kube(api_client(cluster.kubeconfig)), A, asyncio.Event()) is None
    [off] = [e for e in logs if e["event"] == "peer transfer off"]
    assert "'admin', not a ServiceAccount orchardist-agent-<node>" in off["reason"]
