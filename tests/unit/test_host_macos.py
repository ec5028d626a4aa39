"""macOS parsers on the recorded command outputs in tests/data/macos/ (see its README for how they were made).

Expected values are Apple's published figures for each Mac and the working sets written in the files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchardist_agent.host import HostFacts, macos
from orchardist_agent.host.address import choose_address

DATA = Path(__file__).resolve().parents[1] / "data" / "macos"
GiB = 2**30


def read(mac: str, name: str) -> str | None:
    path = DATA / mac / name
    return path.read_text() if path.exists() else None


def facts(mac: str) -> HostFacts:
    sysctl = read(mac, "sysctl.txt")
    assert sysctl is not None
    return macos.facts_from_outputs(
        sysctl, read(mac, "system_profiler.json"), read(mac, "sw_vers.txt"), read(mac, "mlx_device_info.json")
    )


@dataclass(frozen=True)
class Expected:
    mac: str
    chip: str
    family: str
    ident: str
    p: int
    e: int
    gpu: int
    memory: int
    working_set: int
    source: str
    bandwidth_gb_s: int
    os: str
    wired: int | None = None


MACS = [
    Expected(
        "m1-8gb-mac-mini",
        "Apple M1",
        "M1",
        "Macmini9,1",
        4,
        4,
        8,
        8 * GiB,
        int(8 * GiB * 2 / 3),
        "estimate",
        68,
        "13.6.7",
    ),
    Expected(
        "m2-pro-mac-mini-32gb",
        "Apple M2 Pro",
        "M2 Pro",
        "Mac14,12",
        8,
        4,
        19,
        32 * GiB,
        22_906_503_168,
        "mlx",
        200,
        "15.6.1",
    ),
    Expected(
        "m4-pro-mac-mini-64gb",
        "Apple M4 Pro",
        "M4 Pro",
        "Mac16,11",
        10,
        4,
        20,
        64 * GiB,
        48 * GiB,
        "mlx",
        273,
        "15.5",
    ),
    Expected(
        "m3-ultra-mac-studio-256gb",
        "Apple M3 Ultra",
        "M3 Ultra",
        "Mac15,14",
        24,
        8,
        80,
        256 * GiB,
        239_075_557_376,
        "mlx",
        819,
        "15.4",
    ),
    Expected(
        "m4-max-macbook-pro-128gb",
        "Apple M4 Max",
        "M4 Max",
        "Mac16,5",
        12,
        4,
        40,
        128 * GiB,
        114_688 * 2**20,
        "sysctl",
        546,
        "26.1",
        wired=114_688 * 2**20,
    ),
]


@pytest.mark.parametrize("want", MACS, ids=[m.mac for m in MACS])
def test_facts_from_recorded_outputs(want: Expected) -> None:
    got = facts(want.mac)
    assert (got.chip.name, got.chip.family, got.chip.model_identifier) == (want.chip, want.family, want.ident)
    assert (got.cpu.performance_cores, got.cpu.efficiency_cores) == (want.p, want.e)
    assert got.gpu_cores == want.gpu
    assert got.memory.total_bytes == want.memory
    assert got.memory.gpu_working_set_bytes == want.working_set
    assert got.memory.gpu_working_set_source == want.source
    assert got.memory.wired_limit_bytes == want.wired
    assert got.memory_bandwidth_bytes_per_second == want.bandwidth_gb_s * 10**9
    assert got.os_version == want.os


def test_display_strings_are_written_with_the_numbers() -> None:
    got = facts("m4-pro-mac-mini-64gb").model_dump(by_alias=True, exclude_none=True)
    assert got["memory"] == {
        "totalBytes": 64 * GiB,
        "gpuWorkingSetBytes": 48 * GiB,
        "gpuWorkingSetSource": "mlx",
        "total": "64Gi",
        "gpuWorkingSet": "48Gi",
    }
    assert got["chip"] == {"name": "Apple M4 Pro", "family": "M4 Pro", "modelIdentifier": "Mac16,11"}
    assert got["gpuCores"] == 20


def test_sysctl_parser_skips_noise_and_reads_legacy_form() -> None:
    text = "hw.memsize: 17179869184\nsysctl: unknown oid 'iogpu.wired_limit_mb'\nhw.model = Mac16,10\n"
    assert macos.parse_sysctl(text) == {"hw.memsize": "17179869184", "hw.model": "Mac16,10"}


def test_a_missing_sysctl_key_does_not_shift_the_others() -> None:
    """macOS 13 has no iogpu.wired_limit_mb: the M1's file lacks the line, and every other value is right."""
    assert read("m1-8gb-mac-mini", "sysctl.stderr.txt") == "sysctl: unknown oid 'iogpu.wired_limit_mb'\n"
    parsed = macos.parse_sysctl(read("m1-8gb-mac-mini", "sysctl.txt") or "")
    assert "iogpu.wired_limit_mb" not in parsed
    assert parsed["hw.perflevel1.physicalcpu"] == "4"


