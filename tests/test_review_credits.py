"""Adversarial review of the credit book (h/rev-credits): each test here failed on main
79e37ad. Real proxy, real sockets on 127.0.0.1, real SQLite (a foreign write lock held by
another process, or a trigger put in the database file by another connection)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import Proxy, ProxyFactory
from tests.helpers import wait_until
from tests.stripe_double.fixture import RunningDouble
from tests.test_storage_resilience import foreign_write_lock

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.credits.book import Hold
    from tests.test_plan_lifecycle import Env

Q = 1_000_000

RULES = """\
version: 1
meters:
  units: {stripe_event_name: units}
rules:
  - name: health
    match: {path: /healthz}
    auth: none
  - name: items
    match: {methods: [GET], path: /v1/items}
    usage:
      - {meter: units, quantity: request.query.n, credits: 1}
"""


async def _setup(p: Proxy, credits: str) -> dict[str, str]:
    key = await p.customer_with_key("c1", stripe_customer_id="cus_c1", overage="block")
    await p.admin("POST", "/admin/customers/c1/grants",
                  {"credits": credits, "idempotency_key": "c1-g"}, expect=201)
    return {"Authorization": f"Bearer {key}"}


async def _get(p: Proxy, h: dict[str, str], n: int, rid: str) -> tuple[int, str]:
    async with p.session.get(p.url + f"/v1/items?n={n}",
                             headers={**h, "X-Request-Id": rid}) as r:
        return r.status, await r.text()


def _ledger_balance(p: Proxy) -> int:
    with p.db() as c:
        (granted,) = c.execute("SELECT SUM(amount) FROM grants").fetchone()
        (taken,) = c.execute("SELECT COALESCE(SUM(amount), 0) FROM credit_entries"
                             " WHERE grant_id IS NOT NULL").fetchone()
    return int(granted) - int(taken)


async def test_a_credit_alert_write_that_fails_leaves_the_request_debited_but_unrecorded(
        make_proxy: ProxyFactory, tmp_path: Path) -> None:
    """``Settlement.record`` (proxy/request/settle.py) settles the hold in the book
    (``book.settle``: debits applied in memory), then calls ``ThresholdWatch.check``,
    whose ``alerts.fire`` is a synchronous ``execute_write`` (busy_timeout 0), and only
    then hands the row to the Store. While another process holds the write lock, the
    alert write raises ``DatabaseBusy`` out of settlement: the request answers 503
    storage_unavailable, no usage row is queued and nothing is withdrawn, yet the book
    keeps the debit. The customer loses the credits in memory (the ledger still has them:
    book and ledger disagree until a restart) and is refused with 402 meanwhile."""
    p = await make_proxy(rules_text=RULES, storage={"lock_wait": "1s", "fail_mode": "closed"})
    h = await _setup(p, "2")
    with foreign_write_lock(tmp_path / "meter.db"):
        status, body = await _get(p, h, 2, "locked")    # spends all 2: "depleted" fires
    assert status == 503, body
    with p.db() as c:
        audited = {r for (r,) in c.execute("SELECT request_id FROM audit")}
    assert "locked" not in audited                      # not recorded, never billed ...
    assert _ledger_balance(p) == 2_000_000              # ... and the ledger kept the credits
    credits = await p.admin("GET", "/admin/customers/c1/grants", expect=200)
    assert credits["balance"] == "2", credits           # the book must agree with the ledger

    async def healthy() -> bool:
        return bool(p.server.rt.store.healthy)
    await wait_until(healthy)
    status, body = await _get(p, h, 1, "after")
    assert status == 200, body


async def test_a_withheld_row_with_debt_is_withdrawn_and_the_batch_is_kept(
        make_proxy: ProxyFactory, tmp_path: Path) -> None:
    """Store invariant 8: a row whose answer was withheld (503 metering_unavailable) is
    dropped and its credit debits handed to ``store.on_withdraw`` (proxy/app.py), which
    turns every settlement entry into a negative ``refund`` on its grant. An enforced
    ``block`` customer's settlement also has a ``debt`` entry (grant_id ""): the
    negative refund on grant "" raises KeyError inside ``Store._on_failure``. The debt of
    the request never served stays on the book, and the failure handler stops before it
    puts the failed batch back in ``_pending``."""
    p = await make_proxy(rules_text=RULES, storage={"lock_wait": "1s", "fail_mode": "closed"})
    h = await _setup(p, "10")
    # fire the threshold alerts first, so the failing request's settlement writes none
    assert (await _get(p, h, 9, "first"))[0] == 200
    # the group commit fails (not a lock: a trigger refusing the journal insert)
    with sqlite3.connect(str(tmp_path / "meter.db")) as c:
        c.execute("CREATE TRIGGER review_fail BEFORE INSERT ON journal"
                  " BEGIN SELECT RAISE(ABORT, 'review: commit refused'); END")
    # holds the 1-unit floor (1 credit, all that is left), measures 5: 1 debited, 4 debt
    status, body = await _get(p, h, 5, "withheld")
    assert status == 503 and "metering_unavailable" in body, body
    with sqlite3.connect(str(tmp_path / "meter.db")) as c:
        c.execute("DROP TRIGGER review_fail")
    credits = await p.admin("GET", "/admin/customers/c1/grants", expect=200)
    # never billed: the 1 credit debited is back and no debt is owed for it
    assert credits["debt"] == "0", credits
    assert credits["balance"] == "1", credits

    async def healthy() -> bool:
        return bool(p.server.rt.store.healthy)
    await wait_until(healthy)
    assert (await _get(p, h, 1, "after"))[0] == 200
    with p.db() as c:
        audited = {r for (r,) in c.execute("SELECT request_id FROM audit")}
    assert audited == {"first", "after"}


async def rollover_with_request_in_flight(tmp: Path, held: int) -> tuple[Env, Hold]:
    """The test plan's rollover price (allowance 50, cap 80): period 0 (ending at S0) paid,
    and a request holding ``held`` micro-credits admitted on its grant 1 s before the period
    ends, still in flight (tests/test_plan_lifecycle.py's Env)."""
    from tests.test_plan_lifecycle import DAY, S0, Clock, Env, _at, _inv

    env = await Env.open(tmp, Clock(0))
    p0 = (S0 - 30 * DAY, S0)
    await _at(env, p0[0] + 5, "evt_0", "invoice.paid",
              _inv("in_0", "price_roll", p0, "subscription_create"))
    hold = env.credits.book.try_hold("acme", held, S0 - 1, block=True, debt_ok=True)
    assert hold is not None
    return env, hold


async def test_a_rollover_close_does_not_take_credits_an_in_flight_request_was_admitted_on(
        tmp_path: Path) -> None:
    """docs/credits.md, "Expiry at admission": a request is settled against the grants live
    when it was admitted, and a grant's ``expire`` entry is held back while a request
    admitted before its ``expires_at`` is in flight. ``WebhookReceiver._close_previous``
    (proxy/webhooks.py), run when a rollover plan's next period is granted, writes the
    previous grant's ``expire`` entry for all it has left without that check. A request
    admitted one second before the boundary and settled after it then finds the grant
    empty: its cost becomes debt (a ``bill`` customer's: invoiced overage) although the
    same credits were carried into the new grant, and with a cap the customer ends up
    with less than if the request had settled a moment earlier."""
    from tests.test_plan_lifecycle import DAY, S0, _at, _inv

    env, hold = await rollover_with_request_in_flight(tmp_path, 10_000_000)
    try:
        book = env.credits.book
        # the renewal (allowance 50, rollover cap 80) arrives just after the boundary: it
        # waits while the request admitted on the previous period's grant is in flight
        out = await _at(env, S0 + 5, "evt_1", "invoice.paid",
                        _inv("in_1", "price_roll", (S0, S0 + 30 * DAY), "subscription_cycle"),
                        status="waiting_period")
        assert "in flight" in out["reason"], out
        await env.hooks.drain()                         # not due yet: nothing changes
        assert book.balance("acme", S0 + 5) == 0        # the old grant has expired for new ones
        (entries, uncovered), = book.settle(hold, [10_000_000], S0 + 10)
        assert uncovered == 0
        # covered by the grant it was admitted on, as a request settled before the renewal
        assert [e.kind for e in entries] == ["debit"], entries
        assert book.debt("acme") == 0
        env.clock.t = S0 + 10
        assert await env.hooks.drain() == 1             # due again, nothing in flight: granted
        # 50 + what the first period had left after the request (40), capped at 80
        assert book.balance("acme", S0 + 10) == 80_000_000
    finally:
        env.store.close()


async def test_a_rollover_renewal_granted_at_invoice_creation_also_waits_for_the_request(
        tmp_path: Path) -> None:
    """The same at ``invoice.created`` (a renewal granted before its payment): it waits while
    the request admitted on the previous grant is in flight, then carries what is left."""
    from tests.test_plan_lifecycle import DAY, S0, _at, _inv

    env, hold = await rollover_with_request_in_flight(tmp_path, 10_000_000)
    try:
        book = env.credits.book
        await _at(env, S0 + 5, "evt_1", "invoice.created",
                  _inv("in_1", "price_roll", (S0, S0 + 30 * DAY), "subscription_cycle"),
                  status="waiting_period")
        (entries, _), = book.settle(hold, [10_000_000], S0 + 10)
        assert [e.kind for e in entries] == ["debit"], entries
        env.clock.t = S0 + 10
        assert await env.hooks.drain() == 1
        assert book.debt("acme") == 0
        assert book.balance("acme", S0 + 10) == 80_000_000
    finally:
        env.store.close()


async def test_a_withheld_monetary_row_leaves_no_debt_cover_and_no_covered_burn(
        make_proxy: ProxyFactory, stripe_double: RunningDouble, tmp_path: Path) -> None:
    """The monetary mode: settlement moves the customer's money account (the period's
    total, what it burned and what credits covered; ``Account.cover`` adds the request's
    debt to ``debt_total``, which the mirror covers at Stripe with a promotional grant).
    When the row is withheld (503, never reported to Stripe) only the grant debits are
    given back (``store.on_withdraw``): the account keeps the burn, the covered amount and
    the debt. Stripe then gets a promotional credit for usage it never saw (credit given
    away), and the balance check reports a difference that is not there."""
    from proxy.periods import period_bounds
    from tests.test_credits_mirror import CUS, TOKEN_RULES, TOKENS_PRICE, _stripe

    stripe_double.state.add_meter("llm_tokens", id="mtr_tokens")
    stripe_double.state.add_price(TOKENS_PRICE)
    stripe_double.state.add_subscription(CUS, ["price_tokens"], period_bounds(None, time.time()))
    p = await make_proxy(rules_text=TOKEN_RULES, stripe=_stripe(stripe_double),
                         credits={"mode": "monetary"})
    key = await p.customer_with_key("acme", stripe_customer_id=CUS, overage="block")
    await p.admin("POST", "/admin/customers/acme/grants", {"credits": "0.10"}, expect=201)
    h = {"Authorization": f"Bearer {key}"}
    with sqlite3.connect(str(tmp_path / "meter.db")) as c:
        c.execute("CREATE TRIGGER review_fail BEFORE INSERT ON journal"
                  " BEGIN SELECT RAISE(ABORT, 'review: commit refused'); END")
    # 40 tokens at 1 cent: 10 cents covered, 30 cents of debt; the commit fails -> 503
    async with p.session.post(p.url + "/v1/chat/completions", json={}, headers=h) as r:
        assert r.status == 503, await r.text()
    with sqlite3.connect(str(tmp_path / "meter.db")) as c:
        c.execute("DROP TRIGGER review_fail")

    async def grant_mirrored() -> bool:
        rows = (await p.admin("GET", "/admin/credits/mirrors?customer_id=acme",
                              expect=200))["mirrors"]
        return any(r["grant_id"].startswith("grt_") and r["status"] == "mirrored"
                   for r in rows)
    await wait_until(grant_mirrored)
    await asyncio.sleep(2.5)        # the mirror compares the book with its table every second
    covers = [g.value for g in stripe_double.state.credit_grants.grants.values()
              if g.metadata["meterproxy_grant"].startswith("debt:")]
    assert covers == [], covers     # no debt was ever reported: nothing to cover
    got = await p.admin("GET", "/admin/customers/acme/grants", expect=200)
    assert (got["balance"], got["debt"]) == ("0.1", "0"), got
    [check] = (await p.admin("POST", "/admin/credits/balance-check",
                             {"customer_id": "acme"}, expect=200))["checks"]
    assert check["difference"] == 0, check


async def _rollover_refund(tmp: Path, refund_first: bool) -> int:
    """A rollover plan (50 a period, no cap): period 0 paid 20.00 and nothing spent, its
    charge fully refunded, and period 1's renewal; the balance just after both."""
    from proxy.config import CreditPlan
    from tests.test_plan_lifecycle import CFG, DAY, S0, Clock, Env, _at, _inv
    from tests.test_webhooks_lifecycle import _charge

    cfg = CFG.model_copy(deep=True)
    cfg.credits.plans["price_roll"] = CreditPlan.model_validate(
        {"allowance": "50", "mode": "rollover"})
    env = await Env.open(tmp, Clock(0), cfg)
    try:
        p0 = (S0 - 30 * DAY, S0)
        await _at(env, p0[0] + 5, "evt_0", "invoice.paid",
                  _inv("in_0", "price_roll", p0, "subscription_create", charge="ch_1",
                       payment_intent="pi_1", amount_paid=2000))

        async def refund(t: int) -> None:
            await _at(env, t, "evt_r", "charge.refunded", _charge("cus_acme", "in_0", 2000, 2000))

        async def renew(t: int) -> None:
            await _at(env, t, "evt_1", "invoice.paid",
                      _inv("in_1", "price_roll", (S0, S0 + 30 * DAY), "subscription_cycle",
                           amount_paid=2000))
        if refund_first:
            await refund(S0 - 60)
            await renew(S0 + 5)
        else:
            await renew(S0 + 5)
            await refund(S0 + 60)
        return env.balance(S0 + 120)
    finally:
        env.store.close()


async def test_a_refunded_rollover_allowance_is_not_kept_through_the_carry(tmp_path: Path) -> None:
    """A refund takes back a plan grant's unused credit (docs/credits.md, "Refunds"): period
    0's 50 credits, refunded in full before the renewal, are gone (the renewal carries
    nothing: 50). Refunded a minute after the renewal, the same 50 credits have been
    carried into period 1's grant by ``_close_previous``, which wrote them as an ``expire``
    entry on the old grant; the claw-back (``proxy.credits.ledger.clawback``) treats them
    as "expired unused, absorbs its share, takes nothing", so the customer keeps the
    refunded allowance: 100, not 50, depending only on which event came first."""
    before = await _rollover_refund(tmp_path / "a", refund_first=True)
    after = await _rollover_refund(tmp_path / "b", refund_first=False)
    assert before == 50_000_000
    assert after == before


async def test_rollover_after_a_written_off_renewal_paid_late_carries_from_the_paid_grant(
        tmp_path: Path) -> None:
    """A rollover renewal granted at ``invoice.created``, written off
    (``invoice.marked_uncollectible``: its grant clawed back) and then paid: the allowance is
    granted anew under ``stripe:plan:<sub>:<start>:paid:<invoice>``, beside the clawed-back
    grant of the same period start. The next renewal's ``_close_previous`` asks the ledger
    for "the" previous period grant (``previous_period_grant``: ``ORDER BY period_start
    DESC LIMIT 1``, a tie between the two) and gets the clawed-back one: it carries 0 and
    leaves the paid grant's 50 to expire. With nothing spent the customer should hold
    50 + 50 (rollover_expiry next_period: only the paid grant's own allowance moves on)."""
    from proxy.config import CreditPlan
    from tests.test_plan_lifecycle import CFG, DAY, S0, S1, S2, Clock, Env, _at, _inv

    cfg = CFG.model_copy(deep=True)
    cfg.credits.plans["price_roll"] = CreditPlan.model_validate(
        {"allowance": "50", "mode": "rollover"})
    env = await Env.open(tmp_path, Clock(0), cfg)
    try:
        await _at(env, S0 + 5, "evt_0", "invoice.paid",
                  _inv("in_0", "price_roll", (S0, S1), "subscription_create", amount_paid=2000))
        renewal = _inv("in_1", "price_roll", (S1, S2), "subscription_cycle", amount_due=2000)
        out = await _at(env, S1 + 30, "evt_c", "invoice.created", renewal)
        assert out["grants"][0]["credits"] == "100"                 # 50 + 50 carried
        await _at(env, S1 + DAY, "evt_u", "invoice.marked_uncollectible", renewal)
        assert env.balance(S1 + DAY) == 0
        paid = await _at(env, S1 + 2 * DAY, "evt_p", "invoice.paid", renewal)
        assert paid["grants"][0]["credits"] == "100"                # granted anew
        s3 = S2 + 30 * DAY
        nxt = await _at(env, S2 + 5, "evt_n", "invoice.paid",
                        _inv("in_2", "price_roll", (S2, s3), "subscription_cycle",
                             amount_paid=2000))
        assert nxt["grants"][0]["credits"] == "100", nxt
    finally:
        env.store.close()


async def test_the_expiry_task_survives_a_locked_database(make_proxy: ProxyFactory,
                                                         tmp_path: Path) -> None:
    """``CreditService.run_expiry`` writes expiry (and repayment) entries with
    ``ledger.append``, a synchronous ``execute_write`` (busy_timeout 0). If another process
    holds the SQLite write lock when a grant's expiry is due, ``DatabaseBusy`` escapes the
    loop and the ``credit-expiry`` task ends for good (``proxy.tasks`` only logs it): no
    grant's ``expire`` entry is ever written again, and debt owed out of a grant that
    becomes effective later (``repay_due``) is never repaid, until a restart."""
    import time as _time

    p = await make_proxy(rules_text=RULES, storage={"lock_wait": "1s", "fail_mode": "closed"})
    await p.customer_with_key("c1", stripe_customer_id="cus_c1")
    first = int(_time.time()) + 2
    await p.admin("POST", "/admin/customers/c1/grants",
                  {"credits": "5", "expires_at": first, "idempotency_key": "g1"}, expect=201)
    with foreign_write_lock(tmp_path / "meter.db"):
        await asyncio.sleep(first + 1.5 - _time.time())    # the expiry falls due while locked
    second = int(_time.time()) + 2
    await p.admin("POST", "/admin/customers/c1/grants",
                  {"credits": "3", "expires_at": second, "idempotency_key": "g2"}, expect=201)

    async def both_expired() -> bool:
        with p.db() as c:
            (n,) = c.execute("SELECT COUNT(*) FROM credit_entries WHERE kind='expire'"
                             ).fetchone()
        return int(n) == 2
    await wait_until(both_expired, timeout=8.0, what="both grants' expiry entries")


# ---- the claw-back follows carried credits (docs/credits.md, "Refunds, disputes and credit
# notes"): the edges of the fix of the test above

def _roll_cfg(**plan: str) -> Config:
    from proxy.config import CreditPlan
    from tests.test_plan_lifecycle import CFG

    cfg = CFG.model_copy(deep=True)
    cfg.credits.plans["price_roll"] = CreditPlan.model_validate(
        {"allowance": "50", "mode": "rollover", **plan})
    return cfg


def _refund(charge: str, inv: str, refunded: int) -> dict[str, object]:
    return {"id": charge, "object": "charge", "customer": "cus_acme", "invoice": inv,
            "payment_intent": "pi_" + charge, "amount": 2000, "amount_refunded": refunded}


async def _renewed(tmp: Path, cfg: Config, periods: int = 2) -> Env:
    """Period 0 paid 20.00 by ``ch_0`` (invoice in_0), then ``periods - 1`` renewals, each
    paid by ``ch_<n>``; nothing spent. The last period ends in the future."""
    from tests.test_plan_lifecycle import DAY, S0, Clock, Env, _at, _inv

    env = await Env.open(tmp, Clock(0), cfg)
    bounds = [S0 - 30 * DAY + n * 30 * DAY for n in range(periods + 1)]
    bounds[-1] += 30 * DAY
    for n in range(periods):
        await _at(env, bounds[n] + 5, f"evt_{n}", "invoice.paid",
                  _inv(f"in_{n}", "price_roll", (bounds[n], bounds[n + 1]),
                       "subscription_create" if n == 0 else "subscription_cycle",
                       charge=f"ch_{n}", payment_intent=f"pi_ch_{n}", amount_paid=2000))
    return env


async def _spend(env: Env, credits: int, at: float) -> None:
    """``Env.spend``, its settlement entries also written to the ledger (what the group
    commit does with a usage row's debits and debt), so the ledger reloads them."""
    from proxy.store.protocols import LedgerEntry

    hold = env.credits.book.try_hold("acme", credits, at, block=True, debt_ok=True)
    assert hold is not None
    for entries, _ in env.credits.book.settle(hold, [credits], at):
        await env.credits.ledger.append([LedgerEntry("acme", e, f"req-{at}", at=at)
                                         for e in entries])


def _reloaded_balance(env: Env, at: float) -> tuple[int, int]:
    from proxy.credits.service import load_book
    from proxy.store.ledger import load

    book = load_book(load(env.store.conn))
    return book.balance("acme", at), book.debt("acme")


@pytest.mark.parametrize(("spent", "balance", "debt"), [(30, 20, 0), (80, -30, 30)])
async def test_a_refund_after_the_renewal_takes_carried_credits_spent_or_not(
        tmp_path: Path, spent: int, balance: int, debt: int) -> None:
    """Period 0's 50 carried into period 1's grant (100), ``spent`` of it used, then period
    0's payment refunded: the 50 carried are taken from the new grant's unused credit, and
    what of them was spent becomes debt (the rule for spent credit): 100 - 30 - 50 = 20;
    100 - 80 leaves 20 unused, so 20 are taken and 30 owed."""
    from tests.test_plan_lifecycle import S0, _at

    env = await _renewed(tmp_path, _roll_cfg())
    try:
        assert env.balance(S0 + 6) == 100 * Q
        assert env.spend(spent * Q, S0 + 10)
        out = await _at(env, S0 + 60, "evt_r", "charge.refunded", _refund("ch_0", "in_0", 2000))
        assert env.balance(S0 + 120) == balance * Q, out
        assert env.credits.book.debt("acme") == debt * Q
        [(gid, debt_entry)] = [(r["grant_id"], r["debt"]) for r in out["clawed_back"]
                               if r["grant_id"] != _grant_of(env, "in_0")]
        assert debt_entry == str(debt)
        assert gid == _grant_of(env, "in_1")
    finally:
        env.store.close()


def _grant_of(env: Env, inv: str) -> str:
    (gid,) = env.store.conn.execute("SELECT grant_id FROM plan_invoices WHERE invoice_id=?",
                                    (inv,)).fetchone()
    return str(gid)


async def test_a_followed_refund_is_taken_once_under_replay_and_only_its_increase(
        tmp_path: Path) -> None:
    """Half of period 0's payment refunded after the renewal (25 credits followed into the
    new grant), the same cumulative refund replayed under another event id (nothing more),
    then the rest (the other 25). The ledger, reloaded, holds what the book holds."""
    from tests.test_plan_lifecycle import S0, _at

    env = await _renewed(tmp_path, _roll_cfg())
    try:
        await _at(env, S0 + 60, "evt_r1", "charge.refunded", _refund("ch_0", "in_0", 1000))
        assert env.balance(S0 + 61) == 75 * Q
        again = await _at(env, S0 + 70, "evt_r1b", "charge.refunded",
                          _refund("ch_0", "in_0", 1000), status="ignored")
        assert "already taken" in again["reason"], again
        assert env.balance(S0 + 71) == 75 * Q
        await _at(env, S0 + 80, "evt_r2", "charge.refunded", _refund("ch_0", "in_0", 2000))
        assert env.balance(S0 + 81) == 50 * Q
        assert _reloaded_balance(env, S0 + 81) == (50 * Q, 0)
        # more than all of it changes nothing: never more than was carried
        await _at(env, S0 + 90, "evt_r3", "charge.refunded", _refund("ch_0", "in_0", 4000),
                  status="ignored")
        assert env.balance(S0 + 91) == 50 * Q
    finally:
        env.store.close()


@pytest.mark.parametrize("refunded", [2000, 1000])
async def test_a_refund_after_a_capped_carry_takes_what_it_would_have_before(
        tmp_path: Path, refunded: int) -> None:
    """cap 80: the renewal carries 30 of period 0's 50 and 20 expire. Refunded in full
    before the renewal, the new grant is 50; after it, the 20 that expired absorb their
    share and the 30 carried are taken: 50. Half refunded before: 25 left, carried whole
    (75); after: 20 absorbed, 5 taken: 75."""
    from tests.test_plan_lifecycle import S0, _at

    before = await _renewed(tmp_path / "a", _roll_cfg(cap="80"), periods=1)
    try:
        await _at(before, S0 - 60, "evt_r", "charge.refunded",
                  _refund("ch_0", "in_0", refunded))
        from tests.test_plan_lifecycle import DAY, _inv
        await _at(before, S0 + 5, "evt_1", "invoice.paid",
                  _inv("in_1", "price_roll", (S0, S0 + 60 * DAY), "subscription_cycle",
                       amount_paid=2000))
        expected = before.balance(S0 + 120)
    finally:
        before.store.close()
    after = await _renewed(tmp_path / "b", _roll_cfg(cap="80"))
    try:
        assert after.balance(S0 + 6) == 80 * Q
        await _at(after, S0 + 60, "evt_r", "charge.refunded", _refund("ch_0", "in_0", refunded))
        assert after.balance(S0 + 120) == expected == (50 if refunded == 2000 else 75) * Q
    finally:
        after.store.close()


@pytest.mark.parametrize(("expiry", "balance"), [("never", 100), ("next_period", 100)])
async def test_a_refund_follows_a_carry_chain_or_stops_where_the_carry_expired(
        tmp_path: Path, expiry: str, balance: int) -> None:
    """Three periods, nothing spent, period 0's payment refunded after the third began.
    ``rollover_expiry: never``: 50, 100, 150; period 0's 50 went on into the third grant,
    and the refund follows them there: 100 (refunded first: 50, 50, 100). ``next_period``:
    50, 100, 100; period 0's 50 expired with the second grant (carried once), so the
    refund takes nothing more: 100, as when refunded first."""
    from tests.test_plan_lifecycle import S1, _at

    env = await _renewed(tmp_path, _roll_cfg(rollover_expiry=expiry), periods=3)
    try:
        assert env.balance(S1 + 6) == (150 if expiry == "never" else 100) * Q
        await _at(env, S1 + 60, "evt_r", "charge.refunded", _refund("ch_0", "in_0", 2000))
        assert env.balance(S1 + 120) == balance * Q
        assert env.credits.book.debt("acme") == 0
        assert _reloaded_balance(env, S1 + 120) == (balance * Q, 0)
    finally:
        env.store.close()


@pytest.mark.parametrize("first", ["refund", "void"])
async def test_a_receiving_grant_already_refunded_or_voided_gives_nothing_twice(
        tmp_path: Path, first: str) -> None:
    """The grant the carry went into (50 allowance + 50 carried) was itself refunded in
    full (its own payment bought the 50 allowance: those go, the 50 carried stay until
    period 0's refund follows them) or voided by an operator (the 50 carried left with
    it): either way period 0's refund then leaves nothing and owes nothing, and the two
    never take more than the grant held."""
    from tests.test_plan_lifecycle import S0, _at

    env = await _renewed(tmp_path, _roll_cfg())
    try:
        if first == "refund":
            await _at(env, S0 + 30, "evt_r1", "charge.refunded", _refund("ch_1", "in_1", 2000))
        else:
            await env.credits.void(_grant_of(env, "in_1"))
        assert env.balance(S0 + 31) == (50 * Q if first == "refund" else 0)
        out = await _at(env, S0 + 60, "evt_r0", "charge.refunded", _refund("ch_0", "in_0", 2000))
        assert env.balance(S0 + 120) == 0, out
        assert env.credits.book.debt("acme") == 0
        assert _reloaded_balance(env, S0 + 120) == (0, 0)
    finally:
        env.store.close()


async def test_a_refund_after_the_receiving_grant_expired_unspent_takes_nothing_more(
        tmp_path: Path) -> None:
    """The subscription ended after period 1 (no further renewal) and period 1's grant
    (50 + 50 carried) expired unspent: period 0's refund then finds its carried credits
    expired in the receiving grant, where they absorb their share: nothing is taken and
    nothing owed (refunded first, the customer would have ended with 0 as well)."""
    from tests.test_plan_lifecycle import DAY, S0, _at

    env = await _renewed(tmp_path, _roll_cfg())
    try:
        end = S0 + 60 * DAY                         # period 1's end (see _renewed)
        assert await env.credits.expire_due(end + 1) == 1
        out = await _at(env, end + 60, "evt_r", "charge.refunded",
                        _refund("ch_0", "in_0", 2000))
        assert all(r["unused_taken"] == "0" and r["debt"] == "0"
                   for r in out["clawed_back"]), out
        assert env.balance(end + 120) == 0 and env.credits.book.debt("acme") == 0
        assert _reloaded_balance(env, end + 120) == (0, 0)
    finally:
        env.store.close()


async def _capped_chain(tmp: Path, spent: int, refund_first: bool) -> int:
    """cap 70, allowance 50 (``rollover_expiry: next_period``): period 0 paid by ``ch_0``
    and ``spent`` of its 50 used, then two renewals, nothing spent after; ``ch_0``
    refunded in full before the first renewal or after the second. The balance (live
    credits minus debt) at the end."""
    from tests.test_plan_lifecycle import DAY, S0, Clock, Env, _at, _inv

    env = await Env.open(tmp, Clock(0), _roll_cfg(cap="70"))
    try:
        b = [S0 - 30 * DAY, S0, S0 + 30 * DAY, S0 + 90 * DAY]
        for n in range(3):
            if n == 1 and refund_first:
                await _at(env, b[1] - 60, "evt_r", "charge.refunded",
                          _refund("ch_0", "in_0", 2000))
            await _at(env, b[n] + 5, f"evt_{n}", "invoice.paid",
                      _inv(f"in_{n}", "price_roll", (b[n], b[n + 1]),
                           "subscription_create" if n == 0 else "subscription_cycle",
                           charge=f"ch_{n}", payment_intent=f"pi_ch_{n}", amount_paid=2000))
            # the grant repays debt at once (here at the simulated time: S0 is in the past)
            await env.credits.repay_due(b[n] + 6)
            if n == 0:
                await _spend(env, spent * Q, b[0] + 10)
        if not refund_first:
            await _at(env, b[2] + 60, "evt_r", "charge.refunded", _refund("ch_0", "in_0", 2000))
        await env.credits.repay_due(b[2] + 100)
        # the ledger reloaded (what a restart loads) holds what the book holds
        assert _reloaded_balance(env, b[2] + 120) == (env.balance(b[2] + 120),
                                                      env.credits.book.debt("acme"))
        return env.balance(b[2] + 120)
    finally:
        env.store.close()


@pytest.mark.parametrize("spent", [30, 50])
async def test_a_refund_after_two_capped_renewals_takes_what_it_would_have_before(
        tmp_path: Path, spent: int) -> None:
    """docs/credits.md ("Carry chains"): a refund after two renewals takes what it would
    have taken had it come first. cap 70, period 0 spent 30 of 50: refunded first, its 20
    unused are taken and its 30 spent are owed and repaid by period 1's grant at once (50
    -> 20), which period 2 carries (70). Refunded after period 2: period 1's grant (50 +
    20 carried = 70, unspent) went into period 2's grant capped (70, 50 expired). The 20
    followed and the 30 spent, owed on to period 1's grant (which would have repaid them),
    are both absorbed by its 50 that expired: 70 again. (Before the fix the 30 were debt
    repaid out of period 2's 70: 40. spent 50: no carry at all, the 50 owed on are
    absorbed by period 1's 30 that expired and the 20 it carried on are taken from period
    2's grant: 50, as when refunded first; it was 20.) The ledger reloaded agrees."""
    before = await _capped_chain(tmp_path / "a", spent, refund_first=True)
    after = await _capped_chain(tmp_path / "b", spent, refund_first=False)
    assert before == (70 if spent == 30 else 50) * Q
    assert after == before, (after, before)


@pytest.mark.parametrize("order", ["previous_first", "renewal_first"])
async def test_two_refunds_after_the_renewal_take_what_each_payment_bought(
        tmp_path: Path, order: str) -> None:
    """Period 0's payment (20.00, 50 credits) refunded in full and period 1's (20.00, 50
    credits) refunded by half: 75 credits' worth of money returned. Refunded before the
    renewal, period 0's refund takes its 50 and period 1's grant is 50, half of which the
    second refund takes: 25 left. After the renewal, period 1's grant is 100 (50 carried):
    its half refund takes half of what its own payment bought (50 of the 100: the carried
    50 were bought by period 0's payment), 25, and period 0's refund follows its 50
    carried credits into the same grant: 25 left, in either order. (Before the fix it took
    half of the whole 100: 0 left.)"""
    from tests.test_plan_lifecycle import DAY, S0, _at, _inv

    first = await _renewed(tmp_path / "a", _roll_cfg(), periods=1)
    try:
        await _at(first, S0 - 60, "evt_r0", "charge.refunded", _refund("ch_0", "in_0", 2000))
        await _at(first, S0 + 5, "evt_1", "invoice.paid",
                  _inv("in_1", "price_roll", (S0, S0 + 60 * DAY), "subscription_cycle",
                       charge="ch_1", payment_intent="pi_ch_1", amount_paid=2000))
        await _at(first, S0 + 60, "evt_r1", "charge.refunded", _refund("ch_1", "in_1", 1000))
        expected = first.balance(S0 + 120)
    finally:
        first.store.close()
    assert expected == 25 * Q
    env = await _renewed(tmp_path / "b", _roll_cfg())
    try:
        assert env.balance(S0 + 6) == 100 * Q
        refunds = [("evt_r0", "ch_0", "in_0", 2000), ("evt_r1", "ch_1", "in_1", 1000)]
        if order == "renewal_first":
            refunds.reverse()
        for i, (eid, ch, inv, amount) in enumerate(refunds):
            await _at(env, S0 + 60 + i, eid, "charge.refunded", _refund(ch, inv, amount))
        assert env.balance(S0 + 120) == expected
    finally:
        env.store.close()


@pytest.mark.parametrize("order", ["previous_first", "renewal_first", "before_the_renewal"])
async def test_two_refunds_of_a_spent_chain_owe_what_they_would_have_first(
        tmp_path: Path, order: str) -> None:
    """Period 0's 50 all spent, then both payments refunded in full. Had period 0's refund
    come first, its 50 spent would be debt, repaid at once by period 1's grant (50 -> 0),
    and period 1's own refund would then find those 50 spent (repaid) and owe them again:
    -50. After the renewal, period 0's refund owes its 50 on to period 1's grant (its 50
    unused taken) and they count in that grant's spent layer, as its repayment would: period
    1's refund, before or after, owes them: -50 in every order, and the ledger reloaded
    agrees."""
    from tests.test_plan_lifecycle import DAY, S0, Clock, Env, _at, _inv

    env = await Env.open(tmp_path, Clock(0), _roll_cfg())
    try:
        await _at(env, S0 - 30 * DAY + 5, "evt_0", "invoice.paid",
                  _inv("in_0", "price_roll", (S0 - 30 * DAY, S0), "subscription_create",
                       charge="ch_0", payment_intent="pi_ch_0", amount_paid=2000))
        await _spend(env, 50 * Q, S0 - 30 * DAY + 10)
        refunds = [("evt_r0", "ch_0", "in_0"), ("evt_r1", "ch_1", "in_1")]
        if order == "before_the_renewal":
            await _at(env, S0 - 60, "evt_r0", "charge.refunded", _refund("ch_0", "in_0", 2000))
            refunds = refunds[1:]
        elif order == "renewal_first":
            refunds.reverse()
        await _at(env, S0 + 5, "evt_1", "invoice.paid",
                  _inv("in_1", "price_roll", (S0, S0 + 60 * DAY), "subscription_cycle",
                       charge="ch_1", payment_intent="pi_ch_1", amount_paid=2000))
        await env.credits.repay_due(S0 + 6)
        for i, (eid, ch, inv) in enumerate(refunds):
            await _at(env, S0 + 60 + i, eid, "charge.refunded", _refund(ch, inv, 2000))
        await env.credits.repay_due(S0 + 100)
        assert (env.balance(S0 + 120), env.credits.book.debt("acme")) == (-50 * Q, 50 * Q)
        assert _reloaded_balance(env, S0 + 120) == (-50 * Q, 50 * Q)
    finally:
        env.store.close()


async def test_a_refund_owes_nothing_on_to_a_next_period_grant_not_effective_yet(
        tmp_path: Path) -> None:
    """docs/credits.md ("Carry chains"): the spent share is owed on to the next period's
    grant only once that grant is effective. A ``reset`` renewal paid early exists but is
    pending: the refunded current period's 30 spent are debt (repaid when the renewal
    becomes effective, as if the refund had come before it was paid), and the pending grant
    keeps its 50. The ledger reloaded agrees."""
    from tests.test_plan_lifecycle import DAY, S1, S2, Clock, Env, _at, _inv

    env = await Env.open(tmp_path, Clock(0))
    try:
        await _at(env, S1 + 5, "evt_1", "invoice.paid",
                  _inv("in_1", "price_basic", (S1, S2), "subscription_create",
                       charge="ch_1", payment_intent="pi_ch_1", amount_paid=2000))
        now = time.time()
        await _spend(env, 30 * Q, now)
        await _at(env, now, "evt_2", "invoice.paid",
                  _inv("in_2", "price_basic", (S2, S2 + 30 * DAY), "subscription_cycle",
                       charge="ch_2", payment_intent="pi_ch_2", amount_paid=2000))
        nxt = env.credits.book.grant(_grant_of(env, "in_2"))
        assert nxt is not None and nxt.pending(now)
        out = await _at(env, now + 1, "evt_r", "charge.refunded", _refund("ch_1", "in_1", 2000))
        assert [(r["unused_taken"], r["debt"]) for r in out["clawed_back"]] == [("20", "30")]
        assert (env.balance(now + 2), env.credits.book.debt("acme")) == (-30 * Q, 30 * Q)
        assert nxt.remaining == 50 * Q
        assert _reloaded_balance(env, now + 2) == (-30 * Q, 30 * Q)
    finally:
        env.store.close()


async def _written_off_then_refunded(tmp: Path, refund_first: bool, cap: str | None,
                                     between: int, later: int) -> int:
    """Period 0 (50, paid 20.00 by ``ch_0``, unspent); period 1's renewal granted at
    ``invoice.created`` (50 + 50 carried, ``cap``), written off, then paid (granted anew
    under ``:paid:``, carrying period 0's credits again). ``ch_0`` refunded (cumulative
    minor units) ``between`` the write-off and the late payment and ``later`` after it, or
    (``refund_first``) ``later`` before the renewal. The balance at the end."""
    from tests.test_plan_lifecycle import DAY, S0, S1, S2, Clock, Env, _at, _inv

    env = await Env.open(tmp, Clock(0), _roll_cfg(**({} if cap is None else {"cap": cap})))
    try:
        await _at(env, S0 + 5, "evt_0", "invoice.paid",
                  _inv("in_0", "price_roll", (S0, S1), "subscription_create", charge="ch_0",
                       payment_intent="pi_ch_0", amount_paid=2000))
        if refund_first:
            await _at(env, S1 - 60, "evt_r", "charge.refunded", _refund("ch_0", "in_0", later))
        renewal = _inv("in_1", "price_roll", (S1, S2), "subscription_cycle", amount_due=2000)
        await _at(env, S1 + 30, "evt_c", "invoice.created", renewal)
        await _at(env, S1 + DAY, "evt_u", "invoice.marked_uncollectible", renewal)
        if not refund_first:
            await _at(env, S1 + DAY + 60, "evt_r1", "charge.refunded",
                      _refund("ch_0", "in_0", between))
        await _at(env, S1 + 2 * DAY, "evt_p", "invoice.paid", renewal)
        if not refund_first and later > between:
            await _at(env, S1 + 2 * DAY + 30, "evt_r2", "charge.refunded",
                      _refund("ch_0", "in_0", later))
        at = S1 + 2 * DAY + 60
        assert _reloaded_balance(env, at) == (env.balance(at), env.credits.book.debt("acme"))
        return env.balance(at)
    finally:
        env.store.close()


@pytest.mark.parametrize(("cap", "between", "later", "expected"), [
    (None, 2000, 2000, 50), (None, 1000, 1000, 75), (None, 1000, 2000, 50),
    ("80", 2000, 2000, 50), ("80", 1000, 1000, 75), ("80", 1000, 2000, 50)])
async def test_a_refund_between_a_write_off_and_the_late_payment_takes_the_carry_granted_anew(
        tmp_path: Path, cap: str | None, between: int, later: int, expected: int) -> None:
    """A refund takes what it would have taken had it come first (docs/credits.md, "Carry
    chains"), also around a renewal written off and paid late. Refunded first (in full):
    period 0's 50 go, the renewal carries nothing (50, written off, then granted anew: 50);
    by half: 25 carried (75). Refunded after the write-off, before the late payment: the
    carried credits follow into the written-off grant, whose claw-back had already taken
    them; the grant made anew then carried period 0's credits again (``_close_previous``
    reads its expire entry) and no claw-back followed them there: 100 whatever the refund.
    Now the grant anew carries that much less (``followed_out``), and a later increase of
    the same refund follows into it (a follow is counted against the grant it went to)."""
    before = await _written_off_then_refunded(tmp_path / "a", True, cap, later, later)
    after = await _written_off_then_refunded(tmp_path / "b", False, cap, between, later)
    assert before == expected * Q
    assert after == before
