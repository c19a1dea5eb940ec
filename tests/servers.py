"""A throwaway aiohttp server on a loopback ephemeral port, for tests that need a peer
(an upstream with special behaviour, a webhook receiver, a Stripe stub)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web


@contextlib.asynccontextmanager
async def serve(app: web.Application, shutdown_timeout: float = 60.0) -> AsyncIterator[str]:
    """Run ``app`` on 127.0.0.1:0; yields its base URL, cleans up on exit."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
