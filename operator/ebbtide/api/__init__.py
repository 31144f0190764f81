"""The InferenceService API: pydantic models are the single source of truth; the CRD is generated."""

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.api.status import InferenceServiceStatus

GROUP = "ebbtide.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceService"
PLURAL = "inferenceservices"
SINGULAR = "inferenceservice"
SHORT_NAMES = ["isvc", "ebb"]

__all__ = [
    "API_VERSION", "GROUP", "KIND", "PLURAL", "SHORT_NAMES", "SINGULAR", "VERSION",
    "InferenceServiceSpec", "InferenceServiceStatus",
]
