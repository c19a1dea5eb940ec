"""Stripe Prices fetched from the Prices API, and the cache that keeps them fresh.

Owns: :func:`fetch_prices` (one ``GET /v1/prices/{id}?expand[]=tiers`` per id, through
:class:`~proxy.stripe.client.StripeClient`) and :class:`PriceCache` (refetched every
``stripe.price_refresh``; a failed fetch keeps the last good price). The math on a price is
:mod:`proxy.pricing`; this module only brings prices in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from proxy.errors import StripeCallError, StripeRejected
from proxy.pricing import Price, PriceError, price_from_stripe
from proxy.stripe.client import StripeClient

__all__ = ["FetchFailed", "Fetcher", "PriceCache", "fetch_prices"]

log = logging.getLogger("meterproxy.pricing")


@dataclass(frozen=True, slots=True)
class FetchFailed:
    """A price that could not be fetched; ``permanent``: unknown id or a price we cannot
    compute (e.g. custom_unit_amount), retrying will not help."""

    price_id: str
    reason: str
    permanent: bool


async def fetch_prices(conn: StripeClient,
                       price_ids: Iterable[str]) -> dict[str, Price | FetchFailed]:
    """``GET /v1/prices/{id}?expand[]=tiers`` for each id, concurrently (``tiers`` is not
    returned unless expanded). Every failure comes back as :class:`FetchFailed`."""

    async def one(pid: str) -> Price | FetchFailed:
        try:
            got = await conn.retrieve_price(pid)
        except StripeCallError as exc:
            return FetchFailed(pid, exc.reason, isinstance(exc, StripeRejected))
        try:
            return price_from_stripe(got).with_id(pid)
        except PriceError as exc:
            return FetchFailed(pid, f"cannot price {pid}: {exc}", True)

    ids = list(dict.fromkeys(price_ids))
    got = await asyncio.gather(*(one(pid) for pid in ids))
    return dict(zip(ids, got, strict=True))


Fetcher = Callable[[Sequence[str]], Awaitable[Mapping[str, Price | FetchFailed]]]


class PriceCache:
    """Prices by id, refetched every ``ttl`` seconds; a failed fetch keeps the last good
    price (and is retried after ``retry`` seconds, sooner than ``ttl``)."""

    def __init__(self, fetch: Fetcher, price_ids: Iterable[str], ttl: float, *,
                 retry: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self.price_ids = tuple(dict.fromkeys(price_ids))
        self.ttl = ttl
        self.retry = min(ttl, 30.0) if retry is None else retry
        self._clock = clock
        self._prices: dict[str, Price] = {}
        self.errors: dict[str, FetchFailed] = {}
        self._next: float | None = None     # clock time the next refresh is due
        self._lock = asyncio.Lock()

    @classmethod
    def for_stripe(cls, conn: StripeClient, price_ids: Iterable[str],
                   ttl: float) -> PriceCache:
        async def fetch(ids: Sequence[str]) -> Mapping[str, Price | FetchFailed]:
            return await fetch_prices(conn, ids)
        return cls(fetch, price_ids, ttl)

    @property
    def prices(self) -> Mapping[str, Price]:
        return dict(self._prices)

    def get(self, price_id: str) -> Price | None:
        """The last good price (no I/O); None before the first successful fetch."""
        return self._prices.get(price_id)

    def stale(self) -> bool:
        return self._next is None or self._clock() >= self._next

    async def refresh(self) -> None:
        """Fetch every id once; failures keep the previous price and are logged."""
        async with self._lock:
            if not self.price_ids:
                self._next = self._clock() + self.ttl
                return
            try:
                got: Mapping[str, Price | FetchFailed] = await self._fetch(self.price_ids)
            except Exception as exc:  # a fetcher bug must not kill the refresh loop
                log.error("price fetch failed: %r", exc, exc_info=exc)
                got = {pid: FetchFailed(pid, f"{type(exc).__name__}: {exc}", False)
                       for pid in self.price_ids}
            errors: dict[str, FetchFailed] = {}
            for pid in self.price_ids:
                p = got.get(pid) or FetchFailed(pid, "not returned by the fetch", False)
                if isinstance(p, Price):
                    self._prices[pid] = p
                else:
                    errors[pid] = p
                    keep = "keeping the last good price" if pid in self._prices else \
                        "no price known yet"
                    log.warning("price %s not refreshed (%s): %s", pid, keep, p.reason)
            self.errors = errors
            self._next = self._clock() + (self.retry if errors else self.ttl)

    async def get_fresh(self, price_id: str) -> Price | None:
        """``get`` after a refresh if one is due (concurrent callers share it)."""
        if self.stale():
            await self.refresh()
        return self.get(price_id)

    async def run(self) -> None:
        """Refresh forever on the interval (start with proxy.tasks.spawn; cancel to stop)."""
        while True:
            if self.stale():
                await self.refresh()
            assert self._next is not None
            await asyncio.sleep(max(0.0, self._next - self._clock()))
