"""A replica served by a real agent, as a hostile client and a hostile engine would meet it.

On the real control plane with a real registry: the agent runs its engine (mlx_lm.server) as the
unprivileged engine user and serves it through its proxy. The endpoint in the replica's status is
the proxy's; without the deployment's key every route is refused and nothing reaches the engine;
with it a chat completion works; another model is refused and never loaded; the key is on no
command line; the engine's uid cannot read the agent's kubeconfig, records or logs.
"""

from __future__ import annotations

import base64
import json
import secrets
import stat
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from orchardist.api.projection import node_namespace, projected_secret
from orchardist.dev.cluster import Cluster
from orchardist.oci.push import push
from orchardist_agent.engines import Runtime
from orchardist_agent.supervisor.users import EngineUser
from tests.fixtures.agents import (
    Agent,
    condition,
    engine_pid,
    kget,
    make_agent,
    registered,
    stop_recorded_engines,
)
from tests.fixtures.wait import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.registry, pytest.mark.engine]

MiB = 2**20
KEY = secrets.token_urlsafe(24)
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
async def tiny_ref(registry: str, tiny_model: Path) -> tuple[str, str]:
    digest = await push(tiny_model, f"{registry}/hostile/tiny:v1")
    return f"oci://{registry}/hostile/tiny@{digest}", digest


