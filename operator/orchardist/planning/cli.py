"""``orchardist plan``: a model's memory plan on a Mac, offline.

    orchardist plan --model-config PATH --weights-bytes N --working-set BYTES [--json] ...
    orchardist plan --model-config PATH --weights-bytes N --chip m4-pro-64gb
    orchardist plan --model-dir DIR                     # a table over the standard Mac profiles

The same ``planning.memory.plan`` the controller places with; exit code 0 when it fits (or for the
table), 1 when the one planned Mac cannot serve the model, 2 for unusable input.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from orchardist.planning import macs
from orchardist.planning.memory import (
    BLOCK_SIZES,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    MemoryPlan,
    NodeCapacity,
    PlanRequest,
    gib,
    plan,
)
from orchardist.planning.profile import ModelProfile, ProfileError, from_config, from_gguf_metadata

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1 << 10,
    "mi": 1 << 20,
    "gi": 1 << 30,
    "ti": 1 << 40,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


def parse_bytes(text: str) -> int:
    """``"51539607552"``, ``"48Gi"``, ``"51.5GB"`` -> bytes (Ki/Mi/Gi binary, K/M/G decimal)."""
    match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 51539607552, 48Gi, 51.5GB)")
    return int(float(match.group(1).replace("_", "")) * _UNITS[match.group(2).lower()])


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def register(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model-config", type=Path, metavar="PATH", help="config.json (or a directory holding it)"
    )
    model.add_argument(
        "--model-dir",
        type=Path,
        metavar="DIR",
        help="a model directory: config.json and the weight bytes (*.safetensors, *.gguf) from it",
    )
    model.add_argument(
        "--weights-bytes",
        type=parse_bytes,
        metavar="N",
        help="exact bytes of the weight files (optional with --model-dir)",
    )
    model.add_argument(
        "--model", metavar="oci://REF", help="an OCI model: manifest and config only, no weights"
    )
    model.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="talk plain HTTP to this registry (repeatable), for --model",
    )
    mac = parser.add_argument_group("Mac (neither: a table over the standard profiles)")
    where = mac.add_mutually_exclusive_group()
    where.add_argument(
        "--working-set",
        type=parse_bytes,
        metavar="BYTES",
        help="the Mac's GPU working set (max_recommended_working_set_size)",
    )
    where.add_argument(
        "--chip",
        metavar="PROFILE",
        choices=sorted(macs.PROFILES),
        help=f"a named Mac profile: {', '.join(macs.PROFILES)}",
    )
    where.add_argument(
        "--node",
        metavar="NAME",
        help="a MacNode in the cluster: its reported working set, bandwidth and what its replicas hold",
    )
    mac.add_argument("--kubeconfig", help="with --node: kubeconfig (default: $KUBECONFIG, ~/.kube/config)")
    mac.add_argument(
        "--bandwidth",
        type=float,
        metavar="GB/S",
        help="memory bandwidth for the decode estimate with --working-set",
    )
    mac.add_argument(
        "--reserved",
        type=parse_bytes,
        default=0,
        metavar="BYTES",
        help="working-set bytes already held by other replicas on this Mac",
    )
    knobs = parser.add_argument_group("engine")
    knobs.add_argument(
        "--gpu-memory-utilization",
        type=_fraction,
        default=DEFAULT_GPU_MEMORY_UTILIZATION,
        metavar="F",
        help=f"fraction of the working set (default {DEFAULT_GPU_MEMORY_UTILIZATION})",
    )
    knobs.add_argument(
        "--overhead",
        type=parse_bytes,
        metavar="BYTES",
        help="engine overhead (default: 1 GiB + 512 KiB per batched token)",
    )
    knobs.add_argument(
        "--block-size",
        type=int,
        choices=BLOCK_SIZES,
        default=DEFAULT_BLOCK_SIZE,
        metavar="N",
        help=f"KV block size in tokens: {', '.join(map(str, BLOCK_SIZES))} (default 16)",
    )
    knobs.add_argument("--max-num-seqs", type=_positive, metavar="N", help="concurrent sequences")
    knobs.add_argument("--max-num-batched-tokens", type=_positive, metavar="N", help="tokens per engine step")
    knobs.add_argument(
        "--context", type=_positive, metavar="N", help="context length (default: the largest that fits)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (stable keys) instead of a table")
    parser.set_defaults(func=run)


class UsageError(Exception):
    """Input the planner cannot use; exit 2 with the message."""


def _weight_files(directory: Path) -> list[Path]:
    """The weight shards of a model directory (a vision projector ``mmproj`` is not the model)."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.suffix in (".safetensors", ".gguf") and "mmproj" not in p.name.lower()
    )


