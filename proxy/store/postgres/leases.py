"""Credit leases in PostgreSQL: escrow grants, renewal, settlement, return and the reaper.

A lease is an escrow (O'Neil 1986): credits move from the customer's available balance
(``balance - settled - escrowed``) into ``escrowed`` in the same statement that checks they
are there, so whatever the outstanding leases do, fixed-cost spending never exceeds the
balance. One active lease row per (customer, member); a refill adds to it and pushes its
``expires_at`` to ``now() + ttl``.

Lock order, everywhere: the customer's ``credit_accounts`` row first (customer ids in sorted
order when several), then its ``credit_leases`` rows. Renewal touches one lease row only.
So no two of these statements can deadlock.

Guarantees:
- ``grant``: one statement; grants ``sizing.lease_size`` evaluated against the locked row
  (``H`` is counted in the statement's snapshot); never more than is available.
- ``settle`` (in the shipper's transaction, from rows the ledger really inserted): the part
  of a member's spending covered by its active lease moves from escrowed to settled; any
  excess (post-response quantities above their hold, or usage shipped after the reaper
  closed the lease) is settled without escrow: that is the overspend, visible as
  ``settled + escrowed > balance``.
- ``release``: returns ``granted - max(spent, reported)``; the lease closes once everything
  spent is reported.
- ``reap``: after ``expires_at + grace`` returns ``granted - reported`` of abandoned leases.
  Zero overspend needs the dead member's usage shipped before then (docs/fleet.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from proxy.fleet.sizing import LeasePolicy
from proxy.store.postgres.conn import Conn
from proxy.store.postgres.members import Superseded
from proxy.store.postgres.pool import PgPool, retried

# $1 customer, $2 member, $3 wanted (r*T), $4 floor, $5 k, $6 quantum, $7 ttl ms, $8 the
# process's instance token (NULL: unchecked; else nothing happens unless that process holds
# the member id: proxy.store.postgres.members).
# The CASE is sizing.lease_size, evaluated on the locked, newest version of the row.
_HOLDS_ID = "($8::text IS NULL OR EXISTS (SELECT 1 FROM members WHERE id = $2 AND instance = $8))"
GRANT_SQL = f"""
WITH acc AS MATERIALIZED (
    SELECT customer_id, balance - settled - escrowed AS avail
    FROM credit_accounts WHERE customer_id = $1 AND {_HOLDS_ID} FOR UPDATE
), h AS (
    SELECT count(*) + 1 AS n FROM credit_leases
    WHERE customer_id = $1 AND state = 'active' AND member_id <> $2
), s AS (
    SELECT acc.customer_id, acc.avail,
        CASE WHEN acc.avail < GREATEST($6::bigint, 1) THEN 0
             ELSE LEAST(GREATEST(LEAST(GREATEST($3::bigint, $4::bigint), acc.avail / ($5::bigint * h.n)),
                                 GREATEST($6::bigint, 1)),
                        acc.avail) END AS size
    FROM acc, h
), g AS MATERIALIZED (
    SELECT customer_id, avail, size - size % GREATEST($6::bigint, 1) AS amount FROM s
), escrow AS (
    UPDATE credit_accounts a SET escrowed = a.escrowed + g.amount
    FROM g WHERE a.customer_id = g.customer_id AND g.amount > 0
    RETURNING a.customer_id
), lease AS (
    INSERT INTO credit_leases (customer_id, member_id, granted, expires_at)
    SELECT g.customer_id, $2, g.amount, now() + $7::bigint * interval '1 millisecond'
    FROM g WHERE g.amount > 0
    ON CONFLICT (customer_id, member_id) WHERE state = 'active'
    DO UPDATE SET granted = credit_leases.granted + EXCLUDED.granted,
                  expires_at = EXCLUDED.expires_at
    RETURNING id, granted
)
SELECT g.amount, g.avail, lease.id AS lease_id, lease.granted FROM g LEFT JOIN lease ON true
"""

RENEW_SQL = """
UPDATE credit_leases SET expires_at = now() + $3::bigint * interval '1 millisecond'
WHERE customer_id = $1 AND member_id = $2 AND state = 'active'
  AND ($4::text IS NULL OR EXISTS (SELECT 1 FROM members WHERE id = $2 AND instance = $4))
