#!/usr/bin/env bash
# `make image`: the Dockerfile's image, built without a Docker daemon, written as an OCI image
# archive. Prints the archive's path on stdout (and what it built on stderr).
#
#   1. The base: debootstrap of the Dockerfile's Debian release, slimmed, with image/packages.txt
#      (image/base.sh), as one layer. Cached by release and package list under
#      ${DKV_CACHE_DIR:-~/.cache/dkv}/image/base-<release>-<key>/ (an OCI layout).
#   2. The wheel of this working tree and every wheel it needs (image/wheelhouse.sh, with .venv's
#      pip), as the Dockerfile's builder stage does.
#   3. The virtualenv /opt/dkv and the dkv user (image/install.sh, run in the base's root
#      filesystem with chroot), as the second layer. Cached by base, install.sh and the wheels'
#      contents under .../image/app-<key>/: an unchanged tree reuses it.
#   4. The Dockerfile's labels, user, environment and command (umoci config), tagged
#      <version>, and the layout tarred as build/image/dkv-<version>.oci.tar: an OCI image
#      archive of the image dkv:<version> (repository dkv, tag = pyproject's version).
#
# umoci (Debian's package) makes the layers, the manifests and the config. Needs root
# (debootstrap, chroot). Exit 3 with one line when a prerequisite is missing.
#
# Environment: DKV_CACHE_DIR, DKV_IMAGE_OUT_DIR (default build/image), PYTHON (default
# .venv/bin/python), DKV_IMAGE_REF (see below), DKV_IMAGE_BASE_ONLY (print the cached base's
# layout and stop), DKV_DEBIAN_MIRROR and DKV_DEBIAN_SECURITY_MIRROR (default: the archives
# this machine's apt uses for the release; an empty security mirror leaves that suite out).
#
# DKV_IMAGE_REF=name:tag (tilt/Tiltfile passes Tilt's $EXPECTED_REF): the same image named so,
# for loading into a cluster's containerd without a registry. The archive's one manifest is then
# tagged with the reference's fully qualified form (dkv:x -> docker.io/library/dkv:x), the name
# a kubelet resolves `image: dkv:x` to, which `ctr images import` and `kind load image-archive`
# give the image as is; the archive is <out>/<last name component>-<tag>.oci.tar. Unset (make
# image): tagged <version>, build/image/dkv-<version>.oci.tar, as always.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"
# shellcheck source=ref.sh
source "$here/ref.sh"

note() { echo "make image: $*" >&2; }
# debootstrap and chroot live in /usr/sbin, which a user's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

missing=()
for tool in debootstrap umoci unshare chroot flock; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    note "cannot build: ${missing[*]} not installed (apt-get install debootstrap umoci)"
    exit 3
fi
if [[ $(id -u) != 0 ]]; then
    note "cannot build: needs root (debootstrap and chroot)"
    exit 3
fi

