"""The generated CRDs: their shape, structural schemas, and the drift check against crds/."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchardist.api import crds as crds_module
from orchardist.api.cli import default_dir, drift
from orchardist.api.crds import KINDS, all_crds, rendered
from orchardist.api.macnode import MacNode
from orchardist.cli import main
from tests.unit.test_api_cel import walk

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
BY_KIND = {c["spec"]["names"]["kind"]: c for c in all_crds()}


def version(kind: str) -> dict[str, Any]:
    v: dict[str, Any] = BY_KIND[kind]["spec"]["versions"][0]
    return v


def test_three_crds_with_names_and_scope() -> None:
    """Three v1 CRDs in group orchardist.io with the contract's names, short names and scope."""
    assert sorted(BY_KIND) == ["MacNode", "ModelDeployment", "ModelReplica"]
    expected = {
        "ModelDeployment": ("modeldeployments", "md", "Namespaced"),
        "MacNode": ("macnodes", "mn", "Cluster"),
        "ModelReplica": ("modelreplicas", "mr", "Namespaced"),
    }
    for kind, (plural, short, scope) in expected.items():
        crd = BY_KIND[kind]
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        assert crd["metadata"]["name"] == f"{plural}.orchardist.io"
        assert crd["spec"]["group"] == "orchardist.io"
        assert crd["spec"]["scope"] == scope
        assert crd["spec"]["names"]["plural"] == plural
        assert crd["spec"]["names"]["shortNames"] == [short]
        assert crd["spec"]["names"]["categories"] == ["orchardist"]
        assert [v["name"] for v in crd["spec"]["versions"]] == ["v1alpha1"]


def test_subresources() -> None:
    """Status on all three; scale on ModelDeployment, wired to replicas and the selector."""
    for kind in BY_KIND:
        assert version(kind)["subresources"]["status"] == {}
    assert version("ModelDeployment")["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "scale" not in version("MacNode")["subresources"]
    assert "scale" not in version("ModelReplica")["subresources"]


@pytest.mark.parametrize(
    ("kind", "columns"),
    [
        (
            "ModelDeployment",
            [
                ("Model", ".spec.model"),
                ("Engine", ".spec.engine"),
                ("Ready", ".status.ready"),
                ("Status", ".status.phase"),
                ("Reason", ".status.reason"),
                ("Age", ".metadata.creationTimestamp"),
            ],
        ),
        (
            "MacNode",
            [
                ("Chip", ".status.chip.family"),
                ("Memory", ".status.memory.total"),
                ("Working Set", ".status.memory.gpuWorkingSet"),
                ("Allocated", ".status.memory.allocated"),
                ("Free", ".status.memory.free"),
                ("Ready", '.status.conditions[?(@.type=="Ready")].status'),
                ("Cordoned", ".spec.unschedulable"),
                ("Taints", ".spec.taints[*].key"),
                ("Age", ".metadata.creationTimestamp"),
            ],
        ),
        (
            "ModelReplica",
            [
                ("Node", ".spec.nodeName"),
                ("Status", ".status.phase"),
                ("Restarts", ".status.restarts"),
                ("Progress", ".status.progress.percent"),
                ("Endpoint", ".status.endpoint"),
                ("Age", ".metadata.creationTimestamp"),
            ],
        ),
    ],
)
def test_printer_columns(kind: str, columns: list[tuple[str, str]]) -> None:
    """The default `kubectl get` columns (priority 0), in order; wide-only extras may follow."""
    shown = [
        (c["name"], c["jsonPath"]) for c in version(kind)["additionalPrinterColumns"] if not c.get("priority")
    ]
    assert shown == columns


def test_a_macnode_spec_has_no_default_its_creator_would_own() -> None:
    """The agent creates its MacNode without a spec; a schema default would be filled in then and
    owned by the agent, so a user's server-side apply of spec.unschedulable would conflict."""
    spec = version("MacNode")["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert "default" not in spec
    assert {k: "default" in v for k, v in spec["properties"].items()} == {
        "unschedulable": False,
        "taints": False,
    }


@pytest.mark.parametrize("spec", [None, {}, {"taints": []}])
def test_a_macnode_without_unschedulable_reads_schedulable(spec: dict[str, Any] | None) -> None:
    """The CRD has no default for it (the agent creates its MacNode with no spec): missing, an empty
    spec, or the null a server-side apply can leave all read False through the model."""
    assert MacNode.model_validate({"metadata": {"name": "m"}}).spec.unschedulable is False
    body: dict[str, Any] = {"metadata": {"name": "m"}, "spec": spec}
    assert MacNode.model_validate(body).spec.unschedulable is False


def test_replicas_are_selectable_by_node() -> None:
    """Agents list only their own replicas with a server-side field selector on spec.nodeName."""
    assert version("ModelReplica")["selectableFields"] == [{"jsonPath": ".spec.nodeName"}]


def _nodes() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (kind, path, node)
        for kind in BY_KIND
        for path, node in walk(version(kind)["schema"]["openAPIV3Schema"])
    ]


def test_schemas_are_structural() -> None:
    """Every node has a type; nothing a structural schema forbids or an OpenAPI 3.0 reader misreads."""
    forbidden = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "const", "title", "nullable"}
    # Null only where it means something: a MacNode spec a server-side apply emptied (read as {}).
    nullable = {("MacNode", ".spec")}
    for kind, path, node in _nodes():
        assert "type" in node, f"{kind}{path} has no type"
        allowed = {"nullable"} if (kind, path) in nullable else set()
        assert not (forbidden - allowed) & node.keys(), f"{kind}{path} uses {forbidden & node.keys()}"
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(key, True), bool), (
                f"{kind}{path}: {key} must be a boolean in OpenAPI 3.0"
            )
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            item = node["items"]
            assert all(k in item.get("required", []) or "default" in item["properties"][k] for k in keys), (
                f"{kind}{path}: list-map keys must be required or defaulted"
            )


