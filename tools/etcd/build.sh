#!/usr/bin/env bash
# Builds etcd 3.6 (the server, `etcd`, and `etcdctl`) from its Go modules, once, and caches both
# by version. Prints the etcd binary's path on stdout (etcdctl is next to it). Debian ships
# etcd 3.4 (/usr/bin/etcd); the benchmarks compare dkv with both, and this machine may not
# download release binaries, so the Go module proxy is the only way to get a current etcd.
#
# `go install go.etcd.io/etcd/server/v3@<version>` is refused: the server's and etcdctl's
# go.mod files carry `replace` directives (../api, ../client/v3, ...). So, as for Jaeger, a
# throwaway module pins both at one release (replace directives of dependencies are ignored,
# and api/v3, client/v3, pkg/v3 resolve to the same release from the proxy) and builds them.
# The server module's main package would be installed as `server` (its path ends in /v3):
# it is built with -o etcd.
#
# Exit codes: 0 built or cached (path on stdout); 3 no Go toolchain (callers fall back or skip);
# anything else: the build failed (Go's output is on stderr).
set -euo pipefail

# The one pinned release: bump deliberately (bench/etcd_build.py reads the same path).
ETCD_VERSION=v3.6.17
ETCD_SERVER_PKG=go.etcd.io/etcd/server/v3
ETCDCTL_PKG=go.etcd.io/etcd/etcdctl/v3

cache_dir="${DKV_CACHE_DIR:-$HOME/.cache/dkv}/etcd/$ETCD_VERSION"
binary="$cache_dir/etcd"
ctl="$cache_dir/etcdctl"

# shellcheck source=../lib/go_module.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/go_module.sh"
print_if_built "$binary" "$ctl"
go_toolchain "etcd $ETCD_VERSION"
lock_cache "$cache_dir"
print_if_built "$binary" "$ctl"
# Go 1.26.0 or newer for v3.6.17 (etcd's go.mod).
pinning_module "$cache_dir/module" dkv.local/etcd-build \
    "$ETCD_SERVER_PKG@$ETCD_VERSION" "$ETCDCTL_PKG@$ETCD_VERSION"

# As etcd's release build: static (CGO_ENABLED=0), -trimpath, -s -w; etcd's version string is
# a constant of api/v3. etcdctl first, so a present `etcd` always means a finished pair.
export CGO_ENABLED=0
go_build_to "$ctl" "$ETCDCTL_PKG" "-s -w"
go_build_to "$binary" "$ETCD_SERVER_PKG" "-s -w"
echo "$binary"
