"""The registry adapter: the OCI distribution API over aiohttp.

HTTP in this package happens here and in :mod:`orchardist.oci.transfer`, which reads big blob
bodies from the responses :meth:`RegistryClient.open_blob` returns. One aiohttp session per
registry. Auth: anonymous, basic, and the bearer-token flow driven by the ``WWW-Authenticate``
challenge. 429/503 are retried a few times, waiting what ``Retry-After`` asks (refusing when it
asks too long) or else by the project's backoff policy, :mod:`orchardist.retry`.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from orchardist import log, retry
from orchardist.oci import mediatypes as mt
from orchardist.oci.auth import Challenge, Credentials, credential_refusal, parse_challenge, token_form
from orchardist.oci.errors import (
    AuthRequiredError,
    DigestMismatchError,
    NotFoundError,
    OCIError,
    RateLimitedError,
    RegistryError,
    RegistryUnreachableError,
    TooLargeError,
)
from orchardist.oci.platforms import platform_digest
from orchardist.oci.reference import Reference, scheme_for

_log = log.get(__name__)

MANIFEST_LIMIT = 4 << 20
TOKEN_LIMIT = 64 << 10  # a token response is a few KiB; a registry must not make us buffer more
TOKEN_TIMEOUT = 60.0  # seconds for the whole token exchange
SMALL_BODY_DEADLINE = 120.0  # seconds for a whole manifest, config or token body
CONFIG_LIMIT = 4 << 20
CHUNK = 1 << 20
UPLOAD_CHUNK = 64 << 20


@dataclass(frozen=True)
class Manifest:
    """A manifest or index as the registry sent it: raw bytes (what the digest covers) and parsed."""

    digest: str
    media_type: str
    raw: bytes
    data: dict[str, Any]

    @property
    def is_index(self) -> bool:
        return self.media_type in mt.INDEXES or (
            "manifests" in self.data and "layers" not in self.data and "config" not in self.data
        )


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class RegistryClient:
    """Talks to one registry. Use as ``async with RegistryClient.for_ref(ref) as c: ...``."""

    def __init__(
        self,
        registry: str,
        *,
        scheme: str = "https",
        credentials: Credentials | None = None,
        max_retries: int = 4,
        max_retry_after: float = 60.0,
    ) -> None:
        self.registry = registry
        self.base = f"{scheme}://{registry}"
        self.credentials = credentials
        self.max_retries = max_retries
        self.max_retry_after = max_retry_after
        self._session: aiohttp.ClientSession | None = None
        self._auth: dict[str, str] = {}  # scope -> Authorization header value
        self._basic = False
        self._token_lock = asyncio.Lock()

    @classmethod
    def for_ref(
        cls, ref: Reference, *, credentials: Credentials | None = None, insecure: Iterable[str] = ()
    ) -> RegistryClient:
        return cls(ref.registry, scheme=scheme_for(ref, insecure), credentials=credentials)

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=30, sock_read=120),
                connector=aiohttp.TCPConnector(limit=16),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- request core -------------------------------------------------------------------------

    def _scope(self, repo: str, push: bool) -> str:
        return f"repository:{repo}:{'pull,push' if push else 'pull'}"

    def _auth_headers(self, scope: str) -> dict[str, str]:
        if scope in self._auth:
            return {"Authorization": self._auth[scope]}
        if self._basic and self.credentials:
            return {"Authorization": self.credentials.basic_header()}
        return {}

    async def _authenticate(self, challenge: Challenge | None, scope: str, what: str) -> None:
        if challenge is None:
            raise AuthRequiredError(
                f"{what}: the registry {self.registry} refused access (401) without a challenge"
            )
        if challenge.scheme == "basic":
            if not self.credentials:
                raise AuthRequiredError(
                    f"{what}: authentication required by {self.registry} (no credentials: "
                    "set pullSecretRef or `docker login`)"
                )
            self._basic = True
            return
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise AuthRequiredError(
                f"{what}: unsupported auth challenge from {self.registry}: {challenge.scheme}"
            )
        async with self._token_lock:
            # Ask for the scope this request needs (and the challenge's, when it names another).
            params: list[tuple[str, str]] = [("scope", scope)]
            wanted = challenge.params.get("scope")
            if wanted and wanted != scope:
                params.append(("scope", wanted))
            if challenge.params.get("service"):
                params.insert(0, ("service", challenge.params["service"]))
            realm = challenge.params["realm"]
            headers: dict[str, str] = {}
            form: dict[str, str] | None = None
            if self.credentials:
                refusal = credential_refusal(self.base, realm)
                if refusal:
                    raise AuthRequiredError(f"{what}: {refusal}")
                if self.credentials.identity_token:  # OAuth2 refresh token, POSTed as a form
                    form = token_form(self.credentials, params)
                else:
                    headers["Authorization"] = self.credentials.basic_header()
            try:  # a redirect to another origin drops the Authorization header (aiohttp does)
                async with (
                    asyncio.timeout(TOKEN_TIMEOUT),
                    (
                        self.session.post(realm, data=form, headers=headers)
                        if form
                        else self.session.get(realm, params=params, headers=headers)
                    ) as resp,
                ):
                    if resp.status in (401, 403):
                        raise AuthRequiredError(
                            f"{what}: {self.registry} rejected the credentials"
                            if self.credentials
                            else f"{what}: authentication required by {self.registry} (no credentials)"
                        )
                    if resp.status != 200:
                        raise RegistryError(f"{what}: token endpoint answered {resp.status}")
                    raw = await self._read_limited(resp, TOKEN_LIMIT, f"{what}: token response")
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise RegistryError(f"{what}: cannot reach the token endpoint: {exc}") from exc
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise RegistryError(f"{what}: token endpoint returned no JSON: {exc}") from exc
            token = (body.get("token") or body.get("access_token")) if isinstance(body, dict) else None
            if not isinstance(token, str) or not token:
                raise RegistryError(f"{what}: token endpoint returned no token")
            self._auth[scope] = f"Bearer {token}"

    @asynccontextmanager
    async def request(
        self,
        method: str,
        url: str,
        *,
        repo: str,
        what: str,
        push: bool = False,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
        params: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request with auth and rate-limit retries; raises a mapped error unless status is ``ok``."""
        if not url.startswith("http"):
            url = self.base + url
        scope = self._scope(repo, push)
        authed = False
        attempt = 0
        while True:
            try:
                resp = await self.session.request(
                    method,
                    url,
                    headers={**(headers or {}), **self._auth_headers(scope)},
                    data=data,
                    params=params,
                    allow_redirects=method in ("GET", "HEAD"),
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise RegistryUnreachableError(f"{what}: cannot reach {self.registry}: {exc}") from exc
            if resp.status == 401 and not authed:
                challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
                resp.release()
                await self._authenticate(challenge, scope, what)
                authed = True
                continue
            if resp.status in (429, 503) and attempt < self.max_retries:
                wait = retry_after_seconds(resp.headers.get("Retry-After"))
                resp.release()
                if wait is not None and wait > self.max_retry_after:
                    raise RateLimitedError(
                        f"{what}: rate limited by {self.registry}; retry after {wait:.0f} s", retry_after=wait
                    )
                attempt += 1
                await asyncio.sleep(wait if wait is not None else retry.delay(attempt))
                continue
            try:
                if resp.status not in ok:
                    await self._raise_for(resp, what)
                yield resp
            finally:
                resp.release()
            return

    async def _raise_for(self, resp: aiohttp.ClientResponse, what: str) -> None:
        detail = ""
        try:
            body = await resp.content.read(64 << 10)
            errs = json.loads(body).get("errors") or []
            if errs:
                detail = "; ".join(
                    f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errs[:3]
                )
        except (ValueError, AttributeError, aiohttp.ClientError):
            pass
        suffix = f" ({detail})" if detail else ""
        if resp.status == 401:
            raise AuthRequiredError(f"{what}: authentication required by {self.registry}{suffix}")
        if resp.status == 403:
            raise AuthRequiredError(f"{what}: access denied by {self.registry}{suffix}")
        if resp.status == 404:
            raise NotFoundError(f"{what}: not found on {self.registry}{suffix}")
        if resp.status == 429:
            wait = retry_after_seconds(resp.headers.get("Retry-After"))
            hint = f"; retry after {wait:.0f} s" if wait is not None else ""
            raise RateLimitedError(f"{what}: rate limited by {self.registry}{hint}", retry_after=wait)
        raise RegistryError(f"{what}: {self.registry} answered HTTP {resp.status}{suffix}")

    @staticmethod
    async def _read_limited(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
        """A small body, at most ``limit`` bytes, within :data:`SMALL_BODY_DEADLINE` seconds.

        The session's read timeout restarts with every byte, so without the deadline a registry
        dripping a manifest could hold a pull forever.
        """
        if resp.content_length is not None and resp.content_length > limit:
            raise TooLargeError(f"{what}: {resp.content_length} bytes exceeds the {limit}-byte limit")
        buf = bytearray()
        try:
            async with asyncio.timeout(SMALL_BODY_DEADLINE):
                async for chunk in resp.content.iter_chunked(CHUNK):
                    buf += chunk
                    if len(buf) > limit:
                        raise TooLargeError(f"{what}: more than the {limit}-byte limit")
        except TimeoutError:
            raise RegistryUnreachableError(
                f"{what}: not received within {SMALL_BODY_DEADLINE:g} s ({len(buf)} bytes so far)"
            ) from None
        return bytes(buf)

    # ---- manifests ------------------------------------------------------------------------------

    async def get_manifest(self, repo: str, target: str, *, limit: int = MANIFEST_LIMIT) -> Manifest:
        what = f"manifest {self.registry}/{repo}:{target}"
        async with self.request(
            "GET", f"/v2/{repo}/manifests/{target}", repo=repo, what=what, headers={"Accept": mt.ACCEPT}
        ) as resp:
            raw = await self._read_limited(resp, limit, what)
            ctype = resp.headers.get("Content-Type", "").split(";")[0].strip()
        digest = sha256_digest(raw)
        if target.startswith("sha256:") and digest != target:
            raise DigestMismatchError(f"{what}: body hashes to {digest}")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise RegistryError(f"{what}: not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise RegistryError(f"{what}: not a JSON object")
        media_type = str(data.get("mediaType") or ctype or mt.OCI_MANIFEST)
        return Manifest(digest=digest, media_type=media_type, raw=raw, data=data)

    async def resolve(self, ref: Reference) -> Manifest:
        """The image manifest a reference names, following an index to darwin/arm64."""
        m = await self.get_manifest(ref.repository, ref.target)
        if m.is_index:
            m = await self.get_manifest(ref.repository, platform_digest(m.data, ref))
            if m.is_index:
                raise RegistryError(f"{ref}: nested index is not supported")
        if m.media_type not in mt.MANIFESTS and "layers" not in m.data:
            raise RegistryError(f"{ref}: unsupported manifest media type {m.media_type}")
        return m

    async def put_manifest(self, repo: str, target: str, raw: bytes, media_type: str) -> str:
        what = f"push manifest {self.registry}/{repo}:{target}"
        async with self.request(
            "PUT",
            f"/v2/{repo}/manifests/{target}",
            repo=repo,
            what=what,
            push=True,
            headers={"Content-Type": media_type},
            data=raw,
            ok=(201, 200),
        ):
            pass
        return sha256_digest(raw)

    # ---- blobs ----------------------------------------------------------------------------------

    async def get_blob(self, repo: str, digest: str, *, limit: int = CONFIG_LIMIT) -> bytes:
        """A small blob (config, config.json), size-limited and verified."""
        what = f"blob {digest[:19]} of {self.registry}/{repo}"
        async with self.request("GET", f"/v2/{repo}/blobs/{digest}", repo=repo, what=what) as resp:
            raw = await self._read_limited(resp, limit, what)
        if sha256_digest(raw) != digest:
            raise DigestMismatchError(f"{what}: content hashes to {sha256_digest(raw)}; discarded")
        return raw

    async def get_blob_range(self, repo: str, digest: str, start: int, length: int) -> bytes:
        """Bytes ``[start, start+length)`` of a blob (unverifiable: used for headers only)."""
        what = f"blob {digest[:19]} of {self.registry}/{repo}"
        async with self.request(
            "GET",
            f"/v2/{repo}/blobs/{digest}",
            repo=repo,
            what=what,
            headers={"Range": f"bytes={start}-{start + length - 1}"},
            ok=(200, 206),
        ) as resp:
            if resp.status == 200 and start:
                raise RegistryError(f"{what}: the registry ignored the Range header")
            buf = bytearray()
            async for chunk in resp.content.iter_chunked(CHUNK):
                buf += chunk
                if len(buf) >= length:
                    break
            return bytes(buf[:length])

    @asynccontextmanager
    async def open_blob(
        self, repo: str, digest: str, offset: int = 0
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A streaming blob response from ``offset`` (206) or from the start (200: restart)."""
        what = f"blob {digest[:19]} of {self.registry}/{repo}"
        headers = {"Range": f"bytes={offset}-"} if offset else None
        async with self.request(
            "GET", f"/v2/{repo}/blobs/{digest}", repo=repo, what=what, headers=headers, ok=(200, 206)
        ) as resp:
            yield resp

    async def blob_exists(self, repo: str, digest: str) -> bool:
        try:
            async with self.request(
                "HEAD", f"/v2/{repo}/blobs/{digest}", repo=repo, what=f"blob {digest[:19]}", push=True
            ):
                return True
        except NotFoundError:
            return False

    async def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount; False when the registry wants an upload instead."""
        async with self.request(
            "POST",
            f"/v2/{repo}/blobs/uploads/",
            repo=repo,
            what=f"mount {digest[:19]}",
            push=True,
            params={"mount": digest, "from": from_repo},
            ok=(201, 202),
        ) as resp:
            mounted = resp.status == 201
            location = resp.headers.get("Location")
        if not mounted and location:  # cancel the upload session the registry opened instead
            try:
                async with self.request(
                    "DELETE", location, repo=repo, what="cancel upload", push=True, ok=(204, 404, 202, 200)
                ):
                    pass
            except OCIError:
                pass
        return mounted

    async def upload_blob(
        self,
        repo: str,
        digest: str,
        source: Path | bytes,
        *,
        chunk_size: int = UPLOAD_CHUNK,
        on_bytes: Any = None,
    ) -> None:
        """Upload a blob: one PUT when small, else PATCH chunks then the closing PUT."""
        what = f"upload {digest[:19]} to {self.registry}/{repo}"
        size = len(source) if isinstance(source, bytes) else (await asyncio.to_thread(source.stat)).st_size
        async with self.request(
            "POST", f"/v2/{repo}/blobs/uploads/", repo=repo, what=what, push=True, ok=(202,)
        ) as resp:
            location = resp.headers["Location"]
        if size <= chunk_size:
            body = source if isinstance(source, bytes) else await asyncio.to_thread(source.read_bytes)
            async with self.request(
                "PUT",
                location,
                repo=repo,
                what=what,
                push=True,
                params={"digest": digest},
                headers={"Content-Type": "application/octet-stream"},
                data=body,
                ok=(201,),
            ):
                pass
            if on_bytes:
                on_bytes(size)
            return
        assert isinstance(source, Path)
        with source.open("rb") as f:
            offset = 0
            while offset < size:
                chunk = await asyncio.to_thread(f.read, chunk_size)
                end = offset + len(chunk) - 1
                async with self.request(
                    "PATCH",
                    location,
                    repo=repo,
                    what=what,
                    push=True,
                    headers={"Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{end}"},
                    data=chunk,
                    ok=(202,),
                ) as resp:
                    location = resp.headers.get("Location", location)
                offset += len(chunk)
                if on_bytes:
                    on_bytes(len(chunk))
        async with self.request(
            "PUT", location, repo=repo, what=what, push=True, params={"digest": digest}, ok=(201,)
        ):
            pass
