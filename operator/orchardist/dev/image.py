"""OCI images without a container engine: layer trees packed into an OCI layout, pushed to a registry.

``hack/build-image.sh`` stages the operator image's trees (Debian base, locked dependencies, the
project) and calls ``pack``; the dev node's pause image is one static binary (:func:`pause_layout`).
Packing is deterministic: sorted entries, owner root, times clamped to ``SOURCE_DATE_EPOCH``, gzip
without a timestamp, so the same inputs give the same digests. The settings the Dockerfile must
repeat (user, environment, command, label keys) are the constants below; a test holds them equal.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchardist import log

_log = log.get(__name__)

USER = "65532:65532"
ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}
ENTRYPOINT = ["orchardist"]
CMD = ["operator", "run", "--all-namespaces", "--log-format", "json"]
SOURCE = "https://orchardist.invalid"
LABEL_KEYS = (
    "org.opencontainers.image.title",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.source",
    "org.opencontainers.image.created",
)
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
#: Paths the runtime provides; a layer carrying device nodes there would not unpack unprivileged.
_SKIP_UNDER = ("dev/",)


@dataclass(frozen=True)
class Blob:
    media_type: str
    digest: str
    size: int

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def _entries(tree: Path) -> Iterator[Path]:
    """Every path under ``tree``, parents before children, in a fixed order."""
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            yield base / name


def layer_tar(tree: Path, epoch: int) -> bytes:
    """The uncompressed layer for ``tree`` (its root is the image's ``/``), reproducibly."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in _entries(tree):
            rel = path.relative_to(tree).as_posix()
            if rel.startswith(_SKIP_UNDER):
                continue
            st = path.lstat()
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                continue
            info = tarfile.TarInfo(rel)
            info.mode = stat.S_IMODE(st.st_mode)
            info.mtime = min(int(st.st_mtime), epoch)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = str(path.readlink())
                tar.addfile(info)
            else:
                info.size = st.st_size
                with path.open("rb") as f:
                    tar.addfile(info, f)
    return buf.getvalue()


class Layout:
    """An OCI image layout directory being written: content-addressed blobs and one index."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, media_type: str) -> Blob:
        digest = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / "sha256" / digest).write_bytes(data)
        return Blob(media_type, f"sha256:{digest}", len(data))

    def blob(self, digest: str) -> bytes:
        return (self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()

    def finish(self, manifest: Blob, ref: str) -> None:
        desc = manifest.descriptor() | {"annotations": {"org.opencontainers.image.ref.name": ref}}
        index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": [desc]}
        (self.root / "index.json").write_text(json.dumps(index, indent=2))
        (self.root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))


def image_config(
    diff_ids: Sequence[str],
    *,
    epoch: int,
    labels: dict[str, str],
    user: str,
    env: dict[str, str],
    entrypoint: Sequence[str],
    cmd: Sequence[str],
) -> dict[str, Any]:
    """The OCI image config: what the runtime runs, as whom, and the layers' uncompressed digests."""
    created = _rfc3339(epoch)
    return {
        "created": created,
        "architecture": "amd64" if os.uname().machine == "x86_64" else "arm64",
        "os": "linux",
        "config": {
            "User": user,
            "Env": [f"{k}={v}" for k, v in env.items()],
            "Entrypoint": list(entrypoint),
            "Cmd": list(cmd),
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": created, "created_by": "orchardist build-image"} for _ in diff_ids],
    }


def _rfc3339(epoch: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pack(trees: Sequence[Path], out: Path, *, ref: str, config: dict[str, Any], epoch: int) -> Blob:
    """Write an OCI layout at ``out``: one gzip layer per tree, ``config``'s diff_ids filled in."""
    layout = Layout(out)
    layers: list[Blob] = []
    diff_ids: list[str] = []
    for tree in trees:
        raw = layer_tar(tree, epoch)
        diff_ids.append(f"sha256:{hashlib.sha256(raw).hexdigest()}")
        layers.append(layout.put(gzip.compress(raw, compresslevel=6, mtime=0), LAYER))
        _log.info("layer packed", tree=str(tree), size=layers[-1].size, digest=layers[-1].digest)
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    cfg = layout.put(json.dumps(config, sort_keys=True).encode(), CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": cfg.descriptor(),
        "layers": [b.descriptor() for b in layers],
        "annotations": {k: v for k, v in config["config"]["Labels"].items() if k in LABEL_KEYS},
    }
    blob = layout.put(json.dumps(manifest, sort_keys=True).encode(), MANIFEST)
    layout.finish(blob, ref)
    return blob


def operator_labels(version: str, revision: str, epoch: int) -> dict[str, str]:
    values = ("orchardist-operator", version, revision, SOURCE, _rfc3339(epoch))
    return dict(zip(LABEL_KEYS, values, strict=True))


def pause_layout(binary: Path, out: Path, *, epoch: int = 0) -> Blob:
    """The pod sandbox image: the static pause binary alone, run as nobody."""
    tree = out.parent / f".{out.name}-tree"
    (tree).mkdir(parents=True, exist_ok=True)
    target = tree / "pause"
    target.write_bytes(binary.read_bytes())
    target.chmod(0o755)
    config = image_config(
        [],
        epoch=epoch,
        labels={"org.opencontainers.image.title": "orchardist-pause"},
        user="65535:65535",
        env={},
        entrypoint=["/pause"],
        cmd=[],
    )
    return pack([tree], out, ref="pause", config=config, epoch=epoch)


def manifest_size(layout_dir: Path) -> tuple[int, int]:
    """(compressed, uncompressed) bytes of the layout's image: what a pull moves and unpacks to."""
    layout = Layout(layout_dir)
    index = json.loads((layout_dir / "index.json").read_text())
    manifest = json.loads(layout.blob(index["manifests"][0]["digest"]))
    compressed = sum(int(d["size"]) for d in manifest["layers"])
    unpacked = sum(len(gzip.decompress(layout.blob(d["digest"]))) for d in manifest["layers"])
    return compressed, unpacked


def push(layout_dir: Path, registry: str, repository: str, tag: str, *, timeout: float = 120.0) -> str:
    """Push the layout's image to ``http://<registry>`` as ``repository:tag``; returns its digest.

    Blobs the registry already holds are skipped (HEAD first), so a warm push moves only the
    manifest. The registry is the project's own on loopback, hence plain HTTP.
    """
    layout = Layout(layout_dir)
    index = json.loads((layout_dir / "index.json").read_text())
    mdesc = index["manifests"][0]
    manifest_bytes = layout.blob(mdesc["digest"])
    manifest = json.loads(manifest_bytes)
    base = f"http://{registry}/v2/{repository}"
    for desc in [manifest["config"], *manifest["layers"]]:
        digest = desc["digest"]
        if _status(urllib.request.Request(f"{base}/blobs/{digest}", method="HEAD"), timeout) == 200:
            continue
        start = urllib.request.Request(f"{base}/blobs/uploads/", method="POST", data=b"")
        with urllib.request.urlopen(start, timeout=timeout) as resp:
            location = resp.headers["Location"]
        if location.startswith("/"):
            location = f"http://{registry}{location}"
        sep = "&" if "?" in location else "?"
        put = urllib.request.Request(
            f"{location}{sep}digest={digest}",
            method="PUT",
            data=layout.blob(digest),
            headers={"Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(put, timeout=timeout):
            pass
    put_m = urllib.request.Request(
        f"{base}/manifests/{tag}", method="PUT", data=manifest_bytes, headers={"Content-Type": MANIFEST}
    )
    with urllib.request.urlopen(put_m, timeout=timeout):
        pass
    _log.info("image pushed", ref=f"{registry}/{repository}:{tag}", digest=mdesc["digest"])
    return str(mdesc["digest"])


def _status(req: urllib.request.Request, timeout: float) -> int:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchardist.dev.image")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="pack staged layer trees into the operator image's OCI layout")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--revision", required=True)
    p.add_argument("trees", type=Path, nargs="+")
    q = sub.add_parser("push", help="push an OCI layout to a registry on loopback")
    q.add_argument("layout", type=Path)
    q.add_argument("reference", help="<host:port>/<repository>:<tag>")
    args = parser.parse_args(argv)
    log.configure("INFO")
    if args.cmd == "pack":
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
        config = image_config(
            [],
            epoch=epoch,
            labels=operator_labels(args.version, args.revision, epoch),
            user=USER,
            env=ENV,
            entrypoint=ENTRYPOINT,
            cmd=CMD,
        )
        blob = pack(args.trees, args.out, ref=args.version, config=config, epoch=epoch)
        compressed, unpacked = manifest_size(args.out)
        print(f"{blob.digest} {compressed} bytes compressed, {unpacked} unpacked", file=sys.stderr)
        return 0
    host, _, rest = args.reference.partition("/")
    repository, _, tag = rest.rpartition(":")
    print(push(args.layout, host, repository, tag))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
