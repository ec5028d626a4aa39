"""Agent token rotation as examples/launchd sets it up, on the real apiserver with the chart.

A Mac renews its own short-lived token with the current one (the chart's per-Mac token Role) and
never another Mac's; the kubeconfig's exec credential re-reads the token file, so a running agent
picks up a replaced token without a restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchardist.dev.cluster import Cluster
from tests.fixtures.agents import stop_process
from tests.fixtures.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "orchardist"
LAUNCHD = REPO / "examples" / "launchd"
SYSTEM_NS = "orchardist-system"
RELEASE = "rotation"
A, B = "mac-r-a", "mac-r-b"

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def chart(cluster: Cluster) -> Iterator[Cluster]:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "files" / "kopf"))
    cluster.helm(
        "install", RELEASE, str(CHART), "-n", SYSTEM_NS, "--create-namespace",
        "--set", "crds.enabled=false", "--set", f"agents.nodes={{{A},{B}}}",
    )  # fmt: skip
    try:
        yield cluster
    finally:
        cluster.helm("uninstall", RELEASE, "-n", SYSTEM_NS, check=False)
        cluster.kubectl("delete", "macnode", A, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "lease", A, "-n", SYSTEM_NS, "--ignore-not-found", check=False)


def exec_kubeconfig(cluster: Cluster, directory: Path, token: str, recheck: int = 60) -> tuple[Path, Path]:
    """A kubeconfig whose user is the example's exec credential over a token file (mode 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    token_file = directory / "agent.token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": cluster.server,
                                               "certificate-authority": str(cluster.ca_file)}}],
        "users": [{"name": "mac", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": str(LAUNCHD / "orchardist-credential"),
            "env": [{"name": "ORCHARDIST_TOKEN_FILE", "value": str(token_file)},
                    {"name": "ORCHARDIST_TOKEN_RECHECK", "value": str(recheck)}],
            "interactiveMode": "Never",
        }}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "mac"}}],
        "current-context": "c",
    }  # fmt: skip
    kubeconfig = directory / "agent.kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    kubeconfig.chmod(0o600)
    return kubeconfig, token_file


def mint(cluster: Cluster, node: str, duration: str = "10m") -> str:
    out = cluster.kubectl(
        "create", "token", f"orchardist-agent-{node}", "-n", SYSTEM_NS, f"--duration={duration}"
    )
    return out.stdout.strip()


def refresh(
    cluster: Cluster, node: str, kubeconfig: Path, token_file: Path
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCHARDIST_TOKEN_FILE": str(token_file), "ORCHARDIST_KUBECONFIG": str(kubeconfig),
           "KUBECTL": str(cluster.bin("kubectl")), "ORCHARDIST_TOKEN_DURATION": "15m"}  # fmt: skip
    env.pop("KUBECONFIG", None)
    return subprocess.run(
        [str(LAUNCHD / "orchardist-token-refresh"), node], capture_output=True, text=True, env=env, timeout=60
    )


def whoami(cluster: Cluster, kubeconfig: Path) -> str:
    out = subprocess.run(
        [str(cluster.bin("kubectl")), f"--kubeconfig={kubeconfig}", "auth", "whoami", "-o", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["status"]["userInfo"]["username"])


def test_a_mac_renews_its_own_token_through_the_exec_credential(chart: Cluster, tmp_path: Path) -> None:
    kubeconfig, token_file = exec_kubeconfig(chart, tmp_path, mint(chart, A))
    old = token_file.read_text()
    out = refresh(chart, A, kubeconfig, token_file)
    assert out.returncode == 0, out.stderr
    new = token_file.read_text().strip()
    assert new and new != old.strip()
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert whoami(chart, kubeconfig) == f"system:serviceaccount:{SYSTEM_NS}:orchardist-agent-{A}"


def test_a_mac_cannot_mint_another_macs_token(chart: Cluster, tmp_path: Path) -> None:
    kubeconfig, token_file = exec_kubeconfig(chart, tmp_path, mint(chart, A))
    before = token_file.read_text()
    out = refresh(chart, B, kubeconfig, token_file)
    assert out.returncode != 0
    assert (
        f'User "system:serviceaccount:{SYSTEM_NS}:orchardist-agent-{A}" cannot create resource '
        f'"serviceaccounts/token" in API group "" in the namespace "{SYSTEM_NS}"' in out.stderr
    ), out.stderr
    assert token_file.read_text() == before  # nothing replaced
    user = f"--as=system:serviceaccount:{SYSTEM_NS}:orchardist-agent-{A}"
    for sa, answer in (
        (f"orchardist-agent-{A}", "yes"),
        (f"orchardist-agent-{B}", "no"),
        ("rotation-orchardist-operator", "no"),
    ):
        got = chart.kubectl(
            "auth", "can-i", "create", f"serviceaccounts/{sa}", "--subresource=token", "-n", SYSTEM_NS, user,
            check=False,
        )  # fmt: skip
        assert got.stdout.strip() == answer, (sa, got.stdout)


def test_the_running_agent_picks_up_a_replaced_token(chart: Cluster, tmp_path: Path) -> None:
    """The agent starts with a token the API server refuses and keeps retrying registration; once
    the file holds a valid token the agent registers, without a restart."""
    kubeconfig, token_file = exec_kubeconfig(chart, tmp_path, "not-a-token", recheck=1)
    argv = [
        sys.executable, "-m", "orchardist", "agent", "run", "--kubeconfig", str(kubeconfig),
        "--node-name", A, "--simulate", "m4-pro-64gb", "--store", str(tmp_path / "store"),
        "--state-dir", str(tmp_path / "state"), "--address", "127.0.0.1", "--bind-address", "127.0.0.1",
        "--heartbeat-interval", "1", "--log-format", "json",
    ]  # fmt: skip
    log = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(
            lambda: "Unauthorized" in log.read_text() or proc.poll() is not None,
            timeout=60,
            interval=0.3,
            message=lambda: f"the bad token refused:\n{log.read_text()[-2000:]}",
        )
        assert proc.poll() is None, log.read_text()[-2000:]
        token_file.write_text(mint(chart, A))

        def registered() -> bool:
            assert proc.poll() is None, log.read_text()[-2000:]
            node = chart.kubectl("get", "macnode", A, "-o", "json", check=False)
            conds = (
                json.loads(node.stdout).get("status", {}).get("conditions", [])
                if node.returncode == 0
                else []
            )
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

        wait_for(
            registered, timeout=90, interval=0.5, message=lambda: f"registered:\n{log.read_text()[-2000:]}"
        )
    finally:
        stop_process(proc)
