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

# shellcheck source=../lib/go_module.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/go_module.sh"
print_if_built "$binary"
go_toolchain "Jaeger $JAEGER_VERSION"
lock_cache "$cache_dir"
print_if_built "$binary"
# Go 1.24.6 or newer for v1.75.0 (Jaeger's go.mod).
pinning_module "$cache_dir/module" dkv.local/jaeger-build "$JAEGER_PKG@$JAEGER_VERSION"

# -s -w: no symbol/DWARF tables (a smaller binary, a lighter link). -X: the version Jaeger's
# release Makefile stamps in, shown by `jaeger version`, its logs and UI.
go_build_to "$binary" "$JAEGER_PKG" \
    "-s -w -X github.com/jaegertracing/jaeger/internal/version.latestVersion=$JAEGER_VERSION"
echo "$binary"
