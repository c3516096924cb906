#!/bin/sh
# The image's Debian packages (packages.txt), installed as root inside the image's root
# filesystem: by the Dockerfile's final stage and by `make image` (image/base.sh, in a chroot),
# so both images get the same packages from the same release. The upgrade brings the minimal
# base to the release's current point and security updates (debootstrap only knows the release
# itself; the slim base image may be weeks old).
set -eu
here=$(dirname "$0")
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get upgrade -y -q
# shellcheck disable=SC2046 # one package per word
apt-get install -y -q --no-install-recommends $(grep -v '^#' "$here/packages.txt")
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old \
    /var/log/apt /var/log/dpkg.log /var/log/alternatives.log
