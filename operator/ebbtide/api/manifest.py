"""Reading InferenceService manifests and turning validation errors into sentences."""

from __future__ import annotations

import re
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


# The Service the operator creates is named NAME, and a Service name must be an RFC 1035 label:
# lower-case letters, digits and '-', a letter first, a letter or digit last. At most 48
# characters, so that the names derived from it stay 63-character labels too: NAME-spot (the
# spot Deployment) and the longest, NAME-demand-profile (the profile's ConfigMap).
NAME_MAX = 63 - len("-demand-profile")
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # a DNS-1123 label


def check_name(name: object) -> str:
    if not name:
        raise InvalidSpec("metadata.name is required")
    if not isinstance(name, str) or len(name) > NAME_MAX or not _NAME.fullmatch(name):
        raise InvalidSpec(f"metadata.name {name!r} must be at most {NAME_MAX} lower-case letters, digits and "
                          "'-', starting with a letter and ending with a letter or digit")
    return name


def check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or len(namespace) > 63 or not _NAMESPACE.fullmatch(namespace):
        raise InvalidSpec(f"metadata.namespace {namespace!r} must be at most 63 lower-case letters, digits "
                          "and '-', starting and ending with a letter or digit")
    return namespace


def load_manifests(path: str | Path) -> list[tuple[ServiceRef, InferenceServiceSpec]]:
    """Every InferenceService in a YAML file, also in the items of a `kind: List` (what `kubectl
    get -o yaml` writes); other kinds are skipped. Whatever is wrong with the file, including
    holding no InferenceService, is an InvalidSpec that names the file and the document."""
    try:
        services = [_service(where, obj) for where, obj in _objects(_documents(path)) if obj.get("kind") == api.KIND]
        if not services:
            raise InvalidSpec(f"no {api.KIND} in this file")
    except InvalidSpec as e:
        raise InvalidSpec(f"{path}: {e}") from None
    return services


def _documents(path: str | Path) -> list:
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise InvalidSpec(e.strerror or str(e)) from None
    except UnicodeDecodeError as e:
        raise InvalidSpec(f"not UTF-8 text (byte {e.start} cannot be decoded)") from None
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InvalidSpec(f"not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise InvalidSpec("not valid YAML: nested too deeply") from None


def _objects(documents: list) -> Iterator[tuple[str, dict]]:
    """The objects of the documents, each with where it is; a List's items one by one."""
    if not any(doc is not None for doc in documents):
        raise InvalidSpec("the file is empty (no YAML document)")
    for index, doc in enumerate(documents, start=1):
        where = f"document {index}"
        if isinstance(doc, dict) and doc.get("kind") == "List":
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise InvalidSpec(f"{where}: a List's items must be a list, found {_a(items)}")
            entries = [(f"{where}, item {i}", item) for i, item in enumerate(items, start=1)]
        else:
            entries = [] if doc is None else [(where, doc)]  # None: an empty document, as after a last ---
        for place, obj in entries:
            if not isinstance(obj, dict):
                raise InvalidSpec(f"{place}: expected a Kubernetes object (a mapping), found {_a(obj)}")
            yield place, obj


def _a(value: object) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true or false"}.get(
        type(value), f"a {type(value).__name__}")


def _service(where: str, obj: dict) -> tuple[ServiceRef, InferenceServiceSpec]:
    try:
        if obj.get("apiVersion") != api.API_VERSION:
            raise InvalidSpec(f"apiVersion must be {api.API_VERSION}, not {obj.get('apiVersion')}")
        meta = obj.get("metadata") or {}
        if not isinstance(meta, dict):
            raise InvalidSpec(f"metadata must be a mapping, found {_a(meta)}")
        ref = ServiceRef(name=check_name(meta.get("name")), namespace=check_namespace(meta.get("namespace", "default")))
        return ref, parse_spec(obj.get("spec"))
    except InvalidSpec as e:
        raise InvalidSpec(f"{where}: {e}") from None
