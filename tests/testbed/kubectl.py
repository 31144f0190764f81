"""The real kubectl (tools/bin/kubectl, from `make tools`) against the emulated API."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = ROOT / "tools" / "bin" / "kubectl"


def kubectl(apiserver, *args: str) -> str:
    """Its stdout; a failing command fails the test with kubectl's own words."""
    done = subprocess.run([str(KUBECTL), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KUBECONFIG": str(apiserver.kubeconfig_path)})
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout
