"""Simulate the fleet's credit leases: many members, Zipf-skewed customers, fixed-cost requests.

Uses the real sizing functions (proxy.fleet.sizing) and a model of the database's escrow
(what proxy.store.postgres.leases does in SQL: grants capped by the available balance, returns,
settlement). Prints, for the whole run:

- overspend: credits admitted beyond each customer's balance (must be 0 for fixed costs);
- false 402s: requests refused while the customer still had credit somewhere (in another
  member's lease): the price of leasing;
- credit held idle in leases: time-averaged unspent lease credit, against the balances;
- refills on the request path (synchronous grants a request waited for) vs ahead of need;
- database operations per second by kind (grants, renewals, returns, shipping batches,
  reaper and leader statements).

    .venv/bin/python bench/lease_sim.py                    # 100 members, 1000 customers, 60 s
    .venv/bin/python bench/lease_sim.py --members 10 --rps 5000 --seconds 30
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from dataclasses import dataclass, field

from proxy.fleet import sizing
from proxy.fleet.sizing import LeasePolicy

C = 1_000_000
TICK_MS = 10


@dataclass(slots=True)
class Lease:
    remaining: int = 0
    until_ms: int = 0
    rate: int = 0
    spent_window: int = 0
    last_use_ms: int = 0


@dataclass(slots=True)
class Customer:
    balance: int
    available: int
    admitted: int = 0
    held: dict[int, Lease] = field(default_factory=dict)   # member -> its active lease
    empty_until: dict[int, int] = field(default_factory=dict)   # member -> 402 locally until


@dataclass(slots=True)
class Result:
    requests: int = 0
    admitted: int = 0
    refused: int = 0
    false_402: int = 0
    overspend: int = 0
    idle_sum: float = 0.0
    idle_samples: int = 0
    balance_sum: float = 0.0
    sync_refills: int = 0          # then admitted
    refused_grants: int = 0        # grant attempts by requests then refused
    ops: Counter[str] = field(default_factory=Counter)


def simulate(members: int, customers: int, rps: int, seconds: int, zipf_s: float, seed: int,
             policy: LeasePolicy, cost: int = C, rtt_ms: int = 5) -> Result:
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** zipf_s for i in range(customers)]
    total_w = sum(weights)
    cum: list[float] = []
    acc = 0.0
    for w in weights:
        acc += w
        cum.append(acc)
    # each customer's balance lasts 10-120 s at its own rate: many run out during the run
    cust = []
    for w in weights:
        rate = rps * w / total_w
        bal = max(cost, int(rate * rng.uniform(10, 120)) * cost)
        cust.append(Customer(bal, bal))
    res = Result()
    per_tick = rps * TICK_MS // 1000
    pending: set[tuple[int, int]] = set()
    shipped_this_second: set[int] = set()

    def grant(m: int, c: int, now: int) -> int:
        cu = cust[c]
        le = cu.held.get(m)
        holders = len(cu.held) + (0 if le is not None else 1)
        size = sizing.lease_size(sizing.want(le.rate if le else 0, policy.cover_ms), policy.floor,
                                 cu.available, policy.k, holders, cost)
        if size == 0:
            return 0
        if le is None:
            le = cu.held[m] = Lease()
        cu.available -= size
        le.remaining += size
        le.until_ms = sizing.usable_until_ms(now, policy.ttl_ms, policy.drift_margin_ppm)
        return size

    def release(m: int, c: int) -> None:
        cust[c].available += cust[c].held.pop(m).remaining

    for now in range(0, seconds * 1000, TICK_MS):
        cs = rng.choices(range(customers), cum_weights=cum, k=per_tick)
        for c in cs:
            m = rng.randrange(members)
            res.requests += 1
            le = cust[c].held.get(m)
            waited = False
            if (le is None or le.remaining < cost or now >= le.until_ms) and \
                    now >= cust[c].empty_until.get(m, 0):
                res.ops["grant (request waits)"] += 1
                if grant(m, c, now) == 0:
                    cust[c].empty_until[m] = now + policy.empty_backoff_ms
                le = cust[c].held.get(m)
                waited = True
            if le is not None and le.remaining >= cost and now < le.until_ms:
                res.sync_refills += waited
                le.remaining -= cost
                le.spent_window += cost
                le.last_use_ms = now
                cust[c].admitted += cost
                res.admitted += 1
                shipped_this_second.add(m)
                if sizing.should_refill(le.remaining, le.rate, rtt_ms, policy.lead_ms,
                                        le.until_ms - now, policy.ttl_ms):
                    pending.add((m, c))
            else:
                res.refused += 1
                res.refused_grants += waited
                elsewhere = sum(x.remaining for mm, x in cust[c].held.items()
                                if mm != m) if cust[c].available < cost else 0
                if cust[c].available >= cost or elsewhere >= cost:
                    res.false_402 += 1
        for m, c in pending:        # refills ahead of need land one round trip later
            res.ops["grant (ahead of need)"] += 1
            grant(m, c, now + rtt_ms)
        pending.clear()
        if now % 1000 == 0:
            for c, cu in enumerate(cust):
                for m, le in list(cu.held.items()):
                    le.rate = sizing.ewma_rate(le.rate, le.spent_window, 1000)
                    le.spent_window = 0
                    if now - le.last_use_ms > policy.cover_ms:
                        res.ops["return idle lease"] += 1
                        release(m, c)
            res.ops["ship batch"] += len(shipped_this_second)
            shipped_this_second.clear()
            res.ops["reaper"] += 1
            res.ops["member heartbeat"] += members
        if now % (policy.ttl_ms // 3) == 0 and now:
            res.ops["leader renew"] += 1
        if now % 100 == 0:
            res.idle_sum += sum(le.remaining for cu in cust for le in cu.held.values())
            res.balance_sum += sum(cu.balance - cu.admitted for cu in cust)
            res.idle_samples += 1
    res.overspend = sum(max(0, cu.admitted - cu.balance) for cu in cust)
    return res


def report(res: Result, seconds: int, args: argparse.Namespace) -> str:
    idle = res.idle_sum / max(1, res.idle_samples) / C
    left = res.balance_sum / max(1, res.idle_samples) / C
    lines = [
        f"members {args.members}, customers {args.customers} (Zipf s={args.zipf}), "
        f"{args.rps} requests/s for {seconds} s, cost 1 credit, lease ttl {args.ttl} s, "
        f"cover {args.cover} s, floor {args.floor} credits, k {args.k}, "
        f"402 backoff {args.backoff} s, seed {args.seed}",
        f"requests            {res.requests}",
        f"admitted            {res.admitted}",
        f"refused (402)       {res.refused}",
        f"false 402s          {res.false_402}  (credit left in another member's lease)",
        f"overspend           {res.overspend / C:g} credits",
        f"idle in leases      {idle:.1f} credits on average "
        f"({100 * idle / max(left, 1e-9):.2f}% of the unspent balances, {left:.0f} credits)",
        f"admitted after waiting for a grant  {res.sync_refills} "
        f"({100 * res.sync_refills / max(1, res.admitted):.2f}% of admitted requests)",
        f"grants asked by refused requests    {res.refused_grants}",
        "database operations per second:",
    ]
    total = 0
    for kind, n in sorted(res.ops.items()):
        lines.append(f"  {kind:<24} {n / seconds:10.1f}")
        total += n
    lines.append(f"  {'total':<24} {total / seconds:10.1f}  "
                 f"({1000 * total / max(1, res.requests):.1f} per 1,000 requests)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--members", type=int, default=100)
    ap.add_argument("--customers", type=int, default=1000)
    ap.add_argument("--rps", type=int, default=20_000)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--ttl", type=float, default=30.0)
    ap.add_argument("--cover", type=float, default=20.0)
    ap.add_argument("--floor", type=int, default=1)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--backoff", type=float, default=1.0,
                    help="seconds a member answers 402 locally after an empty grant")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    policy = LeasePolicy(cover_ms=int(args.cover * 1000), floor=args.floor * C, k=args.k,
                         ttl_ms=int(args.ttl * 1000), empty_backoff_ms=int(args.backoff * 1000))
    res = simulate(args.members, args.customers, args.rps, args.seconds, args.zipf, args.seed,
                   policy)
    print(report(res, args.seconds, args))
    return 0 if res.overspend == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
