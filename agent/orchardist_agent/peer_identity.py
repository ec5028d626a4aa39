"""Who this agent is to the other Macs, and the short-lived token that says so.

Peers authenticate each other with their node identity: the chart's ServiceAccount
``orchardist-agent-<node>``, one per Mac. Never with the token the agent uses against the API
server: a peer that received that one could replay it against the cluster. The agent instead mints
a *peer token*, a TokenRequest for its own ServiceAccount with the audience ``orchardist.io/peers``
and a one-hour life, which the API server itself refuses (wrong audience) and which a peer checks
with a TokenReview (:mod:`.peer_auth`). It is renewed at 80 % of its life and held only in memory.

The identity comes from a SelfSubjectReview (what the API server says the credentials are), not
from flags or naming guesses: credentials of another kind (an administrator's kubeconfig in
development) leave peer transfer off, with the reason said once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from orchardist import log, retry
from orchardist.kube import paths

if TYPE_CHECKING:
    from orchardist.kube import Kube

LOG = log.get(__name__)

#: The audience of peer tokens: the API server refuses them, peers ask for exactly it.
AUDIENCE = "orchardist.io/peers"
SA_USER = "system:serviceaccount:"
AGENT_SA = "orchardist-agent-"
AUTHN = "authentication.k8s.io/v1"
#: Seconds a peer token lives (the API server's floor is 10 minutes; 3607 would be extended).
LIFETIME_S = 3600
#: Share of a token's life after which it is renewed.
RENEW_AT = 0.8


@dataclass(frozen=True)
class AgentIdentity:
    """An agent ServiceAccount: the release namespace it lives in and the node it stands for."""

    namespace: str
    node: str

    @property
    def service_account(self) -> str:
        return AGENT_SA + self.node

    @property
    def username(self) -> str:
        return f"{SA_USER}{self.namespace}:{self.service_account}"


def parse_username(username: str) -> AgentIdentity | None:
    """``system:serviceaccount:<ns>:orchardist-agent-<node>`` -> its parts; anything else None (pure)."""
    if not username.startswith(SA_USER):
        return None
    namespace, sep, name = username.removeprefix(SA_USER).partition(":")
    node = name.removeprefix(AGENT_SA)
    if not sep or not namespace or not name.startswith(AGENT_SA) or not node or ":" in node:
        return None
    return AgentIdentity(namespace, node)


def own_identity(username: str, node: str) -> AgentIdentity | str:
    """This agent's identity from what the API server calls it, or why peer transfer is off (pure)."""
    found = parse_username(username)
    if found is None:
        who = username or "(anonymous)"
        return f"the agent's credentials are {who!r}, not a ServiceAccount {AGENT_SA}<node>"
    if found.node != node:
        return f"the agent's ServiceAccount {found.service_account} is not this node's ({AGENT_SA}{node})"
    return found


async def whoami(kube: Kube) -> str:
    """The username the API server gives this agent's credentials (SelfSubjectReview)."""
    body = {"apiVersion": AUTHN, "kind": "SelfSubjectReview"}
    out = await kube.call("POST", paths.selfsubjectreview(), body)
    user = ((out.get("status") or {}).get("userInfo") or {}).get("username")
    return str(user or "")


async def discover(kube: Kube, node: str, stop: asyncio.Event) -> AgentIdentity | None:
    """This agent's identity, asked until the API server answers or ``stop``; None (said once, with
    the reason) when the credentials are not this node's agent ServiceAccount."""
    from kubernetes.client.exceptions import ApiException

    failures = 0
    while not stop.is_set():
        try:
            found = own_identity(await whoami(kube), node)
        except ApiException as exc:
            if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                LOG.info("peer transfer off", reason=f"SelfSubjectReview refused ({exc.status} {exc.reason})")
                return None
            failures += 1
        except Exception as exc:  # the API server unreachable: asked again
            failures += 1
            LOG.warning("cannot learn the agent's identity; retrying", error=str(exc) or repr(exc))
        else:
            if isinstance(found, str):
                LOG.info("peer transfer off", reason=found)
                return None
            LOG.info("peer identity", username=found.username)
            return found
        if await _stopped(stop, retry.delay(failures)):
            break
    return None


def _stamp(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def granted_life(status: dict[str, Any], created: Any, asked: int) -> float:
    """Seconds the minted token lives: the server's expiry minus its creation stamp (both its own
    clock, so skew to ours does not matter), never more than asked (pure)."""
    end, start = _stamp(status.get("expirationTimestamp")), _stamp(created)
    if end is None or start is None:
        return float(asked)
    return max(0.0, min(float(asked), end - start))


@dataclass(frozen=True)
class _Minted:
    token: str
    expires: float  # on the local monotonic clock
    renew: float


class PeerToken:
    """This Mac's peer token: minted, renewed at :data:`RENEW_AT` of its life, read by each pull."""

    def __init__(
        self,
        kube: Kube,
        identity: AgentIdentity,
        *,
        lifetime: int = LIFETIME_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.identity = identity
        self.lifetime = lifetime
        self.clock = clock
        self._minted: _Minted | None = None

    def current(self) -> str | None:
        """The token to present now; None without a valid one (pulls then use the registry)."""
        minted = self._minted
        return minted.token if minted is not None and self.clock() < minted.expires else None

    async def mint(self) -> None:
        """Ask the API server for a fresh token (TokenRequest on the agent's own ServiceAccount)."""
        body = {
            "apiVersion": AUTHN,
            "kind": "TokenRequest",
            "spec": {"audiences": [AUDIENCE], "expirationSeconds": self.lifetime},
        }
        asked_at = self.clock()
        path = paths.serviceaccount_token(self.identity.namespace, self.identity.service_account)
        out = await self.kube.call("POST", path, body)
        status = out.get("status") or {}
        token = status.get("token")
        if not isinstance(token, str) or not token:
            raise ValueError("the TokenRequest answer holds no token")
        life = granted_life(status, (out.get("metadata") or {}).get("creationTimestamp"), self.lifetime)
        self._minted = _Minted(token, asked_at + life, asked_at + life * RENEW_AT)

    async def run(self, stop: asyncio.Event) -> None:
        """Mint, then renew before expiry until ``stop``; failures retry by the network backoff
        while the current token, if still valid, keeps being used."""
        failures = 0
        while not stop.is_set():
            minted = self._minted
            if failures:
                wait = retry.delay(failures)
            else:
                wait = 0.0 if minted is None else max(0.0, minted.renew - self.clock())
            if wait and await _stopped(stop, wait):
                return
            try:
                await self.mint()
            except Exception as exc:  # the API server unreachable, RBAC, a malformed answer: retried
                failures += 1
                LOG.warning("cannot mint the peer token; retrying", error=str(exc), failures=failures)
                continue
            if failures or minted is None:
                LOG.info("peer token minted", node=self.identity.node, audience=AUDIENCE)
            failures = 0


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stop``; True when stopped."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()
