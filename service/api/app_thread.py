"""An aiohttp application served from an event loop on a thread of its own, beside the gRPC server (the
HTTP/JSON front and the admin port each run one)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web


class AppThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self, app: web.Application, host: str, port: int, reuse_port: bool = False, **runner: Any) -> int:
        """Listen (``runner``: AppRunner's options); returns the port (0 picks a free one)."""
        self._thread.start()
        return self.run(self._start(app, host, port, reuse_port, runner), 30)

    async def _start(self, app: web.Application, host: str, port: int, reuse_port: bool, options: dict) -> int:
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, **options)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]") or None, port, reuse_port=reuse_port or None)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def run(self, coroutine: Awaitable, timeout: float) -> Any:
        """``coroutine`` on the loop, from another thread; its result (TimeoutError after ``timeout`` s)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self, timeout: float, before: Callable[[], Awaitable[None]] | None = None) -> None:
        """``before()`` (closing what the app holds open), then the app's cleanup: calls in flight drain within
        ``timeout`` seconds; then the loop ends. TimeoutError when they did not."""
        try:
            if self._runner is not None:
                self.run(self._stop(before), timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)

    async def _stop(self, before: Callable[[], Awaitable[None]] | None) -> None:
        if before is not None:
            await before()
        assert self._runner is not None
        await self._runner.cleanup()
