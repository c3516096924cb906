#!/usr/bin/env bash
# The container images a single-node Kubernetes on this machine runs besides dkv's own
# (no registry can be reached, so each is built here and imported with ctr):
#
#   pause         dkv.local/pause:3.10.1              pause.c of k8s.io/kubernetes, gcc -static
#   coredns       dkv.local/coredns:v1.13.1           github.com/coredns/coredns, CGO_ENABLED=0
#   cert-manager  dkv.local/cert-manager-controller:v1.19.2
#                 dkv.local/cert-manager-webhook:v1.19.2
#                 dkv.local/cert-manager-cainjector:v1.19.2
#                 our own main packages (kube/images/cert-manager/) on the packages of
#                 github.com/cert-manager/cert-manager (its commands are nested modules
#                 the module proxy does not serve)
#
# Usage: kube/images/build.sh [pause|coredns|cert-manager|all]...   (default: all)
#        kube/images/build.sh names [WHAT]   prints the image names, builds nothing
#
# Each image is an OCI image archive, <name>-<version>.oci.tar, cached under
# ${DKV_CACHE_DIR:-~/.cache/dkv}/kube/images/ (binaries and Go build modules beside them),
# built once and rebuilt only when its inputs change (version, this script, our sources).
# Prints the archives' paths on stdout, one a line. The archive's index names the image in
# full (io.containerd.image.name), so `ctr -n k8s.io images import ARCHIVE` imports it under
# exactly that name, with no flag.
#
# Exit codes: 0 built or cached; 3 a prerequisite is missing (one line on stderr: Go, umoci,
# gcc with a static libc); anything else: a build failed (its output is on stderr).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

# The pinned releases: bump deliberately (manifests/ and the README name the same).
K8S_VERSION=v1.34.4          # pause.c comes from this k8s.io/kubernetes module
PAUSE_VERSION=3.10.1         # build/pause/Makefile's TAG in that module (kubeadm's PauseVersion)
COREDNS_VERSION=v1.13.1
CERT_MANAGER_VERSION=v1.19.2
CERT_MANAGER_COMMANDS="controller webhook cainjector"
PREFIX=dkv.local

note() { echo "kube/images: $*" >&2; }
missing() {
    echo "kube/images/build.sh: cannot build: $*" >&2
    exit 3
}

names() {
    case $1 in
    pause) echo "$PREFIX/pause:$PAUSE_VERSION" ;;
    coredns) echo "$PREFIX/coredns:$COREDNS_VERSION" ;;
    cert-manager)
        for c in $CERT_MANAGER_COMMANDS; do
            echo "$PREFIX/cert-manager-$c:$CERT_MANAGER_VERSION"
        done
        ;;
    esac
}

list_names=false
if [[ ${1:-} == names ]]; then
    list_names=true
    shift
fi
what=()
for w in "${@:-all}"; do
    case $w in
    all) what+=(pause coredns cert-manager) ;;
    pause | coredns | cert-manager) what+=("$w") ;;
    *)
        echo "usage: kube/images/build.sh [pause|coredns|cert-manager|all]... | names [WHAT]..." >&2
        exit 2
        ;;
    esac
done
if $list_names; then
    for w in "${what[@]}"; do names "$w"; done
    exit 0
fi

cache=${DKV_CACHE_DIR:-$HOME/.cache/dkv}/kube/images
# shellcheck source=../../tools/lib/go_module.sh
source "$repo/tools/lib/go_module.sh"

# Prerequisites, all checked before anything is built.
command -v umoci >/dev/null || missing "umoci not installed (apt-get install umoci)"
command -v jq >/dev/null || missing "jq not installed (apt-get install jq)"
go_toolchain "the Kubernetes images (kube/images)"
if [[ " ${what[*]} " == *" pause "* ]]; then
    command -v gcc >/dev/null || missing "gcc not installed (apt-get install gcc libc6-dev)"
    probe=$(mktemp -d)
    if ! echo 'int main(void){return 0;}' | gcc -static -x c -o "$probe/a" - 2>/dev/null; then
        rm -rf "$probe"
        missing "gcc cannot link statically (apt-get install libc6-dev: libc.a)"
    fi
    rm -rf "$probe"
