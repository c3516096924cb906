"""A log line at most once per interval, the next one counting those skipped: what a flood of
bad requests or refused calls may cost the log (dkv.host.rpc_server, dkv.security.access)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Log at most one line per ``interval_s``; the next line counts the ones skipped.

    ``clock`` is injected so tests need not wait."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._next_at = float("-inf")
        self.suppressed = 0

    def warning(self, message: str, *args: object) -> bool:
        """Log ``message % args`` unless a line was logged less than ``interval_s`` ago.
        Returns whether it was logged."""
        now = self.clock()
        if now < self._next_at:
            self.suppressed += 1
            return False
        self._next_at = now + self.interval_s
        if self.suppressed:
            message += " (%d more like it not logged in the last %g s)"
            args = (*args, self.suppressed, self.interval_s)
            self.suppressed = 0
        self.logger.warning(message, *args)
        return True
