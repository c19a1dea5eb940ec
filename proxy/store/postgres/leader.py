"""Leadership of fleet-wide duties (the Stripe flusher) through a fenced lease row.

A row per duty in ``leader_leases(duty, holder, fence, expires_at)``, not a session advisory
lock: session locks break behind transaction poolers and survive a paused process. Taking
or renewing is one statement; the fence grows by one whenever the holder changes, so every
holder has its own fence number.

Guarantees:
- At most one member believes it leads at any instant, given clock rates that drift less
  than ``drift_margin``: a holder trusts its lease until ``sent + ttl*(1 - margin)`` on its
  own monotonic clock, and nobody else can take the row before ``expires_at`` (at least
  ``sent + ttl`` on the database's clock).
- A deposed leader cannot write: every write a duty does goes through ``fenced()``, a
  transaction that first re-reads the row ``FOR SHARE`` (holder, fence, unexpired) and
  raises ``Deposed`` if it changed; the share lock makes a concurrent takeover wait until
  that transaction ends, so a write either commits under a valid lease or not at all.
- Failover: a member tries every ``ttl/3``; after the leader stops renewing, another takes
  over at most ``ttl + ttl/3`` (plus one statement) after the leader's last renewal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from proxy.errors import MeterproxyError
from proxy.fleet.clock import monotonic_ms
from proxy.fleet.sizing import usable_until_ms
from proxy.store.postgres.conn import Conn
from proxy.store.postgres.errors import PgUnavailable
from proxy.store.postgres.pool import PgPool, retried

TAKE_SQL = """
INSERT INTO leader_leases AS l (duty, holder, fence, expires_at, instance)
SELECT $1, $2, 1, now() + $3::bigint * interval '1 millisecond', $4::text
WHERE $4::text IS NULL OR EXISTS (SELECT 1 FROM members WHERE id = $2 AND instance = $4)
ON CONFLICT (duty) DO UPDATE
    SET holder = EXCLUDED.holder, instance = EXCLUDED.instance,
        fence = CASE WHEN l.holder = EXCLUDED.holder
                      AND l.instance IS NOT DISTINCT FROM EXCLUDED.instance
                     THEN l.fence ELSE l.fence + 1 END,
        expires_at = EXCLUDED.expires_at
    WHERE (l.holder = EXCLUDED.holder AND l.instance IS NOT DISTINCT FROM EXCLUDED.instance)
       OR l.expires_at < now()
RETURNING fence
"""
# The holder is a member id and the process holding it (``instance``, its claim on the id:
# proxy.store.postgres.members): only the process that holds its member id takes or renews
# (a process whose id another one claimed cannot), and another process under the same id is
# another holder (it waits for the lease to expire; its fence is a new one).

CHECK_SQL = """
SELECT 1 FROM leader_leases
WHERE duty = $1 AND holder = $2 AND fence = $3 AND expires_at > now()
  AND instance IS NOT DISTINCT FROM $4::text FOR SHARE
"""


class Deposed(MeterproxyError):
    """This member no longer holds the duty (its fence is stale or its lease expired)."""


class Leadership:
    """One member's claim on one duty."""

    def __init__(self, pool: PgPool, duty: str, member_id: str, ttl_ms: int = 10_000,
                 drift_margin_ppm: int = 50_000, instance: str | None = None) -> None:
        self.pool = pool
        self.duty = duty
        self.member_id = member_id
        self.instance = instance      # the process's claim on member_id (None: unchecked)
        self.ttl_ms = ttl_ms
        self.drift_margin_ppm = drift_margin_ppm
        self.fence: int | None = None
        self._until_ms = 0
        self.clock = monotonic_ms

    @property
    def failover_bound_ms(self) -> int:
        """Longest a duty goes unled after its leader stops, with members trying every
        ``ttl/3``."""
        return self.ttl_ms + self.ttl_ms // 3

    def leads(self) -> bool:
        """Whether this member may act as leader now (its own clock; no I/O)."""
        return self.fence is not None and self.clock() < self._until_ms

    @retried
    async def try_lead(self) -> bool:
        """Take the duty if it is free or expired, or renew it if held; call every ttl/3."""
        sent = self.clock()
        try:
            async with self.pool.acquire() as conn:
                fence = await conn.fetchval(TAKE_SQL, self.duty, self.member_id, self.ttl_ms,
                                            self.instance)
        except PgUnavailable:
            return self.leads()
        if fence is None:
            self.fence = None
            return False
        self.fence = int(fence)
        self._until_ms = usable_until_ms(sent, self.ttl_ms, self.drift_margin_ppm)
        return True

    @retried
    async def resign(self) -> None:
        """Give the duty up at once (shutdown), so the next member need not wait for expiry."""
        if self.fence is None:
            return
        fence, self.fence = self.fence, None
        async with self.pool.acquire() as conn:
            await conn.execute("UPDATE leader_leases SET expires_at = now() - interval '1 ms' "
                               "WHERE duty = $1 AND holder = $2 AND fence = $3",
                               self.duty, self.member_id, fence)

    @asynccontextmanager
    async def fenced(self) -> AsyncIterator[Conn]:
        """A transaction that commits only while this member still holds the duty with the
        same fence; raises ``Deposed`` otherwise (nothing written)."""
        fence = self.fence
        if fence is None or not self.leads():
            raise Deposed(f"{self.member_id} does not hold {self.duty}")
        async with self.pool.acquire() as conn, conn.transaction():
            ok = await conn.fetchval(CHECK_SQL, self.duty, self.member_id, fence,
                                     self.instance)
            if ok is None:
                self.fence = None
                raise Deposed(f"{self.member_id} lost {self.duty} (fence {fence})")
            yield conn


async def claim_outbox(lead: Leadership, limit: int, now: float) -> list[int]:
    """Claim up to ``limit`` due pending outbox rows for this leader's fence (in a fenced
    transaction; rows another transaction holds are skipped, rows this fence already claimed
    are not claimed twice, rows an earlier leader claimed are taken over). Returns their ids."""
    async def claim() -> list[int]:
        async with lead.fenced() as conn:
            rows = await conn.fetch(
                "UPDATE outbox SET claim_fence = $1 WHERE id IN (SELECT id FROM outbox WHERE "
                "status = 'pending' AND next_attempt_at <= $2 AND claim_fence IS DISTINCT FROM"
                " $1 ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING id",
                lead.fence, now, limit)
        return sorted(r["id"] for r in rows)
    return await lead.pool.retrying(claim)


async def mark_sent(lead: Leadership, ids: list[int], sent_at: int, sink: str) -> int:
    """Record delivery of rows this fence claimed; a deposed leader's call raises
    ``Deposed`` and changes nothing. Returns rows updated."""
    async def mark() -> int:
        async with lead.fenced() as conn:
            status = await conn.execute(
                "UPDATE outbox SET status = 'sent', sent_at = $2, sink = $3,"
                " attempts = attempts + 1 "
                "WHERE id = ANY($1::bigint[]) AND claim_fence = $4 AND status = 'pending'",
                ids, sent_at, sink, lead.fence)
        return int(status.split()[-1])
    return await lead.pool.retrying(mark)