fi

lock_cache "$cache"
rm -rf "$cache"/work.* # left by a build that was killed (we hold the lock)
work=$(mktemp -d "$cache/work.XXXXXX")
trap 'rm -rf "$work"' EXIT
export GOTOOLCHAIN=local CGO_ENABLED=0
# Every go command at the lowest priority (the machine's 2 cores are shared).
printf '#!/bin/bash\nexec nice -n 19 %q "$@"\n' "$go_bin" >"$work/go"
chmod +x "$work/go"
go_bin=$work/go

# A key over this script and the given files: an archive is rebuilt when it changes.
key_of() { cat "${BASH_SOURCE[0]}" "$@" | sha256sum | cut -c1-16; }
current() { [[ -f $1 && -f $1.key && $(cat "$1.key") == "$2" ]]; }

# image NAME VERSION KEY ROOTFS USER ENTRYPOINT...: the OCI image archive
# $cache/NAME-VERSION.oci.tar of the files in ROOTFS (one layer, owned by root), run as
# USER with ENTRYPOINT, named $PREFIX/NAME:VERSION.
image() {
    local name=$1 version=$2 key=$3 rootfs=$4 user=$5
    shift 5
    local archive=$cache/$name-$version.oci.tar layout=$work/$name
    local entry=()
    for a in "$@"; do entry+=(--config.entrypoint "$a"); done
    umoci init --layout "$layout"
    umoci new --image "$layout:$version"
    umoci unpack --image "$layout:$version" "$work/$name-bundle" >/dev/null
    cp -a "$rootfs"/. "$work/$name-bundle/rootfs/"
    umoci repack --image "$layout:$version" --history.created_by "kube/images/build.sh $name" \
        "$work/$name-bundle" >/dev/null
    umoci config --image "$layout:$version" --config.user "$user" "${entry[@]}" \
        --config.workingdir / \
        --config.label "org.opencontainers.image.title=$name" \
        --config.label "org.opencontainers.image.version=$version" \
        --history.created_by "kube/images/build.sh $name: user $user, entrypoint $*"
    umoci gc --layout "$layout"
    # The full name in the index: containerd names an imported manifest by
    # io.containerd.image.name, and the OCI ref.name stays the tag for other tools.
    jq --arg n "$PREFIX/$name:$version" \
        '.manifests |= map(.annotations["io.containerd.image.name"] = $n)' \
        "$layout/index.json" >"$layout/index.json.new"
    mv "$layout/index.json.new" "$layout/index.json"
    tar -C "$layout" -cf "$archive.tmp" oci-layout index.json blobs
    mv -f "$archive.tmp" "$archive"
    echo "$key" >"$archive.key"
    rm -rf "$layout" "$work/$name-bundle"
    note "$PREFIX/$name:$version: $archive ($(du -k "$archive" | cut -f1) KiB)"
    echo "$archive"
}

build_pause() {
    local dir
    dir=$("$go_bin" mod download -json "k8s.io/kubernetes@$K8S_VERSION" | jq -r .Dir)
    local src=$dir/build/pause/linux/pause.c
    [[ -f $src ]] || {
        note "no $src in k8s.io/kubernetes@$K8S_VERSION"
        return 1
    }
    local key archive=$cache/pause-$PAUSE_VERSION.oci.tar
    key=$(key_of "$src")
    if current "$archive" "$key"; then
        echo "$archive"
        return
    fi
    started=$SECONDS
    mkdir -p "$work/pause-root"
    # As build/pause/Makefile: -Os -Wall -Werror -static, VERSION stamped for `pause -v`.
    gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION-$K8S_VERSION" -o "$work/pause-root/pause" "$src"
    strip "$work/pause-root/pause"
    # Its Dockerfile's user: 65535, the kubelet's default for the sandbox's pause.
    image pause "$PAUSE_VERSION" "$key" "$work/pause-root" 65535:65535 /pause
    note "pause built in $((SECONDS - started)) s"
}

