"""Generate the InferenceService CustomResourceDefinition from the pydantic models.

The walker below turns model fields into a *structural* OpenAPI v3 schema, the subset the
Kubernetes API server accepts for CRDs: every node has a type, no $ref, no anyOf for
optionals (they become `nullable`), int-or-string quantities use the Kubernetes extension.
It is written by hand rather than post-processing `model_json_schema()` because the CRD
needs things pydantic's output does not give: defaults for nested objects (so the API server
defaults them), `exclusiveMinimum` in the OpenAPI 3.0 boolean form, and CEL rules.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import annotated_types as at
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ebbtide import api
from ebbtide.api.base import ApiModel

PRINTER_COLUMNS = [
    {"name": "Ready", "type": "integer", "jsonPath": ".status.replicas.ready", "description": "Ready replicas"},
    {"name": "Desired", "type": "integer", "jsonPath": ".status.replicas.desired", "description": "Desired replicas"},
    {"name": "Asleep", "type": "integer", "jsonPath": ".status.replicas.asleep", "priority": 1,
     "description": "Replicas in the sleeping warm pool"},
    {"name": "Mode", "type": "string", "jsonPath": ".spec.mode", "description": "Active or Advisory"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase"},
    {"name": "USD/h", "type": "number", "jsonPath": ".status.cost.usdPerHour", "description": "Dollars per hour now"},
    {"name": "USD/1M-tok", "type": "number", "jsonPath": ".status.cost.usdPerMillionTokens",
     "description": "Dollars per million tokens, recent window"},
    {"name": "Variants", "type": "string", "jsonPath": ".status.variantsSummary", "priority": 1,
     "description": "Per accelerator variant: ready/desired replicas and dollars per hour"},
    {"name": "Last-Decision", "type": "string", "jsonPath": ".status.lastDecisionSummary",
     "description": "The latest scaling decision"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

_PRIMITIVES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _constraints(metadata: list[Any]) -> dict:
    out: dict[str, Any] = {}
    for item in metadata:
        match item:
            case at.Ge(ge=v):
                out["minimum"] = v
            case at.Gt(gt=v):
                out.update(minimum=v, exclusiveMinimum=True)
            case at.Le(le=v):
                out["maximum"] = v
            case at.Lt(lt=v):
                out.update(maximum=v, exclusiveMaximum=True)
            case at.MinLen(min_length=v):
                out["minLength"] = v
            case at.MaxLen(max_length=v):
                out["maxLength"] = v
            case _ if isinstance(getattr(item, "pattern", None), str):  # pydantic's Field(pattern=...)
                out["pattern"] = item.pattern
    return out


def _type_schema(annotation: Any) -> dict:
    """Schema of a type, without description (the field supplies it)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        inner = _type_schema(args[0])
        for extra in args[1:]:
            if isinstance(extra, FieldInfo):
                inner |= _constraints(extra.metadata)
        return inner
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if set(members) == {int, str}:
            return {"x-kubernetes-int-or-string": True}
        if len(members) != 1:
            raise TypeError(f"unions other than Optional[X] and int | str have no structural schema: {annotation}")
        return _type_schema(members[0]) | {"nullable": True}
    if origin is Literal:
        (kind,) = {_PRIMITIVES[type(a)] for a in args}
        return {"type": kind, "enum": list(args)}
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])}
    if origin is dict:
        if args[1] is Any:  # free-form: kept as written (the API server would prune it otherwise)
            return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        return {"type": "object", "additionalProperties": _type_schema(args[1])}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_schema(annotation)
    if annotation in _PRIMITIVES:
        return {"type": _PRIMITIVES[annotation]}
    raise TypeError(f"no schema for {annotation!r}")


def _default(field: FieldInfo) -> Any:
    """The default the API server should apply, or PydanticUndefined for none.

    A nested object whose own fields all have defaults defaults to `{}`: the API server then
    fills in its fields from their own defaults, which keeps the CRD short and the
    defaults in one place.
    """
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, ApiModel):
            # A real API server checks a default against the object's CEL rules before it fills
            # in the inner defaults: an object with rules gets its whole default spelled out.
            has_rules = "x-kubernetes-validations" in (type(value).model_config.get("json_schema_extra") or {})
            try:
                if type(value)() == value and not has_rules:
                    return {}
            except ValueError:
                pass
            return value.to_wire()
        return value if value else PydanticUndefined
    if field.default is None or field.default is PydanticUndefined:
        return PydanticUndefined
    return field.default


def model_schema(model: type[BaseModel]) -> dict:
    properties: dict[str, dict] = {}
    required: list[str] = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        if not field.description:
            raise ValueError(f"{model.__name__}.{name} has no description; every CRD field must have one")
        prop = _type_schema(field.annotation) | _constraints(field.metadata)
        if prop.get("type") == "array":  # pydantic's length bounds apply to items here
            for length, items in (("minLength", "minItems"), ("maxLength", "maxItems")):
                if length in prop:
                    prop[items] = prop.pop(length)
        prop["description"] = field.description
        default = _default(field)
        if default is not PydanticUndefined:
            prop["default"] = default
        if field.is_required():
            required.append(key)
        properties[key] = prop
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if model.__doc__ and model.__doc__ is not ApiModel.__doc__:
        schema["description"] = " ".join(model.__doc__.split())
    if required:
        schema["required"] = required
    extra = model.model_config.get("json_schema_extra")
    if isinstance(extra, dict):
        schema |= extra
    return schema


def crd() -> dict:
    spec = model_schema(api.InferenceServiceSpec)
    spec["description"] = "What the user asks for: model, engine, replica bounds, SLOs, schedules, sleep, spot, prices."
    status = model_schema(api.InferenceServiceStatus)
    status["description"] = "What the operator decided and why, and what it costs."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["ebbtide"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A vLLM model server that Ebbtide runs and scales for the lowest "
                            "cost per token within its latency SLOs.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "APIVersion of the object."},
                                "kind": {"type": "string", "description": "Kind of the object."},
                                "metadata": {"type": "object"},  # a real API server refuses anything more here
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `ebbtide crd` from operator/ebbtide/api/. Do not edit by hand.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


CRD_FILENAME = f"{api.PLURAL}.{api.GROUP}.yaml"
