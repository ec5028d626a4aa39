"""The controller's one Kubernetes adapter: raw-JSON calls for what a reconcile plan asks.

Reads of MacNodes, Leases, ModelReplicas and ModelDeployments come from kopf's watches (indexes);
this module writes (replicas, Service, EndpointSlices, status), reads the few things kopf does not
watch (Service, EndpointSlices, pull Secrets) and sets up peering. Every call is blocking and made
through ``asyncio.to_thread``. "Already exists" on create and "not found" on delete are success:
a plan may be executed twice (rule: idempotent, any process may die at any moment).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from orchardist import log
from orchardist.api.constants import GROUP, VERSION
from orchardist.controller.plan import LOST, MANAGED_BY, SERVICE_NAME_LABEL, SLICE_MANAGED_BY, Plan
from orchardist.kube import JSON, MERGE_PATCH, RawApi

PEERING_CRDS = Path(__file__).with_name("kopf-peering.yaml")
LOG = log.get(__name__)


def is_status(exc: BaseException, *codes: int) -> bool:
    return isinstance(exc, ApiException) and exc.status in codes


class Kube:
    """Async, idempotent calls over the shared blocking adapter (each runs in a thread)."""

    def __init__(self, api: ApiClient, timeout: float = 30.0) -> None:
        self.raw = RawApi(api, timeout)

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: Mapping[str, str | int] | None = None,
    ) -> JSON:
        out: JSON = await asyncio.to_thread(
            self.raw.request, method, path, query=query, body=body, content_type=content_type
        )
        return out

    async def get(self, path: str, **query: str | int) -> JSON | None:
        try:
            return await self.call("GET", path, query=query)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, path: str, body: JSON) -> bool:
        """Create; False when it already exists."""
        try:
            await self.call("POST", path, body)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise

    async def delete(self, path: str) -> None:
        try:
            await self.call("DELETE", path, {"propagationPolicy": "Background"})
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def merge_patch(self, path: str, body: JSON) -> JSON:
        return await self.call("PATCH", path, body, content_type=MERGE_PATCH)


def md_path(namespace: str, name: str = "") -> str:
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/modeldeployments"
    return f"{base}/{name}" if name else base


def replica_path(namespace: str, name: str = "") -> str:
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/modelreplicas"
    return f"{base}/{name}" if name else base


def service_path(namespace: str, name: str = "") -> str:
    base = f"/api/v1/namespaces/{namespace}/services"
    return f"{base}/{name}" if name else base


def slice_path(namespace: str, name: str = "") -> str:
    base = f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
    return f"{base}/{name}" if name else base


class Adapter:
    """What a reconcile reads from and writes to the API server."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    async def service(self, namespace: str, name: str) -> JSON | None:
        return await self.kube.get(service_path(namespace, name))

    async def slices(self, namespace: str, service: str) -> list[JSON]:
        found = await self.kube.get(
            slice_path(namespace),
            labelSelector=f"{SERVICE_NAME_LABEL}={service},{SLICE_MANAGED_BY}={MANAGED_BY}",
        )
        return list((found or {}).get("items") or [])

    async def secret_data(self, namespace: str, name: str) -> dict[str, str]:
        found = await self.kube.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
        return dict((found or {}).get("data") or {})

    async def execute(
        self, namespace: str, name: str, uid: str, plan: Plan, service: JSON | None
    ) -> list[str]:
        """Carry out a plan; returns the names of the replicas created (for the in-memory overlay)."""
        created = await self.create_replicas(namespace, plan)
        await self.finish(namespace, name, uid, plan, service)
        return created

    async def create_replicas(self, namespace: str, plan: Plan) -> list[str]:
        """The plan's new replicas, created concurrently; returns the names that were new."""

        async def one(body: JSON) -> str | None:
            return (
                str(body["metadata"]["name"])
                if await self.kube.create(replica_path(namespace), body)
                else None
            )

        made = await asyncio.gather(*(one(b) for b in plan.create))
        return [n for n in made if n is not None]

    async def finish(self, namespace: str, name: str, uid: str, plan: Plan, service: JSON | None) -> None:
        """Everything in the plan but the creations: marks, deletions, Service, slices, status."""
        for replica, on in plan.mark:
            patch = {
                "metadata": {"annotations": {LOST: "replaced while its Mac was NotReady" if on else None}}
            }
            try:
                await self.kube.merge_patch(replica_path(namespace, replica), patch)
            except ApiException as exc:
                if exc.status != 404:
                    raise
        for replica, why in plan.delete:
            LOG.info("deleting replica", namespace=namespace, replica=replica, why=why)
            await self.kube.delete(replica_path(namespace, replica))
        if plan.service is not None:
            await self._service(namespace, uid, plan.service, service)
        for sl in plan.slices:
            slname = sl["metadata"]["name"]
            if not await self.kube.create(slice_path(namespace), sl):
                await self.kube.call(
                    "PUT", slice_path(namespace, slname), await self._with_version(namespace, sl)
                )
        for slname in plan.delete_slices:
            await self.kube.delete(slice_path(namespace, slname))
        if plan.status is not None:
            await self.kube.merge_patch(md_path(namespace, name) + "/status", {"status": plan.status})

    async def _with_version(self, namespace: str, sl: JSON) -> JSON:
        have = await self.kube.get(slice_path(namespace, sl["metadata"]["name"])) or {}
        version = (have.get("metadata") or {}).get("resourceVersion")
        return {**sl, "metadata": {**sl["metadata"], "resourceVersion": version}}

    async def _service(self, namespace: str, uid: str, want: JSON, have: JSON | None) -> None:
        if have is None:
            if await self.kube.create(service_path(namespace), want):
                return
            have = await self.service(namespace, want["metadata"]["name"])
            if have is None:
                return
        owners = (have.get("metadata") or {}).get("ownerReferences") or []
        if not any(o.get("uid") == uid for o in owners):
            raise ServiceConflictError(
                f"Service {want['metadata']['name']} exists and is not owned by this ModelDeployment; "
                "rename it or set spec.service.name"
            )
        patch = {"metadata": {"labels": want["metadata"]["labels"]}, "spec": {"ports": want["spec"]["ports"]}}
        await self.kube.merge_patch(service_path(namespace, want["metadata"]["name"]), patch)

    async def forget_annotation(self, namespace: str, name: str, key: str) -> None:
        """Drop a one-shot annotation (``orchardist.io/re-resolve``) once it has been acted on."""
        await self.kube.merge_patch(md_path(namespace, name), {"metadata": {"annotations": {key: None}}})


