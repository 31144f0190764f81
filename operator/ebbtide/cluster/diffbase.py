"""kopf's diff base, kept without env values.

kopf keeps the last handled InferenceService in an annotation on it and compares the next one
with it, to tell an edit of the spec from other updates. It keeps it `redacted`, like the
Deployment's applied spec (api/redaction.py): both sides of the comparison are built here, so an
edited env value is still an edit, and the value is not copied into the annotation.
"""

from __future__ import annotations

from collections.abc import Iterable

import kopf

from ebbtide.api.redaction import redacted


class RedactedDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    def build(self, *, body: kopf.Body, extra_fields: Iterable[kopf.FieldSpec] | None = None) -> kopf.BodyEssence:
        essence = super().build(body=body, extra_fields=extra_fields)
        if "spec" in essence:
            essence["spec"] = redacted(essence["spec"])
        return essence
