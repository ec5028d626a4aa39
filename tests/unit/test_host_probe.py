"""The Linux parsers, a simulated Mac and the facts' display strings: pure, no processes, no /proc.

The probe on this host (its /proc, disk, interfaces and subprocesses) is in
tests/integration/test_host_probe.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchardist.planning import macs
from orchardist_agent.host import linux
from orchardist_agent.host.facts import display_gi
from orchardist_agent.host.probe import simulated

MEMINFO = "MemTotal:       32594724 kB\nMemFree:         1234567 kB\nMemAvailable:   20000000 kB\n"
CPUINFO_X86 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n"
CPUINFO_ARM = (
    "processor\t: 0\nBogoMIPS\t: 48.00\n\nprocessor\t: 1\nBogoMIPS\t: 48.00\n\nModel\t\t: Raspberry Pi 5\n"
)


@pytest.mark.parametrize(
    ("text", "total"), [(MEMINFO, 32_594_724 * 1024), ("MemTotal: 1024\n", 1024), ("nothing", None)]
)
def test_meminfo(text: str, total: int | None) -> None:
    assert linux.parse_meminfo(text) == total


@pytest.mark.parametrize(
    ("text", "found"),
    [(CPUINFO_X86, ("AMD EPYC 7B13", 2)), (CPUINFO_ARM, ("Raspberry Pi 5", 2)), ("", (None, 0))],
)
def test_cpuinfo(text: str, found: tuple[str | None, int]) -> None:
    assert linux.parse_cpuinfo(text) == found


def test_linux_facts_from_a_proc_directory(tmp_path: Path) -> None:
    """gather() reads the two files it needs from the directory it is given."""
    (tmp_path / "meminfo").write_text(MEMINFO)
    (tmp_path / "cpuinfo").write_text(CPUINFO_X86)
    got = linux.gather(tmp_path)
    total = 32_594_724 * 1024
    assert (got.memory.total_bytes, got.memory.gpu_working_set_bytes) == (total, int(total * 2 / 3))
    assert got.memory.gpu_working_set_source == "estimate"
    assert (got.chip.name, got.cpu.performance_cores, got.cpu.efficiency_cores) == ("AMD EPYC 7B13", 2, 0)
    assert (got.os_version or "").startswith("Linux ")


def test_simulated_profile() -> None:
    status = simulated(macs.get("m4-pro-64gb")).model_dump(mode="json", by_alias=True, exclude_none=True)
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


def test_unknown_simulated_profile_is_an_error() -> None:
    with pytest.raises(KeyError, match="unknown Mac profile"):
        macs.get("m9-1tb")


@pytest.mark.parametrize(
    ("n", "shown"),
    [(64 * 2**30, "64Gi"), (int(107.5 * 2**30), "107.5Gi"), (int(7 * 2**30 * 2 / 3), "4.7Gi"), (None, None)],
)
def test_display_gi(n: int | None, shown: str | None) -> None:
    assert display_gi(n) == shown