def replica(name: str, node: str, ref: tuple[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "ModelReplica",
        "metadata": {
            "name": name,
            "labels": {"orchardist.io/deployment": "tiny", "orchardist.io/node": node},
        },
        "spec": {
            "nodeName": node,
            "deployment": "tiny",
            "model": ref[0],
            "digest": ref[1],
            "engine": "mlx-lm",
            "servedModelName": "tiny",
            "apiKeySecretRef": {"name": "tiny-key", "key": "token"},
            "memoryPlan": {
                "weightBytes": 4 * MiB,
                "overheadBytes": 64 * MiB,
                "kvBudgetBytes": 64 * MiB,
                "kvBytesPerToken": 512,
                "blockSize": 16,
                "numBlocks": 8192,
                "maxModelLen": 2048,
                "maxNumSeqs": 2,
                "maxNumBatchedTokens": 2048,
                "gpuMemoryUtilization": 0.92,
                "reservedBytes": 256 * MiB,
            },
        },
    }


@pytest.fixture
def agent(
    cluster: Cluster, tmp_path: Path, shared_dir: Path, mlx_runtime: Runtime, engine_user: EngineUser
) -> Iterator[Agent]:
    """An agent whose store is readable by the engine user and whose kubeconfig (0600) and state
    (0700) sit in a directory anyone may traverse: only their own modes keep the engine out."""
    kubeconfig = shared_dir / "agent.kubeconfig"
    kubeconfig.write_bytes(cluster.kubeconfig.read_bytes())
    kubeconfig.chmod(0o600)
    a = make_agent(
        cluster,
        tmp_path / "agent",
        extra=(
            "--runtime", f"mlx-lm={mlx_runtime.prefix}",
            "--engine-user", engine_user.name,
            "--store", str(shared_dir / "store"),
            "--state-dir", str(shared_dir / "state"),
            "--kubeconfig", str(kubeconfig),
            "--proxy-max-body", str(BODY_LIMIT),
        ),
    )  # fmt: skip
    try:
        yield a.start()
    finally:
        a.stop()
        stop_recorded_engines(shared_dir / "state")
        cluster.kubectl("delete", "macnode", a.node, "--ignore-not-found", "--wait=false", check=False)
        cluster.kubectl(
            "delete", "namespace", node_namespace(a.node), "--ignore-not-found", "--wait=false", check=False
        )


def call(url: str, body: dict[str, Any] | bytes | None = None, key: str | None = None) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(
        url, data=data, headers=headers, method="POST" if data is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def engine_requests(log: Path) -> list[str]:
    return [ln for ln in log.read_text(errors="replace").splitlines() if "HTTP/1." in ln]


def as_user(user: EngineUser, python: Path, path: Path) -> str:
    """What the engine's uid gets when it opens `path`: READ or the error's name."""
    code = (
        "import sys\ntry:\n open(sys.argv[1]).read(); print('READ')\n"
        "except OSError as e:\n print(type(e).__name__)"
    )
    out = subprocess.run(
        [str(python), "-c", code, str(path)],
        user=user.uid,
        group=user.gid,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.strip()


def test_a_replica_is_reached_only_through_its_proxy_with_its_key(
    cluster: Cluster,
    namespace: str,
    agent: Agent,
    tiny_ref: tuple[str, str],
    shared_dir: Path,
    engine_user: EngineUser,
    mlx_runtime: Runtime,
) -> None:
    registered(cluster, agent)
    # The key as the controller projects it for this Mac (no controller runs here): the agent reads
    # only the copies in its node's namespace.
    node_ns = node_namespace(agent.node)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": projected_secret(namespace, "tiny-key"), "namespace": node_ns},
        "data": {"token": base64.b64encode(KEY.encode()).decode()},
    }
    cluster.kubectl("create", "namespace", node_ns, check=False)
    cluster.kubectl("apply", "-f", "-", input=json.dumps(secret))
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(replica("r1", agent.node, tiny_ref))
    )

    def ready() -> dict[str, Any] | None:
        assert agent.proc is not None and agent.proc.poll() is None, f"agent exited:\n{agent.tail()}"
        st = dict((kget(cluster, "modelreplica", "-n", namespace, "r1") or {}).get("status") or {})
        return st if st.get("phase") == "Ready" else None

    st = wait_for(ready, timeout=180, message=lambda: f"r1 Ready; agent log:\n{agent.tail(30)}")
    assert condition(st, "Ready")["status"] == "True"

    # The endpoint is the proxy's; the engine listens on loopback on another port.
    state = shared_dir / "state"
    [rec] = [json.loads(p.read_text()) for p in (state / "engines").glob("*.json")]
    host, public = st["endpoint"].rsplit(":", 1)
    assert (host, rec["host"]) == ("127.0.0.1", "127.0.0.1") and int(public) != rec["port"]
    base = f"http://{st['endpoint']}"
    log = Path(rec["log_path"])

    # The engine runs as the engine user, and no command line carries the key.
    pid = engine_pid(st)
    assert psutil.Process(pid).uids().real == engine_user.uid
    assert agent.proc is not None
    for proc in (psutil.Process(pid), psutil.Process(agent.proc.pid)):
        assert not any(KEY in arg for arg in proc.cmdline())

    # Without the key (or with a wrong one) every route is refused, and nothing reaches the engine.
    before = engine_requests(log)
    for key in (None, "wrong", KEY[:-1]):
        for path, body in (
            ("/health", None),
            ("/v1/models", None),
            ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/completions", {"model": "tiny", "prompt": "hi"}),
        ):
            status, doc = call(base + path, body, key)
            assert (status, doc["error"]["code"]) == (401, "invalid_api_key"), (path, key)
    assert engine_requests(log) == before

    # With the key, the openai SDK chats through the proxy.
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
    )
    assert answer.choices and answer.choices[0].message.role == "assistant"
    client.close()

    # Another model, adapters, an oversized body: refused before the engine; nothing loaded.
    before = engine_requests(log)
    refused: list[tuple[dict[str, Any] | bytes, int, str]] = [
        ({"model": "mlx-community/Qwen3-0.6B-4bit", "prompt": "hi"}, 404, "model_not_found"),
        ({"model": "tiny", "prompt": "hi", "adapters": "/tmp"}, 400, "unsupported_parameter"),
        (json.dumps({"prompt": "x" * BODY_LIMIT}).encode(), 413, "request_too_large"),
    ]
    for payload, status, code in refused:
        got, doc = call(base + "/v1/completions", payload, KEY)
        assert (got, doc["error"]["code"]) == (status, code)
    assert engine_requests(log) == before
    assert "Qwen3" not in log.read_text(errors="replace")

    # The engine's uid cannot read the agent's credentials, records or logs; the model it can.
    python = mlx_runtime.bin("python")
    kubeconfig = shared_dir / "agent.kubeconfig"
    for private in (kubeconfig, Path(rec["log_path"]), *(state / "engines").glob("*.json")):
        assert as_user(engine_user, python, private) == "PermissionError", private
    model_file = next(p for p in (shared_dir / "store").rglob("config.json"))
    assert as_user(engine_user, python, model_file) == "READ"  # the control: reading works where allowed
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    for d in (state, state / "engines", log.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