def _weights_in(directory: Path) -> int:
    files = _weight_files(directory)
    if not files:
        raise UsageError(f"{directory} holds no *.safetensors or *.gguf files; give --weights-bytes")
    return sum(p.stat().st_size for p in files)


def _gguf_profile(path: Path, weights: int) -> ModelProfile:
    """A GGUF-only directory: the header of its first shard (parsed by the OCI part's reader)."""
    try:
        gguf = importlib.import_module("orchardist.oci.gguf")
    except ImportError:
        raise SourceError("a GGUF model directory needs orchardist.oci.gguf (issue 5)") from None
    size = 4 << 20
    with path.open("rb") as f:
        while True:
            f.seek(0)
            data = f.read(size)
            try:
                meta = gguf.parse_header(data)
                break
            except gguf.NeedMoreError:
                if len(data) < size or size >= 128 << 20:
                    raise UsageError(f"{path}: GGUF header is cut short or larger than 128 MiB") from None
                size *= 4
            except ValueError as exc:
                raise UsageError(f"{path}: {exc}") from None
    try:
        return from_gguf_metadata(meta, weights)
    except ProfileError as exc:
        raise UsageError(f"{path}: {exc}") from None


def _read_config(path: Path) -> dict[str, Any]:
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a JSON object")
    return data


def _oci_profile(reference: str, insecure: Sequence[str]) -> ModelProfile:
    """Profile an OCI model (manifest and small blobs only) via ``orchardist.oci.profile.model_profile``."""
    try:
        module = importlib.import_module("orchardist.oci.profile")
    except ImportError:
        raise SourceError(
            "--model oci://... needs orchardist.oci.profile (issue 5), not in this install"
        ) from None
    fetch = getattr(module, "model_profile", None)
    if fetch is None:
        raise SourceError("--model oci://... needs orchardist.oci.profile.model_profile(reference)")
    try:
        found = fetch(reference, insecure=tuple(insecure))
        if inspect.isawaitable(found):
            found = asyncio.run(found)  # type: ignore[arg-type]
    except Exception as exc:  # the OCI part's errors carry the reason in words
        raise UsageError(f"{reference}: {exc}") from None
    model = found[1] if isinstance(found, tuple) else found
    if not isinstance(model, ModelProfile):
        raise SourceError(f"orchardist.oci.profile.model_profile returned {type(found).__name__}")
    return model


class SourceError(Exception):
    """A model or Mac the planner cannot read (missing module, registry or cluster): exit 2, say why."""


def load_profile(args: argparse.Namespace) -> ModelProfile:
    """The model profile from --model, or --model-config/--model-dir plus the weight bytes."""
    if args.model:
        return _oci_profile(args.model, args.insecure_registry)
    config_path = args.model_config or args.model_dir
    if config_path is None:
        raise UsageError(
            "give --model-config PATH (and --weights-bytes N), --model-dir DIR, or --model oci://..."
        )
    weights = args.weights_bytes
    if weights is None:
        if args.model_dir is None:
            raise UsageError("--weights-bytes N is required unless --model-dir DIR is given")
        weights = _weights_in(args.model_dir)
    if args.model_config is None and not (args.model_dir / "config.json").exists():
        ggufs = [p for p in _weight_files(args.model_dir) if p.suffix == ".gguf"]
        if ggufs:
            return _gguf_profile(ggufs[0], weights)
    try:
        return from_config(_read_config(config_path), weights)
    except ProfileError as exc:
        raise UsageError(str(exc)) from None


