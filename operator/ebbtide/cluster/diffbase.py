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
        extra_fields = list(extra_fields or ())
        if not extra_fields:
            # kopf deep-copies the whole body (status and managedFields too) to keep only the rest
            # and the labels and annotations: on every event, each status write's among them. A
            # body with a full status: 0.53 ms, 0.07 ms cut down first, on the event loop.
            meta = body.get("metadata") or {}
            body = kopf.Body({**{k: v for k, v in body.items() if k not in ("metadata", "status")},
                              "metadata": {k: meta[k] for k in ("labels", "annotations") if k in meta}})
        essence = super().build(body=body, extra_fields=extra_fields)
        if "spec" in essence:
            essence["spec"] = redacted(essence["spec"])
        return essence
