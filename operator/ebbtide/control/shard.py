"""`ebbtide run --selector` and `--namespace`: the InferenceServices one operator (shard) runs.

Kubernetes' label selector syntax (`tier=gold`, `shard!=b`, `team in (a,b)`, `!legacy`), matched
in the handlers: services outside the shard never enter the registry, so the scaling loop,
the reconciler and drift correction leave them to their own operator.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

_TERM = re.compile(r"^\s*(?:(!)\s*([\w./-]+)|([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)|([\w./-]+)\s+(in|notin)\s*\(([^)]*)\)"
                   r"|([\w./-]+))\s*$")

Match = Callable[[Mapping[str, str]], bool]


def parse_selector(text: str) -> Match:
    """A predicate on labels; ValueError (one line) for a selector that is not one."""
    tests: list[Match] = []
    for term in re.split(r",(?![^(]*\))", text or ""):
        if not term.strip():
            continue
        m = _TERM.match(term)
        if m is None:
            raise ValueError(f"not a label selector term: {term.strip()!r}")
        _, absent, key, op, value, set_key, set_op, values, present = m.groups()
        if absent:
            tests.append(lambda labels, k=absent: k not in labels)
        elif key:
            equal = op != "!="
            tests.append(lambda labels, k=key, v=value, eq=equal: (labels.get(k) == v) == eq)
        elif set_key:
            members = {v.strip() for v in values.split(",") if v.strip()}
            inside = set_op == "in"
            tests.append(lambda labels, k=set_key, s=frozenset(members), i=inside:
                         (labels.get(k) in s) if i else (labels.get(k) not in s))
        else:
            tests.append(lambda labels, k=present: k in labels)
    return lambda labels: all(test(labels) for test in tests)


def selector_option(text: str) -> str:
    """For argparse: the selector as given, once it parses."""
    parse_selector(text)
    return text


_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def namespace_option(text: str) -> str:
    """For argparse: a namespace's exact name. kopf would take a pattern (`team-*`), but the
    scaling loop lists in each namespace by name, as a Role per namespace permits."""
    if not _NAMESPACE.match(text):
        raise ValueError(f"not a namespace name: {text!r} (name each namespace; patterns are not supported)")
    return text
