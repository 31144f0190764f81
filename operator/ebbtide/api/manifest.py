"""Reading InferenceService manifests and turning validation errors into sentences."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import yaml
from pydantic import ValidationError

from ebbtide import api
from ebbtide.api.ref import ServiceRef
from ebbtide.api.spec import InferenceServiceSpec


class InvalidSpec(ValueError):
    """A spec the operator will not act on; the message says why, in the manifest's terms."""


def _location(loc: tuple) -> str:
    path = "spec"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def explain(error: ValidationError) -> str:
    problems = []
    for e in error.errors():
        message = e["msg"].removeprefix("Value error, ")
        problems.append(f"{_location(e['loc'])}: {message}")
    return "; ".join(problems)


def parse_spec(raw: dict | None) -> InferenceServiceSpec:
    try:
        return InferenceServiceSpec.model_validate(raw or {})
    except ValidationError as e:
        raise InvalidSpec(explain(e)) from None


def load_manifests(path: str | Path) -> Iterator[tuple[ServiceRef, InferenceServiceSpec]]:
    """Every InferenceService in a YAML file (other kinds are skipped)."""
    with open(path) as f:
        documents = list(yaml.safe_load_all(f))
    for index, doc in enumerate(documents):
        if not doc or doc.get("kind") != api.KIND:
            continue
        if doc.get("apiVersion") != api.API_VERSION:
            raise InvalidSpec(f"document {index}: apiVersion must be {api.API_VERSION}, not {doc.get('apiVersion')}")
        meta = doc.get("metadata") or {}
        if not meta.get("name"):
            raise InvalidSpec(f"document {index}: metadata.name is required")
        ref = ServiceRef(name=meta["name"], namespace=meta.get("namespace", "default"))
        yield ref, parse_spec(doc.get("spec"))
