#!/usr/bin/env bash
# Build the real Kubernetes control plane from the Go module proxy: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler. Pinned, and cached by version: a second run builds
# nothing. Prints the directory holding the four binaries.
#
# Why wrapper modules: k8s.io/kubernetes (and etcd's server module) replace their staging
# modules with local paths, so `go install pkg@version` refuses them. Our own module requires
# the release and replaces each staging module with its published tag (kube/go.mod).
#
# Usage: tools/controlplane/build.sh     (EBBTIDE_CACHE to move the cache, default ~/.cache/ebbtide)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${EBBTIDE_CACHE:-$HOME/.cache/ebbtide}"
out="$cache/controlplane/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION"
commands=(etcd kube-apiserver kube-controller-manager kube-scheduler)

built() { for c in "${commands[@]}"; do [[ -x "$out/$c" ]] || return 1; done; }
if built; then echo "$out"; exit 0; fi

command -v go >/dev/null || { echo "build.sh: go is not installed (Go >= 1.26 is needed)" >&2; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- etcd: its own module, so its dependency graph never mixes with Kubernetes' ---
if [[ ! -x "$out/etcd" ]]; then
  mkdir -p "$work/etcd"
  sed "s/@ETCD_VERSION@/$ETCD_VERSION/" "$here/etcd/go.mod.in" > "$work/etcd/go.mod"
  cp "$here/etcd/tools.go" "$work/etcd/"
  (cd "$work/etcd" && go mod tidy >&2 \
     && go build -trimpath -o "$out/etcd.partial" \
          -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" go.etcd.io/etcd/server/v3 >&2)
  mv "$out/etcd.partial" "$out/etcd"
fi

# --- kube-apiserver, kube-controller-manager, kube-scheduler: one module, shared packages ---
mkdir -p "$work/kube"
staging_version="v0.${KUBE_VERSION#v1.}"
{
  sed "s/@KUBE_VERSION@/$KUBE_VERSION/" "$here/kube/go.mod.in"
  echo "replace ("
  for m in $KUBE_STAGING; do echo "	k8s.io/$m => k8s.io/$m $staging_version"; done
  echo ")"
} > "$work/kube/go.mod"
cp "$here/kube/tools.go" "$work/kube/"
minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
(cd "$work/kube" && go mod tidy >&2)
for c in kube-apiserver kube-controller-manager kube-scheduler; do
  [[ -x "$out/$c" ]] && continue
  (cd "$work/kube" && go build -trimpath -o "$out/$c.partial" -ldflags "$ldflags" "k8s.io/kubernetes/cmd/$c" >&2)
  mv "$out/$c.partial" "$out/$c"
done
built && echo "$out"
