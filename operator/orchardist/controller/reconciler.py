"""Runs reconciles: gathers what is (kopf's indexes + a few reads), decides purely, acts via kube.py.

One reconcile per deployment at a time; triggers that arrive while one waits join it (a burst of
replica status changes costs one reconcile, not one each). Placement across deployments is
serialised by one lock so two deployments never book the same free memory, and replicas this
process created or deleted are remembered until the watch shows them (an "assume" overlay, as
kube-scheduler has), so a reconcile right after another never double-books or double-creates.
Deterministic replica names make a forgotten overlay harmless: a second create is a 409.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import kopf
from pydantic import ValidationError

from orchardist import log
from orchardist.api.constants import LABEL_DEPLOYMENT
from orchardist.api.modeldeployment import ModelDeployment
from orchardist.controller import plan as P  # noqa: N812 - the plan module, read as a namespace
from orchardist.controller import status as st
from orchardist.controller.fitting import fit_for, plan_request
from orchardist.controller.kube import Adapter, ServiceConflictError, md_path
from orchardist.controller.scheduler import FitFn, Mac
from orchardist.oci import auth as oci_auth
from orchardist.oci import profile as oci_profile
from orchardist.oci.errors import OCIError
from orchardist.oci.reference import Reference, parse
from orchardist.planning.profile import ModelProfile

LOG = log.get(__name__)
RESOLVE_TTL = 5.0  # seconds a tag's digest is reused without asking the registry again
WRITE_MEMORY = 2.0  # seconds our own status/Service/slice writes stand in for the (lagging) watch
Key = tuple[str, str]
JSON = dict[str, Any]


class Store(Protocol):
    """What kopf's ``Index`` offers: key -> a collection of values."""

    def get(self, key: Any, default: Any = None) -> Any: ...
    def __iter__(self) -> Any: ...
    def items(self) -> Any: ...


@dataclass
class Config:
    lease_grace: float = 40.0
    resolve_timeout: float = 60.0


@dataclass
class _Pending:
    future: asyncio.Future[None]
    force: bool = False


