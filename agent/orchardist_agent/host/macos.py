"""macOS: parse what ``sysctl``, ``system_profiler``, ``sw_vers`` and MLX print, and gather it.

The parsers are pure (tested on outputs captured on real Macs, tests/data/macos/); :func:`gather` is
the one place that runs the commands, through an injected runner.

``sysctl`` is run with the key names shown (``sysctl KEY...``, not ``-n``): a key missing on an
older macOS (``iogpu.wired_limit_mb`` before 14, ``hw.perflevel*`` on Intel) then drops one line
instead of shifting every later value into the wrong field.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from orchardist.planning import macs

from .facts import Chip, Cpu, HostFacts, WorkingSetSource, memory_facts

Runner = Callable[[Sequence[str]], "str | None"]

#: Core levels read from sysctl; no Apple chip has had more than two.
_LEVELS: Final = 2
SYSCTL_KEYS: Final = (
    "hw.memsize",
    "hw.model",
    "machdep.cpu.brand_string",
    *(f"hw.perflevel{i}.{key}" for i in range(_LEVELS) for key in ("physicalcpu", "name")),
    "iogpu.wired_limit_mb",
)
SYSCTL: Final = ("sysctl", *SYSCTL_KEYS)
SYSTEM_PROFILER: Final = ("system_profiler", "SPHardwareDataType", "SPDisplaysDataType", "-json")
#: Plain ``sw_vers``: its ``ProductVersion:`` line is what captures of real Macs show.
SW_VERS: Final = ("sw_vers",)
#: Run in the engine runtime's python: the agent never imports MLX itself. ``mx.device_info`` is the
#: current name; older MLX only has ``mx.metal.device_info`` (notes 4.2).
MLX_PROBE: Final = (
    "import json, mlx.core as mx; "
    "info = getattr(mx, 'device_info', None) or mx.metal.device_info; print(json.dumps(info()))"
)

#: The one core level that is not performance cores. M5 Pro/Max name theirs "Super" and
#: "Performance"; a virtual Mac has one level, "Standard".
_EFFICIENCY = "Efficiency"
_MEMORY = re.compile(r"^\s*(\d+)\s*(GB|TB)\s*$")
_VERSION = re.compile(r"^\d+(\.\d+)*$")


def parse_sysctl(text: str) -> dict[str, str]:
    """``key: value`` lines (and the legacy ``key = value``) -> a dict; other lines are ignored."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        for sep in (": ", " = "):
            key, hit, value = line.partition(sep)
            if hit and "." in key and " " not in key.strip():  # sysctl names are dotted
                found[key.strip()] = value.strip()
                break
    return found