def test_cel_rules_have_messages_and_bounded_inputs() -> None:
    """At least 12 rules, each with a message; every string and list a rule can reach is bounded.

    The API server estimates each rule's cost from maxLength/maxItems and refuses CRDs over budget.
    """
    rules = [(k, p, r) for k, p, n in _nodes() for r in n.get("x-kubernetes-validations", [])]
    assert len({r["rule"] for _, _, r in rules}) >= 12
    for kind, path, rule in rules:
        assert len(rule["message"]) >= 20, f"{kind}{path}: {rule}"
    for kind, path, node in _nodes():
        if not node.get("x-kubernetes-validations") or path == "":
            continue  # the root rule reads only metadata.name and spec.service.name
        for sub_path, sub in walk(node, path):
            if sub["type"] == "string":
                assert "maxLength" in sub or "enum" in sub or sub.get("format") == "date-time", (
                    f"{kind}{sub_path}"
                )
            if sub["type"] == "array":
                assert "maxItems" in sub, f"{kind}{sub_path}"
            if sub["type"] == "object" and "additionalProperties" in sub:
                assert "maxProperties" in sub, f"{kind}{sub_path}"
    per_kind = {k: sum(1 for kk, _, _ in rules if kk == k) for k in BY_KIND}
    assert per_kind["ModelDeployment"] >= 12
    assert per_kind["ModelReplica"] >= 12


def test_field_paths_point_into_the_schema() -> None:
    """A rule's fieldPath must name a property of the node it sits on (the API server checks this)."""
    for kind, path, node in _nodes():
        for rule in node.get("x-kubernetes-validations", []):
            if "fieldPath" not in rule:
                continue
            target = node
            for part in rule["fieldPath"].lstrip(".").split("."):
                assert part in target.get("properties", {}), f"{kind}{path}: fieldPath {rule['fieldPath']}"
                target = target["properties"][part]


def test_nearly_every_field_is_described() -> None:
    """`kubectl explain` teaches the API: at least 97% of properties carry a description."""
    props = [
        (kind, f"{path}.{name}", sub)
        for kind, path, node in _nodes()
        for name, sub in node.get("properties", {}).items()
    ]
    described = [p for p in props if len(p[2].get("description", "")) >= 5]
    missing = [f"{k}{p}" for k, p, s in props if s not in [d[2] for d in described]]
    assert len(described) / len(props) >= 0.97, missing
    assert all(p.endswith(".metadata") for p in missing), missing


def test_crds_dir_matches_the_models() -> None:
    """crds/ is what `orchardist crds --write` makes from the models today."""
    assert default_dir() == CRDS
    assert drift(CRDS) == []
    assert main(["crds", "--check"]) == 0


def test_output_is_deterministic_and_parses() -> None:
    """Two renderings are byte-identical; stdout is the same documents as multi-doc YAML."""
    assert rendered() == rendered()


def test_stdout_is_every_crd(capsys: pytest.CaptureFixture[str]) -> None:
    """`orchardist crds` prints the three CRDs as one multi-document YAML stream."""
    assert main(["crds"]) == 0
    assert list(yaml.safe_load_all(capsys.readouterr().out)) == all_crds()


def test_check_reports_edited_missing_and_stray_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check fails with a diff summary naming each file that differs, is missing, or is not generated."""
    copy = tmp_path / "crds"
    shutil.copytree(CRDS, copy)
    edited = copy / "macnodes.orchardist.io.yaml"
    edited.write_text(edited.read_text().replace("When true, no new replicas", "When true, fewer replicas"))
    (copy / "modelreplicas.orchardist.io.yaml").unlink()
    (copy / "widgets.orchardist.io.yaml").write_text("kind: CustomResourceDefinition\n")
    assert main(["crds", "--check", "--dir", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "macnodes.orchardist.io.yaml: differs from the models (2 changed lines)" in err
    assert "-                description: When true, fewer replicas" in err
    assert "modelreplicas.orchardist.io.yaml: missing" in err
    assert "widgets.orchardist.io.yaml: not generated by the models" in err
    assert "orchardist crds --write" in err
    assert main(["crds", "--write", "--dir", str(copy)]) == 0
    capsys.readouterr()
    (copy / "widgets.orchardist.io.yaml").unlink()
    assert main(["crds", "--check", "--dir", str(copy)]) == 0


def test_check_fails_after_a_model_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """A change to the API types (here: a printer column) makes the committed crds/ stale."""
    changed = tuple(
        dataclasses.replace(k, columns=(*k.columns, {"name": "X", "type": "string", "jsonPath": ".spec.x"}))
        if k.name == "MacNode"
        else k
        for k in KINDS
    )
    monkeypatch.setattr(crds_module, "KINDS", changed)
    problems = drift(CRDS)
    assert problems[0].startswith(f"{CRDS / 'macnodes.orchardist.io.yaml'}: differs from the models")
    assert main(["crds", "--check"]) == 1
