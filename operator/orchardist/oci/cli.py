"""``orchardist pull | push | inspect``: the OCI model commands of the one CLI.

Each exits 0 on success, or non-zero with one clear line on stderr (the error's message).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from orchardist.oci.auth import Credentials, from_user_config
from orchardist.oci.errors import OCIError
from orchardist.oci.progress import ConsolePrinter, human_bytes
from orchardist.oci.reference import Reference, parse


def _default_store() -> Path:
    env = os.environ.get("ORCHARDIST_STORE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "orchardist" / "store"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST",
        help="use plain HTTP for this registry (host or host:port); loopback always is",
    )
    parser.add_argument(
        "--docker-config",
        type=Path,
        default=None,
        help="dockerconfigjson with credentials (default: $DOCKER_CONFIG/config.json or ~/.docker)",
    )


def _credentials(args: argparse.Namespace, ref: Reference) -> Credentials | None:
    user, password = (
        os.environ.get("ORCHARDIST_REGISTRY_USER"),
        os.environ.get("ORCHARDIST_REGISTRY_PASSWORD"),
    )
    if user and password is not None:
        return Credentials(user, password)
    path: Path | None = args.docker_config
    return from_user_config(ref, path)


def _run(name: str, job: Callable[[], Awaitable[int]]) -> int:
    from orchardist import log

    log.configure(os.environ.get("ORCHARDIST_LOG_LEVEL", "WARNING"))
    try:
        return asyncio.run(job())  # type: ignore[arg-type]
    except OCIError as exc:
        print(f"orchardist {name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"orchardist {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"orchardist {name}: {exc}", file=sys.stderr)
        return 1


# ---- pull -------------------------------------------------------------------------------------


def register_pull(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ref", metavar="REF", help="oci://host[:port]/repo[:tag|@sha256:...] or a Docker Hub name"
    )
    parser.add_argument("--dest", type=Path, required=True, help="directory to materialize the model in")
    parser.add_argument(
        "--store", type=Path, default=None, help="content store (default: $ORCHARDIST_STORE or ~/.cache)"
    )
    parser.add_argument(
        "--budget", type=int, default=1 << 50, metavar="BYTES", help="store disk budget (LRU eviction)"
    )
    parser.add_argument(
        "--min-rate",
        type=int,
        default=None,
        metavar="BYTES_PER_S",
        help="cut a blob download slower than this over a minute (a retry resumes it; default 64 KiB/s)",
    )
    parser.add_argument(
        "--blob-deadline",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up a blob not downloaded within this time, retries included (default 6 h)",
    )
    _common(parser)
    parser.set_defaults(func=run_pull)


def run_pull(args: argparse.Namespace) -> int:
    async def job() -> int:
        from orchardist.oci.store import ContentStore
        from orchardist.oci.transfer import DEFAULT_LIMITS, TransferLimits

        ref = parse(args.ref)
        limits = TransferLimits(
            min_rate=DEFAULT_LIMITS.min_rate if args.min_rate is None else args.min_rate,
            window=DEFAULT_LIMITS.window,
            deadline=DEFAULT_LIMITS.deadline if args.blob_deadline is None else args.blob_deadline,
        )
        store = ContentStore(
            args.store or _default_store(), args.budget, insecure=args.insecure_registry, limits=limits
        )
        try:
            model = await store.pull(ref, auth=_credentials(args, ref), progress=ConsolePrinter())
            dest = await store.export(model, args.dest)
        finally:
            store.close()
        print(
            f"pulled {ref.pinned(model.digest)} ({model.layout}, {len(model.files)} files, "
            f"{human_bytes(model.total_bytes)}) into {dest}"
        )
        return 0

    return _run("pull", job)


# ---- push -------------------------------------------------------------------------------------


def register_push(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", type=Path, help="the model directory")
    parser.add_argument("ref", metavar="REF", help="oci://host[:port]/repo:tag")
    parser.add_argument(
        "--format",
        choices=("modelpack", "docker"),
        default="modelpack",
        help="CNCF ModelPack (default) or Docker Model Runner (a layer per file; config v0.1 for "
        "GGUF models as Docker writes them, v0.2 otherwise)",
    )
    parser.add_argument(
        "--docker-config-version",
        choices=("auto", "v0.1", "v0.2"),
        default="auto",
        help="with --format docker: the config version (auto: v0.1 for GGUF, v0.2 otherwise; "
        "v0.1 is what older Docker clients read, and keeps only top-level files)",
    )
    _common(parser)
    parser.set_defaults(func=run_push)


def run_push(args: argparse.Namespace) -> int:
    async def job() -> int:
        from orchardist.oci.push import push

        if not args.dir.is_dir():
            raise OCIError(f"{args.dir}: not a directory")
        ref = parse(args.ref)
        digest = await push(
            args.dir,
            ref,
            format=args.format,
            docker_config=args.docker_config_version,
            auth=_credentials(args, ref),
            insecure=args.insecure_registry,
            progress=ConsolePrinter(),
        )
        print(f"pushed {ref} as {ref.pinned(digest)}")
        return 0

    return _run("push", job)


# ---- inspect ----------------------------------------------------------------------------------


def register_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", metavar="REF", help="oci://host[:port]/repo[:tag|@sha256:...]")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    _common(parser)
    parser.set_defaults(func=run_inspect)


async def describe(ref: Reference, auth: Credentials | None, insecure: list[str]) -> dict[str, Any]:
    """Everything ``inspect`` shows: layout, files, sizes and the model profile."""
    from orchardist.oci.client import RegistryClient
    from orchardist.oci.profile import _inspect, exact_weight_bytes, profile_of

    async with RegistryClient.for_ref(ref, credentials=auth, insecure=insecure) as client:
        info = await _inspect(client, ref)
        out: dict[str, Any] = {
            "reference": str(ref),
            "digest": info.digest,
            "pinned": ref.pinned(info.digest),
            "layout": info.layout.name,
            "layoutVersion": info.layout.version,
            "format": info.format,
            "totalBytes": info.layout.total_bytes,
            "weightBytes": exact_weight_bytes(info.layout),
            "files": [
                {
                    "path": e.path or ".",
                    "sizeBytes": e.layer.size,
                    "mediaType": e.layer.media_type,
                    "role": e.role,
                    **({"archive": e.archive} if e.archive else {}),
                }
                for e in info.layout.entries
            ],
            "config": info.described,
        }
        try:
            profile = await profile_of(client, info)
        except (OCIError, ValueError) as exc:
            out["profileError"] = str(exc)
            return out
        out["weightBytes"] = profile.weight_bytes  # tar layers: uncompressed, read from the archive
        out["profile"] = {
            "architecture": profile.architecture,
            "parameters": profile.parameters,
            "quantization": profile.quantization,
            "maxContext": profile.max_position_embeddings,
            "kvBytesPerToken": profile.kv_bytes_per_token,
            "layers": profile.num_layers,
        }
        return out


def run_inspect(args: argparse.Namespace) -> int:
    async def job() -> int:
        ref = parse(args.ref)
        out = await describe(ref, _credentials(args, ref), args.insecure_registry)
        if args.json:
            print(json.dumps(out, indent=2))
            return 0
        print(f"{out['reference']}\n  digest:  {out['digest']}")
        print(f"  layout:  {out['layout']} {out['layoutVersion']}   format: {out['format'] or '-'}")
        print(f"  size:    {human_bytes(out['totalBytes'])} (weights {human_bytes(out['weightBytes'])})")
        prof = out.get("profile")
        if prof:
            params = prof["parameters"]
            shown = (
                f"{params / 1e9:.2f}B"
                if params and params >= 1e8
                else (f"{params / 1e6:.1f}M" if params else "?")
            )
            print(
                f"  model:   {prof['architecture']}  parameters {shown}  "
                f"quantization {prof['quantization'] or 'none'}  context {prof['maxContext']}"
            )
        elif out.get("profileError"):
            print(f"  model:   (no profile: {out['profileError']})")
        for key, value in out["config"].items():
            print(f"  config.{key}: {value}")
        print("  files:")
        for f in out["files"]:
            kind = f" [{f['archive']}]" if "archive" in f else ""
            print(f"    {human_bytes(f['sizeBytes']):>10}  {f['path']}{kind}  ({f['mediaType']})")
        return 0

    return _run("inspect", job)
