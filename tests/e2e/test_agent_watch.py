"""The replica loop's informer on the real API server: the field selector, and a relist after 410 Gone."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import pytest

from orchardist.dev.cluster import Cluster
from orchardist.kube import Kube, RawApi
from orchardist.oci.store import ContentStore
from orchardist_agent.config import AgentConfig
from orchardist_agent.node import NodeAgent
from orchardist_agent.replicas import ReplicaLoop

pytestmark = pytest.mark.cluster

DIGEST = "sha256:" + "c" * 64


def replica(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "ModelReplica",
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "deployment": "d",
            "model": f"oci://127.0.0.1:5000/m@{DIGEST}",
            "digest": DIGEST,
            "engine": "mlx-lm",
            "servedModelName": "d",
            "memoryPlan": {
                "weightBytes": 1,
                "overheadBytes": 1,
                "kvBudgetBytes": 1024,
                "kvBytesPerToken": 8,
                "blockSize": 16,
                "numBlocks": 16,
                "maxModelLen": 128,
                "maxNumSeqs": 1,
                "maxNumBatchedTokens": 128,
                "gpuMemoryUtilization": 0.9,
                "reservedBytes": 1,
            },
        },
    }


async def next_item(loop_: ReplicaLoop) -> tuple[str, Any]:
    async with asyncio.timeout(20):
        item: tuple[str, Any] = await loop_.queue.get()
    return item


async def test_watch_sees_only_this_node_and_relists_after_410(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    for name, bound in (("mine", "watch-node"), ("theirs", "other-node")):
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(replica(name, bound)))
    kube = Kube(RawApi(cluster.api_client()))
    cfg = AgentConfig(node_name="watch-node", store=tmp_path / "store", state_dir=tmp_path / "state")
    node = NodeAgent(kube, "watch-node", dict, address="127.0.0.1")
    replicas = ReplicaLoop(
        kube, node, cfg, "127.0.0.1", ContentStore(cfg.store, 2**30), engines=cast(Any, None)
    )
    # Start from a resourceVersion the server no longer has: it answers 410 Gone, the agent relists.
    informer = replicas.watch("1")
    try:
        kind, items = await next_item(replicas)
        assert kind == "relist"
        mine = [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in items]
        assert (namespace, "mine") in mine
        assert (namespace, "theirs") not in mine  # the server-side field selector spec.nodeName
        assert all(o["spec"]["nodeName"] == "watch-node" for o in items)

        # After the relist the watch carries on from the list's resourceVersion.
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(replica("later", "watch-node")))
        cluster.kubectl(
            "apply", "-n", namespace, "-f", "-", input=json.dumps(replica("later2", "other-node"))
        )
        cluster.kubectl("delete", "modelreplica", "-n", namespace, "mine")
        seen: list[tuple[str, str]] = []
        while len(seen) < 2:
            kind, obj = await next_item(replicas)
            seen.append((kind, obj["metadata"]["name"]))
        assert seen == [("ADDED", "later"), ("DELETED", "mine")]
    finally:
        informer.stop()
