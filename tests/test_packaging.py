"""What `pip install .` (not -e) gives a user, the operator image among them: the wheel must
carry the bundled traces and examples, or `ebbtide simulate` fails outside a checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "operator" / "ebbtide"


@pytest.mark.slow
def test_the_wheel_carries_every_data_file_and_example(tmp_path):
    # Built from a clean copy: setuptools reuses a checkout's build/ directory, whose files
    # from an earlier build would hide a pattern that no longer matches.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "operator", source / "operator", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("ebbtide-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"ebbtide/{p.relative_to(PACKAGE).as_posix()}"
              for folder in ("data", "examples") for p in (PACKAGE / folder).rglob("*") if p.is_file()}
    assert wanted and wanted <= names, sorted(wanted - names)
