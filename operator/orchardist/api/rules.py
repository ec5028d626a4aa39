"""CEL validation rules declared next to the fields they guard, plus the shared model base.

A `Rule` is used as ``Annotated`` metadata on a field type (``Annotated[str, Rule(...)]``) or listed
in a model's ``__rules__``. It does two things from one declaration: it adds an
``x-kubernetes-validations`` entry to the JSON schema (which the CRD generator keeps), and, when it
has a Python ``check`` mirroring the CEL expression, it validates the value in pydantic too, with the
same message. So the API server and the unit tests refuse the same objects with the same words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, GetCoreSchemaHandler, GetJsonSchemaHandler, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

VALIDATIONS = "x-kubernetes-validations"


@dataclass(frozen=True)
class Rule:
    """One CEL rule: `rule` is evaluated with `self` bound to the annotated value."""

    rule: str
    message: str
    check: Callable[[Any], bool] | None = None  # Python mirror; None for transition rules (oldSelf)
    reason: str | None = None  # FieldValueInvalid (default) | FieldValueForbidden | FieldValueRequired ...
    field_path: str | None = None  # where the error points, relative to the annotated value
    message_expression: str | None = None  # CEL building the message (e.g. naming the offending item)

    def cel(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.message_expression:
            out["messageExpression"] = self.message_expression
        if self.reason:
            out["reason"] = self.reason
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out

    def validate(self, value: Any) -> Any:
        if self.check is not None and not self.check(value):
            raise ValueError(self.message)
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        schema = handler(source)
        if self.check is None:
            return schema
        return core_schema.no_info_after_validator_function(self.validate, schema)

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        js = dict(handler(schema))
        js[VALIDATIONS] = [*js.get(VALIDATIONS, []), self.cel()]
        return js


class ApiModel(BaseModel):
    """Base of every API type: camelCase JSON names, snake_case attributes, unknown fields ignored.

    Unknown fields are ignored (not refused) because the API server already prunes them and a newer
    CRD must not crash an older reader.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        serialize_by_alias=True,
        extra="ignore",
    )

    #: Cross-field rules, evaluated with `self` bound to this object.
    __rules__: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Any:
        for rule in type(self).__rules__:
            rule.validate(self)
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        js = handler(schema)
        if cls.__rules__:
            target = handler.resolve_ref_schema(js)
            target[VALIDATIONS] = [*target.get(VALIDATIONS, []), *(r.cel() for r in cls.__rules__)]
        return js

    def to_json(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase names, unset optional fields left out."""
        out: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return out


def cel_string(text: str) -> str:
    """`text` as a CEL string literal (double-quoted, so apostrophes in messages need no care)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
