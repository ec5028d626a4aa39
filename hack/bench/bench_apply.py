"""Apply -> bound: 100 ModelDeployments on the real API server, time until every replica is bound.

Starts a local control plane (orchardist.dev.cluster), a registry with the tiny model pushed as a
tag (so every deployment really resolves and profiles it), 50 simulated MacNodes with Leases, and
`orchardist operator run` as a subprocess. Then one kubectl apply of 100 deployments x 2 replicas,
polled until 200 ModelReplicas exist (they are created bound: spec.nodeName set). Measured in the
same run as floors: one deployment alone (latency), and the bench creating the same 200 replicas
itself with plain API calls (what the writes alone cost on this apiserver).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from datetime import UTC, datetime
from typing import Any

DEPLOYMENTS = 100
REPLICAS = 2
MACS = 50
GiB = 2**30


def _docs(kind_list: list[dict[str, Any]]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": kind_list})


def _count(cluster: Any, ns: str) -> int:
    out = cluster.kubectl("get", "modelreplicas", "-n", ns, "-o", "name", check=False).stdout
    return len([line for line in out.splitlines() if line.strip()])


def _wait_count(cluster: Any, ns: str, want: int, timeout: float) -> float:
    t0 = time.monotonic()
    while _count(cluster, ns) < want:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"only {_count(cluster, ns)}/{want} replicas after {timeout:.0f} s")
        time.sleep(0.1)
    return time.monotonic()


def run() -> list[str]:
    from tests.fixtures.agents import bench_stack, operator_argv, stop_process

    from orchardist.dev.tinymodel import build
    from orchardist.kube import RawApi, paths
    from orchardist.oci.push import push

    with bench_stack("bench-apply-") as (work, cluster, registry):
        operator: subprocess.Popen[bytes] | None = None
        try:
            tag = f"oci://{registry.host}/bench/tiny:v1"
            asyncio.run(push(build(work / "tiny"), tag))
            for ns in ("orchardist-system", "bench", "one", "floor"):
                cluster.kubectl("create", "namespace", ns)
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            macs: list[dict[str, Any]] = []
            leases: list[dict[str, Any]] = []
            for i in range(MACS):
                name = f"mac-{i:03d}"
                mac = {"apiVersion": "orchardist.io/v1alpha1", "kind": "MacNode", "metadata": {"name": name}}
                macs.append(mac)
                leases.append(
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": name, "namespace": "orchardist-system"},
                        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now},
                    }
                )
            cluster.kubectl("apply", "-f", "-", input=_docs(macs + leases))
            status = {
                "status": {
                    "memory": {"totalBytes": 64 * GiB, "gpuWorkingSetBytes": 48 * GiB},
                    "chip": {"family": "M4 Pro"},
                    "memoryBandwidthBytesPerSecond": 273 * 10**9,
                    "engines": [{"name": "mlx-lm", "version": "0.1.0"}],
                }
            }
            for m in macs:
                cluster.kubectl(
                    "patch",
                    "macnode",
                    m["metadata"]["name"],
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    json.dumps(status),
                )

            argv = operator_argv(cluster, "--all-namespaces", "--standalone", "--lease-grace", "3600")
            with (work / "operator.log").open("wb") as out:
                operator = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60
            while b"controller started" not in (work / "operator.log").read_bytes():
                if operator.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((work / "operator.log").read_text()[-3000:])
                time.sleep(0.2)
            time.sleep(2.0)  # watches established

            def md(name: str, ns: str) -> dict[str, Any]:
                return {
                    "apiVersion": "orchardist.io/v1alpha1",
                    "kind": "ModelDeployment",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {
                        "model": tag,
                        "engine": "mlx-lm",
                        "replicas": REPLICAS,
                        "contextLength": 1024,
                        "maxConcurrentSequences": 2,
                    },
                }

            t0 = time.monotonic()
            cluster.kubectl("apply", "-f", "-", input=_docs([md("solo", "one")]))
            one = _wait_count(cluster, "one", REPLICAS, 120) - t0

            t0 = time.monotonic()
            cluster.kubectl(
                "apply", "-f", "-", input=_docs([md(f"m{i:03d}", "bench") for i in range(DEPLOYMENTS)])
            )
            applied = time.monotonic() - t0
            total = _wait_count(cluster, "bench", DEPLOYMENTS * REPLICAS, 600) - t0

            kube = RawApi(cluster.api_client())
            listed = cluster.kubectl("get", "modelreplicas", "-n", "bench", "-o", "json").stdout
            sample = json.loads(listed)["items"][0]
            t0 = time.monotonic()
            for i in range(DEPLOYMENTS * REPLICAS):
                body = {
                    "apiVersion": sample["apiVersion"],
                    "kind": "ModelReplica",
                    "metadata": {"name": f"floor-{i:03d}", "namespace": "floor"},
                    "spec": sample["spec"],
                }
                kube.create(paths.modelreplica("floor"), body)
            floor = time.monotonic() - t0
            n = DEPLOYMENTS * REPLICAS
            return [
                f"{DEPLOYMENTS} deployments x {REPLICAS} replicas on {MACS} Macs: all {n} bound "
                f"{total:.2f} s after kubectl apply (the apply itself took {applied:.2f} s)",
                f"one deployment alone: {REPLICAS} replicas bound in {one:.2f} s",
                f"floor: the bench creating the same {n} replicas itself, one POST each: {floor:.2f} s; "
                f"controller / floor = {total / floor:.1f}x",
            ]
        finally:
            if operator is not None:
                stop_process(operator)


if __name__ == "__main__":
    for line in run():
        print(line)
