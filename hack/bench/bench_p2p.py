"""A rollout to four Macs costs about one registry pull; pulls over HTTPS keep up with curl.

Four simulated Macs, each in its own network namespace (orchardist.dev.netns), with its own store
and peer server; a TLS registry (its own CA) on the bridge's host address holds a random 1 GiB
model. Measured in this run:

* one Mac alone pulls the model from the registry (the baseline);
* then four fresh Macs pull it at once, each told the other three (what the controller's
  ``orchardist.io/peers`` hint says for replicas created together): the registry's own access
  log gives the bytes it served, and the time runs until all four hold the model;
* the same two pulls with the registry behind a 1 Gbit/s link (``tc`` on the host's side of the
  bridge; Mac-to-Mac traffic is bridged and not shaped): what a fleet meets when the registry is
  across a WAN and the Macs share a LAN, the case peer transfer is for. On this machine the four
  Macs also share 2 cores and one disk, so in the unshaped arm the followers' hashing and writing
  (a cost each real Mac pays on its own hardware, in parallel) is what the ratio measures;
* HTTPS: our pull (sha256 verified, model materialized) against ``curl --cacert`` on the same blob.

Goals: registry bytes <= 1.25 GiB, all four <= 1.5x one alone (both arms printed), ours >= 0.5x curl
over HTTPS.
Needs root (network namespaces); a worker per Mac runs this module with ``worker``.

No cluster here, so no node identities: each worker's peer server is given a verifier that accepts
one random token of this run (the agent's verifier asks the API server with a cached TokenReview,
one per caller token, which this measures nothing of). Transfer time and registry bytes only.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hack.bench.bench_pull import SIZE, _write_random

MiB = 1 << 20
GiB = 1 << 30
MACS = [f"p2p-{i}" for i in range(4)]
PEER_PORT = 8479
ROUNDS = 2
#: The registry's link in the second arm: a fast office uplink (a registry or hub on the internet).
WAN = "1gbit"
_SERVED = re.compile(r'"GET \S+/blobs/sha256:[0-9a-f]{64} HTTP/[\d.]+" 20[06] (\d+)')


def registry_bytes(log: Path) -> int:
    """Blob bytes the registry sent, from its access log (combined format: status then bytes)."""
    return sum(int(m.group(1)) for m in _SERVED.finditer(log.read_text(errors="replace")))


# ---- one simulated Mac (runs inside its namespace) ---------------------------------------------


async def _worker(spec: dict[str, Any]) -> None:
    from orchardist.oci.peering import Claims, Peer
    from orchardist.oci.peers import PeerSource
    from orchardist.oci.store import ContentStore
    from orchardist_agent.peer_auth import Verdict
    from orchardist_agent.peer_server import PeerServer

    async def this_runs_token(token: str) -> Verdict:
        """Not the agent's check (see the module's docstring): one shared random token."""
        if hmac.compare_digest(token.encode(), spec["token"].encode()):
            return Verdict(200, node="bench")
        return Verdict(401, reason="not this run's token")

    store = ContentStore(Path(spec["store"]), 4 * GiB)
    claims = Claims()
    server = PeerServer(this_runs_token, store.blob_path, lambda d: store.index.blobs.get(d), claims)
    await server.start(spec["address"], PEER_PORT)
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    peers = [Peer(name, f"http://{address}:{PEER_PORT}") for name, address in spec["peers"]]
    source = PeerSource(peers, spec["token"], name=spec["name"], claims=claims) if peers else None
    t0 = time.perf_counter()
    await store.pull(spec["ref"], peers=source)
    elapsed = time.perf_counter() - t0
    took = dict(source.bytes_from) if source else {}
    print(json.dumps({"elapsed": elapsed, "from_peers": took}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # serve the others until told to stop
    await server.close()
    store.close()


def worker() -> None:
    from orchardist import log

    log.configure("WARNING", "console")
    asyncio.run(_worker(json.loads(sys.argv[2])))


# ---- the benchmark --------------------------------------------------------------------------------


def _macs_pull(
    fabric: Any, names: list[str], ref: str, work: Path, env: dict[str, str]
) -> tuple[float, list[Any]]:
    """Start a worker per Mac, let all pull at once; the time until the last holds the model."""
    token = secrets.token_hex(16)
    procs = []
    for name in names:
        spec = {
            "name": name,
            "store": str(work / name),
            "address": fabric.address(name),
            "token": token,
            "ref": ref,
            "peers": [(n, fabric.address(n)) for n in names if n != name],
        }
        argv = fabric.wrap(name, [sys.executable, "-m", "hack.bench.bench_p2p", "worker", json.dumps(spec)])
        procs.append(
            subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        )
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", "a worker did not start"
        t0 = time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"a worker failed (exit {p.wait()})")
            results.append(json.loads(line))
        elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            if p.stdin is not None and not p.stdin.closed:
                p.stdin.write("stop\n")
                p.stdin.close()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    for name in names:
        shutil.rmtree(work / name, ignore_errors=True)
    return elapsed, results


def _ours(ref: str, root: Path, env: dict[str, str]) -> float:
    """Our pull of the model in a fresh process (which trusts the registry's CA from the start)."""
    out = subprocess.run(
        [sys.executable, "-m", "hack.bench.bench_p2p", "pull", ref, str(root / "https-store")],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    shutil.rmtree(root / "https-store", ignore_errors=True)
    return float(out.stdout.strip().splitlines()[-1])


async def _pull(ref: str, store_dir: Path) -> float:
    from orchardist.oci.store import ContentStore

    store = ContentStore(store_dir, 4 * GiB)
    t0 = time.perf_counter()
    await store.pull(ref)
    elapsed = time.perf_counter() - t0
    store.close()
    return elapsed


def _sha256_seconds(size: int) -> float:
    """What verifying ``size`` bytes costs one core here (the floor every Mac pays)."""
    import hashlib

    block = os.urandom(64 * MiB)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    for _ in range(size // len(block)):
        h.update(block)
    return time.perf_counter() - t0


def _disk_write_seconds(path: Path, size: int) -> float:
    """Writing ``size`` bytes with O_DIRECT and fsync, as the store does, on this disk."""
    import mmap

    block = mmap.mmap(-1, 64 * MiB)  # page-aligned, as O_DIRECT wants
    block.write(os.urandom(64 * MiB))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o600)
    t0 = time.perf_counter()
    try:
        for i in range(size // len(block)):
            os.pwrite(fd, block, i * len(block))
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return time.perf_counter() - t0


def _curl(url: str, ca: Path, root: Path) -> float:
    out = root / "curl.bin"
    t0 = time.perf_counter()
    subprocess.run(["curl", "-sSf", "--cacert", str(ca), "-o", str(out), url], check=True)
    elapsed = time.perf_counter() - t0
    assert out.stat().st_size == SIZE
    out.unlink()
    return elapsed


def run() -> list[str]:
    from orchardist import log
    from orchardist.dev import netns
    from orchardist.dev.registry import Registry, make_tls

    log.configure("WARNING", "console")
    reason = netns.unavailable()
    if reason is not None:
        raise RuntimeError(f"needs network namespaces (root): {reason}")
    work = Path(tempfile.mkdtemp(prefix="orchardist-bench-p2p-"))
    fabric = netns.create("bp2p", MACS, owner_pid=os.getpid())
    registry = None
    try:
        tls = make_tls(work / "tls", fabric.host_address)
        registry = Registry.start(work / "registry", bind=fabric.host_address, tls=tls, die_with_parent=True)
        env = {**os.environ, **registry.client_env()}
        model = work / "model"
        model.mkdir()
        digest = _write_random(model / "model.safetensors", SIZE)
        (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        ref = f"oci://{registry.host}/bench/p2p-1g:v1"
        subprocess.run(
            [sys.executable, "-m", "hack.bench.bench_p2p", "push", ref, str(model)], env=env, check=True
        )
        shutil.rmtree(model)

        ours, curl = [], []
        url = f"https://{registry.host}/v2/bench/p2p-1g/blobs/{digest}"
        for _ in range(ROUNDS):
            ours.append(_ours(ref, work, env))
            curl.append(_curl(url, tls.ca, work))
        https_ratio = min(curl) / min(ours)

        before = registry_bytes(registry.log)
        alone, _ = _macs_pull(fabric, MACS[:1], ref, work, env)
        alone_bytes = registry_bytes(registry.log) - before
        before = registry_bytes(registry.log)
        together, results = _macs_pull(fabric, MACS, ref, work, env)
        served = registry_bytes(registry.log) - before
        ratio = together / alone
        hash_s = _sha256_seconds(SIZE)
        cores = os.cpu_count() or 1
        disk_s = _disk_write_seconds(work / "disk-probe", SIZE)
        # the followers' sha256 on shared cores, and their writes on the one shared disk
        floor = alone + (len(MACS) - 1) * (hash_s / cores + disk_s)
        took = ", ".join(
            f"{n}: {r['elapsed']:.1f} s"
            + (f" ({sum(r['from_peers'].values()) / MiB:.0f} MiB from peers)" if r["from_peers"] else "")
            for n, r in zip(MACS, results, strict=True)
        )
        # The case the feature is for: the registry behind a WAN link slower than the Macs' LAN.
        fabric.limit_host_egress(WAN)
        wan_alone, _ = _macs_pull(fabric, MACS[:1], ref, work, env)
        before = registry_bytes(registry.log)
        wan_together, wan_results = _macs_pull(fabric, MACS, ref, work, env)
        wan_served = registry_bytes(registry.log) - before
        fabric.limit_host_egress(None)
        wan_ratio = wan_together / wan_alone
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        return [
            f"model: {SIZE / GiB:.2f} GiB random safetensors on a TLS registry at {registry.host}",
            f"one Mac alone: {alone:.2f} s, registry served {alone_bytes / GiB:.2f} GiB",
            f"four Macs at once: all hold it after {together:.2f} s = {ratio:.2f}x one alone "
            f"(goal <= 1.5x) {'OK' if ratio <= 1.5 else 'MISSED'}; {took}",
            f"  this machine's floor: one alone + {len(MACS) - 1} x (sha256 of the model, {hash_s:.2f} s, "
            f"over {cores} cores + writing it, {disk_s:.2f} s, on the one disk) = {floor:.2f} s = "
            f"{floor / alone:.2f}x one alone (real Macs hash and write in parallel)",
            f"registry served {served / GiB:.2f} GiB for the four (goal <= 1.25 GiB) "
            f"{'OK' if served <= 1.25 * GiB else 'MISSED'}",
            f"registry behind a {WAN} link (tc on the host side; Mac-to-Mac stays on the bridge): one Mac "
            f"alone {wan_alone:.2f} s, four at once {wan_together:.2f} s = {wan_ratio:.2f}x (goal <= 1.5x) "
            f"{'OK' if wan_ratio <= 1.5 else 'MISSED'}; registry served {wan_served / GiB:.2f} GiB for "
            f"the four ({'OK' if wan_served <= 1.25 * GiB else 'MISSED'}); "
            + ", ".join(f"{n}: {r['elapsed']:.1f} s" for n, r in zip(MACS, wan_results, strict=True)),
            f"HTTPS: ours {min(ours):.2f} s ({SIZE / MiB / min(ours):.0f} MiB/s, verified + materialized), "
            f"curl {min(curl):.2f} s ({SIZE / MiB / min(curl):.0f} MiB/s): ratio {https_ratio:.2f}x "
            f"(goal >= 0.5x) {'OK' if https_ratio >= 0.5 else 'MISSED'}",
            f"load average during the run: {load} on {os.cpu_count()} CPUs (2 cores hash 4 GiB here)",
        ]
    finally:
        if registry is not None:
            registry.stop()
        fabric.remove()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker()
    elif sys.argv[1:2] == ["push"]:  # in a process started with the registry's CA trusted
        from orchardist.oci.push import push

        asyncio.run(push(Path(sys.argv[3]), sys.argv[2]))
    elif sys.argv[1:2] == ["pull"]:
        print(asyncio.run(_pull(sys.argv[2], Path(sys.argv[3]))))
    else:
        for line in run():
            print(line)
