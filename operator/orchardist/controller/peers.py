"""Which Macs a new replica's agent may take its model's blobs from (pure).

The controller sees every MacNode; an agent may read only its own (the authorization webhook).
So the controller names the candidates on each replica it creates, in the annotation
:data:`ANNOTATION` (``node=address,...``): the Ready Macs that hold the model, and those bound
to another replica of the same revision (same digest), which are pulling it now or hold it. The
agents of replicas created together see each other there and agree which one pulls from the
registry (:func:`orchardist.oci.peering.choose`). An annotation, not spec: the hint changes
neither the replica's generation nor its revision, and it is only ever a hint (the agent
verifies every byte and falls back to the registry).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from orchardist.api.constants import GROUP
from orchardist.controller.scheduler import Mac

ANNOTATION = f"{GROUP}/peers"
MAX_PEERS = 16  # enough sources for parallel ranges; keeps the annotation small


def candidates(digest: str, node: str, macs: Mapping[str, Mac], sharing: Iterable[str]) -> list[Mac]:
    """Ready Macs with an address (not ``node``'s), other than ``node``, that hold ``digest`` or are
    in ``sharing``."""
    share = set(sharing)
    own = macs[node].address if node in macs else ""  # Macs sharing an address (loopback) skip each other
    found = [
        m
        for m in macs.values()
        if m.name != node
        and m.ready
        and m.address
        and m.address != own
        and (digest in m.cached or m.name in share)
    ]
    # Macs that hold it first (they can serve at once), then by name: a stable annotation.
    found.sort(key=lambda m: (digest not in m.cached, m.name))
    return found[:MAX_PEERS]


def hint(macs: Iterable[Mac]) -> str:
    """The annotation's value: ``node=address`` pairs, comma-separated."""
    return ",".join(f"{m.name}={m.address}" for m in macs)


def annotate(
    bodies: list[dict[str, Any]], digest: str, macs: Mapping[str, Mac], existing_nodes: Iterable[str]
) -> None:
    """Put the hint on each replica body to create (the others being created count as sharing)."""
    sharing = {*existing_nodes, *(str(b["spec"]["nodeName"]) for b in bodies)}
    for body in bodies:
        found = candidates(digest, str(body["spec"]["nodeName"]), macs, sharing)
        if found:
            body["metadata"].setdefault("annotations", {})[ANNOTATION] = hint(found)
