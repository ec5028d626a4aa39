"""Pull throughput: our pull+verify of a 1 GiB model vs `curl -o file` and oras-py, same run, same registry.

A random 1 GiB safetensors model (ModelPack) is pushed to a local docker-registry; then each
contender fetches it ``ROUNDS`` times into a fresh directory, alternating, and the best time counts.
Ours includes sha256 verification, fsync and materializing the model directory; curl writes the
weight blob only; oras-py pulls every layer and verifies nothing. Goal: >= 0.6x curl, >= 2x oras-py.
Our pull is also timed with the raw-socket body reader off (aiohttp's stream, what TLS and chunked
responses use), to show what the fast path buys.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROUNDS = 3
SIZE = 1 << 30
MiB = 1 << 20


def _write_random(path: Path, size: int) -> str:
    import numpy as np

    rng = np.random.default_rng(20260101)
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            chunk = rng.bytes(min(64 * MiB, left))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return "sha256:" + h.hexdigest()


def _ours(ref: str, root: Path, *, fast_path: bool = True) -> float:
    from orchardist.oci.store import ContentStore

    store_dir = root / "store"
    t0 = time.perf_counter()
    model = asyncio.run(ContentStore(store_dir, 4 << 30, fast_path=fast_path).pull(ref))
    elapsed = time.perf_counter() - t0
    assert (model.path / "model.safetensors").stat().st_size == SIZE
    shutil.rmtree(store_dir, ignore_errors=True)
    return elapsed


def _curl(url: str, root: Path) -> float:
    out = root / "curl.bin"
    t0 = time.perf_counter()
    subprocess.run(["curl", "-sSf", "-o", str(out), url], check=True)
    elapsed = time.perf_counter() - t0
    assert out.stat().st_size == SIZE
    out.unlink()
    return elapsed


def _oras(host: str, target: str, root: Path) -> tuple[float, float]:
    import oras.client

    outdir = root / "oras"
    client = oras.client.OrasClient(hostname=host, insecure=True)
    t0 = time.perf_counter()
    client.pull(target=target, outdir=str(outdir))
    elapsed = time.perf_counter() - t0
    weights = outdir / "model.safetensors"
    assert weights.stat().st_size == SIZE
    t1 = time.perf_counter()  # oras-py does not verify digests: what verifying would add
    h = hashlib.sha256()
    with weights.open("rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    verify = time.perf_counter() - t1
    shutil.rmtree(outdir, ignore_errors=True)
    return elapsed, verify


def run() -> list[str]:
    from orchardist import log
    from orchardist.dev.registry import Registry
    from orchardist.oci.push import push

    log.configure("WARNING")
    work = Path(tempfile.mkdtemp(prefix="orchardist-bench-pull-"))
    registry = Registry.start(work / "registry", die_with_parent=True)
    try:
        model = work / "model"
        model.mkdir()
        digest = _write_random(model / "model.safetensors", SIZE)
        (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        repo = "bench/random-1g"
        ref = f"oci://{registry.host}/{repo}:v1"
        t0 = time.perf_counter()
        asyncio.run(push(model, ref))
        push_s = time.perf_counter() - t0
        shutil.rmtree(model)  # the registry holds the only copy now

        url = f"http://{registry.host}/v2/{repo}/blobs/{digest}"
        ours, stream, curl, oras, verify = [], [], [], [], []
        for _ in range(ROUNDS):
            ours.append(_ours(ref, work))
            stream.append(_ours(ref, work, fast_path=False))
            curl.append(_curl(url, work))
            o, v = _oras(registry.host, f"{registry.host}/{repo}:v1", work)
            oras.append(o)
            verify.append(v)
        best = {"ours": min(ours), "stream": min(stream), "curl": min(curl), "oras": min(oras)}
        gib = SIZE / (1 << 30)

        def rate(s: float) -> str:
            return f"{SIZE / MiB / s:.0f} MiB/s"

        def runs(xs: list[float]) -> str:
            return ", ".join(f"{x:.2f}" for x in xs)

        vs_curl = best["curl"] / best["ours"]
        vs_oras = best["oras"] / best["ours"]
        vs_oras_verified = (best["oras"] + min(verify)) / best["ours"]
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())

        def line(label: str, key: str, xs: list[float]) -> str:
            return f"{label:<40} best {best[key]:.2f} s ({rate(best[key])}) [{runs(xs)}]"

        return [
            f"model: {gib:.2f} GiB random safetensors (ModelPack), pushed in {push_s:.1f} s ({rate(push_s)})",
            line("our pull + sha256 verify + materialize:", "ours", ours),
            line("  the same through aiohttp's stream:", "stream", stream)
            + f"; the raw socket path is {best['stream'] / best['ours']:.2f}x faster",
            line("curl -o file (weight blob only):", "curl", curl),
            line("oras-py pull (no verification):", "oras", oras)
            + f"; its missing sha256 pass would add {min(verify):.2f} s",
            f"ratio ours/curl = {vs_curl:.2f}x (goal >= 0.6x) {'OK' if vs_curl >= 0.6 else 'MISSED'}",
            f"ratio ours/oras-py = {vs_oras:.2f}x (goal >= 2x) {'OK' if vs_oras >= 2 else 'MISSED'}; "
            f"against oras-py + the sha256 pass it skips: {vs_oras_verified:.2f}x",
            f"load average during the run: {load} on {os.cpu_count()} CPUs (other work skews every number)",
        ]
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    for line in run():
        print(line)