build_coredns() {
    local bin_dir=$cache/bin/coredns-$COREDNS_VERSION key archive=$cache/coredns-$COREDNS_VERSION.oci.tar
    local binary=$bin_dir/coredns
    started=$SECONDS
    if [[ ! -x $binary ]]; then
        (
            pinning_module "$cache/module/coredns-$COREDNS_VERSION" dkv.local/coredns-build \
                "github.com/coredns/coredns@$COREDNS_VERSION"
            mkdir -p "$bin_dir"
            # As CoreDNS's Makefile: static, -s -w, the commit `coredns -version` prints.
            go_build_to "$binary" github.com/coredns/coredns \
                "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION"
        )
    fi
    key=$(key_of "$binary")
    if current "$archive" "$key"; then
        echo "$archive"
        return
    fi
    mkdir -p "$work/coredns-root"
    cp "$binary" "$work/coredns-root/coredns"
    # As CoreDNS's own image: runs as 65532 (nonroot) and may bind port 53 by the file
    # capability cap_net_bind_service (the Deployment also lowers the unprivileged port start).
    if command -v setcap >/dev/null || [[ -x /usr/sbin/setcap ]]; then
        PATH=$PATH:/usr/sbin setcap cap_net_bind_service=+ep "$work/coredns-root/coredns"
    fi
    image coredns "$COREDNS_VERSION" "$key" "$work/coredns-root" 65532:65532 /coredns
    note "coredns built in $((SECONDS - started)) s"
}

build_cert_manager() {
    local src=$here/cert-manager skey
    skey=$( (cd "$src" && cat go.mod go.sum ./*/*.go webhook/go.mod webhook/go.sum) |
        sha256sum | cut -c1-16)
    local bin_dir=$cache/bin/cert-manager-$CERT_MANAGER_VERSION-$skey
    local c built=false
    started=$SECONDS
    for c in $CERT_MANAGER_COMMANDS; do
        [[ -x $bin_dir/$c ]] && continue
        built=true
        mkdir -p "$bin_dir"
        # controller and cainjector: packages of our module in cert-manager/; the webhook: a
        # module of its own in cert-manager/webhook/ (README: why). Each go.sum pins every
        # dependency; -mod=readonly: nothing in the tree is rewritten. Upstream stamps its
        # version into pkg/util the same way.
        local dir=$src pkg=./$c
        if [[ $c == webhook ]]; then
            dir=$src/webhook pkg=.
        fi
        (cd "$dir" && export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=readonly" &&
            go_build_to "$bin_dir/$c" "$pkg" \
            "-s -w -X github.com/cert-manager/cert-manager/pkg/util.AppVersion=$CERT_MANAGER_VERSION -X github.com/cert-manager/cert-manager/pkg/util.AppGitCommit=dkv-$skey")
    done
    for c in $CERT_MANAGER_COMMANDS; do
        local key archive=$cache/cert-manager-$c-$CERT_MANAGER_VERSION.oci.tar
        key=$(key_of "$bin_dir/$c")
        if current "$archive" "$key"; then
            echo "$archive"
            continue
        fi
        built=true
        rm -rf "$work/cm-root"
        mkdir -p "$work/cm-root/app/cmd/$c"
        cp "$bin_dir/$c" "$work/cm-root/app/cmd/$c/$c"
        # Upstream's images: the binary under /app/cmd/<name>/, user 1000 (the chart's pods
        # set runAsNonRoot).
        image "cert-manager-$c" "$CERT_MANAGER_VERSION" "$key" "$work/cm-root" 1000:1000 "/app/cmd/$c/$c"
    done
    # Keep only the binaries of the current sources.
    find "$cache/bin" -maxdepth 1 -name "cert-manager-$CERT_MANAGER_VERSION-*" ! -name "*-$skey" \
        -exec rm -rf {} + 2>/dev/null || true
    if $built; then
        note "cert-manager built in $((SECONDS - started)) s"
    fi
}

# One compound command, read whole before it runs, that ends in exit: an edit of this file
# during a long build cannot make bash read on from a shifted offset afterwards.
{
    for w in "${what[@]}"; do
        case $w in
        pause) build_pause ;;
        coredns) build_coredns ;;
        cert-manager) build_cert_manager ;;
        esac
    done
    exit 0
}
