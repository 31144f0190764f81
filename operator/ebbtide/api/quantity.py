"""Kubernetes resource quantities ("500m", "32Gi", 4), checked as the API server checks them."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, Field

# resource.Quantity's grammar (k8s.io/apimachinery): a decimal number, then a binary suffix
# (Ki .. Ei), a decimal one (n, u, m, k, M .. E) or a decimal exponent (e3, E-2). No sign:
# a resource request or limit must not be negative.
_QUANTITY = re.compile(r"\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?")


def check_quantity(value: object) -> int | str:
    """Runs before pydantic's int | str, so that 1.5 or `true` gets one sentence, not one per branch."""
    if isinstance(value, bool) or not isinstance(value, int | str) or (
            isinstance(value, str) and not _QUANTITY.fullmatch(value.removeprefix("-"))):
        raise ValueError(f'{value!r} is not a Kubernetes quantity (for example 4, "500m" or "32Gi")')
    if value < 0 if isinstance(value, int) else value.startswith("-"):
        raise ValueError(f"a resource quantity must not be negative, found {value!r}")
    return value


# Checked in the model, so that `ebbtide render` and the operator (SpecValid=False) refuse what
# the API server would only refuse later, in the Deployment, on every reconcile.
Quantity = Annotated[
    int | str,
    BeforeValidator(check_quantity),
    Field(description='A Kubernetes quantity, for example 4, "500m" or "32Gi".'),
]
