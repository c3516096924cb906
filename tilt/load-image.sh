#!/usr/bin/env bash
# load-image.sh ARCHIVE: put an OCI image archive (image/build.sh with DKV_IMAGE_REF, which names
# its manifest with the fully qualified reference) into the cluster's container runtime, so pods
# find the image without a registry. Run by tilt/build-image.sh, Tilt's custom_build command.
#
# DKV_TILT_IMAGE_LOADER picks how (default: auto):
#   auto   kind when the kubectl context is kind-<cluster> and kind is installed; else ctr when
#          this machine runs the node's containerd (a bare containerd node, as issue 14's);
#          else it says what to set.
#   kind   kind load image-archive ARCHIVE --name <cluster> (KIND_CLUSTER_NAME, or the
#          context's name without "kind-"; works with kind's docker, podman or nerdctl nodes).
#   ctr    ctr -n k8s.io images import ARCHIVE, into the containerd at CONTAINERD_ADDRESS
#          (default /run/containerd/containerd.sock); as root, or through sudo -n.
#   any other value: a shell command run with the archive as $1 (and in DKV_IMAGE_ARCHIVE),
#          e.g. 'scp "$1" node:/tmp/i.tar && ssh node sudo ctr -n k8s.io images import /tmp/i.tar'.
set -euo pipefail
archive=${1:?usage: load-image.sh ARCHIVE}
note() { echo "load-image: $*" >&2; }
as_root() {
    if [[ $(id -u) == 0 ]]; then
        "$@"
    elif sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        note "needs root for: $* (run tilt as root, or allow sudo without a password)"
        exit 1
    fi
}

loader=${DKV_TILT_IMAGE_LOADER:-auto}
socket=${CONTAINERD_ADDRESS:-/run/containerd/containerd.sock}
context=$(kubectl config current-context 2>/dev/null || true)
if [[ $loader == auto ]]; then
    if [[ $context == kind-* ]] && command -v kind >/dev/null; then
        loader=kind
    elif command -v ctr >/dev/null && [[ -S $socket ]]; then
        loader=ctr
    else
        note "cannot tell how to load $archive into the cluster of context '${context:-none}':"
        note "set DKV_TILT_IMAGE_LOADER to kind, ctr, or a command (tilt/load-image.sh says how)"
        exit 1
    fi
fi
case $loader in
kind)
    cluster=${KIND_CLUSTER_NAME:-${context#kind-}}
    note "kind load image-archive into kind cluster '$cluster'"
    kind load image-archive "$archive" --name "$cluster"
    ;;
ctr)
    note "ctr -n k8s.io images import into $socket"
    as_root ctr --address "$socket" -n k8s.io images import "$archive"
    ;;
*)
    note "DKV_TILT_IMAGE_LOADER: $loader"
    DKV_IMAGE_ARCHIVE=$archive sh -c "$loader" load-image "$archive"
    ;;
esac
