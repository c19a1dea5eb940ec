"""Cost of one outbox staging (runs on the event loop, once per flush), on this machine:

    python bench/staging.py [CUSTOMERS]

CUSTOMERS (default 500) customers with one hour (60 minute rows each) of unstaged usage on one
meter, billing anchors at :30; prints the best of 5 stagings. Run it on another commit to
compare (the outbox module is imported from the working tree).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.store import outbox
from proxy.store.db import connect


def once(n: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as d:
        conn = connect(Path(d) / "b.db")
        base = 1_800_000_000 - 1_800_000_000 % 3600
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO customers(id, stripe_customer_id, created_at, updated_at,"
                         " billing_anchor) VALUES (?,?,0,0,?)",
                         [(f"c{i}", f"cus{i}", base - 3 * 86400 + 1800) for i in range(n)])
        conn.executemany(
            "INSERT INTO usage_minute(customer_id, key_id, meter, minute, rules_version,"
            " quantity, requests, billable) VALUES (?,?,?,?,?,?,?,?)",
            [(f"c{i}", "k", "m", base + 60 * j, "v", 1_500_000, 1, 1_500_000)
             for i in range(n) for j in range(60)])
        conn.execute("COMMIT")
        conn.execute("BEGIN")
        t = time.perf_counter()
        events = outbox.stage(conn, {"m": ("m", None)}, now=base + 7200)
        dt = time.perf_counter() - t
        conn.execute("COMMIT")
        conn.close()
        return dt, len(events)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    runs = [once(n) for _ in range(5)]
    best = min(dt for dt, _ in runs)
    print(f"{n * 60} minute rows -> {runs[0][1]} events: best of 5 stagings {best * 1000:.0f} ms")


if __name__ == "__main__":
    main()
