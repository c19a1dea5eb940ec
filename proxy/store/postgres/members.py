"""The fleet's ``members`` table seen from a member: its claim on its member id (one live
process per id), its heartbeat (alive, rules version) and the rows ``GET /admin/fleet``
reports (members with their active leases, a duty's leader).

One process per member id: at start a process draws a random instance token and claims its
member id with it (``claim``): the claim succeeds when the row has no instance (released,
never claimed), has this token, or was last seen more than ``stale_ms`` ago (its process
died: a live one heartbeats every ``leader_ttl / 3``). A process whose claim keeps failing
for ``stale_ms`` (and a bit) is refused (``claim_or_refuse``: ``MemberIdInUse``). From then
on the heartbeat, shipping's mark step and the flusher duty's take check the token, so a
process whose id another one claimed (``Superseded``: it stalled longer than ``stale_ms``)
can neither ship nor lead; ``release`` at shutdown frees the id at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime

from proxy.errors import MeterproxyError, StorageError
from proxy.store.postgres.pool import PgPool

_HEARTBEAT = ("INSERT INTO members(id, rules_version) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE "
              "SET rules_version = $2, last_seen = now()")
_HEARTBEAT_OWN = ("UPDATE members SET rules_version = $2, last_seen = now() "
                  "WHERE id = $1 AND instance = $3")
_CLAIM = """
INSERT INTO members AS m (id, instance) VALUES ($1, $2)
ON CONFLICT (id) DO UPDATE SET instance = $2, last_seen = now()
    WHERE m.instance IS NULL OR m.instance = $2
       OR m.last_seen < now() - $3::bigint * interval '1 millisecond'
RETURNING instance
"""
_HOLDER = ("SELECT instance, extract(epoch FROM now() - last_seen)::float8 FROM members "
           "WHERE id = $1")
_RELEASE = "UPDATE members SET instance = NULL WHERE id = $1 AND instance = $2"


class MemberIdInUse(StorageError):
    """Another live process holds this member id (start refused)."""


class Superseded(MeterproxyError):
    """Another process claimed this process's member id: it may no longer ship or lead."""
_MEMBERS = (
    "SELECT m.id, m.rules_version, m.last_shipped_seq, m.started_at, m.last_seen, "
    "extract(epoch FROM now() - m.last_seen)::float8 AS silent, "
    "coalesce(l.n, 0) AS leases, coalesce(l.left_, 0) AS lease_credits "
    "FROM members m LEFT JOIN (SELECT member_id, count(*) AS n, "
    "sum(granted - reported) AS left_ FROM credit_leases WHERE state = 'active' "
    "GROUP BY member_id) l ON l.member_id = m.id ORDER BY m.id")
_LEADER = ("SELECT holder, fence, expires_at > now() AS live FROM leader_leases "
           "WHERE duty = $1")


@dataclass(frozen=True, slots=True)
class MemberRow:
    id: str
    rules_version: str
    shipped_seq: int
    started_at: datetime
    last_seen: datetime
    seconds_since_seen: float
    leases: int
    lease_credits_unreported: int     # micro-credits granted to its active leases, not reported


@dataclass(frozen=True, slots=True)
class LeaderRow:
    holder: str | None                # None: the duty's lease has expired (no leader now)
    fence: int


async def heartbeat(pool: PgPool, member_id: str, rules_version: str,
                    instance: str | None = None) -> None:
    """This member is alive (``last_seen``), with its rules version. With ``instance``:
    only while this process holds the member id, else ``Superseded``."""
    async def beat() -> bool:
        async with pool.acquire() as c:
            if instance is None:
                await c.execute(_HEARTBEAT, member_id, rules_version)
                return True
            return str(await c.execute(_HEARTBEAT_OWN, member_id, rules_version,
                                       instance)).split()[-1] == "1"
    if not await pool.retrying(beat):
        raise Superseded(f"member id {member_id} was claimed by another process; this one "
                         "no longer ships or leads (two processes under one member id)")


async def claim(pool: PgPool, member_id: str, instance: str,
                stale_ms: int) -> tuple[str | None, float] | None:
    """Claim ``member_id`` for ``instance``. None when claimed; else the holder's instance
    and how many seconds ago it was last seen."""
    async def once() -> tuple[str | None, float] | None:
        async with pool.acquire() as c:
            if await c.fetchval(_CLAIM, member_id, instance, stale_ms) is not None:
                return None
            row = await c.fetchrow(_HOLDER, member_id)
        return (None, 0.0) if row is None else (row[0], float(row[1]))
    return await pool.retrying(once)


async def claim_or_refuse(pool: PgPool, member_id: str, instance: str, stale_ms: int,
                          what: str = "") -> None:
    """``claim``, retried while the holder may still be a process that died (up to
    ``stale_ms`` and a second); then ``MemberIdInUse``. ``what``: why this process needs the
    id, for the message."""
    deadline = time.monotonic() + stale_ms / 1000 + 1.0
    while (held := await claim(pool, member_id, instance, stale_ms)) is not None:
        if time.monotonic() >= deadline:
            raise MemberIdInUse(
                f"member id {member_id} is in use by another running process (instance "
                f"{held[0]}, last seen {held[1]:.1f}s ago){what}. Two processes under one "
                "fleet.member_id would ship over each other's usage: give each process its "
                "own fleet.member_id (the default is <host>:<listen port>), or stop the "
                f"other process; the id of a process that died is free {stale_ms / 1000:g}s "
                "after its last heartbeat")
        await asyncio.sleep(min(0.25, stale_ms / 10000))


async def release(pool: PgPool, member_id: str, instance: str) -> None:
    """Free ``member_id`` if ``instance`` still holds it (shutdown): the next process under
    it claims it at once."""
    async def once() -> None:
        async with pool.acquire() as c:
            await c.execute(_RELEASE, member_id, instance)
    await pool.retrying(once)


async def members(pool: PgPool, duty: str) -> tuple[list[MemberRow], LeaderRow | None]:
    """Every member with its active leases, and ``duty``'s leader (None: never held)."""
    async with pool.acquire() as c:
        rows = await c.fetch(_MEMBERS)
        lead = await c.fetchrow(_LEADER, duty)
    out = [MemberRow(r["id"], r["rules_version"], int(r["last_shipped_seq"]), r["started_at"],
                     r["last_seen"], float(r["silent"]), int(r["leases"]),
                     int(r["lease_credits"])) for r in rows]
    return out, None if lead is None else LeaderRow(
        str(lead["holder"]) if lead["live"] else None, int(lead["fence"]))