RETURNING id, granted
"""
_HOLDER = "SELECT instance FROM members WHERE id = $1"


@dataclass(frozen=True, slots=True)
class Grant:
    """What one grant statement did. ``lease_id``/``granted_total`` are None when nothing
    was granted and the member holds no lease for the customer."""

    amount: int                  # micro-credits added to the lease now
    available: int               # the customer's available balance before the grant
    lease_id: int | None
    granted_total: int | None    # the lease's whole grant so far


@dataclass(frozen=True, slots=True)
class Account:
    balance: int
    settled: int
    escrowed: int

    @property
    def available(self) -> int:
        return self.balance - self.settled - self.escrowed


@dataclass(frozen=True, slots=True)
class Holding:
    """One member's active lease for a customer, as the database has it."""

    customer_id: str
    member_id: str
    granted: int
    reported: int
    expires_in_ms: int     # negative: past expiry, waiting for the reaper


_HOLDINGS = """
SELECT a.customer_id, a.balance, a.settled, a.escrowed, l.member_id, l.granted, l.reported,
       (extract(epoch FROM l.expires_at - now()) * 1000)::bigint AS expires_in_ms
FROM credit_accounts a LEFT JOIN credit_leases l
     ON l.customer_id = a.customer_id AND l.state = 'active'
WHERE a.customer_id = ANY($1::text[])
ORDER BY a.customer_id, l.member_id
"""


def _expire_leases(where: str) -> str:
    """End the active leases ``where`` selects and take what they hold unreported
    (``granted - reported``) out of their accounts' escrow: customer_id, back per customer."""
    return f"""
WITH d AS (
    UPDATE credit_leases SET state = 'expired' WHERE {where}
    RETURNING customer_id, granted - reported AS back),
s AS (SELECT customer_id, sum(back)::bigint AS back FROM d GROUP BY customer_id)
UPDATE credit_accounts a SET escrowed = a.escrowed - s.back
FROM s WHERE a.customer_id = s.customer_id
RETURNING a.customer_id, s.back
"""


# a member's own active leases ($1 member, $2 customers); leases past expiry plus grace
# ($1 customers, $2 grace in ms)
_END_OWN = _expire_leases(
    "member_id = $1 AND state = 'active' AND customer_id = ANY($2::text[])")
_REAP = _expire_leases("customer_id = ANY($1::text[]) AND state = 'active'"
                       " AND expires_at < now() - $2::bigint * interval '1 millisecond'")


