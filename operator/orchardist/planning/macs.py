"""Apple Silicon facts: the chip table and named Mac profiles.

Shared ground: the agent's ``--simulate <profile>`` reports a profile as its MacNode status, and
``orchardist plan --chip <profile>`` plans against one.
Sources (shared/notes/vllm-metal-and-model-artifacts.md):

* bandwidth and GPU core options: Apple's published figures (notes §4.4 chip table);
* GPU working set (``recommendedMaxWorkingSetSize``): observed values (notes §4.1) where one exists
  for that RAM size, else :func:`estimate_working_set` — each profile names its source;
* model identifiers: ``hw.model`` values (notes §4.3) and Apple's identification pages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

GB: Final = 1000**3
GiB: Final = 1 << 30


@dataclass(frozen=True)
class ChipFamily:
    """One chip family: its GPU core options and the memory bandwidth of each (Apple's figures)."""

    family: str
    #: GPU cores -> memory bandwidth in GB/s (decimal, as Apple publishes it).
    bandwidth_gb_s: dict[int, float]
    max_memory_gb: int

    @property
    def gpu_core_options(self) -> tuple[int, ...]:
        return tuple(sorted(self.bandwidth_gb_s))

    def bandwidth_bytes_per_second(self, gpu_cores: int | None = None) -> int:
        """Bandwidth for a core count; the nearest option at or below it (binned parts), else the lowest."""
        options = self.gpu_core_options
        if gpu_cores is None:
            return int(self.bandwidth_gb_s[options[-1]] * GB)
        at_or_below = [c for c in options if c <= gpu_cores]
        chosen = at_or_below[-1] if at_or_below else options[0]
        return int(self.bandwidth_gb_s[chosen] * GB)


def _same(cores: tuple[int, ...], gb_s: float) -> dict[int, float]:
    return dict.fromkeys(cores, gb_s)


#: notes §4.4 (Apple newsroom as quoted by MacRumors 2024-10-30; M3 Ultra coverage 2025-03-05).
#: M3 Max and M4 Max have two bandwidths, by GPU bin. M5 Pro/Max are unverified and left out.
CHIPS: Final[dict[str, ChipFamily]] = {
    c.family: c
    for c in (
        ChipFamily("M1", _same((7, 8), 68), 16),
        ChipFamily("M1 Pro", _same((14, 16), 200), 32),
        ChipFamily("M1 Max", _same((24, 32), 400), 64),
        ChipFamily("M1 Ultra", _same((48, 64), 800), 128),
        ChipFamily("M2", _same((8, 10), 100), 24),
        ChipFamily("M2 Pro", _same((16, 19), 200), 32),
        ChipFamily("M2 Max", _same((30, 38), 400), 96),
        ChipFamily("M2 Ultra", _same((60, 76), 800), 192),
        ChipFamily("M3", _same((8, 10), 100), 24),
        ChipFamily("M3 Pro", _same((14, 18), 150), 36),
        ChipFamily("M3 Max", {30: 300, 40: 400}, 128),
        ChipFamily("M3 Ultra", _same((60, 80), 819), 512),
        ChipFamily("M4", _same((8, 10), 120), 32),
        ChipFamily("M4 Pro", _same((16, 20), 273), 64),
        ChipFamily("M4 Max", {32: 410, 40: 546}, 128),
        ChipFamily("M5", _same((10,), 153), 32),
    )
}


def family_of(brand: str) -> str | None:
    """``"Apple M4 Pro"`` / ``"Apple M4 Max (Virtual)"`` -> ``"M4 Pro"`` / ``"M4 Max"``; None if unknown."""
    name = brand.replace("(Virtual)", "").strip().removeprefix("Apple").strip()
    return name if name in CHIPS else None


#: Conservative working-set fractions by RAM when nothing was measured (notes §4.1): 2/3 is the floor
#: every Mac below 64 GB has shown (vllm-metal's recipes test with it too); 75% observed at 64 GB,
#: 84% at 128 GB (macOS 26), ~87% at 256 GB. The step takes the observation at or below the RAM size.
WORKING_SET_STEPS: Final = ((256 * GiB, 0.87), (128 * GiB, 0.84), (64 * GiB, 0.75), (0, 2 / 3))


def estimate_working_set(total_bytes: int) -> int:
    """Estimate ``recommendedMaxWorkingSetSize`` from RAM alone (source "estimate" in MacNode status)."""
    for at_least, fraction in WORKING_SET_STEPS:
        if total_bytes >= at_least:
            return int(total_bytes * fraction)
    return int(total_bytes * 2 / 3)


@dataclass(frozen=True)
class MacProfile:
    """A named Mac: what a real agent would report for it."""

    name: str
    family: str
    machine: str
    model_identifier: str
    memory_bytes: int
    gpu_working_set_bytes: int
    working_set_source: str
    gpu_cores: int
    performance_cores: int
    efficiency_cores: int
    os_version: str
    bandwidth_override_gb_s: float | None = field(default=None)

    @property
    def chip_name(self) -> str:
        return f"Apple {self.family}"

    @property
    def chip(self) -> ChipFamily:
        return CHIPS[self.family]

    @property
    def memory_bandwidth_bytes_per_second(self) -> int:
        if self.bandwidth_override_gb_s is not None:
            return int(self.bandwidth_override_gb_s * GB)
        return self.chip.bandwidth_bytes_per_second(self.gpu_cores)


def _p(
    name: str,
    family: str,
    machine: str,
    ident: str,
    mem_gib: int,
    ws: int | None,
    source: str,
    gpu: int,
    p: int,
    e: int,
    os_version: str,
) -> MacProfile:
    memory = mem_gib * GiB
    if ws is None:
        ws = estimate_working_set(memory)
        source = f"estimate: {source}"
    else:
        source = f"observed: {source}"
    return MacProfile(name, family, machine, ident, memory, ws, source, gpu, p, e, os_version)


#: The standard profiles. Working sets marked "observed" are values reported for that RAM size in
#: notes §4.1 (the Mac itself may differ in chip); "estimate" uses :func:`estimate_working_set`.
PROFILES: Final[dict[str, MacProfile]] = {
    m.name: m
    for m in (
        _p(
            "m1-8gb",
            "M1",
            "Mac mini",
            "Macmini9,1",
            8,
            int(8 * GiB * 2 / 3),
            "5.73 GB = 2/3 of 8 GiB (vllm-metal #755, 8 GB M1)",
            8,
            4,
            4,
            "15.7",
        ),
        _p(
            "m1-16gb",
            "M1",
            "Mac mini",
            "Macmini9,1",
            16,
            int(10_922.67 * 1024**2),
            "10,922.67 MB = 2/3 (llama.cpp logs, 16 GB, older macOS)",
            8,
            4,
            4,
            "14.7",
        ),
        _p(
            "m2-16gb",
            "M2",
            "Mac mini",
            "Mac14,3",
            16,
            int(11_453.25 * 1024**2),
            "11,453.25 MB = 69.9% (llama.cpp CI logs, 16 GB M1 Pro)",
            10,
            4,
            4,
            "15.7",
        ),
        _p(
            "m2-pro-32gb",
            "M2 Pro",
            "Mac mini",
            "Mac14,12",
            32,
            26_800_000_000,
            "26.80 GB ~ 78% (vllm-metal #398, 32 GB M1 Max, macOS 26.4)",
            19,
            8,
            4,
            "26.4",
        ),
        _p(
            "m3-max-64gb",
            "M3 Max",
            "MacBook Pro",
            "Mac15,9",
            64,
            49_152 * 1024**2,
            "49,152 MB = 75% (llama-cpp-python macOS docs, 64 GB)",
            40,
            12,
            4,
            "15.7",
        ),
        _p(
            "m4-16gb",
            "M4",
            "Mac mini",
            "Mac16,10",
            16,
            12_400_000_000,
            "~12.4-12.7 GB ~ 74-78% (third-party logs, 16 GB M4 mini; low end taken)",
            10,
            4,
            6,
            "15.7",
        ),
        _p(
            "m4-24gb",
            "M4",
            "Mac mini",
            "Mac16,10",
            24,
            19_069_665_280,
            "19,069,665,280 B = 17.76 GiB ~ 74% (third-party log, 24 GB, macOS 26.2)",
            10,
            4,
            6,
            "26.2",
        ),
        _p(
            "m4-pro-24gb",
            "M4 Pro",
            "Mac mini",
            "Mac16,11",
            24,
            19_069_665_280,
            "19,069,665,280 B ~ 74% (third-party log, 24 GB, macOS 26.2)",
            16,
            8,
            4,
            "26.2",
        ),
        _p(
            "m4-pro-48gb",
            "M4 Pro",
            "Mac mini",
            "Mac16,11",
            48,
            None,
            "2/3 of RAM below 64 GB (no 48 GB observation)",
            20,
            10,
            4,
            "15.7",
        ),
        _p(
            "m4-pro-64gb",
            "M4 Pro",
            "Mac mini",
            "Mac16,11",
            64,
            49_152 * 1024**2,
            "49,152 MB = 48 GiB = 75% (llama-cpp-python macOS docs, 64 GB)",
            20,
            10,
            4,
            "15.7",
        ),
        _p(
            "m4-max-36gb",
            "M4 Max",
            "Mac Studio",
            "Mac16,9",
            36,
            None,
            "2/3 of RAM below 64 GB (no 36 GB observation)",
            32,
            10,
            4,
            "15.7",
        ),
        _p(
            "m4-max-128gb",
            "M4 Max",
            "Mac Studio",
            "Mac16,9",
            128,
            int(107.52 * GiB),
            "107.52 GiB = 84% (antirez/ds4 PR #893, 128 GB M5 Max, macOS 26)",
            40,
            12,
            4,
            "26.1",
        ),
        _p(
            "m2-ultra-192gb",
            "M2 Ultra",
            "Mac Studio",
            "Mac14,14",
            192,
            None,
            "84% as observed at 128 GB (no 192 GB observation)",
            76,
            16,
            8,
            "15.7",
        ),
        _p(
            "m3-ultra-256gb",
            "M3 Ultra",
            "Mac Studio",
            "Mac15,14",
            256,
            239_100_000_000,
            "~239.1 GB ~ 87% (code comment in a ds4 fork, 256 GB M3 Ultra)",
            80,
            24,
            8,
            "15.7",
        ),
        _p(
            "m3-ultra-512gb",
            "M3 Ultra",
            "Mac Studio",
            "Mac15,14",
            512,
            None,
            "87% as observed at 256 GB (no 512 GB observation)",
            80,
            24,
            8,
            "15.7",
        ),
    )
}


def get(name: str) -> MacProfile:
    """A profile by name; the error lists the known names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown Mac profile {name!r}; known: {', '.join(PROFILES)}") from None
