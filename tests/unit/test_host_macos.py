"""macOS parsers on command outputs captured on real Macs (tests/data/macos/, its README names each source).

Expected values are what each capture says (and Apple's figures for the chip where a row needs them).
Inputs written inline are marked: they test a rule, not a capture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchardist_agent.host import HostFacts, macos
from orchardist_agent.host.address import choose_address
from orchardist_agent.host.facts import Cpu, Memory

DATA = Path(__file__).resolve().parents[1] / "data" / "macos"
GiB = 2**30


def read(mac: str, name: str) -> str | None:
    path = DATA / mac / name
    return path.read_text() if path.exists() else None


def facts(mac: str, profiler: str = "system_profiler.json") -> HostFacts:
    return macos.facts_from_outputs(
        read(mac, "sysctl.txt") or "",
        read(mac, profiler),
        read(mac, "sw_vers.txt"),
        read(mac, "mlx_device_info.txt"),
    )


@dataclass(frozen=True)
class Expected:
    mac: str
    chip: str | None
    family: str | None
    ident: str | None
    cores: tuple[int | None, int | None]
    gpu: int | None
    memory: int | None
    working_set: int | None
    source: str | None
    bandwidth_gb_s: int | None
    os: str | None
    profiler: str = "system_profiler.json"


MACS = [
    # sysctl + system_profiler + sw_vers from one macOS 26 runner: one "Standard" level, no E-cores.
    Expected(
        "virtual-mac-m1-macos-26", "Apple M1 (Virtual)", "M1", "VirtualMac2,1", (3, 0), None,
        7 * GiB, int(7 * GiB * 2 / 3), "estimate", 68, "26.6.2",
    ),
    # "Super" + "Performance" levels are all performance cores; M5 Max is not in the chip table yet.
    Expected(
        "m5-max-macbook-pro-128gb", "Apple M5 Max", None, "Mac17,6", (18, 0), None,
        128 * GiB, int(128 * GiB * 0.84), "estimate", None, None,
    ),
    # system_profiler alone: memory from physical_memory, cores from "proc 8:4:4".
    Expected(
        "m1-macbook-air-16gb", "Apple M1", "M1", "MacBookAir10,1", (4, 4), None,
        16 * GiB, int(16 * GiB * 2 / 3), "estimate", 68, None,
    ),
    # The same Mac asked from a Rosetta process: no chip_type, a plain processor count.
    Expected(
        "m1-macbook-air-16gb", None, None, "MacBookAir10,1", (None, None), None,
        16 * GiB, int(16 * GiB * 2 / 3), "estimate", None, None, "system_profiler.rosetta.json",
    ),
    # Only the displays report: the GPU names the chip and its core count picks the bandwidth.
    Expected(
        "m1-pro-macbook-pro", "Apple M1 Pro", "M1 Pro", None, (None, None), 14,
        None, None, None, 200, None,
    ),
    # Named levels "Performance" and "Efficiency".
    Expected(
        "apple-m4-family-24gb", None, None, None, (8, 4), None,
        24 * GiB, int(24 * GiB * 2 / 3), "estimate", None, None,
    ),
    # Levels without names: level 0 is the performance cores.
    Expected("m1-pro-macos-12", None, None, None, (8, 2), None, None, None, None, None, None),
    # MLX alone (a Python dict): the working set is measured, nothing else is known.
    Expected(
        "m2-generation-mlx", None, None, None, (None, None), None,
        None, 188_743_680_000, "mlx", None, None,
    ),
]  # fmt: skip


@pytest.mark.parametrize("want", MACS, ids=[f"{m.mac}/{m.profiler}" for m in MACS])
def test_facts_from_captured_outputs(want: Expected) -> None:
    got = facts(want.mac, want.profiler)
    assert (got.chip.name, got.chip.family, got.chip.model_identifier) == (want.chip, want.family, want.ident)
    assert (got.cpu.performance_cores, got.cpu.efficiency_cores) == want.cores
    assert got.gpu_cores == want.gpu
    assert got.memory.total_bytes == want.memory
    assert got.memory.gpu_working_set_bytes == want.working_set
    assert got.memory.gpu_working_set_source == want.source
    assert got.memory.wired_limit_bytes is None  # no capture shows a raised wired limit
    bandwidth = want.bandwidth_gb_s * 10**9 if want.bandwidth_gb_s is not None else None
    assert got.memory_bandwidth_bytes_per_second == bandwidth
    assert got.os_version == want.os


def test_display_strings_are_written_with_the_numbers() -> None:
    got = facts("virtual-mac-m1-macos-26").model_dump(by_alias=True, exclude_none=True)
    assert got["memory"] == {
        "totalBytes": 7 * GiB,
        "gpuWorkingSetBytes": int(7 * GiB * 2 / 3),
        "gpuWorkingSetSource": "estimate",
        "total": "7Gi",
        "gpuWorkingSet": "4.7Gi",
    }
    assert got["chip"] == {"name": "Apple M1 (Virtual)", "family": "M1", "modelIdentifier": "VirtualMac2,1"}
    assert got["cpu"] == {"performanceCores": 3, "efficiencyCores": 0}


@pytest.mark.parametrize(
    ("mac", "profiler", "chip", "model", "memory", "cores"),
    [
        ("m5-max-macbook-pro-128gb", "system_profiler.json", "Apple M5 Max", "Mac17,6", 128 * GiB, (18, 0)),
        ("virtual-mac-m1-macos-26", "system_profiler.json", "Apple M1 (Virtual)", "VirtualMac2,1", 7 * GiB,
         (None, None)),
        ("m1-macbook-air-16gb", "system_profiler.json", "Apple M1", "MacBookAir10,1", 16 * GiB, (4, 4)),
        ("m1-macbook-air-16gb", "system_profiler.rosetta.json", None, "MacBookAir10,1", 16 * GiB,
         (None, None)),
    ],
)  # fmt: skip
def test_system_profiler_hardware_report(
    mac: str, profiler: str, chip: str | None, model: str, memory: int, cores: tuple[int | None, int | None]
) -> None:
    """Three- and four-field processor strings, a plain number (VM, Rosetta), memory in binary GB."""
    found = macos.parse_system_profiler(read(mac, profiler) or "")
    assert (found["chip_type"], found["machine_model"], found["memory_bytes"]) == (chip, model, memory)
    assert (found["performance_cores"], found["efficiency_cores"]) == cores
    assert "gpu_cores" not in found  # no displays report in these captures


def test_system_profiler_displays_report_with_attached_displays() -> None:
    """The GPU entry is found among the display entries nested in it."""
    found = macos.parse_system_profiler(read("m1-pro-macbook-pro", "system_profiler.json") or "")
    assert (found["gpu_cores"], found["gpu_model"], found["chip_type"]) == (14, "Apple M1 Pro", None)


@pytest.mark.parametrize(
    ("mac", "cores"),
    [
        ("m5-max-macbook-pro-128gb", (18, 0)),  # Super 6 + Performance 12
        ("virtual-mac-m1-macos-26", (3, 0)),  # Standard 3
        ("apple-m4-family-24gb", (8, 4)),  # Performance 8, Efficiency 4
        ("m1-pro-macos-12", (8, 2)),  # unnamed levels, printed level 1 first
        ("m1-macbook-air-16gb", (None, None)),  # no sysctl capture
    ],
)
def test_sysctl_cores(mac: str, cores: tuple[int | None, int | None]) -> None:
    assert macos.sysctl_cores(macos.parse_sysctl(read(mac, "sysctl.txt") or "")) == cores


def test_sysctl_parser_reads_only_the_keys_printed() -> None:
    """A key unknown to that Mac (here the perflevel1 and iogpu keys) is absent, the rest are exact."""
    assert macos.parse_sysctl(read("virtual-mac-m1-macos-26", "sysctl.txt") or "") == {
        "hw.model": "VirtualMac2,1",
        "hw.memsize": "7516192768",
        "hw.nperflevels": "1",
        "hw.perflevel0.name": "Standard",
        "hw.perflevel0.physicalcpu": "3",
        "machdep.cpu.brand_string": "Apple M1 (Virtual)",
    }


def test_sysctl_parser_skips_noise_and_reads_legacy_form() -> None:
    """Inline: sysctl's own error line (as in archspec issue #76) and the legacy ``key = value`` form."""
    text = "hw.memsize: 17179869184\nsysctl: unknown oid 'machdep.cpu.model'\nhw.model = Mac16,10\n"
    assert macos.parse_sysctl(text) == {"hw.memsize": "17179869184", "hw.model": "Mac16,10"}


