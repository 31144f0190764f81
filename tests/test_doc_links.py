"""Every link in README.md and docs/ resolves inside the repository: a reader of a clone (or of
the chart's package) has nothing else."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_every_relative_link_resolves_inside_the_repository():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            resolved = (doc.parent / target).resolve()
            if not resolved.exists() or ROOT not in resolved.parents:
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_no_doc_points_outside_the_repository():
    outside = [f"{doc.relative_to(ROOT)}: {m}" for doc in DOCS
               for m in re.findall(r"(?<![\w/])(?:\.\./)+[\w./-]+", doc.read_text())
               if ROOT not in (doc.parent / m).resolve().parents]
    assert not outside, outside