python=${PYTHON:-$repo/.venv/bin/python}
version=$(sed -n 's/^version = "\([^"]*\)"$/\1/p' "$repo/pyproject.toml" | head -n 1)
release=$(sed -n 's/^ARG DEBIAN_RELEASE=//p' "$repo/Dockerfile")
out_dir=${DKV_IMAGE_OUT_DIR:-$repo/build/image}
archive=$out_dir/dkv-$version.oci.tar
oci_tag=$version
if [[ -n ${DKV_IMAGE_REF:-} ]]; then
    if ! oci_tag=$(normalize_ref "$DKV_IMAGE_REF"); then
        note "DKV_IMAGE_REF: the image's name:tag, e.g. dkv:dev"
        exit 2
    fi
    ref_name=${oci_tag%:*}
    archive=$out_dir/${ref_name##*/}-${oci_tag##*:}.oci.tar
fi
cache=${DKV_CACHE_DIR:-$HOME/.cache/dkv}/image
mirror=${DKV_DEBIAN_MIRROR:-$(apt_uri "$release")}
security=${DKV_DEBIAN_SECURITY_MIRROR-$(apt_uri "$release-security")}
if [[ -z $version || -z $release ]]; then
    note "cannot read the version from pyproject.toml or DEBIAN_RELEASE from the Dockerfile"
    exit 1
fi
if [[ ! -x $python ]]; then
    note "no Python to build the wheel with at $python: run make setup (or set PYTHON)"
    exit 3
fi
if [[ -z $mirror ]]; then
    note "no Debian archive for $release in this machine's apt sources: set DKV_DEBIAN_MIRROR"
    exit 3
fi

# One build at a time per cache (make image while the image test builds): the second waits,
# then finds the first one's layers.
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
# Holding the lock, any work dir left is from a build that was killed.
rm -rf "$cache"/work.*
work=$(mktemp -d "$cache/work.XXXXXX")
trap 'rm -rf "$work"' EXIT

# copy_layout SRC DST: an OCI layout to change without changing SRC. Blobs are immutable and
# named by digest, so they are hard links; umoci rewrites index.json, so that is copied.
copy_layout() {
    mkdir -p "$2"
    cp -a "$1/oci-layout" "$1/index.json" "$2/"
    cp -al "$1/blobs" "$2/blobs"
}

# prune PATTERN KEEP: delete all but the KEEP newest cache entries matching PATTERN.
prune() {
    # shellcheck disable=SC2012 # our own directory names, one a line
    ls -1dt "$cache"/$1 2>/dev/null | tail -n +"$(($2 + 1))" | while IFS= read -r old; do
        rm -rf "$old"
    done
}

# 1. The base.
base_key=$( (echo "$release" && cat "$here/packages.txt" "$here/os-packages.sh" \
    "$here/base.sh" "$here/lib.sh") | sha256sum | cut -c1-16)
base=$cache/base-$release-$base_key
if [[ ! -f $base/index.json ]]; then
    note "building the Debian $release base once (debootstrap; cached in $base) ..."
    started=$SECONDS
    umoci init --layout "$work/base"
    umoci new --image "$work/base:base"
    umoci unpack --image "$work/base:base" "$work/base-bundle" >/dev/null
    if ! "$here/base.sh" "$work/base-bundle/rootfs" "$release" "$mirror" "$security" \
        >"$work/base.log" 2>&1; then
        tail -n 20 "$work/base.log" >&2
        note "building the base failed (above: the end of debootstrap's and apt's output)"
        exit 1
    fi
    umoci repack --image "$work/base:base" "$work/base-bundle" \
        --history.created_by "image/base.sh: debootstrap --variant=minbase $release, slimmed; image/os-packages.sh"
    umoci gc --layout "$work/base"
    rm -rf "$work/base-bundle"
    mv "$work/base" "$base"
    note "base built in $((SECONDS - started)) s"
    prune "base-$release-*" 2
fi
# DKV_IMAGE_BASE_ONLY=1 (tilt/devtools/build.sh): the base's OCI layout is all that is wanted.
if [[ -n ${DKV_IMAGE_BASE_ONLY:-} ]]; then
    echo "$base"
    exit 0
fi

# 2. The wheels, from a clean copy of what the Dockerfile copies (a build in the tree itself
# would pack stale files of ./build/lib into the wheel).
note "building the wheel of dkv $version and fetching the wheels it needs ..."
mkdir "$work/src"
tar -C "$repo" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
    -cf - pyproject.toml README.md src services | tar -C "$work/src" -xf -
"$here/wheelhouse.sh" "$python" "$work/src" "$work/wheels"

# 3. The virtualenv. The key: the base, install.sh, every wheel's name (name and version; the
# index never changes a published file) and the contents of dkv's own wheel (its RECORD lists
# every file's digest; the wheel's zip timestamps differ from build to build).
app_key=$( (echo "$base_key" && cat "$here/install.sh" && ls "$work/wheels" &&
    "$python" -c 'import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
print(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))).decode())' \
        "$work/wheels"/dkv-*.whl) | sha256sum | cut -c1-16)
app=$cache/app-$app_key
if [[ ! -f $app/index.json ]]; then
    note "installing dkv and Envoy into the image (a virtualenv from the wheels) ..."
    copy_layout "$base" "$work/app"
    umoci unpack --image "$work/app:base" "$work/app-bundle" >/dev/null
    rootfs=$work/app-bundle/rootfs
    mkdir "$rootfs/tmp/image" "$rootfs/tmp/wheels"
    in_root "$rootfs" "$here:/tmp/image" "$work/wheels:/tmp/wheels" -- \
        /tmp/image/install.sh /tmp/wheels
    rmdir "$rootfs/tmp/image" "$rootfs/tmp/wheels"
    umoci repack --image "$work/app:app" "$work/app-bundle" \
        --history.created_by "image/install.sh: the virtualenv /opt/dkv (dkv $version, Envoy), the dkv user"
    umoci rm --image "$work/app:base"
    umoci gc --layout "$work/app"
    rm -rf "$work/app-bundle"
    mv "$work/app" "$app"
    prune "app-*" 3
else
    note "the wheels are unchanged: reusing the image's layers from $app"
fi
touch "$app"

# 4. The Dockerfile's final-stage settings (tests/image/ compares them with the Dockerfile).
revision=$(git -C "$repo" describe --always --dirty --abbrev=40 2>/dev/null || echo unknown)
copy_layout "$app" "$work/final"
umoci config --image "$work/final:app" --tag "$oci_tag" \
    --config.user 10001:10001 \
    --config.workingdir /var/lib/dkv \
    --config.env PATH=/opt/dkv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env PYTHONUNBUFFERED=1 \
    --config.env PYTHONDONTWRITEBYTECODE=1 \
    --config.cmd dkv --config.cmd=--help \
    --config.label org.opencontainers.image.title=dkv \
    --config.label "org.opencontainers.image.description=A replicated, sharded key-value store for Kubernetes" \
    --config.label "org.opencontainers.image.version=$version" \
    --config.label "org.opencontainers.image.revision=$revision" \
    --config.label org.opencontainers.image.licenses=Apache-2.0 \
    --history.created_by "image/build.sh: the Dockerfile's labels, user, environment and command"
umoci rm --image "$work/final:app"
umoci gc --layout "$work/final"
mkdir -p "$out_dir"
tar -C "$work/final" -cf "$archive.tmp" oci-layout index.json blobs
mv -f "$archive.tmp" "$archive"

if [[ -n ${DKV_IMAGE_REF:-} ]]; then
    note "image $oci_tag (dkv $version), $(du -m "$archive" | cut -f1) MiB compressed"
else
    note "image dkv:$version (repository dkv, tag $version), $(du -m "$archive" | cut -f1) MiB compressed"
fi
note "OCI image archive: $archive"
echo "$archive"
