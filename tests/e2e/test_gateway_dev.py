"""The demo's gateway: `start_gateway` creates a working key and a ready gateway process."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from orchardist.dev import procs
from orchardist.dev.cluster import Cluster
from orchardist.dev.gateway import KEY_NAMESPACE, KEY_SECRET, start_gateway

pytestmark = pytest.mark.cluster


def test_start_gateway_returns_a_url_and_a_key_that_work(cluster: Cluster, tmp_path: Path) -> None:
    cluster.kubectl("create", "namespace", "demo-gw", check=False)
    url, key = start_gateway(cluster, tmp_path, namespaces=("demo-gw",))
    [record] = procs.load(tmp_path / "pids")
    try:
        assert record.name == "gateway" and procs.is_running(record)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)
        assert client.models.list().data == []  # the key works; no deployment in its namespace yet
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key=key + "x", max_retries=0).models.list()
        secret = json.loads(
            cluster.kubectl("get", "secret", KEY_SECRET, "-n", KEY_NAMESPACE, "-o", "json").stdout
        )
        assert secret["metadata"]["labels"]["orchardist.io/gateway-key"] == "true"
    finally:
        procs.stop(record)
    assert not procs.is_running(record)
