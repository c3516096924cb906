# Shared by image/build.sh and image/base.sh. Sourced, not run.

# in_root ROOTFS [SRC:DST]... -- COMMAND...: run COMMAND as root chrooted into ROOTFS, with a
# fresh /proc, the host's /dev, and each SRC bind-mounted read-only on DST (a directory that
# must exist in ROOTFS), in a clean environment. Every mount is made in a private mount
# namespace (unshare), so it is gone when COMMAND ends: nothing stays mounted in ROOTFS, and
# nothing on the host changes.
in_root() {
    local rootfs=$1
    shift
    local binds=()
    while [[ $1 != -- ]]; do
        binds+=("$1")
        shift
    done
    shift
    unshare --mount --propagation private --pid --fork --mount-proc="$rootfs/proc" \
        /bin/bash -euc '
            rootfs=$1 n=$2
            shift 2
            mount --rbind /dev "$rootfs/dev"
            for ((i = 0; i < n; i++)); do
                mount --bind -o ro "${1%%:*}" "$rootfs${1#*:}"
                shift
            done
            exec chroot "$rootfs" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
                PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
        ' in_root "$rootfs" "${#binds[@]}" "${binds[@]}" "$@"
}

# apt_uri SUITE: the first archive URI this machine's apt uses for SUITE (bookworm,
# bookworm-security, ...), as apt itself reads its sources; nothing when there is none.
apt_uri() {
    command -v apt-get >/dev/null || return 0
    # shellcheck disable=SC2016 # apt's format variables, not the shell's
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' 2>/dev/null \
        | awk -v suite="$1" '$2 == suite { print $1; exit }'
}
