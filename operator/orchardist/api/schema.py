"""Turn a pydantic model's JSON schema into a structural OpenAPI v3 schema for a CRD.

pydantic emits JSON Schema 2020-12: ``$ref``/``$defs``, ``anyOf`` with ``null`` for optional fields,
``const``, titles and numeric ``exclusiveMinimum``. A CRD needs a structural schema: everything
inlined, one type per node, optional meaning "not required", OpenAPI 3.0 keywords. Anything this
converter does not understand is an error, so a new construct in the models cannot slip through.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

Schema = dict[str, Any]

# Keywords copied as they are (after the conversions below).
_KEPT = {
    "type",
    "format",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "properties",
    "items",
    "additionalProperties",
    "required",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-preserve-unknown-fields",
}
_DROPPED = {"title", "$defs"}


class SchemaError(ValueError):
    """The model uses a construct a structural CRD schema cannot express."""


def structural(model: type[BaseModel]) -> Schema:
    """The model's structural schema (camelCase names, validation mode)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _convert(raw, raw.get("$defs", {}), model.__name__)


def _merge(base: Schema, extra: Schema) -> Schema:
    """`extra` (keywords beside a $ref or anyOf) on top of `base`; CEL rules add up."""
    out = dict(base)
    for key, value in extra.items():
        if key == "x-kubernetes-validations":
            out[key] = [*out.get(key, []), *value]
        else:
            out[key] = value
    return out


def _convert(node: Schema, defs: dict[str, Schema], where: str) -> Schema:
    node = dict(node)
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        node = _merge(copy.deepcopy(defs[name]), node)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in node:
            branches = [b for b in node.pop(key) if b != {"type": "null"}]
            if len(branches) != 1:
                raise SchemaError(f"{where}: {key} with {len(branches)} non-null branches is not structural")
            if node.get("default", 0) is None:
                del node["default"]
            return _convert(_merge(branches[0], node), defs, where)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("default", 0) is None:
        del node["default"]
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node and not isinstance(node[bound], bool):
            node[flag] = node.pop(bound)
            node[bound] = True
    if node.get("type") == "integer":
        node.setdefault("format", "int64")
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    out: Schema = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key not in _KEPT:
            raise SchemaError(f"{where}: unsupported keyword {key!r}")
        if key == "properties":
            out[key] = {name: _convert(sub, defs, f"{where}.{name}") for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _convert(value, defs, f"{where}[]")
        else:
            out[key] = value
    if "type" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        raise SchemaError(f"{where}: no type")
    return out