@dataclass
class Controller:
    """Operator-wide state of the controller (lives in kopf's memo)."""

    adapter: Adapter
    config: Config = field(default_factory=Config)
    deployments: Store | None = None
    replicas: Store | None = None
    macnodes: Store | None = None
    leases: Store | None = None
    services: Store | None = None  # (namespace, name) -> our Services
    slices: Store | None = None  # (namespace, service name) -> our EndpointSlices
    profiles: dict[str, ModelProfile] = field(default_factory=dict)
    fits: dict[tuple[str, Any], FitFn] = field(default_factory=dict)
    assumed: dict[Key, dict[str, JSON]] = field(default_factory=dict)  # (ns, deployment) -> name -> body
    forgotten: set[Key] = field(default_factory=set)  # (ns, replica name) deleted by us
    phases: dict[str, str | None] = field(default_factory=dict)  # replica uid -> last phase seen
    _recent: dict[tuple[str, str | None], tuple[float, str]] = field(default_factory=dict)
    _written: dict[Key, tuple[float, JSON | None, list[JSON]]] = field(default_factory=dict)
    _status_written: dict[Key, tuple[float, JSON]] = field(default_factory=dict)
    _inflight: dict[tuple[str, str | None], asyncio.Future[tuple[str, ModelProfile]]] = field(
        default_factory=dict
    )
    place_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    _pending: dict[Key, _Pending] = field(default_factory=dict)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    # -- triggering ---------------------------------------------------------------------------

    async def trigger(
        self, namespace: str, name: str, body: Mapping[str, Any] | None = None, *, force_resolve: bool = False
    ) -> None:
        """Reconcile ``namespace/name`` soon; joins a reconcile that is queued but not started yet."""
        key = (namespace, name)
        pending = self._pending.get(key)
        if pending is not None:
            pending.force |= force_resolve
            await asyncio.shield(pending.future)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        mine = self._pending[key] = _Pending(future, force_resolve)
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                if self._pending.get(key) is mine:
                    del self._pending[key]
                try:
                    await self._reconcile(namespace, name, body, mine.force)
                except BaseException as exc:
                    if not future.done():
                        future.set_exception(exc)
                    raise
                if not future.done():
                    future.set_result(None)
        finally:
            if self._pending.get(key) is mine:
                del self._pending[key]

    # -- one reconcile -------------------------------------------------------------------------

    def _body(
        self, namespace: str, name: str, fallback: Mapping[str, Any] | None
    ) -> Mapping[str, Any] | None:
        if self.deployments is not None:
            for body in self.deployments.get((namespace, name), ()):
                return dict(body)
            return None if fallback is None else fallback
        return fallback

    async def _reconcile(
        self, namespace: str, name: str, fallback: Mapping[str, Any] | None, force: bool
    ) -> None:
        body = self._body(namespace, name, fallback)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return  # gone or going: ownerReferences let the garbage collector remove the rest
        meta = body.get("metadata") or {}
        try:
            md = ModelDeployment.model_validate(dict(body))
        except ValidationError as exc:
            await self._invalid(namespace, name, body, exc)
            return
        annotations = meta.get("annotations") or {}
        re_resolve = force or P.RE_RESOLVE in annotations
        current = self._status_of(namespace, name, body)
        pin, error = await self._pin(namespace, md, current, re_resolve)
        svc_name = md.spec.service.name or name
        service, slices = await self._exposure(namespace, svc_name)
        # Placement reads and books the shared free memory: one deployment at a time, until the
        # new replicas exist (and are assumed); the rest of the plan touches only this deployment.
        async with self.place_lock:
            now = self.clock()
            obs = P.Observed(
                name=name,
                namespace=namespace,
                uid=str(meta.get("uid")),
                generation=int(meta.get("generation") or 0),
                spec=md.spec,
                status=current,
                replicas=[P.replica_from(b) for b in self._replicas_of(namespace, name)],
                macs=self._macs(now),
                pin=pin,
                now=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                resolve_error=error,
                service=service,
                slices=slices,
            )
            plan = P.decide(obs)
            created = await self.adapter.create_replicas(namespace, plan)
            bucket = self.assumed.setdefault((namespace, name), {})
            for c in plan.create:
                if c["metadata"]["name"] in created:
                    bucket[c["metadata"]["name"]] = c
        try:
            await self.adapter.finish(namespace, name, obs.uid, plan, service)
        except ServiceConflictError as exc:
            kopf.event(_ref(body), type="Warning", reason="ServiceConflict", message=str(exc))
            raise kopf.TemporaryError(str(exc), delay=30) from exc
        if plan.service is not None or plan.slices or plan.delete_slices:
            written = {s["metadata"]["name"]: s for s in slices}
            written.update({s["metadata"]["name"]: s for s in plan.slices})
            for gone in plan.delete_slices:
                written.pop(gone, None)
            self._written[(namespace, svc_name)] = (
                time.monotonic(),
                plan.service or service,
                list(written.values()),
            )
        for replica, _ in plan.delete:
            bucket.pop(replica, None)
            self.forgotten.add((namespace, replica))
        if plan.status is not None:
            self._status_written[(namespace, name)] = (time.monotonic(), plan.status)
        if pin is not None and P.RE_RESOLVE in annotations:
            await self.adapter.forget_annotation(namespace, name, P.RE_RESOLVE)
        for ev in plan.events:
            kopf.event(_ref(body), type=ev.type, reason=ev.reason, message=ev.message[:1024])
        if not plan.empty:
            LOG.info(
                "reconciled",
                namespace=namespace,
                deployment=name,
                created=len(plan.create),
                deleted=len(plan.delete),
                status=plan.status is not None,
            )

    async def _invalid(
        self, namespace: str, name: str, body: Mapping[str, Any], exc: ValidationError
    ) -> None:
        """A spec the API server let through but the types refuse: say so in status, do nothing else."""
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"the spec does not validate at {where}: {first.get('msg')}"
        generation = int((body.get("metadata") or {}).get("generation") or 0)
        conds = {
            "Ready": st.Cond(False, "InvalidSpec", message),
            "Reconciling": st.Cond(False, st.AS_EXPECTED, "waiting for a person (see Stalled)"),
            "Stalled": st.Cond(True, "InvalidSpec", message),
            "Degraded": st.Cond(False, st.AS_EXPECTED, ""),
        }
        previous = list((body.get("status") or {}).get("conditions") or ())
        now = self.clock().strftime("%Y-%m-%dT%H:%M:%SZ")
        rendered = st.render(conds, generation, previous, now)
        new = {"observedGeneration": generation, "phase": "Failed", "conditions": rendered}
        strip = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in rendered]
        have = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in previous]
        if strip != have:
            await self.adapter.kube.merge_patch(md_path(namespace, name) + "/status", {"status": new})
            kopf.event(_ref(body), type="Warning", reason="InvalidSpec", message=message[:1024])

    def _status_of(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """The deployment's status: what this process just wrote, while the watch may still lag."""
        recent = self._status_written.get((namespace, name))
        if recent is not None and time.monotonic() - recent[0] < WRITE_MEMORY:
            return dict(recent[1])
        self._status_written.pop((namespace, name), None)
        return dict(body.get("status") or {})

    async def _exposure(self, namespace: str, svc_name: str) -> tuple[JSON | None, list[JSON]]:
        """The Service and our EndpointSlices as they are: from the watches (free), else by GET.

        Right after this process wrote them, what it wrote is used for ``WRITE_MEMORY`` seconds, so a
        reconcile that runs before the watch catches up does not write them again.
        """
        key = (namespace, svc_name)
        recent = self._written.get(key)
        if recent is not None and time.monotonic() - recent[0] < WRITE_MEMORY:
            return recent[1], list(recent[2])
        self._written.pop(key, None)
        if self.services is None or self.slices is None:
            service, slices = await asyncio.gather(
                self.adapter.service(namespace, svc_name), self.adapter.slices(namespace, svc_name)
            )
            return service, slices
        service = next(iter(self.services.get(key, ())), None)
        return (dict(service) if service is not None else None), [dict(s) for s in self.slices.get(key, ())]

    # -- pinning and profiles ------------------------------------------------------------------

    async def _pin(
        self, namespace: str, md: ModelDeployment, status: Mapping[str, Any], re_resolve: bool
    ) -> tuple[P.Pin | None, str | None]:
        spec = md.spec
        try:
            ref = parse(spec.model)
        except (OCIError, ValueError) as exc:
            return None, f"spec.model: {exc}"
        pinned_digest = status.get("resolvedDigest")
        pinned_model = status.get("resolvedModel")
        same_repo = False
        if pinned_model:
            try:
                was = parse(str(pinned_model))
                same_repo = (was.registry, was.repository) == (ref.registry, ref.repository)
            except (OCIError, ValueError):
                same_repo = False
        if ref.digest:
            target, digest_hint = ref, ref.digest
        elif pinned_digest and same_repo and not re_resolve:
            target, digest_hint = ref.with_digest(str(pinned_digest)), str(pinned_digest)
        else:
            target, digest_hint = ref, None
        profile = self.profiles.get(digest_hint) if digest_hint else None
        if digest_hint is not None and profile is not None:
            return self._make_pin(digest_hint, ref.pinned(digest_hint), profile, md), None
        try:
            creds = await self._credentials(namespace, md, ref)
            digest, fetched = await self._resolve(target, creds, fresh=re_resolve)
        except (OCIError, ValueError, OSError, TimeoutError) as exc:
            message = f"cannot read {target} from its registry: {exc}"
            LOG.warning(
                "resolve failed", namespace=namespace, deployment=md.metadata.get("name"), error=message
            )
            if pinned_digest and pinned_model and same_repo and not ref.digest:
                cached = self.profiles.get(str(pinned_digest))
                if cached is not None:
                    return self._make_pin(str(pinned_digest), str(pinned_model), cached, md), None
            return None, message
        self.profiles[digest] = fetched
        return self._make_pin(digest, ref.pinned(digest), fetched, md), None

    async def _resolve(
        self, target: Reference, creds: oci_auth.Credentials | None, *, fresh: bool
    ) -> tuple[str, ModelProfile]:
        """One registry round per reference at a time; a tag resolved a moment ago is not asked again.

        A hundred deployments of one tag applied together cost one resolution, not a hundred; the
        answer is reused for ``RESOLVE_TTL`` seconds unless the user asked for a fresh one.
        """
        key = (str(target), creds.username if creds else None)
        hit = self._recent.get(key)
        if hit and not fresh and time.monotonic() - hit[0] < RESOLVE_TTL and hit[1] in self.profiles:
            return hit[1], self.profiles[hit[1]]
        flight = self._inflight.get(key)
        if flight is None:
            flight = asyncio.ensure_future(
                asyncio.wait_for(oci_profile.model_profile(target, creds), self.config.resolve_timeout)
            )
            self._inflight[key] = flight
            flight.add_done_callback(lambda _: self._inflight.pop(key, None))
        digest, profile = await asyncio.shield(flight)
        self._recent[key] = (time.monotonic(), digest)
        return digest, profile

    def _make_pin(self, digest: str, model: str, profile: ModelProfile, md: ModelDeployment) -> P.Pin:
        request = plan_request(md.spec)
        key = (digest, request)
        fit = self.fits.get(key)
        if fit is None:
            fit = self.fits[key] = fit_for(profile, request)
        return P.Pin(digest, model, profile.to_status(), fit)

    async def _credentials(
        self, namespace: str, md: ModelDeployment, ref: Reference
    ) -> oci_auth.Credentials | None:
        if md.spec.pull_secret_ref is None:
            return None
        data = await self.adapter.secret_data(namespace, md.spec.pull_secret_ref.name)
        return oci_auth.from_secret_data(data, ref)

    # -- the world from the indexes ------------------------------------------------------------

    def _all_replicas(self) -> list[JSON]:
        out: list[JSON] = []
        seen: set[Key] = set()
        indexed: set[Key] = set()
        if self.replicas is not None:
            for _, bodies in self.replicas.items():
                for b in bodies:
                    meta = b.get("metadata") or {}
                    key = (str(meta.get("namespace")), str(meta.get("name")))
                    indexed.add(key)
                    if key in self.forgotten:
                        continue
                    seen.add(key)
                    out.append(b)
        self.forgotten &= indexed  # deleted ones the watch no longer shows need no memory
        for (ns, _), bucket in list(self.assumed.items()):
            for rname, b in list(bucket.items()):
                if (ns, rname) in indexed:
                    del bucket[rname]
                elif (ns, rname) not in seen:
                    out.append(b)
        return out

    def _replicas_of(self, namespace: str, name: str) -> list[JSON]:
        return [
            b
            for b in self._all_replicas()
            if (b.get("metadata") or {}).get("namespace") == namespace
            and ((b.get("metadata") or {}).get("labels") or {}).get(LABEL_DEPLOYMENT) == name
        ]

    def _macs(self, now: datetime) -> list[Mac]:
        reserved = P.reserved_by_node(self._all_replicas())
        macs: list[Mac] = []
        if self.macnodes is None:
            return macs
        for name, bodies in self.macnodes.items():
            for body in bodies:
                lease = next(iter(self.leases.get(name, ()) if self.leases is not None else ()), None)
                ready = P.lease_ready(lease, now, self.config.lease_grace)
                macs.append(P.mac_from(body, ready, reserved.get(str(name), 0)))
                break
        return macs

    # -- replica events --------------------------------------------------------------------------

    def replica_phase_event(self, body: Mapping[str, Any], initial: bool) -> tuple[str, str, str] | None:
        """The Event to post on the deployment when a replica changes phase (None: nothing new)."""
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid"))
        st = body.get("status") or {}
        phase = st.get("phase")
        before = self.phases.get(uid, "unseen")
        self.phases[uid] = phase
        if initial or before == phase or (before == "unseen" and phase in (None, "Pending")):
            return None
        spec = body.get("spec") or {}
        who = f"{meta.get('name')} on {spec.get('nodeName')}"
        progress = st.get("progress") or {}
        if phase == "Pulling":
            total = progress.get("bytesTotal")
            size = f" ({int(total) / (1 << 30):.1f} GiB)" if total else ""
            return "Normal", "Pulling", f"{who}: pulling {spec.get('model')}{size}"
        if phase == "Starting":
            return "Normal", "Pulled", f"{who}: model in place, starting {spec.get('engine')}"
        if phase == "Ready":
            return "Normal", "Started", f"{who}: serving at {st.get('endpoint')}"
        if phase == "Failed":
            err = st.get("lastError") or {}
            return "Warning", str(err.get("reason") or "Failed"), f"{who}: {err.get('message') or 'failed'}"
        return None

    def created_here(self, namespace: str, deployment: str, replica: str) -> bool:
        """Whether this process created the replica and still holds it as assumed."""
        return replica in self.assumed.get((namespace, deployment), {})

    def forget_replica(self, body: Mapping[str, Any]) -> None:
        self.phases.pop(str((body.get("metadata") or {}).get("uid")), None)

    def needs_placement(self) -> list[Key]:
        """Deployments still short of replicas (a new or changed Mac may let them in)."""
        out: list[Key] = []
        if self.deployments is None:
            return out
        for key, bodies in self.deployments.items():
            for b in bodies:
                spec, st = b.get("spec") or {}, b.get("status") or {}
                if int(st.get("replicas") or 0) < int(spec.get("replicas", 1)) or st.get("phase") in (
                    "Pending",
                    "Failed",
                ):
                    out.append(key)
                break
        return out


def _ref(body: Mapping[str, Any]) -> kopf.Body:
    """What kopf needs to post an Event about a ModelDeployment."""
    meta = body.get("metadata") or {}
    raw = {
        "apiVersion": body.get("apiVersion", "orchardist.io/v1alpha1"),
        "kind": body.get("kind", "ModelDeployment"),
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid")},
    }
    return kopf.Body(cast(kopf.RawBody, raw))


def deployment_ref(namespace: str, name: str, uid: str | None) -> kopf.Body:
    return _ref({"metadata": {"name": name, "namespace": namespace, "uid": uid}})
