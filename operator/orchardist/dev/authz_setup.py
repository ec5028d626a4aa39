"""The local control plane's authorizers: the agents' webhook first, then RBAC.

Writes the webhook's self-signed certificate, the kubeconfig the API server reaches it with, and
the ``--authorization-config`` file; returns the webhook's command line. The webhook is asked only
about agent identities (a match condition on the username) and fails closed for them; everyone
else goes straight to RBAC. On a real cluster the same file goes to the API server's flags
(docs/architecture.md, "Agent identities").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from orchardist.dev.tls import self_signed


def prepare(pki: Path, port: int, agent_prefix: str) -> list[str]:
    """Write ``authz.crt``/``authz.key``, ``authz.kubeconfig`` and ``authorization.yaml`` in ``pki``."""
    cert, key = pki / "authz.crt", pki / "authz.key"
    self_signed(cert, key, common_name="orchardist-authz", ip="127.0.0.1", days=365)
    hook = pki / "authz.kubeconfig"
    hook.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "authz", "cluster": {
                    "server": f"https://127.0.0.1:{port}/authorize", "certificate-authority": str(cert)}}],
                "users": [{"name": "apiserver", "user": {}}],
                "contexts": [{"name": "authz", "context": {"cluster": "authz", "user": "apiserver"}}],
                "current-context": "authz",
            }
        )
    )  # fmt: skip
    config = {
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "AuthorizationConfiguration",
        "authorizers": [
            {
                "type": "Webhook",
                "name": "orchardist-agents",
                "webhook": {
                    "timeout": "3s",
                    "subjectAccessReviewVersion": "v1",
                    "matchConditionSubjectAccessReviewVersion": "v1",
                    # Unreachable webhook: agents are refused, never waved through to RBAC.
                    "failurePolicy": "Deny",
                    "authorizedTTL": "10s",
                    "unauthorizedTTL": "10s",
                    "connectionInfo": {"type": "KubeConfigFile", "kubeConfigFile": str(hook)},
                    "matchConditions": [{"expression": f"request.user.startsWith('{agent_prefix}')"}],
                },
            },
            {"type": "RBAC", "name": "rbac"},
        ],
    }
    (pki / "authorization.yaml").write_text(json.dumps(config, indent=2))
    return [
        sys.executable, "-m", "orchardist", "operator", "authz-webhook",
        f"--port={port}", f"--tls-cert={cert}", f"--tls-key={key}",
        f"--agent-prefix={agent_prefix}", "--log-format=json",
    ]  # fmt: skip
