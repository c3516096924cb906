#!/usr/bin/env bash
# Builds the Kubernetes binaries `make kube-up` runs -- kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kube-proxy and kubectl -- from the k8s.io/kubernetes Go module at one pinned
# release, once, and caches them by version. Prints the directory holding them on stdout.
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces the k8s.io/* staging modules
# (k8s.io/api, k8s.io/client-go, ...) with ./staging/src/..., and a module zip leaves nested
# modules out. So a throwaway module requires k8s.io/kubernetes at the release and replaces every
# staging module with its published twin (k8s.io/api v0.34.x for kubernetes v1.34.x: the same
# source, tagged by Kubernetes' publishing bot), then builds the commands inside it.
#
# Why v1.34: this machine has the cgroup v1 hierarchy (with a v2 `unified` mount beside it), and
# from v1.35 the kubelet refuses cgroup v1 unless told otherwise; v1.34 still runs on it, and
# Debian's containerd 1.6 speaks the CRI v1 API it needs.
#
# Exit codes: 0 built or cached (directory on stdout); 3 no Go toolchain; anything else: the
# build failed (Go's output is on stderr).
set -euo pipefail

# The one pinned release: bump deliberately (kube/cluster.py reads this line).
K8S_VERSION=v1.34.4
COMMANDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

cache_dir="${DKV_CACHE_DIR:-$HOME/.cache/dkv}/kube/kubernetes-$K8S_VERSION"
bin_dir="$cache_dir/bin"
binaries=()
for c in "${COMMANDS[@]}"; do
    binaries+=("$bin_dir/$c")
done

# shellcheck source=../tools/lib/go_module.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tools/lib/go_module.sh"
print_dir_if_built() {
    local b
    for b in "${binaries[@]}"; do
        [[ -x $b ]] || return 0
    done
    echo "$bin_dir"
    exit 0
}
print_dir_if_built
go_toolchain "Kubernetes $K8S_VERSION"
lock_cache "$cache_dir"
print_dir_if_built

module="$cache_dir/module"
mkdir -p "$module" "$bin_dir"
cd "$module"
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod" GOTOOLCHAIN=local CGO_ENABLED=0
if [[ ! -f go.mod ]]; then
    "$go_bin" mod init dkv.local/kubernetes-build >&2
    # The staging modules, read from the release's own go.mod (its replace block).
    kube_dir=$("$go_bin" mod download -json "k8s.io/kubernetes@$K8S_VERSION" \
        | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
    staging_version="v0.${K8S_VERSION#v1.}"
    mapfile -t staging < <(sed -n '/^replace (/,/^)/p' "$kube_dir/go.mod" \
        | awk '$2 == "=>" && $3 ~ /^\.\/staging\// { print $1 }')
    if ((${#staging[@]} == 0)); then
        echo "kube/build.sh: no staging modules found in $kube_dir/go.mod" >&2
        exit 1
    fi
    edits=()
    for m in "${staging[@]}"; do
        edits+=("-replace=$m=$m@$staging_version")
    done
    "$go_bin" mod edit "${edits[@]}"
fi
pkgs=()
for c in "${COMMANDS[@]}"; do
    pkgs+=("k8s.io/kubernetes/cmd/$c@$K8S_VERSION")
done
"$go_bin" get -tool "${pkgs[@]}" >&2

# The version every component reports (/version, `kubectl version`, node info): Kubernetes'
# release build stamps these; unstamped binaries say v0.0.0, which Helm's kubeVersion checks
# and the kubelet's version skew checks refuse.
minor=${K8S_VERSION#v1.}
minor=${minor%%.*}
ldflags="-s -w"
for kv in "gitVersion=$K8S_VERSION" gitMajor=1 "gitMinor=$minor" gitTreeState=clean; do
    ldflags+=" -X k8s.io/component-base/version.$kv"
done
for c in "${COMMANDS[@]}"; do
    [[ -x $bin_dir/$c ]] && continue
    echo "kube/build.sh: building $c $K8S_VERSION" >&2
    go_build_to "$bin_dir/$c" "k8s.io/kubernetes/cmd/$c" "$ldflags"
done
echo "$bin_dir"
