"""Identity of an InferenceService."""

from __future__ import annotations

from dataclasses import dataclass

from ebbtide import api


@dataclass(frozen=True)
class ServiceRef:
    """Identity of an InferenceService: all that rendering needs besides the spec."""

    name: str
    namespace: str
    uid: str = "00000000-0000-0000-0000-000000000000"

    def owner_reference(self) -> dict:
        return {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
