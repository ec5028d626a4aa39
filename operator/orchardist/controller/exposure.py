"""Exposure of one ModelDeployment: a Service without selector and EndpointSlices of its ready replicas. Pure.

The controller writes the EndpointSlices itself (the Service has no selector: replicas are not Pods),
one per port, listing the ready replicas whose endpoint an IPv4 slice accepts. Each desired object is
compared with what is, so a second reconcile writes nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from orchardist.api.constants import API_VERSION, LABEL_DEPLOYMENT
from orchardist.controller.world import (
    LABEL_MANAGED_BY,
    MANAGED_BY,
    SERVICE_NAME_LABEL,
    SLICE_MANAGED_BY,
    Observed,
    Replica,
    owner_reference,
    service_name,
)


def split_endpoint(endpoint: str | None) -> tuple[str, int] | None:
    """``"10.0.0.5:8001"`` -> ("10.0.0.5", 8001); None for what an IPv4 EndpointSlice refuses.

    The API server rejects loopback, link-local, multicast and unspecified addresses in slices, so a
    replica reporting one cannot be served through the Service (and is left out instead of failing
    the whole slice).
    """
    if not endpoint or ":" not in endpoint:
        return None
    host, _, port = endpoint.rpartition(":")
    try:
        ip = ipaddress.IPv4Address(host)
        number = int(port)
    except ValueError:
        return None
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return None
    return (host, number) if 0 < number < 65536 else None


def exposure(
    obs: Observed, live: Sequence[Replica]
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], list[str]]:
    svc_name = service_name(obs)
    labels = {LABEL_DEPLOYMENT: obs.name, LABEL_MANAGED_BY: MANAGED_BY}
    desired_svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": svc_name,
            "namespace": obs.namespace,
            "labels": labels,
            "ownerReferences": [owner_reference(obs)],
        },
        "spec": {"ports": [{"name": "http", "port": obs.spec.service.port, "protocol": "TCP"}]},
    }
    service = None if _service_same(obs.service, desired_svc) else desired_svc

    by_port: dict[int, list[tuple[str, Replica]]] = {}
    for r in sorted(live, key=lambda r: r.name):
        hp = split_endpoint(r.endpoint) if r.ready else None
        if hp:
            by_port.setdefault(hp[1], []).append((hp[0], r))
    ports = sorted(by_port) or [0]
    wanted: list[dict[str, Any]] = []
    for i, port in enumerate(ports):
        name = svc_name if i == 0 else f"{svc_name}-{port}"
        wanted.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": name,
                    "namespace": obs.namespace,
                    "labels": {**labels, SERVICE_NAME_LABEL: svc_name, SLICE_MANAGED_BY: MANAGED_BY},
                    "ownerReferences": [owner_reference(obs)],
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": port, "protocol": "TCP"}] if port else [],
                "endpoints": [
                    {
                        "addresses": [addr],
                        "conditions": {"ready": True, "serving": True, "terminating": False},
                        "targetRef": {
                            "kind": "ModelReplica",
                            "apiVersion": API_VERSION,
                            "name": r.name,
                            "namespace": obs.namespace,
                        },
                    }
                    for addr, r in by_port.get(port, [])
                ],
            }
        )
    existing = {str(s["metadata"]["name"]): s for s in obs.slices}
    changed = [w for w in wanted if not _slice_same(existing.get(w["metadata"]["name"]), w)]
    keep = {w["metadata"]["name"] for w in wanted}
    stale = sorted(n for n in existing if n not in keep)
    return service, changed, stale


def _service_same(have: Mapping[str, Any] | None, want: Mapping[str, Any]) -> bool:
    if have is None:
        return False
    ports = [
        {k: p.get(k) for k in ("name", "port", "protocol")}
        for p in (have.get("spec") or {}).get("ports") or ()
    ]
    labels = (have.get("metadata") or {}).get("labels") or {}
    return ports == want["spec"]["ports"] and all(
        labels.get(k) == v for k, v in want["metadata"]["labels"].items()
    )


def _slice_same(have: Mapping[str, Any] | None, want: Mapping[str, Any]) -> bool:
    if have is None:
        return False

    def norm_eps(eps: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted(
            (
                tuple(e.get("addresses") or ()),
                bool((e.get("conditions") or {}).get("ready")),
                ((e.get("targetRef") or {}).get("name")),
            )
            for e in eps
        )

    have_ports = [{k: p.get(k) for k in ("name", "port", "protocol")} for p in have.get("ports") or ()]
    labels = (have.get("metadata") or {}).get("labels") or {}
    return (
        have_ports == want["ports"]
        and norm_eps(have.get("endpoints") or ()) == norm_eps(want["endpoints"])
        and all(labels.get(k) == v for k, v in want["metadata"]["labels"].items())
    )
