"""The host probe: one call, three sources (macOS, Linux, or a simulated Mac profile).

``probe(store_path, simulate)`` is what the node loop calls every refresh; it never raises for a
missing tool (a field it cannot learn stays None) so a heartbeat is never lost to a probe.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from orchardist import __version__, log
from orchardist.planning import macs

from . import linux, macos
from .address import choose_address, host_addresses
from .facts import Chip, Cpu, HostFacts, ModelStore, memory_facts

_log = log.get(__name__)

#: The engine runtime's python, where MLX is importable (the agent itself never imports MLX).
ENGINE_PYTHON_ENV = "ORCHARDIST_ENGINE_PYTHON"
COMMAND_TIMEOUT_S = 20.0
#: Outputs that do not change while the agent runs (see macos.gather); one per process.
_CACHE: dict[str, str | None] = {}


def run_command(argv: Sequence[str]) -> str | None:
    """Run a probe command; its stdout, or None if it is missing, fails or hangs."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _log.info("probe command unavailable", argv=list(argv)[:3], error=str(exc))
        return None
    if done.returncode != 0 and not done.stdout:
        _log.info(
            "probe command failed", argv=list(argv)[:3], code=done.returncode, stderr=done.stderr[-300:]
        )
        return None
    return done.stdout


def model_store(path: Path) -> ModelStore:
    """Free bytes on the store's disk (the nearest existing parent if the store is not made yet)."""
    probe_at = path
    while not probe_at.exists() and probe_at != probe_at.parent:
        probe_at = probe_at.parent
    try:
        free = shutil.disk_usage(probe_at).free
    except OSError:
        free = None
    return ModelStore(path=str(path), free_bytes=free)


def simulated(profile: macs.MacProfile) -> HostFacts:
    """A named Mac's facts (chip, memory, cores); address and disk still come from the real host."""
    return HostFacts(
        chip=Chip(name=profile.chip_name, family=profile.family, model_identifier=profile.model_identifier),
        cpu=Cpu(performance_cores=profile.performance_cores, efficiency_cores=profile.efficiency_cores),
        gpu_cores=profile.gpu_cores,
        memory=memory_facts(profile.memory_bytes, profile.gpu_working_set_bytes, "simulated"),
        memory_bandwidth_bytes_per_second=profile.memory_bandwidth_bytes_per_second,
        os_version=profile.os_version,
        simulated_profile=profile.name,
    )


def probe(
    store_path: Path | str,
    simulate: str | None = None,
    *,
    address: str | None = None,
    engine_python: str | None = None,
) -> HostFacts:
    """This host's MacNode status facts. ``simulate`` names a Mac profile (planning.macs.PROFILES)."""
    store = Path(store_path)
    if simulate:
        facts = simulated(macs.get(simulate))
    elif sys.platform == "darwin":
        python = engine_python or os.environ.get(ENGINE_PYTHON_ENV)
        facts = macos.gather(run_command, python, _CACHE)
    elif sys.platform.startswith("linux"):
        facts = linux.gather()
    else:
        facts = HostFacts()
    return facts.model_copy(
        update={
            "model_store": model_store(store),
            # Interfaces are listed only when no address was given.
            "address": address or choose_address(host_addresses(run_command)),
            "agent_version": __version__,
        }
    )
