"""macOS: parse what ``sysctl``, ``system_profiler``, ``sw_vers`` and MLX print, and gather it.

The parsers are pure (tested on recorded outputs, tests/data/macos/); :func:`gather` is the one
place that runs the commands, through an injected runner.

``sysctl`` is run with the key names shown (``sysctl KEY...``, not ``-n``): a key missing on an
older macOS (``iogpu.wired_limit_mb`` before 14, ``hw.perflevel*`` on Intel) then drops one line
instead of shifting every later value into the wrong field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from orchardist.planning import macs

from .facts import Chip, Cpu, HostFacts, WorkingSetSource, memory_facts

Runner = Callable[[Sequence[str]], "str | None"]

SYSCTL_KEYS: Final = (
    "hw.memsize",
    "hw.model",
    "machdep.cpu.brand_string",
    "hw.perflevel0.physicalcpu",
    "hw.perflevel1.physicalcpu",
    "iogpu.wired_limit_mb",
)
SYSCTL: Final = ("sysctl", *SYSCTL_KEYS)
SYSTEM_PROFILER: Final = ("system_profiler", "SPHardwareDataType", "SPDisplaysDataType", "-json")
SW_VERS: Final = ("sw_vers", "-productVersion")
#: Run in the engine runtime's python: the agent never imports MLX itself. ``mx.device_info`` is the
#: current name; older MLX only has ``mx.metal.device_info`` (notes 4.2).
MLX_PROBE: Final = (
    "import json, mlx.core as mx; "
    "info = getattr(mx, 'device_info', None) or mx.metal.device_info; print(json.dumps(info()))"
)


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


def parse_system_profiler(text: str) -> dict[str, Any]:
    """Chip, machine, model identifier, core counts and GPU cores from the ``-json`` output."""
    data = json.loads(text)
    hardware: Mapping[str, Any] = (data.get("SPHardwareDataType") or [{}])[0]
    found: dict[str, Any] = {
        "chip_type": hardware.get("chip_type"),
        "machine_name": hardware.get("machine_name"),
        "machine_model": hardware.get("machine_model"),
    }
    # "proc 14:10:4" = total:performance:efficiency (a newer sample has four fields, "proc 12:0:8:4":
    # the last two are still P and E); VMs report a plain integer (notes 4.3).
    procs = str(hardware.get("number_processors", ""))
    parts = procs.removeprefix("proc").strip().split(":")
    if len(parts) >= 3:
        found["performance_cores"] = _int(parts[-2])
        found["efficiency_cores"] = _int(parts[-1])
    for gpu in data.get("SPDisplaysDataType") or []:
        if gpu.get("sppci_device_type") in (None, "spdisplays_gpu") and "sppci_cores" in gpu:
            found["gpu_cores"] = _int(gpu["sppci_cores"])
            found["gpu_model"] = gpu.get("sppci_model") or gpu.get("_name")
            break
    return found


def parse_sw_vers(text: str) -> str | None:
    """``sw_vers -productVersion`` prints just the version ("15.5")."""
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    return line or None


def parse_mlx_device_info(text: str) -> int | None:
    """``max_recommended_working_set_size`` from ``mx.device_info()`` printed as JSON."""
    try:
        info = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    value = info.get("max_recommended_working_set_size") if isinstance(info, dict) else None
    return _int(value) if value else None


def facts_from_outputs(
    sysctl: str, system_profiler: str | None, sw_vers: str | None, mlx_device_info: str | None
) -> HostFacts:
    """HostFacts from the recorded/fresh outputs (address and model store are filled by the caller)."""
    ctl = parse_sysctl(sysctl)
    try:
        prof = parse_system_profiler(system_profiler) if system_profiler else {}
    except (ValueError, AttributeError, IndexError, TypeError):  # a garbled report: sysctl still answers
        prof = {}
    brand = ctl.get("machdep.cpu.brand_string") or prof.get("chip_type") or prof.get("gpu_model")
    family = macs.family_of(brand) if brand else None
    total = _int(ctl.get("hw.memsize"))
    wired_mb = _int(ctl.get("iogpu.wired_limit_mb"))
    wired = wired_mb * (1 << 20) if wired_mb else None  # 0 = the default heuristic, not a limit

    working_set = parse_mlx_device_info(mlx_device_info) if mlx_device_info else None
    source: WorkingSetSource | None = "mlx" if working_set else None
    if working_set is None and wired is not None:
        working_set, source = wired, "sysctl"  # a raised wired limit becomes the working set (notes 4.1)
    if working_set is None and total:
        working_set, source = macs.estimate_working_set(total), "estimate"

    gpu_cores = prof.get("gpu_cores")
    perf = _int(ctl.get("hw.perflevel0.physicalcpu"))
    eff = _int(ctl.get("hw.perflevel1.physicalcpu"))
    bandwidth = macs.CHIPS[family].bandwidth_bytes_per_second(gpu_cores) if family else None
    return HostFacts(
        chip=Chip(
            name=brand, family=family, model_identifier=ctl.get("hw.model") or prof.get("machine_model")
        ),
        cpu=Cpu(
            performance_cores=perf if perf is not None else prof.get("performance_cores"),
            efficiency_cores=eff if eff is not None else prof.get("efficiency_cores"),
        ),
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
