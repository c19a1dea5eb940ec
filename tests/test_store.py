"""The Store's journal: strict commits append to it; materialize moves rows into the ledger
exactly once, including after a crash that left rows behind."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from proxy.credits.ledger import Entry
from proxy.store.db import Store, UsageItem, UsageRow, decode_row, encode_row


def _row(i: int) -> UsageRow:
    return UsageRow(f"r{i}", time.time(), "c", "k", "rule", "v1", 200,
                    [UsageItem("m", 1_000_000 + i, 0, 1_000_000 + i, "")], method="GET",
                    path="/x")


@given(st.text(max_size=20), st.integers(0, 10**15), st.lists(st.integers(0, 10**9), max_size=3))
def test_journal_encoding_round_trips(rid: str, q: int, debits: list[int]) -> None:
    r = UsageRow(rid, 1234.5, "c", "k", "rule", "v", 201, [UsageItem("m", q, 1, q, "unreadable")],
                 debits=[("m", Entry(f"g{i}", "debit", d)) for i, d in enumerate(debits)],
                 method="POST", path="/p")
    back = decode_row(encode_row(r))
    assert back == r


async def test_rows_left_in_the_journal_are_recovered_exactly_once(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = Store.open(db)
    for i in range(5):
        store.record(_row(i), wait=True)
    await store.drain()            # commits to the journal, then materializes
    for i in range(5, 8):
        store.record(_row(i), wait=True)
    store._commit_now()            # committed to the journal, not yet materialized ...
    store.conn.close()             # ... and the process "dies"
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == 3
    again = Store.open(db)          # recovery at open
    again.materialize()
    again.close()
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == 0
        rows = c.execute("SELECT request_id FROM audit ORDER BY seq").fetchall()
        (total,) = c.execute("SELECT SUM(quantity) FROM usage_minute").fetchone()
    assert [r[0] for r in rows] == [f"r{i}" for i in range(8)]
    assert total == sum(1_000_000 + i for i in range(8))
