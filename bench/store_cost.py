"""The Store's own cost per usage row, without a proxy around it: deterministic under
callgrind (no clocks decide how rows batch), so a change to the group commit or to
materialize can be measured in seconds instead of a full ``bench/instructions.sh`` run,
whose strict figure moves by +-10k with how rows happened to batch.

N rows (the small JSON bench's row: one constant quantity, no credits) are recorded in
group commits of B rows (strict: appended to the journal; batched: written to the tables)
and, in strict, materialized every M rows, as ``materialize_forever`` does. Per row:

    for n in 300 1500; do valgrind --tool=callgrind --callgrind-out-file=/tmp/sc-$n.out \\
        .venv/bin/python bench/store_cost.py $n 3 15 strict 2>&1 | grep Collected; done
    # instructions per row = (I(1500) - I(300)) / 1200

usage: python bench/store_cost.py N B M strict|batched [ordered|random] [SLICE]

``ITEMS=2`` in the environment gives each row two usage items (the SSE bench's row: two
token meters) instead of one.

Request ids are ordered by default (a counter: like the time-ordered ids the proxy generates
since 2026-11-29);
``random`` gives 32 random hex digits (as generated before, and as many clients send):
each then lands on its own page of the audit's request_id index. SLICE is the
materialize transaction's row limit (default ``MATERIALIZE_SLICE``, as served).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.store.db import MATERIALIZE_SLICE, Store, UsageItem, UsageRow


async def main(n: int, batch: int, every: int, durability: str, ids: str = "ordered",
               slice_rows: int = MATERIALIZE_SLICE) -> None:
    seq = iter(range(10**12))
    rid = ((lambda: os.urandom(16).hex()) if ids == "random" else lambda: f"{next(seq):032x}")
    meters = ("api_calls",) if os.environ.get("ITEMS", "1") == "1" else \
        ("input_tokens", "output_tokens")
    with tempfile.TemporaryDirectory() as d:
        store = Store.open(Path(d) / "m.db", durability=durability)
        done = 0
        while done < n:
            for _ in range(batch):
                store.record(UsageRow(rid(), time.time(), "bench", "key_abcdef",
                                      "all", "v1abc", 200,
                                      [UsageItem(m, 1_000_000, 0, 1_000_000, "")
                                       for m in meters],
                                      method="GET", path="/small"), wait=False)
            store._commit_now()         # one group commit (the loop schedules it in the proxy)
            done += batch
            if durability == "strict" and done % every == 0:
                while store.materialize(limit=slice_rows) >= slice_rows:
                    pass        # one pass of materialize_forever: slices until the journal is empty
        store._closed = True            # (close() would materialize the rest: not per row)
        store.conn.close()
        store._close_maint()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                     *sys.argv[5:6], *[int(x) for x in sys.argv[6:7]]))
