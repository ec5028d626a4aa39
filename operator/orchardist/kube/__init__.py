"""The Kubernetes API adapter shared by the controller, the agent and the dev tools.

Here: where credentials come from (an explicit kubeconfig, then ``$KUBECONFIG``/``~/.kube/config``,
then the in-cluster service account), the field manager each process writes as, and
:class:`RawApi`, blocking raw-JSON calls over the official client's connection. Beside it:
:mod:`.paths` (every URL), :mod:`.aio` (:class:`Kube`, the async and idempotent calls),
:mod:`.informer` (list + watch) and :mod:`.events` (core/v1 Events).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from orchardist import __version__
from orchardist.api.constants import API_VERSION, GROUP, VERSION

__all__ = [
    "AGENT",
    "API_VERSION",
    "CONTROLLER",
    "DEV",
    "GATEWAY",
    "GROUP",
    "JSON",
    "MERGE_PATCH",
    "SYSTEM_NAMESPACE",
    "VERSION",
    "Api",
    "Kube",
    "RawApi",
    "api_client",
    "user_agent",
]

SYSTEM_NAMESPACE = "orchardist-system"
MERGE_PATCH = "application/merge-patch+json"
JSON = dict[str, Any]

# Field managers (docs/architecture.md, "Who writes what"). The API server names a write that
# carries no fieldManager after its User-Agent up to the first '/', so each process's client sends
# `<manager>/<version>` and managedFields tell the operator, the agents and the gateway apart
# (the official client would send `OpenAPI-Generator/...` for all of them).
CONTROLLER = "orchardist-controller"
AGENT = "orchardist-agent"
GATEWAY = "orchardist-gateway"
DEV = "orchardist-dev"  # dev tools, `orchardist plan`, tests


def user_agent(manager: str) -> str:
    """The User-Agent a process of ``manager`` sends: the manager, then '/' and the version."""
    return f"{manager}/{__version__}"


def api_client(
    kubeconfig: str | Path | None = None, context: str | None = None, *, manager: str = DEV
) -> client.ApiClient:
    """An ApiClient for the given kubeconfig, else the usual kubeconfig, else in-cluster; its
    writes are made under the field manager ``manager`` (the caller says who it is)."""
    cfg = client.Configuration()
    path = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG")
    if path or Path("~/.kube/config").expanduser().exists():
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, context=context, client_configuration=cfg
        )
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except ConfigException as exc:
            raise ConfigException(
                "no Kubernetes credentials: pass --kubeconfig, set KUBECONFIG, or run inside a cluster"
            ) from exc
    api = client.ApiClient(cfg)
    api.user_agent = user_agent(manager)
    return api


class Api(Protocol):
    """The blocking calls :class:`RawApi` makes; tests hand a scripted fake in its place."""

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str | int] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        stream: bool = False,
        timeout: float | None = None,
    ) -> Any: ...

    def get(self, path: str, **query: str | int) -> JSON: ...

    def watch(self, path: str, **query: str | int) -> Iterator[JSON]: ...


class RawApi:
    """Blocking raw-JSON calls over an ApiClient (from async code: :class:`Kube`).

    JSON on the wire instead of the client's typed APIs: callers parse our kinds at the edge with
    their pydantic models, and importing the typed core API alone costs ~20 MB of RSS on a Mac that
    should give its memory to models. Connection, auth and TLS stay the official client's. Non-2xx
    answers raise ``ApiException``.
    """

    def __init__(self, api: client.ApiClient, timeout: float = 30.0) -> None:
        self.api = api
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str | int] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        stream: bool = False,
        timeout: float | None = None,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        m, url, hdrs, data, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self.api.call_api(
            m, url, header_params=hdrs, body=data, _request_timeout=timeout or self.timeout
        )
        if stream:
            if not 200 <= resp.status <= 299:
                resp.read()  # type: ignore[no-untyped-call]
                raise ApiException(http_resp=resp)
            return resp.response
        raw = resp.read()  # type: ignore[no-untyped-call]
        if not 200 <= resp.status <= 299:
            raise ApiException(http_resp=resp)
        return json.loads(raw) if raw else {}

    def get(self, path: str, **query: str | int) -> JSON:
        out: JSON = self.request("GET", path, query=query)
        return out

    def create(self, path: str, body: JSON) -> JSON:
        out: JSON = self.request("POST", path, body=body)
        return out

    def merge_patch(self, path: str, body: JSON) -> JSON:
        out: JSON = self.request("PATCH", path, body=body, content_type=MERGE_PATCH)
        return out

    def delete(self, path: str, body: JSON | None = None) -> None:
        self.request("DELETE", path, body=body)

    def watch(self, path: str, **query: str | int) -> Iterator[JSON]:
        """Events of a watch (``ERROR`` events included, as the server sent them)."""
        timeout = float(query.get("timeoutSeconds", 300)) + 30
        resp = self.request("GET", path, query={**query, "watch": "true"}, stream=True, timeout=timeout)
        try:
            buf = b""
            for chunk in resp.stream(amt=None, decode_content=False):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.release_conn()


from orchardist.kube.aio import Kube  # noqa: E402  (it builds on RawApi above)
