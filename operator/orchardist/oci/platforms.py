"""Choosing the manifest for this platform from an image index: pure functions.

An index entry's digest becomes a request path and then the name of files in the store, so it is
validated here before anything uses it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from orchardist.oci.errors import NotFoundError, RegistryError
from orchardist.oci.reference import Reference

PLATFORM = ("darwin", "arm64")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def pick_platform(index: Mapping[str, Any], ref: Reference) -> Mapping[str, Any]:
    """From an index, the darwin/arm64 entry, else the only real entry (attestations ignored)."""
    entries = [m for m in index.get("manifests") or [] if isinstance(m, Mapping)]
    real = [m for m in entries if (m.get("platform") or {}).get("os") != "unknown"]
    for m in real:
        p = m.get("platform") or {}
        if (p.get("os"), p.get("architecture")) == PLATFORM:
            return m
    if len(real) == 1:
        return real[0]
    seen = sorted(
        {
            f"{(m.get('platform') or {}).get('os')}/{(m.get('platform') or {}).get('architecture')}"
            for m in real
        }
    )
    raise NotFoundError(
        f"{ref}: the index has no darwin/arm64 manifest and more than one entry "
        f"(platforms: {', '.join(seen) or 'none'})"
    )


def platform_digest(index: Mapping[str, Any], ref: Reference) -> str:
    """The digest of the entry :func:`pick_platform` chooses, checked to be ``sha256:<64 hex>``."""
    target = pick_platform(index, ref).get("digest")
    if not isinstance(target, str) or not DIGEST.fullmatch(target):
        raise RegistryError(f"{ref}: the index entry's digest {str(target)[:80]!r} is not sha256:<64 hex>")
    return target
