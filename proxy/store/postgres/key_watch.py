"""Key changes across the fleet: LISTEN/NOTIFY for speed, a version poll for certainty.

Every insert or update of ``api_keys`` draws a new ``version`` (monotonic, committed in
order: proxy.store.postgres.schema) and notifies ``meterproxy_keys``. A member keeps every
key in a ``KeyCache`` and a ``KeyWatcher`` keeps the cache current:

- one direct connection LISTENs (not through a pool: LISTEN is session state, which a
  transaction pooler would lose); a notification wakes the watcher at once;
- NOTIFY has no replay for a listener that was disconnected, so the watcher also reads
  ``WHERE version > last_seen`` every ``poll_interval`` and after every reconnect;
- a dead listener (``pg_terminate_backend``, network cut) is reopened on the next pass.

Bound: a change committed on any member is in every running member's cache within
``poll_interval`` plus one query (default 0.5 s: "about a second" with margin), while
PostgreSQL is reachable. While it is not, the cache keeps serving what it last saw; the
``stale_seconds`` property says for how long (wave 2 bounds it with a config setting).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import asyncpg

from proxy import tasks
from proxy.fleet.clock import monotonic_ms
from proxy.store.postgres.errors import PgUnavailable, is_unavailable
from proxy.store.postgres.pool import PgPool
from proxy.store.postgres.schema import KEYS_CHANNEL

log = logging.getLogger("meterproxy.fleet.keys")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    customer_id: str
    hash: str
    prefix: str
    revoked_at: int | None
    version: int


class KeyCache:
    """Every API key by hash, as of ``version``; only the watcher writes it."""

    def __init__(self) -> None:
        self.by_hash: dict[str, KeyRecord] = {}
        self.version = 0

    def apply(self, records: list[KeyRecord]) -> None:
        for r in records:
            self.by_hash[r.hash] = r
            self.version = max(self.version, r.version)

    def lookup(self, key_hash: str) -> KeyRecord | None:
        """The live key with this hash, or None (unknown or revoked)."""
        r = self.by_hash.get(key_hash)
        return None if r is None or r.revoked_at is not None else r


_CHANGED = """
SELECT key_id, customer_id, hash, prefix, revoked_at, version FROM api_keys
WHERE version > $1 ORDER BY version LIMIT $2
"""


class KeyWatcher:
    """Keeps a KeyCache current; ``start()``/``stop()`` as a pair."""

    def __init__(self, pool: PgPool, dsn: str, cache: KeyCache, poll_interval: float = 0.5,
                 page: int = 10_000) -> None:
        self.pool = pool
        self.dsn = dsn
        self.cache = cache
        self.poll_interval = poll_interval
        self.page = page
        self.listener: asyncpg.Connection | None = None
        self.reconnects = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._fresh_ms = monotonic_ms()

    @property
    def stale_seconds(self) -> float:
        """How long since the cache was last confirmed current."""
        return (monotonic_ms() - self._fresh_ms) / 1000

    async def start(self) -> None:
        """Load every key, then watch (raises PgUnavailable if the first load fails)."""
        await self.refresh()
        await self._listen()
        self._task = tasks.spawn("fleet-key-watcher", self._run())

    async def stop(self) -> None:
        await tasks.cancel_and_wait(self._task)
        self._task = None
        await self._drop_listener()

    async def refresh(self) -> int:
        """Apply every change after the cache's version; returns how many."""
        n = 0
        async with self.pool.acquire() as conn:
            while True:
                rows = await conn.fetch(_CHANGED, self.cache.version, self.page)
                self.cache.apply([KeyRecord(*r) for r in rows])
                n += len(rows)
                if len(rows) < self.page:
                    break
        self._fresh_ms = monotonic_ms()
        return n

    async def _run(self) -> None:
        while True:
            await tasks.wait_event(self._wake, self.poll_interval)
            self._wake.clear()
            if self.listener is None or self.listener.is_closed():
                await self._listen()
            try:
                await self.refresh()
            except PgUnavailable as exc:
                log.warning("key refresh failed (serving cached keys): %s", exc)

    async def _listen(self) -> None:
        await self._drop_listener()
        try:
            conn = await asyncpg.connect(self.dsn, timeout=self.pool.settings.connect_timeout)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            return
        await conn.add_listener(KEYS_CHANNEL, self._notified)
        conn.add_termination_listener(self._terminated)
        self.listener = conn
        self.reconnects += 1
        self._wake.set()   # changes made while no listener was up: poll now

    def _notified(self, *_args: object) -> None:
        self._wake.set()

    def _terminated(self, _conn: object) -> None:
        self._wake.set()

    async def _drop_listener(self) -> None:
        conn, self.listener = self.listener, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)
        elif conn is not None:
            conn.terminate()
