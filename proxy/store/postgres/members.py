"""The fleet's ``members`` table seen from a member: its heartbeat (alive, rules version) and
the rows ``GET /admin/fleet`` reports (members with their active leases, a duty's leader)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from proxy.store.postgres.pool import PgPool

_HEARTBEAT = ("INSERT INTO members(id, rules_version) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE "
              "SET rules_version = $2, last_seen = now()")
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


async def heartbeat(pool: PgPool, member_id: str, rules_version: str) -> None:
    async def beat() -> None:
        async with pool.acquire() as c:
            await c.execute(_HEARTBEAT, member_id, rules_version)
    await pool.retrying(beat)


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
