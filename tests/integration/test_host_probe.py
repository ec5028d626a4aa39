"""The host probe on this (Linux) host: real /proc, disk, interfaces and subprocesses."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from orchardist import __version__
from orchardist.planning import macs
from orchardist_agent.host import linux, macos, probe
from orchardist_agent.host.probe import run_command


def test_probe_on_this_linux_host(tmp_path: Path) -> None:
    """The facts a Linux development agent reports (this suite runs on Linux)."""
    assert sys.platform.startswith("linux")
    store = tmp_path / "store"
    got = probe(store)
    total = linux.parse_meminfo(Path("/proc/meminfo").read_text())
    assert total is not None
    assert got.memory.total_bytes == total
    assert got.memory.gpu_working_set_source == "estimate"
    assert got.memory.gpu_working_set_bytes == macs.estimate_working_set(total)
    assert got.cpu.performance_cores == os.cpu_count()
    assert got.model_store.path == str(store)
    free = shutil.disk_usage(tmp_path).free
    assert got.model_store.free_bytes is not None
    assert abs(got.model_store.free_bytes - free) < 1 << 30
    assert got.address is not None and got.address.count(".") == 3
    assert got.agent_version == __version__
    assert got.simulated_profile is None


def test_simulated_profile_with_the_real_disk(tmp_path: Path) -> None:
    got = probe(tmp_path, "m4-pro-64gb", address="10.0.0.7")
    status = got.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert (status["simulatedProfile"], status["address"]) == ("m4-pro-64gb", "10.0.0.7")
    assert abs(status["modelStore"]["freeBytes"] - shutil.disk_usage(tmp_path).free) < 1 << 30


def test_store_not_made_yet_is_measured_at_its_nearest_parent() -> None:
    got = probe("/nonexistent/store", "m4-max-128gb")
    assert (got.memory.gpu_working_set, got.memory.total) == ("107.5Gi", "128Gi")
    assert got.model_store.free_bytes is not None
    assert abs(got.model_store.free_bytes - shutil.disk_usage("/").free) < 1 << 30


def test_run_command_real_processes() -> None:
    """Real subprocesses: stdout on success; None for a missing tool or a failed command."""
    assert run_command([sys.executable, "-c", "print('hello')"]) == "hello\n"
    assert run_command(["/nonexistent/tool"]) is None
    assert run_command([sys.executable, "-c", "import sys; sys.exit(3)"]) is None


def test_mlx_probe_in_a_runtime_without_mlx_gives_none() -> None:
    """In a runtime without MLX the probe fails and the working set falls back to sysctl or an estimate."""
    assert run_command([sys.executable, "-c", macos.MLX_PROBE]) is None