def test_sysctl_keys_asked_include_the_level_names() -> None:
    assert {"hw.perflevel0.name", "hw.perflevel1.name", "iogpu.wired_limit_mb"} <= set(macos.SYSCTL_KEYS)


@pytest.mark.parametrize(
    ("text", "version"),
    [
        (read("virtual-mac-m1-macos-26", "sw_vers.txt") or "", "26.6.2"),  # captured `sw_vers`
        ("15.5\n", "15.5"),  # inline: `sw_vers -productVersion`
        ("ProductName:\tmacOS\nProductVersionExtra:\t(a)\nProductVersion:\t13.4.1\n", "13.4.1"),  # inline
        ("", None),
        ("ProductName:\t\tmacOS\n", None),
        ("sw_vers: command not found\n", None),  # inline: never a version from an error line
    ],
)
def test_sw_vers(text: str, version: str | None) -> None:
    assert macos.parse_sw_vers(text) == version


@pytest.mark.parametrize(
    ("text", "working_set"),
    [
        (read("m2-generation-mlx", "mlx_device_info.txt") or "", 188_743_680_000),  # captured Python dict
        # inline: MLX's deprecation warning before the JSON the probe prints
        (
            "mx.metal.device_info is deprecated and will be removed in a future version. Use mx.device_info "
            'instead.\n{"max_recommended_working_set_size": 51539607552}\n',
            51_539_607_552,
        ),
        ("Traceback (most recent call last):\nModuleNotFoundError: No module named 'mlx'\n", None),
        ("{not a dict\n", None),
        ("", None),
    ],
)
def test_mlx_device_info(text: str, working_set: int | None) -> None:
    assert macos.parse_mlx_device_info(text) == working_set


