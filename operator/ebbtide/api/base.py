"""The base every API model shares: camelCase on the wire, snake_case in Python, strict."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """A part of the InferenceService API.

    `extra="forbid"` so that a typo in a manifest fails loudly in `ebbtide render` instead of
    being ignored (in a cluster the CRD's structural schema prunes unknown fields first).
    Models are frozen: the policy core receives them and must not be able to change them.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=False,
    )

    def to_wire(self) -> dict:
        """The object as it appears in a manifest: camelCase keys, defaults included."""
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)


def cel(*rules: tuple[str, str]) -> dict:
    """CEL rules (rule, message) for the generated CRD; see api/crd.py."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}
