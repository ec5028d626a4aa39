"""Each process's writes carry its own field manager: the User-Agent the API server names them by."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchardist import __version__
from orchardist.controller.handlers import NamedConnection, connection_info
from orchardist.kube import AGENT, CONTROLLER, DEV, GATEWAY, api_client, user_agent

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "https://127.0.0.1:6443", insecure-skip-tls-verify: true}
users:
- name: u
  user: {token: secret-token}
contexts:
- name: x
  context: {cluster: c, user: u}
current-context: x
"""


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG)
    return path


@pytest.mark.parametrize(
    ("manager", "sent"),
    [
        (CONTROLLER, f"orchardist-controller/{__version__}"),
        (AGENT, f"orchardist-agent/{__version__}"),
        (GATEWAY, f"orchardist-gateway/{__version__}"),
        (DEV, f"orchardist-dev/{__version__}"),
    ],
)
def test_the_user_agent_names_the_manager_before_the_slash(kubeconfig: Path, manager: str, sent: str) -> None:
    """The API server takes the User-Agent up to the first '/' as the manager of a plain write."""
    assert user_agent(manager) == sent
    assert api_client(kubeconfig, manager=manager).user_agent == sent


def test_a_caller_that_does_not_say_is_a_dev_tool(kubeconfig: Path) -> None:
    """Never the client library's own `OpenAPI-Generator/...`."""
    assert api_client(kubeconfig).user_agent == f"orchardist-dev/{__version__}"


def test_kopf_connects_as_the_controller(kubeconfig: Path) -> None:
    """kopf keeps the session's User-Agent, so its finalizers and annotations are the controller's;
    the credentials are the same as every other client's."""
    info = connection_info(kubeconfig)
    assert isinstance(info, NamedConnection)
    assert info.as_http_headers() == {
        "Authorization": "Bearer secret-token",
        "User-Agent": f"orchardist-controller/{__version__}",
    }
    assert (info.server, info.insecure) == ("https://127.0.0.1:6443", True)
