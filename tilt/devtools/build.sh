#!/usr/bin/env bash
# build.sh: the dev-only image of Tilt's Prometheus and Jaeger (tilt/devtools/*.yaml), without a
# Docker daemon, as image/build.sh builds dkv's: on make image's cached Debian base (one layer),
# Debian's prometheus package and the Jaeger binary of tools/jaeger/build.sh (make jaeger) as a
# second layer, written by umoci as an OCI image archive. Prints the archive's path.
# Needs root, debootstrap, umoci, and Go for Jaeger (once). The Docker equivalent: Dockerfile.
#
# Environment: DKV_IMAGE_REF (default dkv-devtools:dev; Tilt passes $EXPECTED_REF through
# tilt/build-image.sh), DKV_IMAGE_OUT_DIR (default build/tilt), DKV_CACHE_DIR.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=../../image/lib.sh
source "$repo/image/lib.sh"
# shellcheck source=../../image/ref.sh
source "$repo/image/ref.sh"
note() { echo "devtools image: $*" >&2; }
export PATH="$PATH:/usr/sbin:/sbin"

oci_tag=$(normalize_ref "${DKV_IMAGE_REF:-dkv-devtools:dev}")
ref_name=${oci_tag%:*}
out_dir=${DKV_IMAGE_OUT_DIR:-$repo/build/tilt}
archive=$out_dir/${ref_name##*/}-${oci_tag##*:}.oci.tar
cache=${DKV_CACHE_DIR:-$HOME/.cache/dkv}/image

jaeger=$("$repo/tools/jaeger/build.sh")
base=$(DKV_IMAGE_BASE_ONLY=1 "$repo/image/build.sh")

mkdir -p "$cache"
exec 9>"$cache/.devtools.lock"
flock 9
key=$( (basename "$base" && sha256sum "$jaeger" && cat "$0") | sha256sum | cut -c1-16)
layout=$cache/devtools-$key
if [[ ! -f $layout/index.json ]]; then
    work=$(mktemp -d "$cache/devtools-work.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    note "installing Debian's prometheus and Jaeger on the base (once; cached in $layout) ..."
    mkdir -p "$work/layout"
    cp -a "$base/oci-layout" "$base/index.json" "$work/layout/"
    cp -al "$base/blobs" "$work/layout/blobs"
    umoci unpack --image "$work/layout:base" "$work/bundle" >/dev/null
    rootfs=$work/bundle/rootfs
    cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
    # No service may start in the chroot.
    printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
    chmod +x "$rootfs/usr/sbin/policy-rc.d"
    in_root "$rootfs" -- /bin/sh -ec '
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends prometheus
        apt-get clean
        rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log' >&2
    rm -f "$rootfs/usr/sbin/policy-rc.d"
    : >"$rootfs/etc/resolv.conf"
    install -m 0755 "$jaeger" "$rootfs/usr/local/bin/jaeger"
    umoci repack --image "$work/layout:devtools" "$work/bundle" \
        --history.created_by "tilt/devtools/build.sh: Debian's prometheus, Jaeger (tools/jaeger/build.sh)"
    umoci rm --image "$work/layout:base"
    umoci gc --layout "$work/layout"
    mv "$work/layout" "$layout"
fi

work=$(mktemp -d "$cache/devtools-work.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/final"
cp -a "$layout/oci-layout" "$layout/index.json" "$work/final/"
cp -al "$layout/blobs" "$work/final/blobs"
umoci config --image "$work/final:devtools" --tag "$oci_tag" \
    --config.user 65534:65534 --config.cmd prometheus --config.cmd=--help \
    --config.label org.opencontainers.image.title=dkv-devtools \
    --config.label "org.opencontainers.image.description=Prometheus and Jaeger for dkv's Tilt dev loop (not for production)"
umoci rm --image "$work/final:devtools"
umoci gc --layout "$work/final"
mkdir -p "$out_dir"
tar -C "$work/final" -cf "$archive.tmp" oci-layout index.json blobs
mv -f "$archive.tmp" "$archive"
note "image $oci_tag: $archive"
echo "$archive"
