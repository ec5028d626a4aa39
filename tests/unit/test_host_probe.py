"""The probe on this (Linux) host, the Linux parsers, and a simulated Mac."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from orchardist import __version__
from orchardist.planning import macs
from orchardist_agent.host import linux, probe

MEMINFO = "MemTotal:       32594724 kB\nMemFree:         1234567 kB\nMemAvailable:   20000000 kB\n"
CPUINFO_X86 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n"
CPUINFO_ARM = (
    "processor\t: 0\nBogoMIPS\t: 48.00\n\nprocessor\t: 1\nBogoMIPS\t: 48.00\n\nModel\t\t: Raspberry Pi 5\n"
)


def test_meminfo_and_cpuinfo_parsers() -> None:
    assert linux.parse_meminfo(MEMINFO) == 32_594_724 * 1024
    assert linux.parse_meminfo("nothing") is None
    assert linux.parse_cpuinfo(CPUINFO_X86) == ("AMD EPYC 7B13", 2)
    assert linux.parse_cpuinfo(CPUINFO_ARM) == ("Raspberry Pi 5", 2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads this Linux host's /proc")
def test_probe_on_this_linux_host(tmp_path: Path) -> None:
    """Real /proc, real disk, real interfaces: the facts a Linux dev agent reports."""
    store = tmp_path / "store"
    got = probe(store)
    total = linux.parse_meminfo(Path("/proc/meminfo").read_text())
    assert got.memory.total_bytes == total
    assert got.memory.gpu_working_set_source == "estimate"
    assert got.memory.gpu_working_set_bytes == macs.estimate_working_set(total or 0)
    assert got.cpu.performance_cores == os.cpu_count()
    assert got.model_store.path == str(store)
    free = shutil.disk_usage(tmp_path).free
    assert got.model_store.free_bytes is not None
    assert abs(got.model_store.free_bytes - free) < 1 << 30
    assert got.address is not None and got.address.count(".") == 3
    assert got.agent_version == __version__
    assert got.simulated_profile is None


def test_simulated_profile_with_the_real_address_and_disk(tmp_path: Path) -> None:
    got = probe(tmp_path, "m4-pro-64gb", address="10.0.0.7")
    status = got.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert status["chip"] == {"name": "Apple M4 Pro", "family": "M4 Pro", "modelIdentifier": "Mac16,11"}
    assert status["cpu"] == {"performanceCores": 10, "efficiencyCores": 4}
    assert status["gpuCores"] == 20
    assert status["memory"] == {
        "totalBytes": 64 * 2**30,
        "gpuWorkingSetBytes": 48 * 2**30,
        "gpuWorkingSetSource": "simulated",
        "total": "64Gi",
        "gpuWorkingSet": "48Gi",
    }
    assert status["memoryBandwidthBytesPerSecond"] == 273 * 10**9
    assert status["simulatedProfile"] == "m4-pro-64gb"
    assert status["address"] == "10.0.0.7"
    assert abs(status["modelStore"]["freeBytes"] - shutil.disk_usage(tmp_path).free) < 1 << 30


def test_simulated_big_mac_display() -> None:
    got = probe("/nonexistent/store", "m4-max-128gb")
    assert got.memory.gpu_working_set == "107.5Gi"
    assert got.memory.total == "128Gi"
    assert got.model_store.free_bytes is not None  # measured at the nearest existing parent


def test_unknown_simulated_profile_is_an_error() -> None:
    with pytest.raises(KeyError, match="unknown Mac profile"):
        probe("/tmp", "m9-1tb")


def test_run_command_real_processes() -> None:
    """Real subprocesses: stdout on success; None for a missing tool or a failed command."""
    from orchardist_agent.host.probe import run_command

    assert run_command([sys.executable, "-c", "print('hello')"]) == "hello\n"
    assert run_command(["/nonexistent/tool"]) is None
    assert run_command([sys.executable, "-c", "import sys; sys.exit(3)"]) is None


def test_mlx_probe_in_a_runtime_without_mlx_gives_none() -> None:
    """The MLX probe is valid Python; in a runtime without MLX it fails and the probe falls back."""
    from orchardist_agent.host import macos
    from orchardist_agent.host.probe import run_command

    compile(macos.MLX_PROBE, "<mlx probe>", "exec")
    assert run_command([sys.executable, "-c", macos.MLX_PROBE]) is None
