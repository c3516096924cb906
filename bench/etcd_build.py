"""The etcd builds the benchmarks run next to dkv: etcd 3.6 and Debian's etcd 3.4.

etcd 3.6 is built from its Go modules by ``tools/etcd/build.sh`` (``make etcd36``) and cached
by version under ``${DKV_CACHE_DIR:-~/.cache/dkv}/etcd/<version>/`` (``etcd`` and ``etcdctl``);
Debian's ``etcd-server``/``etcd-client`` packages put etcd 3.4 on PATH.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["ETCD36_VERSION", "EtcdBinaries", "cached_etcd36_dir", "find_etcd34", "find_etcd36"]

ETCD36_VERSION: Final = "v3.6.17"
"""The etcd release tools/etcd/build.sh builds (keep the two in step)."""


@dataclass(frozen=True)
class EtcdBinaries:
    etcd: str
    etcdctl: str


def cached_etcd36_dir() -> Path:
    """Where tools/etcd/build.sh leaves etcd and etcdctl (they may not exist yet)."""
    root = os.environ.get("DKV_CACHE_DIR") or str(Path.home() / ".cache" / "dkv")
    return Path(root) / "etcd" / ETCD36_VERSION


def find_etcd36() -> EtcdBinaries | None:
    """etcd 3.6 from the build cache, or None when it has not been built."""
    d = cached_etcd36_dir()
    etcd, ctl = d / "etcd", d / "etcdctl"
    if all(p.is_file() and os.access(p, os.X_OK) for p in (etcd, ctl)):
        return EtcdBinaries(str(etcd), str(ctl))
    return None


def find_etcd34() -> EtcdBinaries | None:
    """Debian's etcd (3.4) and etcdctl on PATH, or None when either is missing."""
    etcd, ctl = shutil.which("etcd"), shutil.which("etcdctl")
    return EtcdBinaries(etcd, ctl) if etcd and ctl else None
