"""One blob into a partial file: verified, resumable, keyed by where it comes from.

:func:`download` streams into ``tmp/<hex>.<src>.partial`` through :mod:`orchardist.oci.transfer`,
resumes with a Range request after a cut (retried by the project's one backoff policy,
:mod:`orchardist.retry`), checks the sha256 and fsyncs. Peers reuse it for a blob one other Mac
holds (through a client-shaped adapter). Tar layers the store does not keep as blobs take
:mod:`orchardist.oci.unpack` instead.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tenacity

from orchardist import log, retry
from orchardist.oci.client import RegistryClient
from orchardist.oci.errors import DigestMismatchError, RegistryUnreachableError
from orchardist.oci.fsutil import fsync_path
from orchardist.oci.layouts import Layer
from orchardist.oci.transfer import (
    DEFAULT_LIMITS,
    INTERRUPTIONS,
    BlobFile,
    Pace,
    TransferLimits,
    hash_prefix,
    open_body,
    receive,
)

_log = log.get(__name__)


@dataclass
class _Received:
    """Where a download stands: bytes in the partial file, and the hash over exactly those."""

    offset: int
    h: Any


async def download(
    client: RegistryClient,
    repo: str,
    layer: Layer,
    partial: Path,
    on_bytes: Callable[[int], None],
    *,
    attempts: int,
    fast: bool = True,
    on_request: Callable[[], None] = lambda: None,
    limits: TransferLimits = DEFAULT_LIMITS,
) -> None:
    """Fetch ``layer`` into ``partial`` (verified and fsynced on return); resume whatever is there.

    A digest mismatch discards the partial file and is not retried; interruptions (a slow body
    included) are retried up to ``attempts`` requests in all, each resuming after the last byte
    written; past ``limits.deadline`` the download is given up (:class:`DeadlineError`).
    """
    loop = asyncio.get_running_loop()
    pace = Pace(limits, f"blob {layer.digest[:19]} of {client.registry}/{repo}", loop.time())
    got = await asyncio.to_thread(_resume_point, partial, layer.size)
    if got.offset:
        on_bytes(got.offset)

    async def one_request() -> None:
        pace.check_deadline(loop.time())
        on_request()
        async with client.open_blob(repo, layer.digest, got.offset) as resp:
            if resp.status == 200 and got.offset:
                _log.info("registry ignored Range; restarting blob", digest=layer.digest)
                on_bytes(-got.offset)
                got.offset, got.h = 0, hashlib.sha256()
            body = open_body(resp, fast=fast)
            _log.debug("blob body", digest=layer.digest, offset=got.offset, reader=body.kind)
            with BlobFile(partial, got.offset) as f:
                got.offset = await receive(
                    body,
                    f,
                    got.h,
                    got.offset,
                    size=layer.size,
                    digest=layer.digest,
                    on_bytes=on_bytes,
                    pace=pace,
                )
        if got.offset < layer.size:
            raise RegistryUnreachableError(f"blob {layer.digest}: connection closed at byte {got.offset}")

    def resume_from_disk(state: tenacity.RetryCallState) -> None:
        # Every byte in the partial file went through the hash too: resume right after it.
        got.offset = partial.stat().st_size if partial.exists() else 0
        outcome = state.outcome
        _log.info(
            "blob download interrupted; resuming",
            digest=layer.digest,
            offset=got.offset,
            error=str(outcome.exception()) if outcome is not None else "",
        )

    try:
        if got.offset < layer.size:
            async for attempt in retry.retrying(
                attempts=attempts, retry_on=INTERRUPTIONS, before_sleep=resume_from_disk
            ):
                with attempt:
                    await one_request()
    except INTERRUPTIONS as exc:
        raise RegistryUnreachableError(
            f"blob {layer.digest[:19]}: download interrupted {attempts} times, last: {exc}"
        ) from exc
    except DigestMismatchError:
        await asyncio.to_thread(partial.unlink, missing_ok=True)
        raise
    digest = "sha256:" + got.h.hexdigest()
    if digest != layer.digest:
        await asyncio.to_thread(partial.unlink, missing_ok=True)
        raise DigestMismatchError(f"blob {layer.digest}: received content hashes to {digest}; discarded")
    await asyncio.to_thread(fsync_path, partial)


def _resume_point(partial: Path, size: int) -> _Received:
    """What an earlier try left in ``partial``: its length and hash (nothing when it is too long)."""
    try:
        have = partial.stat().st_size
    except FileNotFoundError:
        have = 0
    if not have or have > size:
        return _Received(0, hashlib.sha256())
    return _Received(have, hash_prefix(partial, have))
