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

import jsonschema
import pytest
import yaml

from orchardist.api import API_VERSION, MacNode, ModelDeployment, ModelReplica
from orchardist.api.crds import all_crds
from orchardist.api.rules import ApiModel
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
