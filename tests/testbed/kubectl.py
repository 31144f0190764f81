"""The real kubectl (tools/bin/kubectl, from `make tools`) against the test bed's control plane."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = ROOT / "tools" / "bin" / "kubectl"


def run_kubectl(apiserver, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """kubectl as a user runs it, with the cluster's kubeconfig; the caller reads the outcome."""
    return subprocess.run([str(KUBECTL), *args], capture_output=True, text=True, timeout=60, input=stdin,
                          env={**os.environ, "KUBECONFIG": str(apiserver.kubeconfig_path)})


def kubectl(apiserver, *args: str, stdin: str | None = None) -> str:
    """Its stdout; a failing command fails the test with kubectl's own words."""
    done = run_kubectl(apiserver, *args, stdin=stdin)
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout
