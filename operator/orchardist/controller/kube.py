"""What a reconcile plan asks of the API server, over the shared :class:`orchardist.kube.Kube`.

Reads of MacNodes, Leases, ModelReplicas and ModelDeployments come from kopf's watches (indexes);
this module writes (replicas, Service, EndpointSlices, status), reads the few things kopf does not
watch (Service, EndpointSlices, pull Secrets) and sets up peering. ``Kube`` makes "already exists"
on create and "not found" on delete success: a plan may be executed twice (rule: idempotent, any
process may die at any moment).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml
from kubernetes.client.exceptions import ApiException

from orchardist import log
from orchardist.controller.plan import LOST, MANAGED_BY, SERVICE_NAME_LABEL, SLICE_MANAGED_BY, Plan
from orchardist.kube import JSON, Kube, paths

__all__ = ["Adapter", "Kube", "ServiceConflictError", "ensure_peering"]

PEERING_CRDS = Path(__file__).with_name("kopf-peering.yaml")
LOG = log.get(__name__)


class Adapter:
    """What a reconcile reads from and writes to the API server."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    async def service(self, namespace: str, name: str) -> JSON | None:
        return await self.kube.get(paths.service(namespace, name))

    async def slices(self, namespace: str, service: str) -> list[JSON]:
        found = await self.kube.get(
            paths.endpointslice(namespace),
            labelSelector=f"{SERVICE_NAME_LABEL}={service},{SLICE_MANAGED_BY}={MANAGED_BY}",
        )
        return list((found or {}).get("items") or [])

    async def secret_data(self, namespace: str, name: str) -> dict[str, str]:
        found = await self.kube.get(paths.secret(namespace, name))
        return dict((found or {}).get("data") or {})

    async def create_replicas(self, namespace: str, plan: Plan) -> list[str]:
        """The plan's new replicas, created concurrently; returns the names that were new."""

        async def one(body: JSON) -> str | None:
            return (
                str(body["metadata"]["name"])
                if await self.kube.create(paths.modelreplica(namespace), body)
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
            await self.kube.patch_existing(paths.modelreplica(namespace, replica), patch)
        for replica, why in plan.delete:
            LOG.info("deleting replica", namespace=namespace, replica=replica, why=why)
            await self.kube.delete(paths.modelreplica(namespace, replica))
        if plan.service is not None:
            await self._service(namespace, uid, plan.service, service)
        for sl in plan.slices:
            slname = sl["metadata"]["name"]
            if not await self.kube.create(paths.endpointslice(namespace), sl):
                await self.kube.call(
                    "PUT", paths.endpointslice(namespace, slname), await self._with_version(namespace, sl)
                )
        for slname in plan.delete_slices:
            await self.kube.delete(paths.endpointslice(namespace, slname))
        if plan.status is not None:
            await self.kube.merge_patch(
                paths.modeldeployment(namespace, name, status=True), {"status": plan.status}
            )

    async def _with_version(self, namespace: str, sl: JSON) -> JSON:
        have = await self.kube.get(paths.endpointslice(namespace, sl["metadata"]["name"])) or {}
        version = (have.get("metadata") or {}).get("resourceVersion")
        return {**sl, "metadata": {**sl["metadata"], "resourceVersion": version}}

    async def _service(self, namespace: str, uid: str, want: JSON, have: JSON | None) -> None:
        if have is None:
            if await self.kube.create(paths.service(namespace), want):
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
        await self.kube.merge_patch(paths.service(namespace, want["metadata"]["name"]), patch)

    async def forget_annotation(self, namespace: str, name: str, key: str) -> None:
        """Drop a one-shot annotation (``orchardist.io/re-resolve``) once it has been acted on."""
        await self.kube.merge_patch(
            paths.modeldeployment(namespace, name), {"metadata": {"annotations": {key: None}}}
        )


class ServiceConflictError(Exception):
    """The Service name is taken by an object this deployment does not own."""


async def ensure_peering(kube: Kube, name: str, namespaces: list[str] | None) -> None:
    """The peering CRDs (kopf-peering.yaml) and the peering object(s) named ``name``."""
    for doc in yaml.safe_load_all(PEERING_CRDS.read_text()):
        if not doc:
            continue
        try:
            if await kube.get(paths.customresourcedefinition(doc["metadata"]["name"])) is not None:
                continue
        except ApiException as exc:
            if exc.status != 403:
                raise
        try:
            await kube.create(paths.customresourcedefinition(), doc)
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
                await kube.create(paths.kopfpeering(), body)
            else:
                for ns in namespaces:
                    body = {
                        "apiVersion": "kopf.dev/v1",
                        "kind": "KopfPeering",
                        "metadata": {"name": name, "namespace": ns},
                    }
                    await kube.create(paths.kopfpeering(ns), body)
            return
        except ApiException as exc:
            if exc.status != 404:
                raise
            await asyncio.sleep(0.2)
    raise RuntimeError("the kopf peering CRDs are not served; apply controller/kopf-peering.yaml")