class ServiceConflictError(Exception):
    """The Service name is taken by an object this deployment does not own."""


async def ensure_peering(kube: Kube, name: str, namespaces: list[str] | None) -> None:
    """The peering CRDs (kopf-peering.yaml) and the peering object(s) named ``name``."""
    for doc in yaml.safe_load_all(PEERING_CRDS.read_text()):
        if not doc:
            continue
        crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        try:
            if await kube.get(f"{crds}/{doc['metadata']['name']}") is not None:
                continue
        except ApiException as exc:
            if exc.status != 403:
                raise
        try:
            await kube.create(crds, doc)
        except ApiException as exc:
            if exc.status != 403:
                raise
            LOG.warning(
                "cannot read or create the peering CRDs; apply kopf-peering.yaml as an administrator",
                crd=doc["metadata"]["name"],
            )
    for _ in range(50):  # the CRDs serve a moment after they are created
        try:
            if namespaces is None:
                body = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}}
                await kube.create("/apis/kopf.dev/v1/clusterkopfpeerings", body)
            else:
                for ns in namespaces:
                    body = {
                        "apiVersion": "kopf.dev/v1",
                        "kind": "KopfPeering",
                        "metadata": {"name": name, "namespace": ns},
                    }
                    await kube.create(f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings", body)
            return
        except ApiException as exc:
            if exc.status != 404:
                raise
            await asyncio.sleep(0.2)
    raise RuntimeError("the kopf peering CRDs are not served; apply controller/kopf-peering.yaml")
