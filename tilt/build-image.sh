#!/usr/bin/env bash
# build-image.sh dkv|devtools: Tilt's custom_build command (tilt/Tiltfile). Builds the image
# without a Docker daemon, named as Tilt expects ($EXPECTED_REF), and loads it into the cluster's
# container runtime (tilt/load-image.sh): no registry, no Docker.
#   dkv       image/build.sh (make image's build) with DKV_IMAGE_REF=$EXPECTED_REF
#   devtools  tilt/devtools/build.sh: Prometheus (Debian's package) and Jaeger, for the dev loop
# The builds need root (debootstrap, chroot): run as root, or with sudo -n when it is allowed.
# Archives go to build/tilt/.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
ref=${EXPECTED_REF:?run by Tilt: custom_build sets EXPECTED_REF}
case ${1:-} in
dkv) build=("$repo/image/build.sh") ;;
devtools) build=("$here/devtools/build.sh") ;;
*)
    echo "usage: build-image.sh dkv|devtools" >&2
    exit 2
    ;;
esac
env=(env "DKV_IMAGE_REF=$ref" "DKV_IMAGE_OUT_DIR=$repo/build/tilt")
[[ -n ${DKV_CACHE_DIR:-} ]] && env+=("DKV_CACHE_DIR=$DKV_CACHE_DIR")
if [[ $(id -u) != 0 ]]; then
    if ! sudo -n true 2>/dev/null; then
        echo "build-image: the daemonless build needs root: run tilt as root, allow sudo without a password, or use Docker (DKV_TILT_BUILDER=docker)" >&2
        exit 1
    fi
    env=(sudo -n "${env[@]}")
fi
archive=$("${env[@]}" "${build[@]}")
"$here/load-image.sh" "$archive"
