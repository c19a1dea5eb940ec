"""A minimal fleet member for tests: a LeaseBook, an in-memory journal and a Shipper, all on
one PgPool. Each admitted request appends one journal row carrying its credits, as the real
member will (the journal row and the lease debit go together)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

from proxy.fleet.book import Decision, LeaseBook
from proxy.fleet.sizing import LeasePolicy
from proxy.store.postgres.leases import LeaseStore
from proxy.store.postgres.pool import PgPool
from proxy.store.postgres.shipping import LocalRow, ShipItem, Shipper

ADMITTED = (Decision.ADMIT, Decision.ADMIT_OWED)


class MemoryJournal:
    def __init__(self) -> None:
        self.rows: list[LocalRow] = []

    def rows_after(self, seq: int, limit: int) -> Sequence[LocalRow]:
        return [r for r in self.rows if r.seq > seq][:limit]


class Member:
    def __init__(self, pool: PgPool, member_id: str, policy: LeasePolicy,
                 fail_mode: Literal["closed", "open"] = "closed", offline_allowance: int = 0,
                 first_seq: int = 1) -> None:
        self.id = member_id
        self.book = LeaseBook(LeaseStore(pool, member_id, policy), fail_mode, offline_allowance)
        self.journal = MemoryJournal()
        self.shipper = Shipper(pool, member_id, batch_size=50)
        self._seq = itertools.count(first_seq)

    async def request(self, customer_id: str, cost: int) -> Decision:
        d = await self.book.admit(customer_id, cost)
        if d in ADMITTED:
            seq = next(self._seq)
            self.journal.rows.append(LocalRow(
                seq, f"{self.id}-{seq}", 0, customer_id, "k", "r", "v1", 200,
                (ShipItem("api_calls", 1_000_000, credits=cost),)))
        return d
