"""Linux (development and CI hosts): memory and CPU from /proc, the OS from ``platform``.

A Linux host has no Metal working set; the planner still needs one, so it is estimated from RAM
with the same conservative steps as a Mac without MLX (source "estimate").
"""

from __future__ import annotations

import platform
from pathlib import Path

from orchardist.planning import macs

from .facts import Chip, Cpu, HostFacts, memory_facts


def parse_meminfo(text: str) -> int | None:
    """``MemTotal:  32594724 kB`` -> bytes."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            words = line.split()
            unit = 1024 if len(words) > 2 and words[2].lower() == "kb" else 1
            return int(words[1]) * unit
    return None


def parse_cpuinfo(text: str) -> tuple[str | None, int]:
    """The CPU's name and the number of logical processors from /proc/cpuinfo."""
    name: str | None = None
    count = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            count += 1
        elif key in ("model name", "Model", "Hardware") and name is None and value.strip():
            name = value.strip()
    return name, count


def gather(proc: Path = Path("/proc")) -> HostFacts:
    """Facts of this Linux host."""
    total = parse_meminfo((proc / "meminfo").read_text())
    name, count = parse_cpuinfo((proc / "cpuinfo").read_text())
    working_set = macs.estimate_working_set(total) if total else None
    return HostFacts(
        chip=Chip(name=name, family=None, model_identifier=platform.machine() or None),
        cpu=Cpu(performance_cores=count or None, efficiency_cores=0),
        memory=memory_facts(total, working_set, "estimate" if working_set else None),
        os_version=f"Linux {platform.release()}",
    )
