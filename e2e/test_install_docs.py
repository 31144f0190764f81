"""README.md's "Install on a cluster" is exactly what the kind backend runs (e2e/kind.py)."""

from __future__ import annotations

import re
import shlex

from e2e.backend import ROOT
from e2e.kind import install_commands


def readme_install_commands() -> list[list[str]]:
    """The commands of the first bash block under "## Install on a cluster", continuations joined."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Install on a cluster\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_readme_install_section_is_what_the_kind_backend_runs():
    assert readme_install_commands() == install_commands("ebbtide-e2e")
