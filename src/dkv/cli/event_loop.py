"""The event loop a server process runs on: uvloop by default, the standard one on request.

uvloop (libuv) makes the loop's own work -- callbacks, ready handles, the thread-safe wake-ups
grpc.aio's poller thread sends -- cheaper than asyncio's pure-Python loop; that work was the
largest share of a loaded node's time (docs/benchmarks.md, issue 12). grpc.aio, asyncio.to_thread
and our signal handling run on either; ``--event-loop asyncio`` is there to rule uvloop out
when something looks wrong.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

__all__ = ["EVENT_LOOPS", "EVENT_LOOP_HELP", "check_event_loop", "run"]

T = TypeVar("T")

EVENT_LOOPS = ("uvloop", "asyncio")
EVENT_LOOP_HELP = (
    "the asyncio event loop: uvloop (libuv; cheaper per request) or asyncio (the standard "
    "library's)"
)


def check_event_loop(p: argparse.ArgumentParser, value: str | None) -> str:
    """The ``--event-loop`` value, checked (``parser.error`` names the problem)."""
    choice = (value or "uvloop").strip().lower()
    if choice not in EVENT_LOOPS:
        p.error(f"--event-loop must be one of {', '.join(EVENT_LOOPS)}, not {value!r}")
    return choice


def run(main: Coroutine[Any, Any, T], event_loop: str) -> T:
    """Run ``main`` to completion on ``event_loop`` (as :func:`asyncio.run` does)."""
    if event_loop == "uvloop":
        return uvloop.run(main)
    return asyncio.run(main)
