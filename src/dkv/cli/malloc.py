"""glibc's malloc arenas, limited in the processes that hold a RocksDB.

glibc gives each thread that meets contention an arena of its own (up to 8 per core), and
memory freed in one is not reused by another: with RocksDB's background threads, grpc's poller
and ``asyncio.to_thread`` workers, a node's RSS grew with the writes it took. Two arenas, as
``MALLOC_ARENA_MAX=2`` would set, cost nothing measurable in throughput and lowered the RSS
after ~80,000 puts from 222-286 to 193-235 MiB (docs/benchmarks.md, issue 12).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

__all__ = ["MALLOC_ARENAS_MAX", "limit_malloc_arenas"]

log = logging.getLogger("dkv.malloc")

MALLOC_ARENAS_MAX = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS_MAX) -> bool:
    """Cap glibc's arenas at ``arenas`` (call first thing, before threads start); returns
    whether it was done. Without glibc (musl, macOS), or with ``MALLOC_ARENA_MAX`` already set
    by the operator, it leaves things as they are."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_ARENA_MAX, arenas))
    if not done:
        log.debug("mallopt(M_ARENA_MAX, %d) refused", arenas)
    return done
