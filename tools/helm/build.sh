#!/usr/bin/env bash
# Builds the Helm CLI (v4) from its Go module, once, and caches it by version. Prints the
# binary's path on stdout. The chart tests (tests/chart) lint and render charts/dkv with it;
# this machine may not download release binaries, so the Go module proxy is the only way to
# get the real helm.
#
# Exit codes: 0 built or cached (path on stdout); 3 no Go toolchain (callers fall back or skip);
# anything else: the build failed (Go's output is on stderr).
set -euo pipefail

# The one approved version (FIELD-NOTES): bump deliberately (tests/chart/helm.py reads it).
HELM_VERSION=v4.3.2
HELM_PKG=helm.sh/helm/v4/cmd/helm

cache_dir="${DKV_CACHE_DIR:-$HOME/.cache/dkv}/helm/$HELM_VERSION"
binary="$cache_dir/helm"

# shellcheck source=../lib/go_module.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/go_module.sh"
print_if_built "$binary"
go_toolchain "Helm $HELM_VERSION"
lock_cache "$cache_dir"
print_if_built "$binary"
pinning_module "$cache_dir/module" dkv.local/helm-build "$HELM_PKG@$HELM_VERSION"

# As Helm's release build: static (CGO_ENABLED=0), -trimpath, -s -w; -X stamps the version
# `helm version` prints (Helm's Makefile does the same).
export CGO_ENABLED=0
go_build_to "$binary" "$HELM_PKG" "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"
echo "$binary"
