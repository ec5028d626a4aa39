"""Which other Macs a pull asks for blobs: the controller's hint on the replica.

An agent may read only its own MacNode, so it cannot find the fleet itself; the controller,
which sees every Mac, names the candidates on each replica it creates (the annotation
``orchardist.io/peers``: ``node=address,...``; see ``orchardist.controller.peers``). A hint is
only a hint: every byte a peer sends is verified and a failed peer costs a registry pull, never
a bad blob. All Macs serve on the same port (``--peer-port``): MacNode status has no port field.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import Any

from orchardist.api.constants import GROUP
from orchardist.oci.peering import Claims, Peer
from orchardist.oci.peers import PeerSource

ANNOTATION = f"{GROUP}/peers"


def _host(address: str) -> str | None:
    """An IP literal or a DNS name fit for a URL host, or None (the hint is not trusted blindly)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        name = address.rstrip(".")
        ok = 0 < len(name) <= 253 and all(
            part and len(part) <= 63 and part.replace("-", "").isalnum() for part in name.split(".")
        )
        return name if ok else None
    return f"[{ip}]" if ip.version == 6 else str(ip)


def peers_from_hint(hint: str, me: str, port: int, my_address: str = "") -> list[Peer]:
    """The peers named by the annotation, minus this Mac, malformed entries and any at this Mac's
    own address (Macs sharing loopback in development would ask themselves) (pure)."""
    found: dict[str, Peer] = {}
    for item in hint.split(","):
        name, sep, address = item.strip().partition("=")
        host = _host(address.strip()) if sep else None
        if name and name != me and host is not None and address.strip() != my_address:
            found.setdefault(name, Peer(name, f"http://{host}:{port}"))
    return list(found.values())


def hint_of(metadata: Mapping[str, Any] | None) -> str:
    return str(((metadata or {}).get("annotations") or {}).get(ANNOTATION) or "")


class FleetPeers:
    """This Mac's side of peer transfer: its peer token (read at each request, as it is renewed),
    the port, and what it claims."""

    def __init__(
        self, me: str, port: int, token: Callable[[], str | None], claims: Claims, address: str = ""
    ) -> None:
        self.me = me
        self.address = address
        self.port = port
        self.token = token
        self.claims = claims

    def source(self, hint: str) -> PeerSource | None:
        """The pull's peers from a replica's hint; None when it names none or this Mac holds no
        valid peer token yet (registry only)."""
        peers = peers_from_hint(hint, self.me, self.port, self.address)
        if not peers or self.token() is None:
            return None
        return PeerSource(peers, self.token, name=self.me, claims=self.claims)
