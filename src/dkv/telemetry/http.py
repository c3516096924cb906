"""The HTTP server of ``--listen-metrics``: ``/metrics``, ``/livez``, ``/readyz``.

It runs on the process's own event loop (aiohttp), so a scrape reads the process's state
between two steps of the loop and never races it (a threaded server would iterate dicts the
loop is changing). Kubernetes probes:

- ``/livez``: 200 while the event loop answers — a wedged loop fails it (the probe times out);
- ``/readyz``: 200 "ok" when the process can serve, 503 with the one-line reason otherwise
  (the process's :data:`ReadyCheck`: a node whose groups know a leader, a gateway with a
  cluster map, a membership replica whose group has a leader).

``/metrics`` answers in the Prometheus text format, or OpenMetrics when the scraper asks for
it (``Accept``), as prometheus-client's own server does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from dkv.errors import InvalidArgument

__all__ = ["MetricsServer", "ReadyCheck", "parse_listen"]

log = logging.getLogger("dkv.telemetry")

ReadyCheck = Callable[[], tuple[bool, str]]


def parse_listen(address: str, flag: str = "--listen-metrics") -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port``; None for "" or "off" (no metrics server)."""
    text = address.strip()
    if text in ("", "off", "none"):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgument(f"{flag} {address!r} is not host:port (or 'off')")
    return host.strip("[]"), int(port)


def _always_ready() -> tuple[bool, str]:
    return True, "ok"


class MetricsServer:
    """Serve ``registry`` and the probes on ``address`` (``host:port``; port 0 picks one)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        address: str,
        ready: ReadyCheck = _always_ready,
    ) -> None:
        listen = parse_listen(address)
        if listen is None:
            raise InvalidArgument("MetricsServer needs an address")
        self.host, self.port = listen
        self.registry = registry
        self.ready = ready
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Listen; returns the bound port. A port in use is an :class:`Unavailable` naming it."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_port=False)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise InvalidArgument(
                f"cannot listen for metrics on {self.host}:{self.port} ({exc.strerror or exc})"
            ) from exc
        self._runner = runner
        for addr in runner.addresses:
            if isinstance(addr, tuple) and len(addr) >= 2:
                self.port = int(addr[1])
                break
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(self.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _livez(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        try:
            ready, reason = self.ready()
        except Exception as exc:  # a broken check must say so, not hang the probe
            log.warning("readiness check failed: %s", exc)
            ready, reason = False, f"readiness check failed: {exc}"
        return web.Response(status=200 if ready else 503, text=f"{reason}\n")
