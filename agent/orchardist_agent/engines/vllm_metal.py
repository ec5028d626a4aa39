"""vllm-metal: vLLM's own server with the Metal platform plugin, started as `vllm serve`.

Standard vLLM flags carry the memory plan because they survived every plugin version; the plugin's
environment knobs changed between versions, so they are kept as data keyed by the plugin version.
The user's flags go right after the model and the operator's last; the API key goes by
VLLM_API_KEY (env, not argv, so `ps` never shows it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

from orchardist_agent.engines.base import (
    ENGINE_HOST,
    EngineArgsError,
    EngineSpec,
    Launch,
    Measured,
    MemoryPlanLike,
    completion_probe,
    format_fraction,
)
from orchardist_agent.engines.policy import COMMON_ENV, LaunchPolicy, check_args, check_env

# Flags this driver writes itself (all in orchardist.api.launch.FLAG_OWNERS too).
OWNED_FLAGS = frozenset(
    {
        "--host",
        "--port",
        "--model",
        "--max-model-len",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--gpu-memory-utilization",
        "--block-size",
        "--served-model-name",
    }
)

#: vLLM flags a deployment may set (flag -> takes a value), from `vllm serve --help=all` (0.32.0,
#: tests/data/engines): sampling defaults, scheduling, logging and tool/reasoning parsers built in.
VLLM_FLAGS: dict[str, bool] = {
    "--seed": True,
    "--enable-prefix-caching": False,
    "--no-enable-prefix-caching": False,
    "--enable-chunked-prefill": False,
    "--no-enable-chunked-prefill": False,
    "--long-prefill-token-threshold": True,
    "--async-scheduling": False,
    "--no-async-scheduling": False,
    "--scheduling-policy": True,
    "--max-num-queued-reqs": True,
    "--enforce-eager": False,
    "--no-enforce-eager": False,
    "--max-logprobs": True,
    "--override-generation-config": True,
    "--default-chat-template-kwargs": True,
    "--chat-template-content-format": True,
    "--response-role": True,
    "--tokenizer-mode": True,
    "--enable-auto-tool-choice": False,
    "--no-enable-auto-tool-choice": False,
    "--tool-call-parser": True,
    "--reasoning-parser": True,
    "--enable-prompt-tokens-details": False,
    "--no-enable-prompt-tokens-details": False,
    "--disable-log-stats": False,
    "--enable-log-requests": False,
    "--no-enable-log-requests": False,
    "--enable-log-outputs": False,
    "--no-enable-log-outputs": False,
    "--max-log-len": True,
    "--log-level": True,
    "--uvicorn-log-level": True,
    "--disable-uvicorn-access-log": False,
    "--no-disable-uvicorn-access-log": False,
    "--disable-fastapi-docs": False,
    "--no-disable-fastapi-docs": False,
}

#: vLLM's code-loading flags (accepted only with code loading allowed).
VLLM_CODE_FLAGS: dict[str, bool] = {
    "--trust-remote-code": False,
    "--tool-parser-plugin": True,
    "--reasoning-parser-plugin": True,
    "--chat-template": True,
    "--logits-processors": True,
    "--enable-lora": False,
    "--lora-modules": True,
}

VLLM_ENV = COMMON_ENV | {
    "VLLM_LOGGING_LEVEL",
    "VLLM_LOG_STATS_INTERVAL",
    "VLLM_ENGINE_ITERATION_TIMEOUT_S",
}

_COMMON_KNOBS = frozenset(
    {
        "VLLM_MLX_DEVICE",
        "VLLM_METAL_MULTIMODAL_MODE",
        "VLLM_USE_MODELSCOPE",
        "VLLM_METAL_MODELSCOPE_CACHE",
        "VLLM_METAL_GDN_LAZY_KERNELS",
        "VLLM_METAL_DECODE_PIPELINE",
        "VLLM_METAL_COMPILED_MLP",
        "VLLM_METAL_MLA_KERNEL",
        "VLLM_METAL_DISABLE_NAX",
        "VLLM_METAL_SPEC_VERIFY_WINDOW",
        "VLLM_METAL_BUILD_FROM_SOURCE",
        "VLLM_METAL_RING_BASE_PORT",
    }
)


@dataclass(frozen=True)
class KnobSet:
    """The environment knobs one range of plugin versions reads (envs.py / docs/configuration.md)."""

    since: tuple[int, int, int, int]  # (major, minor, patch, dev stamp or _FINAL)
    knobs: frozenset[str]
    memory_fraction: bool  # VLLM_METAL_MEMORY_FRACTION exists (numeric value = KV budget fraction)
    note: str


_FINAL = 99_999_999_999_999  # a final release sorts after all of its .devYYYYMMDDhhmmss builds

# Oldest first. Sources: the 0.1.0 wheel's config.py; the 2026-08-22 snapshot's envs.py; later
# upstream envs.py, which dropped VLLM_METAL_MEMORY_FRACTION / _USE_PAGED_ATTENTION (after Aug 2026;
# the exact build is not known, so the boundary is the first build of September 2026).
KNOB_SETS: tuple[KnobSet, ...] = (
    KnobSet(
        since=(0, 0, 0, 0),
        knobs=frozenset(
            {
                "VLLM_METAL_MEMORY_FRACTION",
                "VLLM_METAL_USE_MLX",
                "VLLM_MLX_DEVICE",
                "VLLM_METAL_BLOCK_SIZE",
                "VLLM_METAL_DEBUG",
            }
        ),
        memory_fraction=False,  # 0.1.0's fraction meant a share of RAM x 0.5, not the plan's fraction
        note="0.1.0: psutil-RAM sizing",
    ),
    KnobSet(
        since=(0, 2, 0, 0),
        knobs=_COMMON_KNOBS | {"VLLM_METAL_MEMORY_FRACTION", "VLLM_METAL_USE_PAGED_ATTENTION"},
        memory_fraction=True,
        note="paged KV; --gpu-memory-utilization ignored until Jul 2026, so the fraction is also set",
    ),
    KnobSet(
        since=(0, 3, 0, 20260901000000),
        knobs=_COMMON_KNOBS
        | {
            "VLLM_METAL_NATIVE_SAMPLING",
            "VLLM_METAL_SPEC_INGEST_CHUNK",
            "VLLM_METAL_DISABLE_GQA_DECODE",
            "VLLM_METAL_TQ_PREFILL",
            "VLLM_METAL_TQ_PREFILL_MAX_MIB",
            "VLLM_METAL_MM_PREFIX_PATH",
            "VLLM_METAL_KV_COMMIT_PROBE",
            "VLLM_METAL_BACKEND",
            "VLLM_METAL_FUSED_MOE_DECODE",
        },
        memory_fraction=False,
        note="fraction = --gpu-memory-utilization only; env validated at start",
    ),
)

_RELEASE = re.compile(r"^v?(\d+(?:\.\d+)*)")


def version_key(version: str) -> tuple[int, int, int, int]:
    """'0.3.0.dev20260826120000' -> (0, 3, 0, 20260826120000); '0.2.0' -> (0, 2, 0, _FINAL).

    PEP 440 versions are read by packaging; a git-describe tag it refuses ('v0.2.0-20260420-142150',
    how source builds name themselves) is read as its leading release.
    """
    try:
        parsed = Version(version.strip())
    except InvalidVersion:
        m = _RELEASE.match(version.strip())
        if not m:
            raise EngineArgsError(f"unparseable vllm-metal version {version!r}") from None
        parsed = Version(m.group(1))
    major, minor, patch = (*parsed.release, 0, 0)[:3]
    return (major, minor, patch, parsed.dev if parsed.dev is not None else _FINAL)


def knob_set(version: str) -> KnobSet:
    key = version_key(version)
    return [k for k in KNOB_SETS if k.since <= key][-1]


POLICY = LaunchPolicy(
    engine="vllm-metal",
    flags=VLLM_FLAGS,
    env_names=VLLM_ENV | {"VLLM_MLX_DEVICE"},
    env_prefixes=("VLLM_METAL_",),  # then checked against the plugin version's knobs
    code_flags=VLLM_CODE_FLAGS,
    driver_owned=OWNED_FLAGS,
)


def check_knobs(version: str, env: dict[str, str] | None) -> None:
    """Refuse VLLM_METAL_* variables this plugin version does not read (later versions fail on them)."""
    known = knob_set(version).knobs
    unknown = sorted(n for n in env or {} if n.startswith("VLLM_METAL_") and n not in known)
    if unknown:
        raise EngineArgsError(f"vllm-metal {version} does not read {', '.join(unknown)}")


def serve_flags(spec: EngineSpec, port: int) -> list[str]:
    """The vLLM flags both vLLM drivers share (vllm serve and the api_server module take the same).

    `--served-model-name` takes several values, so it comes last: nothing of the user's follows it.
    """
    plan: MemoryPlanLike = spec.plan
    return [
        "--host",
        ENGINE_HOST,
        "--port",
        str(port),
        "--max-model-len",
        str(plan.max_model_len),
        "--max-num-seqs",
        str(plan.max_num_seqs),
        "--max-num-batched-tokens",
        str(plan.max_num_batched_tokens),
        "--gpu-memory-utilization",
        format_fraction(plan.gpu_memory_utilization),
        "--block-size",
        str(plan.block_size),
        "--served-model-name",
        spec.served_model_name,
    ]


def base_env(api_key: str | None) -> dict[str, str]:
    # Serving from a local directory: never stall on hub checks. VLLM_HOST_IP is the internal
    # rendezvous address (a VPN address could otherwise be picked), not the bind address.
    env = {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": ENGINE_HOST, "VLLM_NO_USAGE_STATS": "1"}
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return env


def launch(spec: EngineSpec, port: int) -> Launch:
    extra = check_args(POLICY, spec.engine_args, allow_code_loading=spec.allow_code_loading)
    user_env = check_env(POLICY, spec.env, allow_code_loading=spec.allow_code_loading)
    check_knobs(spec.runtime.version, user_env)
    env = user_env | base_env(spec.api_key)
    # A numeric fraction with the legacy (non-paged) KV path is refused by the plugin.
    legacy_kv = user_env.get("VLLM_METAL_USE_PAGED_ATTENTION") == "0"
    if knob_set(spec.runtime.version).memory_fraction and not legacy_kv:
        env["VLLM_METAL_MEMORY_FRACTION"] = format_fraction(spec.plan.gpu_memory_utilization)
    argv = [str(spec.runtime.bin("vllm")), "serve", str(spec.model_dir), *extra, *serve_flags(spec, port)]
    return Launch(
        argv=tuple(argv),
        env=env,
        host=ENGINE_HOST,
        port=port,
        probe=completion_probe(spec.served_model_name),
        api_key=spec.api_key,
        parse_log=parse_memory_breakdown,
    )


_BREAKDOWN = re.compile(r"Paged attention memory breakdown:(?P<body>.*)")
_PAIR = re.compile(r"(?P<key>[a-z_]+)=(?P<num>-?\d+(?:\.\d+)?)(?P<gb>GB)?")


def parse_memory_breakdown(line: str) -> Measured | None:
    """Parse the plugin's `Paged attention memory breakdown: ...` line (GB = 1e9 bytes).

    Read as `key=number[GB]` pairs, so every spelling works: metal_limit/usable_metal (Metal working
    set, captured in tests/data/engines), the older total_ram/usable_ram (RAM sizing), and the extra
    kv_budget_before_hybrid and hybrid_gdn_state parts of hybrid models. A failed start's error
    ("not enough Metal memory for KV cache. metal_limit=...") has the same pairs but no pool: not a
    measurement.
    """
    m = _BREAKDOWN.search(line)
    if not m:
        return None
    details: dict[str, float] = {}
    for p in _PAIR.finditer(m.group("body")):
        value = float(p.group("num"))
        details[p.group("key") + ("_bytes" if p.group("gb") else "")] = (
            value * 1e9 if p.group("gb") else value
        )
    if not details:
        return None
    overhead = details.get("overhead_bytes")
    blocks = details.get("num_blocks")
    return Measured(
        overhead_bytes=round(overhead) if overhead is not None else None,
        num_blocks=int(blocks) if blocks is not None else None,
        details=details,
    )