@pytest.mark.parametrize(
    ("sysctl", "mlx", "working_set", "source", "wired"),
    [
        # inline (no capture reads back a raised limit): 128 GiB with iogpu.wired_limit_mb=114688, the
        # setting antirez/ds4 PR #893 reports
        ("hw.memsize: 137438953472\niogpu.wired_limit_mb: 114688\n", None, 114_688 * 2**20, "sysctl",
         114_688 * 2**20),
        # MLX measures the raised limit itself and wins over the sysctl figure
        ("hw.memsize: 137438953472\niogpu.wired_limit_mb: 114688\n", '{"max_recommended_working_set_size": '
         "120259084288}", 120_259_084_288, "mlx", 114_688 * 2**20),
        # 0 is macOS's default rule, not a limit
        ("hw.memsize: 137438953472\niogpu.wired_limit_mb: 0\n", None, int(128 * GiB * 0.84), "estimate",
         None),
        # a limit above RAM gives the GPU at most RAM
        ("hw.memsize: 17179869184\niogpu.wired_limit_mb: 20000\n", None, 16 * GiB, "sysctl", 20_000 * 2**20),
    ],
)  # fmt: skip
def test_working_set_sources(
    sysctl: str, mlx: str | None, working_set: int, source: str, wired: int | None
) -> None:
    got = macos.facts_from_outputs(sysctl, None, None, mlx).memory
    assert (got.gpu_working_set_bytes, got.gpu_working_set_source, got.wired_limit_bytes) == (
        working_set,
        source,
        wired,
    )


def test_a_chip_name_of_a_known_family_wins() -> None:
    """Inline: an M1 on macOS 11.0 says "Apple processor" in sysctl (archspec issue #38); system_profiler
    names the chip, so the Mac is still an M1 with M1 bandwidth."""
    profiler = '{"SPHardwareDataType": [{"chip_type": "Apple M1", "number_processors": "proc 8:4:4"}]}'
    got = macos.facts_from_outputs("machdep.cpu.brand_string: Apple processor\n", profiler, None, None)
    assert (got.chip.name, got.chip.family, got.memory_bandwidth_bytes_per_second) == (
        "Apple M1",
        "M1",
        68 * 10**9,
    )


