#!/usr/bin/env bash
# Builds the Jaeger v2 binary (cmd/jaeger: an OpenTelemetry-collector build with OTLP receivers,
# in-memory storage, the query API and UI) from its Go module, once, and caches it by version.
# Prints the binary's path on stdout. Jaeger ships no Python package and this machine may not
# download release binaries, so the Go module proxy is the only way to get the real thing.
#
# Exit codes: 0 built or cached (path on stdout); 3 no Go toolchain (callers fall back or skip);
# anything else: the build failed (Go's output is on stderr).
set -euo pipefail

# The one approved version: bump deliberately (src/dkv/telemetry/jaeger.py reads the same path).
JAEGER_VERSION=v1.75.0
JAEGER_PKG=github.com/jaegertracing/jaeger/cmd/jaeger

cache_dir="${DKV_CACHE_DIR:-$HOME/.cache/dkv}/jaeger/$JAEGER_VERSION"
binary="$cache_dir/jaeger"

if [[ -x $binary ]]; then
    echo "$binary"
    exit 0
fi

# $GO picks a toolchain explicitly; otherwise go on PATH, then the official tarball's location
# (often not on PATH in non-login shells).
go_bin="${GO:-$(command -v go || true)}"
if [[ -z ${GO:-} && -z $go_bin && -x /usr/local/go/bin/go ]]; then
    go_bin=/usr/local/go/bin/go
fi
if [[ -z $go_bin || ! -x $go_bin ]]; then
    echo "build.sh: no Go toolchain (${GO:-go not on PATH nor at /usr/local/go/bin/go}); cannot build Jaeger $JAEGER_VERSION" >&2
    exit 3
fi

mkdir -p "$cache_dir"
# Two builds at once (make jaeger while a test builds) would race on the module dir; the second
# waits and then finds the binary.
exec 9>"$cache_dir/.lock"
if command -v flock >/dev/null; then
    flock 9
fi
if [[ -x $binary ]]; then
    echo "$binary"
    exit 0
fi

# A throwaway module whose only purpose is to pin Jaeger's version (and through its go.sum, every
# dependency's); it stays in the cache so a rebuild after a deleted binary skips `go get`.
module_dir="$cache_dir/module"
mkdir -p "$module_dir"
cd "$module_dir"
# -mod=mod: the module has no vendor dir and go.sum is written by `go get`; GOTOOLCHAIN=local so
# a Go older than Jaeger's go.mod asks for (1.24.6 for v1.75.0) fails loudly instead of
# fetching another toolchain behind our back.
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod" GOTOOLCHAIN=local
if [[ ! -f go.mod ]]; then
    "$go_bin" mod init dkv.local/jaeger-build >&2
fi
"$go_bin" get -tool "$JAEGER_PKG@$JAEGER_VERSION" >&2

# Write under a temporary name and rename (atomic on one filesystem): an interrupted build leaves
# no half binary that the -x check above would take for a finished one.
tmp="$binary.tmp.$$"
trap 'rm -f "$tmp"' EXIT
# -trimpath and -s -w: no local paths, no symbol/DWARF tables (a smaller binary, a lighter link).
# -X: the version Jaeger's release Makefile stamps in, shown by `jaeger version`, its logs and UI.
"$go_bin" build -trimpath \
    -ldflags="-s -w -X github.com/jaegertracing/jaeger/internal/version.latestVersion=$JAEGER_VERSION" \
    -o "$tmp" "$JAEGER_PKG" >&2
mv -f "$tmp" "$binary"
echo "$binary"