class LeaseStore:
    """One member's lease verbs against the shared database."""

    def __init__(self, pool: PgPool, member_id: str, policy: LeasePolicy,
                 instance: str | None = None) -> None:
        """``instance``: the running process's claim on ``member_id``
        (``proxy.store.postgres.members``): grants, renewals and returns then act only while
        that process holds the id (``Superseded`` from ``grant``; nothing renewed or
        returned), so a process whose id another one claimed cannot spend, keep or cut the
        leases under it."""
        self.pool = pool
        self.member_id = member_id
        self.policy = policy
        self.instance = instance

    @retried
    async def grant(self, customer_id: str, wanted: int, quantum: int) -> Grant:
        """Escrow a lease (or top up the held one) in one statement. Raises PgUnavailable,
        or ``Superseded`` when another process holds the member id."""
        p = self.policy
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(GRANT_SQL, customer_id, self.member_id, wanted, p.floor,
                                      p.k, quantum, p.ttl_ms, self.instance)
            if row is None:
                if self.instance is not None and \
                        await conn.fetchval(_HOLDER, self.member_id) != self.instance:
                    raise Superseded(f"member id {self.member_id} is held by another process: "
                                     "no lease granted (two processes under one member id)")
                return Grant(0, 0, None, None)
            if row["lease_id"] is None:
                held = await conn.fetchrow(
                    "SELECT id, granted FROM credit_leases WHERE customer_id = $1 AND "
                    "member_id = $2 AND state = 'active'", customer_id, self.member_id)
                if held is None:
                    return Grant(0, row["avail"], None, None)
                return Grant(0, row["avail"], held["id"], held["granted"])
            return Grant(row["amount"], row["avail"], row["lease_id"], row["granted"])

    @retried
    async def renew(self, customer_id: str) -> tuple[int, int] | None:
        """Push the held lease's expiry to now + ttl: (lease id, granted) or None if the
        member holds no active lease (the reaper took it)."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(RENEW_SQL, customer_id, self.member_id, self.policy.ttl_ms,
                                      self.instance)
        return None if row is None else (row["id"], row["granted"])

    async def holdings(self, customer_id: str) -> tuple[Account, list[Holding]]:
        """The customer's account and every member's active lease for it (one snapshot)."""
        got = await self.holdings_of([customer_id])
        return got.get(customer_id, (Account(0, 0, 0), []))

    async def holdings_of(self, customers: list[str]
                          ) -> dict[str, tuple[Account, list[Holding]]]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_HOLDINGS, customers)
        out: dict[str, tuple[Account, list[Holding]]] = {}
        for r in rows:
            cid = str(r["customer_id"])
            if cid not in out:
                out[cid] = (Account(r["balance"], r["settled"], r["escrowed"]), [])
            if r["member_id"] is not None:
                out[cid][1].append(Holding(cid, str(r["member_id"]), int(r["granted"]),
                                           int(r["reported"]), int(r["expires_in_ms"])))
        return out

    async def leased_customers(self, limit: int) -> list[str]:
        """Customers some member holds an active lease for (at most ``limit``, by id)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT DISTINCT customer_id FROM credit_leases WHERE"
                                    " state = 'active' ORDER BY customer_id LIMIT $1", limit)
        return [str(r[0]) for r in rows]

    @retried
    async def release(self, customer_id: str, lease_id: int, spent: int) -> int:
        """Give back what this member will not spend: ``granted - max(spent, reported)``.
        Returns the micro-credits returned to the available balance."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM credit_accounts WHERE customer_id = $1 FOR UPDATE",
                               customer_id)
            row = await conn.fetchrow(
                """
                WITH l AS (SELECT id, granted, reported FROM credit_leases
                           WHERE id = $1 AND state = 'active'
                             AND ($3::text IS NULL OR EXISTS (SELECT 1 FROM members
                                  WHERE id = $4 AND instance = $3)) FOR UPDATE),
                k AS (SELECT id, granted, reported,
                             LEAST(granted, GREATEST($2::bigint, reported)) AS keep FROM l)
                UPDATE credit_leases c SET granted = k.keep,
                    state = CASE WHEN k.keep = k.reported THEN 'closed' ELSE 'active' END
                FROM k WHERE c.id = k.id RETURNING k.granted - k.keep AS back
                """, lease_id, spent, self.instance, self.member_id)
            back = 0 if row is None else int(row["back"])
            if back:
                await conn.execute("UPDATE credit_accounts SET escrowed = escrowed - $2 "
                                   "WHERE customer_id = $1", customer_id, back)
            return back

    @retried
    async def end_earlier(self) -> dict[str, int]:
        """At start, once the journal is shipped: end the active leases of this member id
        (an earlier process's, killed), returning ``granted - reported`` as the reaper
        does. Everything that process spent is reported by then (its journal shipped), so
        the rest was never spent; left active, the restarted member would renew it and
        count it as spent for as long as it runs. Returns customer -> micro-credits."""
        async with self.pool.acquire() as conn, conn.transaction():
            customers = [r["customer_id"] for r in await conn.fetch(
                "SELECT DISTINCT customer_id FROM credit_leases WHERE member_id = $1 AND "
                "state = 'active' ORDER BY customer_id", self.member_id)]
            if not customers:
                return {}
            await conn.execute("SELECT 1 FROM credit_accounts WHERE customer_id = ANY($1::text[]) "
                               "ORDER BY customer_id FOR UPDATE", customers)
            rows = await conn.fetch(_END_OWN, self.member_id, customers)
            return {r["customer_id"]: int(r["back"]) for r in rows}

    @retried
    async def reap(self, grace_ms: int, limit: int = 1000) -> dict[str, int]:
        """Return ``granted - reported`` of leases past ``expires_at + grace``; customers
        whose account row another member is busy with are skipped (next pass).
        Returns customer -> micro-credits returned."""
        async with self.pool.acquire() as conn, conn.transaction():
            due = await conn.fetch(
                "SELECT DISTINCT customer_id FROM credit_leases WHERE state = 'active' AND "
                "expires_at < now() - $1::bigint * interval '1 millisecond' LIMIT $2",
                grace_ms, limit)
            if not due:
                return {}
            locked = await conn.fetch(
                "SELECT customer_id FROM credit_accounts WHERE customer_id = ANY($1::text[]) "
                "ORDER BY customer_id FOR UPDATE SKIP LOCKED", [r["customer_id"] for r in due])
            rows = await conn.fetch(_REAP, [r["customer_id"] for r in locked], grace_ms)
            return {r["customer_id"]: int(r["back"]) for r in rows}


async def settle(conn: Conn, member_id: str, spent: Mapping[str, int]) -> None:
    """Settle ``spent`` (customer -> micro-credits, from ledger rows just inserted) inside the
    caller's transaction: covered by the member's active lease -> out of escrow; the rest
    straight to settled."""
    customers = sorted(c for c, v in spent.items() if v)
    if not customers:
        return
    amounts = [spent[c] for c in customers]
    # a customer never granted credits has no account yet (a block customer admitted
    # offline, ``fail_mode: open``): its account is made here, so that what it spent is
    # settled and the debt it becomes (``grant_debits.debit_grants``, after this) is in
    # ``credit_accounts.debt`` (the migration-6 trigger updates existing rows only), which
    # its first grant repays (docs/fleet.md, "Repayments")
    await conn.execute("INSERT INTO credit_accounts(customer_id) SELECT c FROM"
                       " unnest($1::text[]) AS c ORDER BY c ON CONFLICT (customer_id) DO NOTHING",
                       customers)
    await conn.execute("SELECT 1 FROM credit_accounts WHERE customer_id = ANY($1::text[]) "
                       "ORDER BY customer_id FOR UPDATE", customers)
    covered = await conn.fetch(
        """
        WITH x AS (SELECT * FROM unnest($1::text[], $2::bigint[]) AS x(customer_id, amount)),
        l AS (SELECT c.id, LEAST(x.amount, c.granted - c.reported) AS within
              FROM credit_leases c JOIN x ON x.customer_id = c.customer_id
              WHERE c.member_id = $3 AND c.state = 'active' FOR UPDATE OF c)
        UPDATE credit_leases c SET reported = c.reported + l.within FROM l WHERE c.id = l.id
        RETURNING c.customer_id, l.within
        """, customers, amounts, member_id)
    within = {r["customer_id"]: int(r["within"]) for r in covered}
    await conn.execute(
        "UPDATE credit_accounts a SET settled = a.settled + x.amount, "
        "escrowed = a.escrowed - x.within "
        "FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS x(customer_id, amount, within) "
        "WHERE a.customer_id = x.customer_id",
        customers, amounts, [within.get(c, 0) for c in customers])


async def deposit(conn: Conn, customer_id: str, amount: int) -> None:
    """Add ``amount`` micro-credits to the customer's balance (creating its account).
    Wave 2 calls this from the grant verbs, in the grant's transaction."""
    await conn.execute(
        "INSERT INTO credit_accounts(customer_id, balance) VALUES ($1, $2) ON CONFLICT "
        "(customer_id) DO UPDATE SET balance = credit_accounts.balance + EXCLUDED.balance",
        customer_id, amount)


async def account(conn: Conn, customer_id: str) -> Account:
    row = await conn.fetchrow("SELECT balance, settled, escrowed FROM credit_accounts "
                              "WHERE customer_id = $1", customer_id)
    return Account(0, 0, 0) if row is None else Account(row[0], row[1], row[2])