def test_gather_runs_the_documented_commands() -> None:
    """gather() asks for sysctl, system_profiler, sw_vers and, given a runtime, MLX; slow answers are cached.

    The runner answers from two captures (a virtual Mac, and MLX's output on another Mac): this checks
    which commands run and how often, not one machine's facts.
    """
    asked: list[tuple[str, ...]] = []
    answers = {
        "sysctl": read("virtual-mac-m1-macos-26", "sysctl.txt"),
        "system_profiler": read("virtual-mac-m1-macos-26", "system_profiler.json"),
        "sw_vers": read("virtual-mac-m1-macos-26", "sw_vers.txt"),
        "/opt/runtime/bin/python3": read("m2-generation-mlx", "mlx_device_info.txt"),
    }

    def recorded(argv: Sequence[str]) -> str | None:
        asked.append(tuple(argv))
        return answers[argv[0]]

    got = macos.gather(recorded, "/opt/runtime/bin/python3")
    assert asked[0] == ("sysctl", *macos.SYSCTL_KEYS)
    assert ("system_profiler", "SPHardwareDataType", "SPDisplaysDataType", "-json") in asked
    assert ("sw_vers",) in asked
    assert ("/opt/runtime/bin/python3", "-c", macos.MLX_PROBE) in asked
    assert (got.memory.gpu_working_set_source, got.os_version) == ("mlx", "26.6.2")
    cache: dict[str, str | None] = {}
    asked.clear()
    macos.gather(recorded, "/opt/runtime/bin/python3", cache)
    macos.gather(recorded, "/opt/runtime/bin/python3", cache)
    assert [a[0] for a in asked].count("system_profiler") == 1  # the hardware report is asked once
    assert [a[0] for a in asked].count("/opt/runtime/bin/python3") == 1  # MLX once per wired limit
    assert [a[0] for a in asked].count("sysctl") == 2  # sysctl every time: the wired limit may change
    without_runtime = macos.gather(recorded, None)
    assert without_runtime.memory.gpu_working_set_source == "estimate"


def test_mlx_probe_is_valid_python() -> None:
    compile(macos.MLX_PROBE, "<mlx probe>", "exec")


def test_address_from_captured_ifconfig() -> None:
    """Loopback is skipped; en0's address is the one engines are reached at."""
    addresses = macos.parse_ifconfig(read("wifi-mac-2020", "ifconfig.txt") or "")
    assert addresses == ["127.0.0.1", "192.168.3.227"]
    assert choose_address(addresses) == "192.168.3.227"


@pytest.mark.parametrize(
    ("candidates", "override", "chosen"),
    [
        (["127.0.0.1", "127.0.0.2", "192.168.0.13"], None, "192.168.0.13"),  # a second loopback address
        (["127.0.0.1", "169.254.243.94", "192.168.3.227"], None, "192.168.3.227"),  # a self-assigned one
        (["127.0.0.1", "192.168.3.227"], "mac-1.lan", "mac-1.lan"),
        (["127.0.0.1"], None, "127.0.0.1"),
        ([], None, "127.0.0.1"),
    ],
)
def test_choose_address(candidates: list[str], override: str | None, chosen: str) -> None:
    assert choose_address(candidates, override) == chosen


def test_garbled_hardware_report_still_gives_sysctl_facts() -> None:
    got = macos.facts_from_outputs(
        read("virtual-mac-m1-macos-26", "sysctl.txt") or "", "not json", None, None
    )
    assert (got.chip.family, got.memory.total_bytes, got.gpu_cores) == ("M1", 7 * GiB, None)
    assert got.memory_bandwidth_bytes_per_second == 68 * 10**9


@pytest.mark.parametrize(
    "build",
    [
        lambda: HostFacts(memory=Memory(total_bytes=GiB, gpu_working_set_bytes=2 * GiB)),
        lambda: HostFacts(cpu=Cpu(performance_cores=-1)),
        lambda: HostFacts(gpu_cores=-1),
    ],
    ids=["working set above RAM", "negative cores", "negative GPU cores"],
)
def test_facts_use_the_api_validation(build: Callable[[], object]) -> None:
    """HostFacts is made of the API's types: a status the API server would refuse fails in the agent."""
    with pytest.raises(ValidationError):
        build()