def _int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def sysctl_cores(ctl: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(performance, efficiency) cores from the ``hw.perflevelN`` keys; (None, None) if there are none.

    A level counts as efficiency cores only when it is named "Efficiency"; without names (older
    macOS) level 0 is the performance cores and level 1 the efficiency cores.
    """
    perf = eff = 0
    seen = False
    for i in range(_LEVELS):
        count = _int(ctl.get(f"hw.perflevel{i}.physicalcpu"))
        if count is None:
            continue
        seen = True
        name = ctl.get(f"hw.perflevel{i}.name") or ("Performance" if i == 0 else _EFFICIENCY)
        if name == _EFFICIENCY:
            eff += count
        else:
            perf += count
    return (perf, eff) if seen else (None, None)


def _processor_cores(value: Any) -> tuple[int | None, int | None]:
    """``number_processors`` -> (performance, efficiency).

    "proc 8:4:4" is total:performance:efficiency. macOS 26 prints four fields on M5 Pro/Max,
    total:super:efficiency:performance ("proc 18:6:0:12"); super and performance cores are both
    performance cores here. A virtual Mac or a Rosetta process gets a plain number: no split.
    """
    if not isinstance(value, str):
        return None, None
    parts = [_int(p) for p in value.removeprefix("proc").strip().split(":")]
    if len(parts) == 3:
        return parts[1], parts[2]
    if len(parts) == 4:
        top, eff, middle = parts[1:]
        return (top + middle if top is not None and middle is not None else None), eff
    return None, None


def _memory_bytes(value: Any) -> int | None:
    """``physical_memory`` ("16 GB", binary units as for any RAM size) -> bytes."""
    m = _MEMORY.match(str(value)) if value is not None else None
    if not m:
        return None
    return int(m.group(1)) << (30 if m.group(2) == "GB" else 40)


def parse_system_profiler(text: str) -> dict[str, Any]:
    """Chip, machine, memory, core counts and GPU cores from the ``-json`` output."""
    data = json.loads(text)
    hardware: Mapping[str, Any] = (data.get("SPHardwareDataType") or [{}])[0]
    perf, eff = _processor_cores(hardware.get("number_processors"))
    found: dict[str, Any] = {
        "chip_type": hardware.get("chip_type"),
        "machine_name": hardware.get("machine_name"),
        "machine_model": hardware.get("machine_model"),
        "memory_bytes": _memory_bytes(hardware.get("physical_memory")),
        "performance_cores": perf,
        "efficiency_cores": eff,
    }
    for gpu in data.get("SPDisplaysDataType") or []:
        if gpu.get("sppci_device_type") in (None, "spdisplays_gpu") and "sppci_cores" in gpu:
            found["gpu_cores"] = _int(gpu["sppci_cores"])
            found["gpu_model"] = gpu.get("sppci_model") or gpu.get("_name")
            break
    return found


def parse_sw_vers(text: str) -> str | None:
    """The ``ProductVersion:`` line of ``sw_vers``; a bare version (``sw_vers -productVersion``) too."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip() == "ProductVersion":
            return value.strip() or None
    if lines and _VERSION.match(lines[0]):
        return lines[0]
    return None


def parse_mlx_device_info(text: str) -> int | None:
    """``max_recommended_working_set_size`` from the last dict printed (JSON, or Python's repr).

    Warnings (``mx.metal.device_info is deprecated ...``) may come first; a dict printed without
    ``json.dumps`` has single quotes.
    """
    dicts = [line.strip() for line in text.splitlines() if line.strip().startswith("{")]
    if not dicts:
        return None
    try:
        info = json.loads(dicts[-1])
    except ValueError:
        try:
            info = ast.literal_eval(dicts[-1])
        except (ValueError, SyntaxError):
            return None
    value = info.get("max_recommended_working_set_size") if isinstance(info, dict) else None
    return _int(value) if value else None


def _chip_name(candidates: Sequence[str | None]) -> str | None:
    """The first name of a known chip family, else the first name at all.

    An M1 on macOS 11.0 reports ``machdep.cpu.brand_string: Apple processor`` (archspec issue #38);
    system_profiler still names the chip there.
    """
    names = [c for c in candidates if c]
    return next((n for n in names if macs.family_of(n)), names[0] if names else None)


def facts_from_outputs(
    sysctl: str, system_profiler: str | None, sw_vers: str | None, mlx_device_info: str | None
) -> HostFacts:
    """HostFacts from the recorded/fresh outputs (address and model store are filled by the caller)."""
    ctl = parse_sysctl(sysctl)
    try:
        prof = parse_system_profiler(system_profiler) if system_profiler else {}
    except (ValueError, AttributeError, IndexError, TypeError):  # a garbled report: sysctl still answers
        prof = {}
    name = _chip_name([ctl.get("machdep.cpu.brand_string"), prof.get("chip_type"), prof.get("gpu_model")])
    family = macs.family_of(name) if name else None
    total = _int(ctl.get("hw.memsize")) or prof.get("memory_bytes")
    wired_mb = _int(ctl.get("iogpu.wired_limit_mb"))
    wired = wired_mb * (1 << 20) if wired_mb else None  # 0 = the default heuristic, not a limit

    working_set = parse_mlx_device_info(mlx_device_info) if mlx_device_info else None
    source: WorkingSetSource | None = "mlx" if working_set else None
    if working_set is None and wired is not None:
        working_set, source = wired, "sysctl"  # a raised wired limit becomes the working set (notes 4.1)
    if working_set is None and total:
        working_set, source = macs.estimate_working_set(total), "estimate"
    if working_set is not None and total and working_set > total:
        working_set = total  # a wired limit set above RAM cannot give the GPU more than RAM

    perf, eff = sysctl_cores(ctl)
    if perf is None:
        perf, eff = prof.get("performance_cores"), prof.get("efficiency_cores")
    gpu_cores = prof.get("gpu_cores")
    bandwidth = macs.CHIPS[family].bandwidth_bytes_per_second(gpu_cores) if family else None
    return HostFacts(
        chip=Chip(
            name=name, family=family, model_identifier=ctl.get("hw.model") or prof.get("machine_model")
        ),
        cpu=Cpu(performance_cores=perf, efficiency_cores=eff),
        gpu_cores=gpu_cores,
        memory=memory_facts(total, working_set, source, wired),
        memory_bandwidth_bytes_per_second=bandwidth,
        os_version=parse_sw_vers(sw_vers) if sw_vers else None,
    )


def gather(run: Runner, engine_python: str | None, cache: dict[str, str | None] | None = None) -> HostFacts:
    """Run the commands (``run`` returns stdout, or None when a command failed) and parse them.

    ``cache`` (kept by the caller across refreshes) spares the slow, unchanging outputs: the
    hardware report, and the MLX working set until ``iogpu.wired_limit_mb`` or the runtime changes.
    """
    memo: dict[str, str | None] = cache if cache is not None else {}

    def once(key: str, argv: Sequence[str]) -> str | None:
        if memo.get(key) is None:
            memo[key] = run(argv)
        return memo[key]

    sysctl = run(SYSCTL) or ""
    mlx = None
    if engine_python:
        wired = parse_sysctl(sysctl).get("iogpu.wired_limit_mb", "")
        mlx = once(f"mlx:{engine_python}:{wired}", (engine_python, "-c", MLX_PROBE))
    return facts_from_outputs(sysctl, once("system_profiler", SYSTEM_PROFILER), once("sw_vers", SW_VERS), mlx)


def parse_ifconfig(text: str) -> list[str]:
    """IPv4 addresses from macOS ``ifconfig`` output, in interface order."""
    found: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "inet":
            found.append(words[1])
    return found
