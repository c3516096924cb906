# Shared by tools/*/build.sh: build a Go program from the module proxy into a cache directory.
# Sourced, not run. Each function exits the calling script on failure.

# go_toolchain WHAT: set $go_bin to a Go toolchain -- $GO, else go on PATH, else the official
# tarball's location (often not on PATH in non-login shells) -- or exit 3 (callers fall back
# or skip) saying that WHAT cannot be built.
go_toolchain() {
    go_bin="${GO:-$(command -v go || true)}"
    if [[ -z ${GO:-} && -z $go_bin && -x /usr/local/go/bin/go ]]; then
        go_bin=/usr/local/go/bin/go
    fi
    if [[ -z $go_bin || ! -x $go_bin ]]; then
        echo "build.sh: no Go toolchain (${GO:-go not on PATH nor at /usr/local/go/bin/go}); cannot build $1" >&2
        exit 3
    fi
}

# lock_cache DIR: hold a lock on DIR until the script ends. Two builds at once (a make target
# while a test or benchmark builds) would race on the module dir; the second waits, and should
# then look again for the finished binaries.
lock_cache() {
    mkdir -p "$1"
    exec 9>"$1/.lock"
    if command -v flock >/dev/null; then
        flock 9
    fi
}

# pinning_module DIR NAME PKG@VERSION...: cd into DIR, a throwaway module (NAME) whose only
# purpose is to pin the packages' release and, through its go.sum, every dependency's. It stays
# in the cache, so a rebuild after a deleted binary skips `go get`. -mod=mod: no vendor dir,
# go.sum is written by `go get`; GOTOOLCHAIN=local, so a Go older than the module asks for fails
# loudly instead of fetching another toolchain behind our back.
pinning_module() {
    local dir=$1 name=$2
    shift 2
    mkdir -p "$dir"
    cd "$dir"
    export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod" GOTOOLCHAIN=local
    if [[ ! -f go.mod ]]; then
        "$go_bin" mod init "$name" >&2
    fi
    "$go_bin" get -tool "$@" >&2
}

# print_if_built BINARY...: when every BINARY is already an executable, print the first and
# exit 0 (a cached build). Called before the lock and again once holding it: a build that
# finished while we waited is taken as it is.
print_if_built() {
    local b
    for b in "$@"; do
        [[ -x $b ]] || return 0
    done
    echo "$1"
    exit 0
}

# go_build_to OUT PKG LDFLAGS: `go build -trimpath` PKG into OUT under a temporary name, then
# rename (atomic on one filesystem): an interrupted build leaves no half binary that
# print_if_built would take for a finished one. -s -w belong in LDFLAGS (smaller binaries,
# lighter links); CGO_ENABLED is the caller's.
go_build_to() {
    local out=$1 pkg=$2 ldflags=$3
    local tmp="$out.tmp.$$"
    if ! "$go_bin" build -trimpath -ldflags="$ldflags" -o "$tmp" "$pkg" >&2; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$out"
}
