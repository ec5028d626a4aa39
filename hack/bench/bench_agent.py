"""The node agent's idle cost: RSS and CPU over 60 s of heartbeats (goal: <= 80 MB, <= 1 % of a core).

Starts a real local control plane (orchardist.dev.cluster) and `orchardist agent run --simulate
m4-pro-64gb` as a subprocess, waits for its MacNode to be Ready, then samples /proc/<pid> once a
second: resident memory (VmRSS) and CPU time (utime + stime, all threads). A bare Python
interpreter is measured the same way, in the same run, as the floor the agent is built on. Then
the same agent serves one tiny model through mlx-lm (a real registry and engine) and is sampled
again: what supervising an engine adds to the agent itself (the engine process is not counted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

GOAL_RSS_MB = 80.0
GOAL_CPU_PCT = 1.0
WINDOW_S = 60.0
SERVING_WINDOW_S = 30.0
HEARTBEAT_S = 10.0
REPO = Path(__file__).resolve().parents[2]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # after the command: state(0) ... utime(11) stime(12), in clock ticks
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sample(pid: int, seconds: float) -> tuple[float, float, float]:
    """(peak RSS MB, mean RSS MB, CPU % of one core) over `seconds`."""
    t0, c0 = time.monotonic(), cpu_seconds(pid)
    rss: list[float] = []
    while time.monotonic() - t0 < seconds:
        rss.append(rss_mb(pid))
        time.sleep(1.0)
    c1, t1 = cpu_seconds(pid), time.monotonic()
    return max(rss), sum(rss) / len(rss), 100.0 * (c1 - c0) / (t1 - t0)


def bare_python_rss() -> float:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(1.0)
        return rss_mb(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def mlx_runtime() -> Path:
    """The mlx-lm venv from hack/install-runtimes.sh (cached; installed on first use)."""
    out = subprocess.run(
        ["bash", str(REPO / "hack" / "install-runtimes.sh"), "mlx-lm"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)["mlx-lm"])


def replica(name: str, node: str, ref: str, digest: str) -> dict[str, object]:
    """A bound replica with a small plan (what the controller would create)."""
    mib = 2**20
    plan: dict[str, object] = {"weightBytes": 4 * mib, "overheadBytes": 64 * mib, "kvBudgetBytes": 64 * mib}
    plan |= {"kvBytesPerToken": 512, "blockSize": 16, "numBlocks": 8192, "maxModelLen": 2048, "maxNumSeqs": 2}
    plan |= {"maxNumBatchedTokens": 2048, "gpuMemoryUtilization": 0.92, "reservedBytes": 256 * mib}
    spec: dict[str, object] = {
        "nodeName": node,
        "deployment": "bench",
        "model": ref,
        "digest": digest,
        "engine": "mlx-lm",
    }
    spec |= {"servedModelName": "bench", "memoryPlan": plan}
    meta = {"name": name, "namespace": "default"}
    return {"apiVersion": "orchardist.io/v1alpha1", "kind": "ModelReplica", "metadata": meta, "spec": spec}


def run() -> list[str]:
    import asyncio

    from tests.fixtures.agents import bench_stack, kget, make_agent, registered

    from orchardist.dev import tinymodel
    from orchardist.oci.push import push

    with bench_stack("bench-agent-") as (work, cluster, registry):
        node = "bench-mac"
        extra = ("--runtime", f"mlx-lm={mlx_runtime()}", "--stop-engines-on-exit")
        agent = make_agent(cluster, work, node=node, extra=extra, heartbeat=HEARTBEAT_S)
        try:
            proc = agent.start().proc
            assert proc is not None
            registered(cluster, agent)
            time.sleep(2.0)  # let start-up settle (first status patch, watch established)
            lease0 = kget(cluster, "lease", "-n", "orchardist-system", node)
            peak, mean, cpu = sample(proc.pid, WINDOW_S)
            lease1 = kget(cluster, "lease", "-n", "orchardist-system", node)
            renewed = lease0["spec"]["renewTime"] != lease1["spec"]["renewTime"]
            if proc.poll() is not None:
                raise RuntimeError("agent exited during the measurement")
            floor = bare_python_rss()

            # The same agent supervising one engine (health probes, its log followed, status kept).
            digest = asyncio.run(push(tinymodel.build(work / "tiny"), f"{registry.host}/bench/tiny:v1"))
            ref = f"oci://{registry.host}/bench/tiny@{digest}"
            cluster.kubectl("apply", "-f", "-", input=json.dumps(replica("bench", node, ref, digest)))
            t0 = time.monotonic()
            while True:
                out = cluster.kubectl("get", "mr", "bench", "-o", "json", check=False)
                if out.returncode == 0 and json.loads(out.stdout).get("status", {}).get("phase") == "Ready":
                    break
                if proc.poll() is not None or time.monotonic() - t0 > 180:
                    raise RuntimeError(f"replica not Ready:\n{agent.log.read_text()[-3000:]}")
                time.sleep(0.5)
            ready_s = time.monotonic() - t0
            time.sleep(2.0)
            busy_peak, _, busy_cpu = sample(proc.pid, SERVING_WINDOW_S)
        finally:
            agent.stop()
    return [
        f"agent idle over {WINDOW_S:.0f} s, heartbeat every {HEARTBEAT_S:.0f} s (lease renewed: {renewed})",
        f"RSS peak {peak:.1f} MB (mean {mean:.1f}); goal {GOAL_RSS_MB:.0f} MB"
        f" -> {peak / GOAL_RSS_MB:.2f}x goal",
        f"CPU {cpu:.3f} % of one core; goal {GOAL_CPU_PCT:.0f} % -> {cpu / GOAL_CPU_PCT:.2f}x goal",
        f"bare Python interpreter RSS {floor:.1f} MB -> agent is {peak / floor:.1f}x the floor",
        f"replica created -> Ready (pull + mlx-lm start) in {ready_s:.1f} s",
        f"agent supervising one engine over {SERVING_WINDOW_S:.0f} s: RSS peak {busy_peak:.1f} MB"
        f" ({busy_peak / GOAL_RSS_MB:.2f}x the idle goal), CPU {busy_cpu:.3f} % of one core"
        f" ({busy_cpu / GOAL_CPU_PCT:.2f}x the idle goal)",
    ]


if __name__ == "__main__":
    for line in run():
        print(line)
