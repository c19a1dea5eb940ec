"""Starting the Stripe double from tests.

In ``tests/conftest.py``::

    pytest_plugins = ["tests.stripe_double.fixture"]

then use the ``stripe_double`` fixture (a :class:`RunningDouble`), the
``stripe_client`` fixture (a real ``stripe.StripeClient`` on the double, closed
at teardown) or ``stripe_double_factory`` for custom settings / several doubles.
Outside pytest: ``async with run_stripe_double() as double: ...``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import stripe
from aiohttp import web

from .app import CLOSING_KEY, create_app
from .state import StripeDoubleState

TEST_API_KEY = "sk_test_meterproxy_double"


class RunningDouble:
    """A started double: ``url`` serves both the "api" and "meter_events" bases."""

    def __init__(self, url: str, state: StripeDoubleState, runner: web.AppRunner) -> None:
        self.url = url
        self.state = state
        self.runner = runner
        self._http_clients: list[stripe.AIOHTTPClient] = []

    @property
    def base_addresses(self) -> dict[str, str]:
        return {"api": self.url, "meter_events": self.url}

    def client(
        self,
        api_key: str = TEST_API_KEY,
        *,
        timeout: float = 5.0,
        max_network_retries: int = 0,
        **kwargs: Any,
    ) -> stripe.StripeClient:
        """A real StripeClient pointed at the double, async via aiohttp.

        Its http client is closed when the double stops.
        """
        http_client = stripe.AIOHTTPClient(timeout=timeout)
        self._http_clients.append(http_client)
        return stripe.StripeClient(
            api_key,
            base_addresses=self.base_addresses,  # type: ignore[arg-type]
            http_client=http_client,
            max_network_retries=max_network_retries,
            **kwargs,
        )

    async def stop(self) -> None:
        for http_client in self._http_clients:
            await http_client.close_async()  # type: ignore[no-untyped-call]
        self._http_clients.clear()
        self.runner.app[CLOSING_KEY].set()
        await self.runner.cleanup()


async def start_stripe_double(
    *, host: str = "127.0.0.1", port: int = 0, **state_kwargs: Any
) -> RunningDouble:
    """Start a double (``port=0``: ephemeral). ``state_kwargs`` go to StripeDoubleState."""
    state = StripeDoubleState(**state_kwargs)
    runner = web.AppRunner(create_app(state), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    return RunningDouble(f"http://{bound_host}:{bound_port}", state, runner)


@contextlib.asynccontextmanager
async def run_stripe_double(**kwargs: Any) -> AsyncIterator[RunningDouble]:
    double = await start_stripe_double(**kwargs)
    try:
        yield double
    finally:
        await double.stop()


@pytest.fixture
async def stripe_double_factory() -> AsyncIterator[Callable[..., Awaitable[RunningDouble]]]:
    """``double = await stripe_double_factory(processing_delay=0.05, seed=7)``."""
    started: list[RunningDouble] = []

    async def factory(**kwargs: Any) -> RunningDouble:
        double = await start_stripe_double(**kwargs)
        started.append(double)
        return double

    yield factory
    for double in reversed(started):
        await double.stop()


@pytest.fixture
async def stripe_double() -> AsyncIterator[RunningDouble]:
    """A double with default settings and no meters (seed them on ``.state``)."""
    async with run_stripe_double() as double:
        yield double


@pytest.fixture
async def stripe_client(stripe_double: RunningDouble) -> stripe.StripeClient:
    """A StripeClient (no SDK retries, 5 s timeout) on ``stripe_double``."""
    return stripe_double.client()
