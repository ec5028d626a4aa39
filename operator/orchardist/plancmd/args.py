"""The options of ``orchardist plan``: where the model comes from, which Mac, and the engine knobs."""

from __future__ import annotations

import argparse
from pathlib import Path

from orchardist.api.quantity import parse_bytes
from orchardist.planning import macs
from orchardist.planning.memory import BLOCK_SIZES, DEFAULT_BLOCK_SIZE, DEFAULT_GPU_MEMORY_UTILIZATION


def fraction(text: str) -> float:
    """A share in (0, 1], such as a GPU memory utilization."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def positive(text: str) -> int:
    """A count of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the plan command's options to ``parser``."""
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
        type=fraction,
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
        help=f"KV block size in tokens: {', '.join(map(str, BLOCK_SIZES))} (default {DEFAULT_BLOCK_SIZE})",
    )
    knobs.add_argument("--max-num-seqs", type=positive, metavar="N", help="concurrent sequences")
    knobs.add_argument("--max-num-batched-tokens", type=positive, metavar="N", help="tokens per engine step")
    knobs.add_argument(
        "--context", type=positive, metavar="N", help="context length (default: the largest that fits)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (stable keys) instead of a table")