def _request(args: argparse.Namespace) -> PlanRequest:
    return PlanRequest(
        context_length=args.context,
        max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        overhead_bytes=args.overhead,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


def node_for(profile: macs.MacProfile, reserved: int = 0) -> NodeCapacity:
    """The planner's view of a named Mac."""
    return NodeCapacity(
        gpu_working_set_bytes=profile.gpu_working_set_bytes,
        memory_bandwidth_bytes_per_second=profile.memory_bandwidth_bytes_per_second,
        total_memory_bytes=profile.memory_bytes,
        reserved_bytes=reserved,
        name=profile.name,
    )


def _describe(model: ModelProfile) -> list[tuple[str, str]]:
    layers = f"{model.num_layers}"
    if model.sliding_attention_layers or model.linear_attention_layers:
        parts = [f"{model.full_attention_layers} full"]
        if model.sliding_attention_layers:
            parts.append(f"{model.sliding_attention_layers} sliding (window {model.sliding_window:,})")
        if model.linear_attention_layers:
            parts.append(f"{model.linear_attention_layers} linear")
        layers += f" ({', '.join(parts)})"
    params = model.parameters
    return [
        ("model", f"{model.architecture} ({model.model_type})"),
        ("quantization", model.quantization or f"none ({model.dtype})"),
        ("parameters", _count(params) if params else "unknown"),
        ("weights", f"{gib(model.weight_bytes)} ({model.weight_bytes:,} B)"),
        ("layers", layers),
        (
            "attention",
            f"{model.num_attention_heads} heads, {model.num_kv_heads} KV heads, head_dim {model.head_dim}",
        ),
        ("kv dtype", _kv_dtype(model)),
        ("kv bytes/token", f"{model.kv_bytes_per_token:,} ({model.kv_bytes_per_token / 1024:g} KiB)"),
        ("model max context", f"{model.max_position_embeddings:,}"),
    ]


def _print_pairs(pairs: Sequence[tuple[str, str]], out: TextIO) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        print(f"{key:<{width}}  {value}", file=out)


def node_from_cluster(name: str, kubeconfig: str | None, extra_reserved: int = 0) -> NodeCapacity:
    """The planner's view of a registered Mac: what its agent reports in MacNode.status.

    The Kubernetes adapter is imported here, not at the top: planning stays pure, and only this
    option talks to a cluster.
    """
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException
    from urllib3.exceptions import HTTPError

    from orchardist.kube import GROUP, VERSION, RawApi, api_client

    try:
        node = RawApi(api_client(kubeconfig), timeout=10).get(f"/apis/{GROUP}/{VERSION}/macnodes/{name}")
    except ApiException as exc:
        if exc.status == 404:
            raise SourceError(f"no MacNode {name!r} in the cluster (kubectl get macnodes)") from None
        raise SourceError(f"reading MacNode {name!r}: HTTP {exc.status} {exc.reason}") from None
    except (ConfigException, HTTPError, OSError) as exc:
        raise SourceError(f"--node {name}: cannot reach the cluster: {exc}") from None
    status = node.get("status") or {}
    memory = status.get("memory") or {}
    if not memory.get("gpuWorkingSetBytes"):
        raise SourceError(f"MacNode {name!r} reports no GPU working set yet (is its agent running?)")
    bandwidth = status.get("memoryBandwidthBytesPerSecond")
    return NodeCapacity(
        gpu_working_set_bytes=int(memory["gpuWorkingSetBytes"]),
        memory_bandwidth_bytes_per_second=int(bandwidth) if bandwidth else None,
        total_memory_bytes=int(memory["totalBytes"]) if memory.get("totalBytes") else None,
        reserved_bytes=int(memory.get("allocatedBytes") or 0) + extra_reserved,
        name=name,
    )


def _count(n: int) -> str:
    """~70.6B, ~854M, ~12K: a parameter count at the scale it has."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"~{n / scale:.1f}{unit}"
    return f"{n}"


def _kv_dtype(model: ModelProfile) -> str:
    if model.dtype_bytes * 8 < _BITS.get(model.dtype, 16):  # a float32 checkpoint is served in 16 bits
        return f"{model.dtype} checkpoint, KV in 16 bits ({model.dtype_bytes} B)"
    return f"{model.dtype} ({model.dtype_bytes} B)"


_BITS = {"float32": 32, "float": 32}


def print_plan(model: ModelProfile, node: NodeCapacity, result: MemoryPlan, out: TextIO) -> None:
    """One plan as readable lines."""
    decode = result.predicted_decode_tokens_per_s
    pairs = [
        *_describe(model),
        ("mac", node.name or "(given working set)"),
        ("gpu working set", f"{gib(node.gpu_working_set_bytes)} ({node.gpu_working_set_bytes:,} B)"),
        ("usable", f"{result.gpu_memory_utilization:g} x working set = {gib(result.reserved_bytes)}"),
        (
            "overhead",
            f"{gib(result.overhead_bytes)} (max_num_batched_tokens {result.max_num_batched_tokens})",
        ),
        ("kv budget", f"{gib(result.kv_budget_bytes)} ({result.kv_budget_bytes:,} B)"),
        ("blocks", f"{result.num_blocks:,} x {result.block_size} tokens = {result.max_tokens:,} tokens"),
        ("max model len", f"{result.max_model_len:,}"),
        ("max num seqs", f"{result.max_num_seqs}"),
        ("decode (1 stream)", f"<= {decode:g} tokens/s" if decode is not None else "unknown (no bandwidth)"),
        ("fits", "yes" if result.fits else "NO"),
        ("reason", result.reason),
    ]
    _print_pairs(pairs, out)


def print_table(model: ModelProfile, rows: list[tuple[macs.MacProfile, MemoryPlan]], out: TextIO) -> None:
    """A plan per standard Mac profile, then where it fits."""
    _print_pairs(_describe(model), out)
    print(file=out)
    header = (
        "PROFILE",
        "CHIP",
        "MEMORY",
        "WORKING SET",
        "FITS",
        "MAX CONTEXT",
        "SEQS",
        "KV TOKENS",
        "DECODE TOK/S",
    )
    table = [header]
    for mac, result in rows:
        decode = result.predicted_decode_tokens_per_s
        table.append(
            (
                mac.name,
                mac.chip_name.removeprefix("Apple "),
                f"{mac.memory_bytes >> 30}Gi",
                f"{mac.gpu_working_set_bytes / (1 << 30):.1f}Gi",
                "yes" if result.fits else "no",
                f"{result.max_model_len:,}" if result.fits else "-",
                str(result.max_num_seqs) if result.fits else "-",
                f"{result.max_tokens:,}" if result.fits else "-",
                f"{decode:g}" if decode is not None and result.fits else "-",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip(), file=out)
    print(file=out)
    fitting = [(m, r) for m, r in rows if r.fits]
    if fitting:
        names = ", ".join(f"{m.name} (max context {r.max_model_len:,})" for m, r in fitting)
        print(f"fits on {names}", file=out)
    else:
        print("fits on none of the standard Macs", file=out)
    for mac, result in rows:
        if not result.fits:
            print(f"  {mac.name}: {result.reason}", file=out)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        model = load_profile(args)
        request = _request(args)
        if args.working_set is not None or args.chip is not None or args.node:
            if args.node:
                node = node_from_cluster(args.node, args.kubeconfig, args.reserved)
            elif args.chip is not None:
                node = node_for(macs.get(args.chip), args.reserved)
            else:
                bandwidth = int(args.bandwidth * 1e9) if args.bandwidth else None
                node = NodeCapacity(args.working_set, bandwidth, reserved_bytes=args.reserved)
            result = plan(model, node, request)
            if args.json:
                json.dump(result.to_json(), out, indent=2)
                print(file=out)
            else:
                print_plan(model, node, result, out)
            return 0 if result.fits else 1
        rows = [(mac, plan(model, node_for(mac, args.reserved), request)) for mac in macs.PROFILES.values()]
        if args.json:
            json.dump([{"profile": mac.name, **result.to_json()} for mac, result in rows], out, indent=2)
            print(file=out)
        else:
            print_table(model, rows, out)
        return 0
    except (UsageError, ValueError) as exc:
        print(f"orchardist plan: {exc}", file=sys.stderr)
        return 2
    except SourceError as exc:
        print(f"orchardist plan: {exc}", file=sys.stderr)
        return 2
