"""Env values live in the pod template and nowhere else.

A spec is kept in two annotations: the Deployment's applied spec (the last valid one, for a
restarted operator) and kopf's diff base on the InferenceService (to tell edits apart). Both keep
the spec `redacted`: each literal `engine.env` value replaced by a fingerprint, so that an edited
value still changes what is kept, while the value itself is not copied. A fingerprint of a guessable
value can be guessed: literal values are not secret by declaration, secrets come by valueFrom.

The applied spec is `restored` from the one place the values are: the env the Deployment was
rendered with, which begins with the spec's own entries, in order. A value there that no longer
matches its fingerprint was changed by hand: the last valid spec is then unknown, and the
operator rather says so than renders a guess (or the fingerprint) into the pods.
"""

from __future__ import annotations

import hashlib

FINGERPRINT = "sha256:"


def fingerprint(value: str) -> str:
    return FINGERPRINT + hashlib.sha256(value.encode()).hexdigest()[:16]


def _with_env(spec: dict, env: list[dict]) -> dict:
    return {**spec, "engine": {**spec["engine"], "env": env}}


def redacted(spec: dict) -> dict:
    """A copy of a spec (wire form) whose literal env values are fingerprints."""
    env = (spec.get("engine") or {}).get("env")
    if not env:
        return spec
    return _with_env(spec, [{**e, "value": fingerprint(e["value"])} if "value" in e else e for e in env])


def restored(spec: dict, rendered_env: list[dict]) -> dict:
    """The inverse of `redacted`, given the container env rendered from the spec.

    Raises ValueError when a value is not there (the error names the variable, never a value).
    """
    env = (spec.get("engine") or {}).get("env")
    if not env:
        return spec
    out = []
    for index, item in enumerate(env):
        if "value" in item:
            live = rendered_env[index] if index < len(rendered_env) else {}
            value = live.get("value", "")
            if live.get("name") != item["name"] or fingerprint(value) != item["value"]:
                raise ValueError(f"env {item['name']} was changed in the Deployment, its applied value is unknown")
            item = {**item, "value": value}
        out.append(item)
    return _with_env(spec, out)
