"""The Argo CD health check of examples/argocd/argocd-cm.yaml, run by a real Lua 5.1 interpreter.

Argo CD runs health scripts in gopher-lua (Lua 5.1 semantics) with the object as the global table
``obj``; Debian's ``lua5.1`` runs the same text here. The script is read from the example a user
copies, so the file and the test cannot drift. Statuses come from the controller's own status
function wherever it makes them, so the script is checked against what the controller writes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchardist.controller.status import Facts, conditions, render, summary

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "argocd" / "argocd-cm.yaml"
KEY = "resource.customizations.health.orchardist.io_ModelDeployment"
NOW = "2026-03-01T12:00:00Z"
D = "sha256:" + "ab" * 32


def script() -> str:
    doc = yaml.safe_load(EXAMPLE.read_text())
    text: str = doc["data"][KEY]
    return text


def lua(value: Any) -> str:
    """A JSON value as a Lua literal (null fields are absent, as Argo CD converts them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid Lua 5.1 escapes for this text
    if isinstance(value, list):
        return "{" + ", ".join(lua(v) for v in value) + "}"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"[{json.dumps(k)}] = {lua(v)}" for k, v in value.items() if v is not None) + "}"
        )
    raise TypeError(type(value))


def health(obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) the script returns for ``obj``."""
    lua51 = shutil.which("lua5.1")
    assert lua51, "lua5.1 is missing: run hack/install-system-deps.sh"
    program = (
        f"obj = {lua(obj)}\n"
        f"local function check()\n{script()}\nend\n"
        'local hs = check()\nio.write(hs.status, "\\t", hs.message or "")\n'
    )
    out = subprocess.run([lua51, "-"], input=program, capture_output=True, text=True, timeout=30, check=True)
    status, _, message = out.stdout.partition("\t")
    return status, message


def md(
    spec: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    generation: int = 2,
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "chat", "namespace": "llm", "generation": generation}
    if deleting:
        meta["deletionTimestamp"] = NOW
    obj: dict[str, Any] = {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": meta,
        "spec": {"model": "oci://r.example/m:v1", "replicas": 2, **(spec or {})},
    }
    if status is not None:
        obj["status"] = status
    return obj


def written(f: Facts, generation: int = 2, **extra: Any) -> dict[str, Any]:
    """The status the controller writes for these facts (conditions through its own functions)."""
    conds = conditions(f)
    reason, message = summary(conds)
    return {
        "observedGeneration": generation,
        "conditions": render(conds, generation, [], NOW),
        "readyReplicas": f.ready,
        "replicas": f.existing,
        "reason": reason,
        "message": message,
        **extra,
    }


READY = Facts(desired=2, existing=2, ready=2, updated=2, updated_ready=2, digest=D)
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("no status yet", md(), "Progressing", "waiting for the controller"),
    (
        "being deleted, even while Ready",
        md(status=written(READY), deleting=True),
        "Progressing",
        "being deleted",
    ),
    ("spec not observed yet", md(status=written(READY, generation=1)), "Progressing", "not observed"),
    ("serving", md(status=written(READY)), "Healthy", "Ready: 2/2 replicas ready"),
    (
        "pulling",
        md(status=written(Facts(desired=2, existing=2, updated=2, pulling=2, percent="42%", digest=D))),
        "Progressing",
        "PullProgressing: 2 replica(s) pulling the model (42%)",
    ),
    (
        "fits nowhere",
        md(status=written(Facts(desired=2, unschedulable="no Mac fits: closest is mac-a"))),
        "Degraded",
        "Unschedulable: no Mac fits: closest is mac-a",
    ),
    (
        "Degraded while Ready",
        md(
            status=written(
                Facts(desired=2, existing=3, ready=2, updated=2, updated_ready=2, lost=1, digest=D)
            )
        ),
        "Degraded",
        "NodeNotReady: 1 replica(s) on Macs that stopped renewing their Lease",
    ),
    (
        "replicas missing after the rollout",
        md(
            status={
                **written(READY),
                "readyReplicas": 1,
            }
        ),
        "Degraded",
        "ReplicasMissing: 1/2 replicas ready after the rollout",
    ),
    (
        "scaled to zero by spec.replicas",
        md(spec={"replicas": 0}, status=written(Facts(desired=0))),
        "Suspended",
        "spec.replicas is 0",
    ),
    (
        "idle at zero with minReplicas 0",
        md(
            spec={"replicas": 1, "scaling": {"minReplicas": 0, "maxReplicas": 3}},
            status=written(Facts(desired=0), autoscaling={"desiredReplicas": 0, "reason": "Idle"}),
        ),
        "Suspended",
        "scaled to zero while idle",
    ),
    (
        "starting from zero with minReplicas 0",
        md(
            spec={"replicas": 1, "scaling": {"minReplicas": 0, "maxReplicas": 3}},
            status=written(
                Facts(desired=1, existing=1, updated=1, starting=1, digest=D),
                autoscaling={"desiredReplicas": 1, "reason": "ScaleFromZero"},
            ),
        ),
        "Progressing",
        "Starting: 1 replica(s) starting the engine",
    ),
    (
        "autoscaled at one, serving",
        md(
            spec={"replicas": 5, "scaling": {"minReplicas": 1, "maxReplicas": 3}},
            status=written(
                Facts(desired=1, existing=1, ready=1, updated=1, updated_ready=1, digest=D),
                autoscaling={"desiredReplicas": 1, "reason": "Steady"},
            ),
        ),
        "Healthy",
        "Ready: 1/1 replicas ready",
    ),
    (
        "crash loop",
        md(
            status=written(
                Facts(
                    desired=2,
                    existing=2,
                    updated=2,
                    failures=(("CrashLoop", "chat-x on mac-a: engine exited 3 times"),),
                    digest=D,
                )
            )
        ),
        "Degraded",
        "CrashLoop: chat-x on mac-a: engine exited 3 times",
    ),
]


@pytest.mark.parametrize(("case", "obj", "want", "message"), CASES, ids=[c[0] for c in CASES])
def test_health(case: str, obj: dict[str, Any], want: str, message: str) -> None:
    """Each state gets Argo CD's verdict, and the message says why."""
    status, said = health(obj)
    assert (status, message in said) == (want, True), said


def test_every_verdict_is_covered() -> None:
    """The table exercises all four verdicts the script can give."""
    assert {c[2] for c in CASES} == {"Progressing", "Healthy", "Degraded", "Suspended"}
