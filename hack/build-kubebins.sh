#!/usr/bin/env bash
# Build the real control plane (etcd, kube-apiserver, kube-controller-manager, kubectl) and helm
# from Go modules, version-stamped, into a cache outside the repo keyed by versions.
# A second run with the same versions does nothing. Prints the bin dir on stdout (last line).
# `--node` also builds what a dev node runs: kubelet, kube-proxy and kube-scheduler from the same
# k8s.io/kubernetes module as the apiserver, and the pod sandbox's pause binary (hack/kubebins/pause),
# so nothing is pulled from outside. Without it, callers that only need the control plane never wait for those.
set -euo pipefail
here=$(cd "$(dirname "$0")/kubebins" && pwd)
K8S_VERSION=$(awk '/^require k8s.io\/kubernetes /{print $3}' "$here/go.mod")
HELM_VERSION=$(awk '$1=="helm.sh/helm/v4" && NF>=2 {print $2}' "$here/go.mod")
ETCD_VERSION=$(awk '$1=="go.etcd.io/etcd/server/v3" && NF>=2 {print $2}' "$here/go.mod")
GO_VERSION=$(go env GOVERSION)
key="k8s-${K8S_VERSION}_helm-${HELM_VERSION}_etcd-${ETCD_VERSION}_${GO_VERSION}"
cache="${ORCHARDIST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orchardist}/kubebins/$key"
bins="etcd kube-apiserver kube-controller-manager kubectl helm"
[ "${1:-}" = --node ] && bins="$bins kubelet kube-proxy kube-scheduler pause"
ok=1
for b in $bins; do [ -x "$cache/bin/$b" ] || ok=0; done
if [ "$ok" = 1 ]; then
  echo "control plane binaries cached: $cache/bin" >&2
  echo "$cache/bin"; exit 0
fi
mkdir -p "$cache/bin"
# One build at a time per cache: a second caller waits for the first and then finds the binaries.
exec 9>"$cache/.lock"
if ! flock -n 9; then
  echo "another build of the control plane is running; waiting for it" >&2
  flock 9
fi
ok=1
for b in $bins; do [ -x "$cache/bin/$b" ] || ok=0; done
if [ "$ok" = 1 ]; then
  echo "control plane binaries cached: $cache/bin" >&2
  echo "$cache/bin"; exit 0
fi
minor=$(echo "$K8S_VERSION" | cut -d. -f2)
export CGO_ENABLED=0 GOFLAGS="-trimpath -mod=mod"
kldf="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
hldf="-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"
cd "$here"
build() { # name ldflags package
  local t0=$SECONDS
  echo ">> building $1 (this is the slow part of a cold machine; progress below)" >&2
  go build -tags grpcnotrace -ldflags "$2" -o "$cache/bin/$1.tmp" "$3"
  mv "$cache/bin/$1.tmp" "$cache/bin/$1"
  echo ">> $1 built in $((SECONDS - t0)) s ($(du -h "$cache/bin/$1" | cut -f1))" >&2
}
[ -x "$cache/bin/etcd" ] || build etcd "-s -w" go.etcd.io/etcd/server/v3
[ -x "$cache/bin/kube-apiserver" ] || build kube-apiserver "$kldf" k8s.io/kubernetes/cmd/kube-apiserver
[ -x "$cache/bin/kube-controller-manager" ] || build kube-controller-manager "$kldf" k8s.io/kubernetes/cmd/kube-controller-manager
[ -x "$cache/bin/kubectl" ] || build kubectl "$kldf" k8s.io/kubernetes/cmd/kubectl
[ -x "$cache/bin/helm" ] || build helm "$hldf" helm.sh/helm/v4/cmd/helm
if [ "${1:-}" = --node ]; then
  [ -x "$cache/bin/kubelet" ] || build kubelet "$kldf" k8s.io/kubernetes/cmd/kubelet
  [ -x "$cache/bin/kube-proxy" ] || build kube-proxy "$kldf" k8s.io/kubernetes/cmd/kube-proxy
  [ -x "$cache/bin/kube-scheduler" ] || build kube-scheduler "$kldf" k8s.io/kubernetes/cmd/kube-scheduler
  [ -x "$cache/bin/pause" ] || build pause "-s -w" ./pause
fi
echo "$cache/bin"