def test_system_profiler_four_field_processor_string() -> None:
    """'proc 16:0:12:4' (a newer format): the last two fields are still P and E cores."""
    found = macos.parse_system_profiler(read("m4-max-macbook-pro-128gb", "system_profiler.json") or "")
    assert (found["performance_cores"], found["efficiency_cores"], found["gpu_cores"]) == (12, 4, 40)
    assert found["machine_name"] == "MacBook Pro"


def test_virtual_mac_falls_back_to_sysctl_cores() -> None:
    """A VM reports number_processors as a plain integer and "(Virtual)" in the chip name."""
    profiler = (
        '{"SPHardwareDataType": [{"chip_type": "Apple M4 Max (Virtual)", "machine_model": "VirtualMac2,1",'
        ' "number_processors": 4}], "SPDisplaysDataType": []}'
    )
    sysctl = (
        "hw.memsize: 17179869184\nhw.model: VirtualMac2,1\nmachdep.cpu.brand_string: Apple M4 Max (Virtual)\n"
        "hw.perflevel0.physicalcpu: 4\n"
    )
    got = macos.facts_from_outputs(sysctl, profiler, "15.5\n", None)
    assert (got.chip.family, got.cpu.performance_cores, got.cpu.efficiency_cores) == ("M4 Max", 4, None)
    assert got.gpu_cores is None
    assert got.memory_bandwidth_bytes_per_second == 546 * 10**9  # unknown GPU bin: the family's top figure
    assert got.memory.gpu_working_set_source == "estimate"


def test_mlx_output_with_a_warning_line_before_the_json() -> None:
    text = 'mx.metal.device_info is deprecated\n{"max_recommended_working_set_size": 51539607552}\n'
    assert macos.parse_mlx_device_info(text) == 51_539_607_552
    assert macos.parse_mlx_device_info("Traceback (most recent call last):\n") is None


def test_gather_runs_the_documented_commands() -> None:
    """gather() asks for sysctl, system_profiler, sw_vers and, given a runtime, MLX."""
    mac = "m4-pro-mac-mini-64gb"
    asked: list[tuple[str, ...]] = []

    def recorded(argv: Sequence[str]) -> str | None:
        asked.append(tuple(argv))
        by_command = {
            "sysctl": "sysctl.txt",
            "system_profiler": "system_profiler.json",
            "sw_vers": "sw_vers.txt",
            "/opt/runtime/bin/python3": "mlx_device_info.json",
        }
        return read(mac, by_command[argv[0]])

    got = macos.gather(recorded, "/opt/runtime/bin/python3")
    assert asked[0] == ("sysctl", *macos.SYSCTL_KEYS)
    assert ("system_profiler", "SPHardwareDataType", "SPDisplaysDataType", "-json") in asked
    assert ("sw_vers", "-productVersion") in asked
    assert ("/opt/runtime/bin/python3", "-c", macos.MLX_PROBE) in asked
    assert got.memory.gpu_working_set_source == "mlx"
    cache: dict[str, str | None] = {}
    asked.clear()
    macos.gather(recorded, "/opt/runtime/bin/python3", cache)
    macos.gather(recorded, "/opt/runtime/bin/python3", cache)
    assert [a[0] for a in asked].count("system_profiler") == 1  # the hardware report is asked once
    assert [a[0] for a in asked].count("/opt/runtime/bin/python3") == 1  # MLX once per wired limit
    assert [a[0] for a in asked].count("sysctl") == 2  # sysctl every time: the wired limit may change
    without_runtime = macos.gather(recorded, None)
    assert without_runtime.memory.gpu_working_set_source == "estimate"
    assert without_runtime.memory.gpu_working_set_bytes == int(64 * GiB * 0.75)


def test_address_from_recorded_ifconfig() -> None:
    """Loopback and the link-local bridge are skipped; en0's address is the one engines are reached at."""
    addresses = macos.parse_ifconfig(read("m4-pro-mac-mini-64gb", "ifconfig.txt") or "")
    assert addresses == ["127.0.0.1", "169.254.17.4", "198.51.100.23"]
    assert choose_address(addresses) == "198.51.100.23"
    assert choose_address(addresses, override="mac-1.lan") == "mac-1.lan"
    assert choose_address(["127.0.0.1"]) == "127.0.0.1"
    assert choose_address([]) == "127.0.0.1"


def test_garbled_hardware_report_still_gives_sysctl_facts() -> None:
    got = macos.facts_from_outputs(read("m4-pro-mac-mini-64gb", "sysctl.txt") or "", "not json", None, None)
    assert (got.chip.family, got.memory.total_bytes, got.gpu_cores) == ("M4 Pro", 64 * GiB, None)
    assert got.memory_bandwidth_bytes_per_second == 273 * 10**9
