"""What a ModelDeployment's tag resolves to, and the model's profile: the pin a reconcile plans with.

A tag is resolved once and then held (``status.resolvedDigest``) until the user asks again
(annotation ``orchardist.io/re-resolve``) or changes ``spec.model``; a registry that cannot be
reached keeps the last pin rather than stopping the deployment. Profiles are kept per digest and
fit functions per (digest, plan inputs), so most reconciles ask the registry nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from orchardist import log
from orchardist.api.modeldeployment import ModelDeployment, ModelDeploymentStatus
from orchardist.controller.fitting import fit_for, plan_request
from orchardist.controller.scheduler import FitFn
from orchardist.controller.world import Pin
from orchardist.oci import auth as oci_auth
from orchardist.oci import profile as oci_profile
from orchardist.oci.errors import OCIError
from orchardist.oci.reference import Reference, parse
from orchardist.planning.profile import ModelProfile

LOG = log.get(__name__)
RESOLVE_TTL = 5.0  # seconds a tag's digest is reused without asking the registry again


@dataclass
class Pins:
    """Resolved tags, model profiles and fit functions, shared by every deployment's reconcile."""

    secret_data: Callable[[str, str], Awaitable[dict[str, str]]]  # (namespace, name) -> Secret data
    resolve_timeout: float = 60.0
    profiles: dict[str, ModelProfile] = field(default_factory=dict)
    fits: dict[tuple[str, Any], FitFn] = field(default_factory=dict)
    _recent: dict[tuple[str, str | None], tuple[float, str]] = field(default_factory=dict)
    _inflight: dict[tuple[str, str | None], asyncio.Future[tuple[str, ModelProfile]]] = field(
        default_factory=dict
    )

    async def pin(
        self, namespace: str, md: ModelDeployment, status: ModelDeploymentStatus, re_resolve: bool
    ) -> tuple[Pin | None, str | None]:
        spec = md.spec
        try:
            ref = parse(spec.model)
        except (OCIError, ValueError) as exc:
            return None, f"spec.model: {exc}"
        pinned_digest = status.resolved_digest
        pinned_model = status.resolved_model
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
                asyncio.wait_for(oci_profile.model_profile(target, creds), self.resolve_timeout)
            )
            self._inflight[key] = flight
            flight.add_done_callback(lambda _: self._inflight.pop(key, None))
        digest, profile = await asyncio.shield(flight)
        self._recent[key] = (time.monotonic(), digest)
        return digest, profile

    def _make_pin(self, digest: str, model: str, profile: ModelProfile, md: ModelDeployment) -> Pin:
        request = plan_request(md.spec)
        key = (digest, request)
        fit = self.fits.get(key)
        if fit is None:
            fit = self.fits[key] = fit_for(profile, request)
        return Pin(digest, model, profile.to_status(), fit)

    async def _credentials(
        self, namespace: str, md: ModelDeployment, ref: Reference
    ) -> oci_auth.Credentials | None:
        if md.spec.pull_secret_ref is None:
            return None
        data = await self.secret_data(namespace, md.spec.pull_secret_ref.name)
        return oci_auth.from_secret_data(data, ref)
