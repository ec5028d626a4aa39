"""Authorization webhook: each Mac's agent reads only its own node's objects.

RBAC grants verbs on kinds; it cannot say "the ModelReplicas whose spec.nodeName is yours" or
"the MacNode named like you". Since Kubernetes 1.34 the API server passes a list or watch's field
selector to authorizers (``resourceAttributes.fieldSelector``), so a webhook authorizer placed
before RBAC can refuse an agent's list/watch of ModelReplicas unless it is narrowed to
``spec.nodeName=<its node>``, and its reads of another node's MacNode or Lease. The webhook only
ever denies or has no opinion: every grant still comes from RBAC (the chart's ClusterRole).

:func:`decide` is pure; :func:`serve` answers SubjectAccessReviews over HTTPS. The API server's
``--authorization-config`` sends it only agent identities (a match condition on the username) and
fails closed for them (``failurePolicy: Deny``); ``orchardist dev cluster`` configures exactly that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchardist import log
from orchardist.api.constants import GROUP

LOG = log.get(__name__)

#: Every agent's username starts so; the rest is its node (the chart's agentUserPrefix).
DEFAULT_PREFIX = "system:serviceaccount:orchardist-system:orchardist-agent-"
#: A SubjectAccessReview body is small; anything larger is not one.
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Decision:
    """``denied`` refuses outright; neither allowed nor denied lets the next authorizer (RBAC) decide."""

    denied: bool
    reason: str = ""


NO_OPINION = Decision(False)


def _narrowed_to(selector: Mapping[str, Any] | None, node: str) -> bool:
    """True when the field selector's requirements include ``spec.nodeName in (node)`` (and so only
    that node's replicas can match: requirements are ANDed). A raw, unparsed selector never counts."""
    if not selector or selector.get("rawSelector"):
        return False
    for req in selector.get("requirements") or ():
        if req.get("key") == "spec.nodeName" and req.get("operator") == "In" and req.get("values") == [node]:
            return True
    return False


def decide(review: Mapping[str, Any], prefix: str = DEFAULT_PREFIX) -> Decision:
    """The verdict on one SubjectAccessReview for an agent identity; others get no opinion."""
    spec = review.get("spec") or {}
    user = str(spec.get("user") or "")
    attrs = spec.get("resourceAttributes")
    if not user.startswith(prefix) or not attrs:
        return NO_OPINION
    node = user[len(prefix) :]
    who = f"orchardist agent {node}"
    group, resource = attrs.get("group", ""), attrs.get("resource", "")
    verb, name = attrs.get("verb", ""), attrs.get("name", "")
    if (group, resource) == (GROUP, "modelreplicas") and verb in ("list", "watch"):
        if attrs.get("subresource") or _narrowed_to(attrs.get("fieldSelector"), node):
            return NO_OPINION
        return Decision(
            True,
            f"{who} may {verb} only the ModelReplicas bound to its own node: "
            f"use the field selector spec.nodeName={node}",
        )
    if (group, resource) == (GROUP, "macnodes") and verb == "get" and name != node:
        return Decision(True, f"{who} may read only its own MacNode, not MacNode {name or '(all)'}")
    if (group, resource) == ("coordination.k8s.io", "leases") and verb == "get" and name != node:
        return Decision(True, f"{who} may read only its own Lease, not Lease {name or '(all)'}")
    return NO_OPINION


def answer(review: Mapping[str, Any], prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """The SubjectAccessReview to send back (same apiVersion, the verdict in status)."""
    verdict = decide(review, prefix)
    status: dict[str, Any] = {"allowed": False}
    if verdict.denied:
        status.update(denied=True, reason=verdict.reason)
    return {
        "apiVersion": review.get("apiVersion", "authorization.k8s.io/v1"),
        "kind": "SubjectAccessReview",
        "status": status,
    }


async def serve(host: str, port: int, cert: str, key: str, prefix: str) -> None:
    """Answer ``POST /authorize`` until cancelled."""
    from aiohttp import web

    async def authorize(request: web.Request) -> web.Response:
        if (request.content_length or 0) > MAX_BODY:
            return web.Response(status=413, text="body too large")
        try:
            review = json.loads(await request.content.read(MAX_BODY + 1))
        except ValueError:
            return web.Response(status=400, text="not JSON")
        reply = answer(review, prefix)
        if reply["status"].get("denied"):
            LOG.info("agent request refused", reason=reply["status"]["reason"])
        return web.json_response(reply)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/authorize", authorize)
    app.router.add_get("/healthz", lambda _: _ok())
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=tls).start()
    LOG.info("authorization webhook serving", address=f"https://{host}:{port}/authorize", prefix=prefix)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def _ok() -> Any:
    from aiohttp import web

    return web.Response(text="ok")


def register(parser: argparse.ArgumentParser) -> None:
    """``orchardist operator authz-webhook``: arguments and entry."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8443, help="TCP port (8443)")
    parser.add_argument("--tls-cert", required=True, help="PEM certificate the API server trusts")
    parser.add_argument("--tls-key", required=True, help="its PEM private key")
    parser.add_argument(
        "--agent-prefix",
        default=DEFAULT_PREFIX,
        help=f"username prefix of agent identities ({DEFAULT_PREFIX})",
    )
    parser.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    log.configure("INFO", args.log_format)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.tls_cert, args.tls_key, args.agent_prefix))
    return 0
