#!/usr/bin/env bash
# Build Prometheus with Kubernetes service discovery from its Go module, pinned and cached by
# version (a second run builds nothing). Prints the path of the binary.
#
# Why not the Debian package: Debian builds Prometheus without kubernetes_sd_configs (a patch
# disables it), and the end-to-end scenarios' Prometheus finds the engines through the API
# server with the job users add (docs/prometheus-scrape.yaml). The build tags keep only the
# file, HTTP and Kubernetes discoveries: the other clouds' SDKs would triple the build.
#
# Usage: tools/prometheus/build.sh     (EBBTIDE_CACHE to move the cache, default ~/.cache/ebbtide)
set -euo pipefail

PROMETHEUS_VERSION=v2.55.1
# Prometheus publishes its Go module as v0.MINOR.PATCH for release v2.MINOR.PATCH.
module_version="v0.${PROMETHEUS_VERSION#v2.}"
cache="${EBBTIDE_CACHE:-$HOME/.cache/ebbtide}"
out="$cache/prometheus/$PROMETHEUS_VERSION"
if [[ -x "$out/prometheus" ]]; then echo "$out/prometheus"; exit 0; fi

command -v go >/dev/null || { echo "build.sh: go is not installed" >&2; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
printf 'module ebbtide.dev/prometheus\n\ngo 1.26.0\n\nrequire github.com/prometheus/prometheus %s\n' \
  "$module_version" > "$work/go.mod"
# A dependency's replace directives are ignored, and Prometheus replaces klog with its go-kit
# adapter (cmd/prometheus does not compile without it): copy its replace block into ours.
prometheus_mod="$(cd "$work" && go mod download -json "github.com/prometheus/prometheus@$module_version" \
  | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
sed -n '/^replace (/,/^)/p' "$prometheus_mod" >> "$work/go.mod"
version_pkg=github.com/prometheus/common/version
(cd "$work" && go build -trimpath -tags remove_all_sd,enable_kubernetes_sd -o "$out/prometheus.partial" \
   -ldflags "-s -w -X $version_pkg.Version=${PROMETHEUS_VERSION#v} -X $version_pkg.Branch=ebbtide-build" \
   github.com/prometheus/prometheus/cmd/prometheus >&2)
mv "$out/prometheus.partial" "$out/prometheus"
echo "$out/prometheus"
