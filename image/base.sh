#!/usr/bin/env bash
# base.sh ROOTFS RELEASE MIRROR [SECURITY_MIRROR]: the image's Debian base in the empty
# directory ROOTFS, as the Dockerfile's `FROM debian:RELEASE-slim` + `os-packages.sh` gives it:
# debootstrap's minimal variant (what Debian's official images are made from), slimmed the way
# the -slim images are (no manuals, docs or translations, now or in later installs; copyright
# files stay), the release's -updates and -security suites as apt sources, then
# os-packages.sh run inside it. Needs root. image/build.sh caches the result.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"
rootfs=$1 release=$2 mirror=$3 security=${4:-}
if [[ -z $rootfs || $(realpath -m "$rootfs") == / ]]; then
    echo "base.sh: refusing ROOTFS '$rootfs'" >&2
    exit 2
fi

debootstrap --variant=minbase "$release" "$rootfs" "$mirror"

cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'CFG'
# As Debian's -slim images: no manuals, docs or translations (copyright files stay).
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
CFG
find "$rootfs/usr/share/doc" -mindepth 1 -not -type d -not -name copyright -delete
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
for dir in groff info linda lintian locale man; do
    if [[ -d $rootfs/usr/share/$dir ]]; then
        find "$rootfs/usr/share/$dir" -mindepth 1 -delete
    fi
done

rm -f "$rootfs/etc/apt/sources.list"
{
    printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\n' \
        "$mirror" "$release" "$release"
    printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
    if [[ -n $security ]]; then
        printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\n' \
            "$security" "$release"
        printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
    fi
} >"$rootfs/etc/apt/sources.list.d/debian.sources"

# debootstrap copied this machine's resolv.conf, which apt uses in there.
mkdir "$rootfs/tmp/image"
in_root "$rootfs" "$here:/tmp/image" -- /tmp/image/os-packages.sh
rmdir "$rootfs/tmp/image"

# What a container runtime provides when it runs the image, and what the build left behind.
: >"$rootfs/etc/resolv.conf"
echo localhost >"$rootfs/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$rootfs/etc/hosts"
find "$rootfs/dev" "$rootfs/tmp" "$rootfs/var/tmp" -mindepth 1 -delete
rm -f "$rootfs/var/log/bootstrap.log" "$rootfs/var/cache/ldconfig/aux-cache"
