"""Every example of our kinds under examples/ is valid against the generated CRD schema.

Found generically (examples/**/*.yaml), so examples added later are covered too. Each document is
checked three ways: the structural schema with defaults applied (jsonschema, with unknown fields
refused, since the API server would silently drop a misspelled field), every CEL rule (cel-python),
and the pydantic model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

from orchardist.api import API_VERSION, MacNode, ModelDeployment, ModelReplica
from orchardist.api.crds import all_crds
from orchardist.api.rules import ApiModel
from tests.integration.test_argocd_health import CASES as HEALTH_CASES
from tests.unit.test_api_cel import failures, with_defaults

REPO = Path(__file__).resolve().parents[2]
MODELS: dict[str, type[ApiModel]] = {
    "ModelDeployment": ModelDeployment,
    "MacNode": MacNode,
    "ModelReplica": ModelReplica,
}
SCHEMAS = {
    c["spec"]["names"]["kind"]: c["spec"]["versions"][0]["schema"]["openAPIV3Schema"] for c in all_crds()
}


def _documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((REPO / "examples").rglob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("orchardist.io/"):
                name = doc.get("metadata", {}).get("name", "?")
                found.append((f"{path.relative_to(REPO)}#{i}:{doc.get('kind')}/{name}", doc))
    return found


DOCUMENTS = _documents()


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown properties refused (except under metadata, which is not ours)."""
    out = copy.deepcopy(schema)
    if out.get("properties"):
        out.setdefault("additionalProperties", False)
        out["properties"] = {k: v if k == "metadata" else strict(v) for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = strict(out["items"])
    return out


def test_every_kind_has_an_example() -> None:
    """At least one example per kind, so each schema is exercised by a real document."""
    assert {doc["kind"] for _, doc in DOCUMENTS} >= set(MODELS)


@pytest.mark.parametrize("doc", [d for _, d in DOCUMENTS], ids=[i for i, _ in DOCUMENTS])
def test_example_is_valid(doc: dict[str, Any]) -> None:
    """The document passes the structural schema, the CEL rules and the pydantic model."""
    assert doc["apiVersion"] == API_VERSION
    assert doc["kind"] in SCHEMAS, f"unknown kind {doc['kind']}"
    schema = SCHEMAS[doc["kind"]]
    defaulted = with_defaults(schema, doc)
    jsonschema.Draft4Validator(strict(schema)).validate(defaulted)
    assert failures(schema, defaulted) == []
    MODELS[doc["kind"]].model_validate(doc)


@pytest.mark.parametrize(
    ("kind", "doc", "error"),
    [
        (
            "ModelDeployment",
            {"spec": {"model": "oci://r.example.com/m:1", "replica": 2}},
            "'replica' was unexpected",
        ),
        ("ModelDeployment", {"spec": {}}, "'model' is a required property"),
        ("MacNode", {"spec": {"taints": [{"key": "a", "effect": "Later"}]}}, "'Later' is not one of"),
    ],
)
def test_the_example_check_catches_mistakes(kind: str, doc: dict[str, Any], error: str) -> None:
    """The same check refuses a misspelled field, a missing required field and a bad enum value."""
    with pytest.raises(jsonschema.ValidationError, match=error):
        jsonschema.Draft4Validator(strict(SCHEMAS[kind])).validate(with_defaults(SCHEMAS[kind], doc))


# ------------------------------------------------------------------------------------------------
# GitOps health: the Flux example's healthCheckExprs, evaluated by cel-python as Flux evaluates them,
# on the same objects the Argo CD script is run on.

FLUX = REPO / "examples" / "flux" / "kustomization.yaml"


def flux_exprs() -> dict[str, str]:
    [kustomization] = [d for d in yaml.safe_load_all(FLUX.read_text()) if d["kind"] == "Kustomization"]
    [check] = [c for c in kustomization["spec"]["healthCheckExprs"] if c["kind"] == "ModelDeployment"]
    assert check["apiVersion"] == API_VERSION
    return {k: check[k] for k in ("inProgress", "failed", "current") if k in check}


def flux_status(obj: dict[str, Any]) -> str:
    """Flux's verdict: InProgress while the generation is not observed, then the first expression that
    holds (inProgress, failed, current); none holding is InProgress; an evaluation error is Unknown."""
    status = obj.get("status") or {}
    generation = obj["metadata"].get("generation")
    if "observedGeneration" in status and status["observedGeneration"] != generation:
        return "InProgress"
    env = celpy.Environment()
    activation = {k: json_to_cel(v) for k, v in obj.items() if k in ("metadata", "spec", "status")}
    for key, verdict in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        expr = flux_exprs().get(key)
        if expr is None:
            continue
        try:
            got = env.program(env.compile(expr)).evaluate(activation)
        except CELEvalError:
            return "Unknown"
        if isinstance(got, CELEvalError):
            return "Unknown"
        if bool(got):
            return verdict
    return "InProgress"


FLUX_WANT = {
    "no status yet": {"Unknown", "InProgress"},  # never Current: `wait` does not pass early
    "being deleted, even while Ready": {"Current"},
    "spec not observed yet": {"InProgress"},
    "serving": {"Current"},
    "pulling": {"InProgress"},
    "fits nowhere": {"Failed"},
    "Degraded while Ready": {"Current"},  # still serving every replica asked for
    "replicas missing after the rollout": {"Current"},
    "scaled to zero by spec.replicas": {"Current"},
    "idle at zero with minReplicas 0": {"Current"},
    "starting from zero with minReplicas 0": {"InProgress"},
    "autoscaled at one, serving": {"Current"},
    "crash loop": {"Failed"},
}


@pytest.mark.parametrize(
    ("case", "obj"), [(c[0], c[1]) for c in HEALTH_CASES], ids=[c[0] for c in HEALTH_CASES]
)
def test_flux_health_check_exprs(case: str, obj: dict[str, Any]) -> None:
    """`wait: true` passes only once the controller reports Ready for this generation, and fails fast
    on Stalled."""
    assert flux_status(obj) in FLUX_WANT[case]


def test_flux_table_covers_every_argocd_state() -> None:
    """Both GitOps checks are judged on the same objects."""
    assert set(FLUX_WANT) == {c[0] for c in HEALTH_CASES}
