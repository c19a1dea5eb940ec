"""``JournalShipping``: a member's local SQLite journal shipped to the shared database; the
fleet's ``UsageLedger.materialize`` (``proxy.store.postgres.usage``).

``UsageLedger.record`` in fleet mode appends to the member's own ``Store`` journal (strict
durability, no network round trip). ``ship_pending`` then moves every journal row after
the watermark, batch by batch:

1. the rows' grant debits (``proxy.store.postgres.journal.ship_debit_columns``: keyed
   ``(member_id, seq, index)``, a resend inserts nothing; one transaction, none when the
   batch has no debits);
2. the rows themselves through ``Shipper.ship_batch`` (``usage_ledger`` keyed
   ``(member_id, seq)``, leases settled from the rows really inserted, the minutes kept by
   the trigger; atomic), after which the watermark moves.

Each batch is read from the journal straight into the shipping statements' items
(``SqliteJournal.batch_after``: one decode per blob, no row objects).

A crash between 1 and 2 resends both: 1 inserts nothing, 2 inserts the rows. So each row is
counted exactly once in audit, usage and credits (a reader may see a batch's debits a moment
before its usage).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.store.db import UsageRow
from proxy.store.postgres.journal import SqliteJournal, ship_debit_columns, shipped_as
from proxy.store.postgres.pool import PgPool
from proxy.store.postgres.shipping import LocalRow, ShipItem, Shipper


def to_local(seq: int, r: UsageRow) -> LocalRow:
    """Pure: a journal row as the shipper's ``LocalRow``."""
    return LocalRow(seq, r.request_id, int(r.at * 1000), r.customer_id, r.key_id, r.rule,
                    r.rules_version, r.status,
                    tuple(ShipItem(i.meter, i.quantity, i.credits, i.billable, i.flags)
                          for i in r.items), r.method, r.path)


@dataclass(slots=True)
class Renumbering:
    """``JournalShipping.numbered_elsewhere``: the rows to renumber."""

    seqs: list[int]       # never shipped: moved above the watermark (``Store.renumber_journal``)
    debited: int          # not shipped, but their grant debits did (under the old seq, before
                          # the usage): left, so the grant is not debited a second time
    older: int            # not found, but older than what the retention pruned: left


class JournalShipping:
    def __init__(self, pool: PgPool, member_id: str, journal: SqliteJournal,
                 batch_size: int = 1000, instance: str | None = None) -> None:
        """``instance``: the running process's claim on ``member_id``
        (``proxy.store.postgres.members.claim``); every batch checks it."""
        self.pool = pool
        self.member_id = member_id
        self.journal = journal
        self.instance = instance
        self.shipper = Shipper(pool, member_id, batch_size, instance)
        self._loaded = False

    async def resume(self) -> int:
        """Load the shared ledger's watermark for this member id; returns it."""
        watermark = await self.shipper.load_watermark()
        self._loaded = True
        return watermark

    async def numbered_elsewhere(self, watermark: int) -> Renumbering:
        """The journal's rows at or below ``watermark`` (rows above it ship as usual) that
        the shared ledger does not hold under this member id at their seq. A row this
        journal shipped is found there (the same request id, customer and time at that seq:
        the process stopped between a ship and its prune). One that is not, and that the
        audit retention cannot have pruned (journaled at or after the highest cutoff it ever
        deleted below, ``audit_pruned``), never shipped: it was numbered here while another
        process of the id shipped its own rows under those seqs (this one was killed or
        stalled, and another took its id), and the watermark alone would take it for
        shipped. Rows without a usage item have nothing in the ledger to find and are left
        out; so is a row whose grant debits shipped under its seq before its usage did (a
        row journaled in single-process mode, the process gone between the two): shipped
        under a new seq, its credits would debit the grant a second time (counted in
        ``debited``; its usage stays unshipped, as before). One local read and one
        statement per ``batch_size`` rows, only for rows at or below the watermark (none,
        normally)."""
        out = Renumbering([], 0, 0)
        after = 0
        while keys := self.journal.keys_between(after, watermark, self.shipper.batch_size):
            after = keys[-1][1]
            found = await shipped_as(self.pool, self.member_id,
                                     [(rid, seq, cid, at) for rid, seq, cid, at, has in keys
                                      if has])
            for _rid, seq, _cid, at, has in keys:
                if not has or seq in found.shipped:
                    continue
                if at < found.pruned_before:
                    out.older += 1
                    continue
                if seq in found.debited:
                    out.debited += 1
                    continue
                out.seqs.append(seq)
        return out

    async def ship_pending(self) -> int:
        """Ship every journal row after the watermark; returns how many rows shipped.
        Raises PgUnavailable (what committed stays committed; the rest is resent)."""
        if not self._loaded:
            await self.shipper.load_watermark()
            self._loaded = True
        total = 0
        while (b := self.journal.batch_after(self.shipper.watermark,
                                             self.shipper.batch_size)).usage.rows:
            await ship_debit_columns(self.pool, self.member_id, b.debits, self.instance)
            await self.shipper.ship_batch(b.usage)
            total += b.usage.rows
        return total
