"""Contract of the ``CreditLedger`` owner (proxy.store.protocols.CreditLedger)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.credits.ledger import Entry, GrantState, replay
from proxy.store.protocols import ClawbackDecision, GrantFacts, LedgerEntry, NewGrant
from tests.store.conftest import Backend


def _g(gid: str, cid: str = "c1", amount: int = 100, created: int = 1000) -> GrantState:
    return GrantState(gid, cid, amount, 50, None, created, "admin")


async def test_create_grant_is_idempotent_per_customer_and_key(backend: Backend) -> None:
    led = backend.storage.ledger
    await backend.customer("c1")
    await backend.customer("c2")
    g, created = await led.create_grant(NewGrant(_g("g1"), idempotency_key="k"))
    assert created and g.id == "g1"
    again, created = await led.create_grant(NewGrant(_g("g2", amount=5), idempotency_key="k"))
    assert not created and (again.id, again.amount) == ("g1", 100)   # the existing grant
    other, created = await led.create_grant(NewGrant(_g("g3", "c2"), idempotency_key="k"))
    assert created and other.id == "g3"                              # another customer's key
    snap = await led.load()
    assert sorted(g.id for g in snap.grants) == ["g1", "g3"]


async def test_concurrent_grants_with_one_key_create_one(backend: Backend) -> None:
    await backend.customer("c1")
    peer = backend.peer()
    got = await asyncio.gather(*(s.ledger.create_grant(NewGrant(_g(f"g{i}"), idempotency_key="k"))
                                 for i, s in enumerate([backend.storage, peer] * 3)))
    assert sum(created for _, created in got) == 1
    assert len({g.id for g, _ in got}) == 1
    assert len((await backend.storage.ledger.load()).grants) == 1


async def test_create_grant_refuses_an_unknown_customer_and_writes_nothing(
        backend: Backend) -> None:
    with pytest.raises(LookupError):
        await backend.storage.ledger.create_grant(NewGrant(_g("g1", "nobody")))
    assert (await backend.storage.ledger.load()).grants == []


async def test_then_entries_and_payment_refs_only_on_creation(backend: Backend) -> None:
    led = backend.storage.ledger
    await backend.customer("c1")
    calls: list[str] = []

    def then(g: GrantState) -> list[Entry]:
        calls.append(g.id)
        return [Entry(g.id, "repay", 30)]

    new = NewGrant(_g("g1"), idempotency_key="k", payment_refs=("in_1", "ch_1"), paid_minor=500)
    await led.create_grant(new, then)
    await led.create_grant(NewGrant(_g("g2"), idempotency_key="k"), then)
    assert calls == ["g1"]
    snap = await led.load()
    if backend.name == "postgres":
        # fleet mode repays only debt the shared ledger shows, under the account lock
        # (docs/fleet.md, "Repayments"): c1 owes nothing, so nothing is repaid
        assert (snap.entries, snap.debts) == ([], {})
    else:
        # a single process repays debt its book holds, which may still be in the
        # group-commit buffer (docs/credits.md, "Settlement")
        assert snap.entries == [Entry("g1", "repay", 30)]
        assert snap.debts == {"c1": -30}
    assert await led.payment_customer(["ch_1"]) == "c1"
    assert await led.payment_customer(["", "nope"]) is None
    assert await led.payment_customer([]) is None


async def test_append_load_and_entries(backend: Backend) -> None:
    led = backend.storage.ledger
    await backend.customer("c1")
    await led.create_grant(NewGrant(_g("g1")))
    await led.append([LedgerEntry("c1", Entry("g1", "debit", 10), request_id="r1", meter="m",
                                  at=2.5),
                      LedgerEntry("c1", Entry("", "debt", 7), at=3.0),
                      LedgerEntry("c1", Entry("g1", "expire", 5), at=4.0)])
    snap = await led.load()
    assert snap.entries == [Entry("g1", "debit", 10), Entry("", "debt", 7),
                            Entry("g1", "expire", 5)]                    # commit order
    assert snap.debts == {"c1": 7}
    recs = await led.entries("c1")
    assert [(e.kind, e.amount, e.grant_id) for e in recs] == [
        ("expire", 5, "g1"), ("debt", 7, None), ("debit", 10, "g1")]     # newest first
    assert (recs[2].request_id, recs[2].meter, recs[2].at_ms) == ("r1", "m", 2500)
    assert len(await led.entries("c1", limit=2)) == 2
    assert await led.entry_total("g1", "expire") == 5
    assert await led.entry_total("g1", "void") == 0


async def test_grant_lookups_for_webhook_effects(backend: Backend) -> None:
    led = backend.storage.ledger
    await backend.customer("c1")
    await led.create_grant(NewGrant(_g("pack"), idempotency_key="stripe:in_1:price_a"))
    await led.create_grant(NewGrant(_g("p1"), idempotency_key="stripe:plan:sub:100",
                                    period=(100, 200)))
    await led.create_grant(NewGrant(_g("op"), idempotency_key="admin-1"))
    assert await led.grant_ids("c1", "stripe:", exclude_prefix="stripe:plan:") == {"pack"}
    assert await led.grant_ids("c1", "stripe:") == {"pack", "p1"}
    assert await led.has_grant("c1", "admin-1") and not await led.has_grant("c2", "admin-1")
    assert await led.previous_period_grant("c1", "stripe:plan:sub:", 200) == "p1"
    assert await led.previous_period_grant("c1", "stripe:plan:sub:", 100) is None
    await led.create_grant(NewGrant(_g("p3"), idempotency_key="stripe:plan:sub:300",
                                    period=(300, 400)))
    # a later period was granted first: it already carried
    assert await led.previous_period_grant("c1", "stripe:plan:sub:", 200) is None


async def test_link_payment_is_idempotent_and_links_refs(backend: Backend) -> None:
    led = backend.storage.ledger
    await backend.customer("c1")
    await led.create_grant(NewGrant(_g("g1"), payment_refs=("in_1",), paid_minor=1000))
    assert await led.payment_customer(["pi_1"]) is None
    assert await led.link_payment(["pi_1", "ch_1", ""], "in_1") == 2
    assert await led.link_payment(["pi_1", "ch_1"], "in_1") == 0
    assert await led.link_payment([], "in_1") == 0
    assert await led.payment_customer(["pi_1"]) == "c1"


async def test_claw_back_decides_from_facts_once_per_key(backend: Backend) -> None:
    led = backend.storage.ledger
    await backend.customer("c1")
    await led.create_grant(NewGrant(_g("g1"), payment_refs=("ch_1",), paid_minor=1000))
    await led.append([LedgerEntry("c1", Entry("g1", "expire", 10))])
    seen: list[GrantFacts] = []

    def decide(f: GrantFacts) -> ClawbackDecision | None:
        seen.append(f)
        target = 40
        if target - f.previous_credits <= 0:
            return None
        return ClawbackDecision(target, [Entry("g1", "refund", 25), Entry("", "debt", 15)])

    got = await led.claw_back("c1", ["ch_1"], "refund:ch_1", "evt_1", 400, decide)
    assert got == [("g1", 40, [Entry("g1", "refund", 25), Entry("", "debt", 15)])]
    f = seen[0]
    assert (f.grant_id, f.paid_minor, f.previous_credits, f.clawed_total, f.owed) == (
        "g1", 1000, 0, 0, 0)
    assert dict(f.sums) == {"expire": 10}
    assert await led.claw_back("c1", ["ch_1"], "refund:ch_1", "evt_2", 400, decide) == []
    f2 = seen[1]
    assert (f2.previous_credits, f2.clawed_total, f2.owed) == (40, 40, 15)
    assert dict(f2.sums) == {"expire": 10, "refund": 25}
    recs = await led.entries("c1")
    assert [(e.kind, e.request_id) for e in recs[:2]] == [
        ("debt", "clawback:g1"), ("refund", "refund:ch_1:g1")]
    assert await led.claw_back("c1", ["nothing"], "k", "e", 1, decide) == []
    assert await led.claw_back("c1", [""], "k", "e", 1, decide) == []


async def test_claw_back_follows_a_rollover_carry_into_the_grant_that_received_it(
        backend: Backend) -> None:
    """A decision's ``follow`` is decided again on the next period's plan grant that carried
    the paying grant's credits (docs/credits.md, "Refunds"), under its own row key; the
    facts say how much was carried and how much earlier claw-backs followed already."""
    led = backend.storage.ledger
    await backend.customer("c1")
    await led.create_grant(NewGrant(_g("p0"), idempotency_key="stripe:plan:sub_1:100",
                                    period=(100, 200), payment_refs=("ch_0",), paid_minor=1000))
    await led.create_grant(NewGrant(_g("p1", amount=140, created=1001),
                                    idempotency_key="stripe:plan:sub_1:200", period=(200, 300),
                                    carried=40))
    await led.append([LedgerEntry("c1", Entry("p0", "expire", 50))])
    seen: list[GrantFacts] = []

    def decide(f: GrantFacts) -> ClawbackDecision | None:
        seen.append(f)
        if f.grant_id == "x":
            return None
        if f.grant_id == "p0":
            target = 30 if len(seen) == 1 else 100
            delta = target - f.previous_credits
            return ClawbackDecision(target, [], follow=delta) if delta > 0 else None
        assert f.follow_target is not None
        return ClawbackDecision(f.follow_target,
                                [Entry("p1", "refund", f.follow_target - f.previous_credits)])

    got = await led.claw_back("c1", ["ch_0"], "refund:ch_0", "evt_1", 300, decide)
    assert got == [("p0", 30, []), ("p1", 30, [Entry("p1", "refund", 30)])]
    assert (seen[0].carried_out, seen[0].followed_out, seen[0].follow_target) == (40, 0, None)
    assert (seen[1].grant_id, seen[1].previous_credits, seen[1].follow_target) == ("p1", 0, 30)
    # what was carried into each grant (its own payment did not buy that part)
    assert (seen[0].carried_in, seen[1].carried_in) == (0, 40)
    # the same key again with a larger cumulative amount: only the difference follows
    got = await led.claw_back("c1", ["ch_0"], "refund:ch_0", "evt_2", 1000, decide)
    assert got == [("p0", 70, []), ("p1", 70, [Entry("p1", "refund", 70)])]
    assert (seen[2].previous_credits, seen[2].followed_out) == (30, 30)
    assert (seen[3].previous_credits, seen[3].follow_target, seen[3].clawed_total) == (
        30, 100, 30)
    recs = await led.entries("c1")
    assert [(e.grant_id, e.request_id) for e in recs if e.kind == "refund"] == [
        ("p1", "carry:p0>p1:refund:ch_0"), ("p1", "carry:p0>p1:refund:ch_0")]
    # a grant no plan grant carried from (p1: no later period) follows nowhere
    await led.create_grant(NewGrant(_g("x", created=1002), idempotency_key="stripe:plan:sub_2:200",
                                    period=(200, 300), payment_refs=("ch_x",), paid_minor=10))
    await led.claw_back("c1", ["ch_x"], "refund:ch_x", "evt_3", 10, decide)
    assert (seen[-1].grant_id, seen[-1].carried_out) == ("x", 0)
    # what claw-backs followed out of a grant, every key (a period granted anew after a
    # write-off carries that much less: WebhookReceiver._grant_plan)
    assert (await led.followed_out("p0"), await led.followed_out("p1")) == (100, 0)
    # a period of p0's next start granted anew (``:paid:``) is the next period grant now:
    # what followed into p1 is not counted against it
    await led.create_grant(NewGrant(_g("p1b", amount=50, created=1003),
                                    idempotency_key="stripe:plan:sub_1:200:paid:in_1",
                                    period=(200, 300), carried=0))
    got = await led.claw_back("c1", ["ch_0"], "refund:ch_0", "evt_4", 1000, decide)
    assert got == [] and (seen[-1].grant_id, seen[-1].followed_out) == ("p0", 0)


async def test_a_next_period_grant_that_carried_nothing_receives_no_follow(
        backend: Backend) -> None:
    led = backend.storage.ledger
    await backend.customer("c1")
    await led.create_grant(NewGrant(_g("p0"), idempotency_key="stripe:plan:sub_1:100",
                                    period=(100, 200), payment_refs=("ch_0",), paid_minor=1000))
    await led.create_grant(NewGrant(_g("p1", created=1001),
                                    idempotency_key="stripe:plan:sub_1:200", period=(200, 300)))
    await led.create_grant(NewGrant(_g("p2", created=1002), carried=50,
                                    idempotency_key="stripe:plan:sub_1:300", period=(300, 400)))
    seen: list[GrantFacts] = []

    def decide(f: GrantFacts) -> ClawbackDecision | None:
        seen.append(f)
        return ClawbackDecision(10, [], follow=10)

    assert await led.claw_back("c1", ["ch_0"], "k", "e", 1, decide) == [("p0", 10, [])]
    assert [(f.grant_id, f.carried_out) for f in seen] == [("p0", 0)]


async def test_claw_back_owes_spent_credits_on_to_the_next_period_grant_once_per_key(
        backend: Backend) -> None:
    """A decision's ``owe`` (spent credits of the refunded grant, docs/credits.md "Carry
    chains") is decided again on the next period's plan grant even when it carried nothing,
    with ``owe_target`` set and recorded as ``owe:<grant>><next>:<key>``; the facts say what
    the grant owed on already and what was owed into the next one, and a larger cumulative
    return owes on only the increase."""
    led = backend.storage.ledger
    await backend.customer("c1")
    await led.create_grant(NewGrant(_g("p0"), idempotency_key="stripe:plan:sub_1:100",
                                    period=(100, 200), payment_refs=("ch_0",), paid_minor=1000))
    await led.create_grant(NewGrant(_g("p1", created=1001),
                                    idempotency_key="stripe:plan:sub_1:200", period=(200, 300)))
    seen: list[GrantFacts] = []
    want = [30]

    def decide(f: GrantFacts) -> ClawbackDecision | None:
        seen.append(f)
        if f.grant_id == "p0":
            delta = want[0] - f.previous_credits
            return ClawbackDecision(want[0], [], owe=delta) if delta > 0 else None
        assert f.owe_target is not None and f.follow_target == f.previous_credits
        return ClawbackDecision(f.follow_target,
                                [Entry("p1", "refund", f.owe_target - f.owe_previous)])

    got = await led.claw_back("c1", ["ch_0"], "refund:ch_0", "evt_1", 300, decide)
    assert got == [("p0", 30, []), ("p1", 30, [Entry("p1", "refund", 30)])]
    assert (seen[0].successor, seen[0].carried_out, seen[0].owed_on) == ("p1", 0, 0)
    assert (seen[1].grant_id, seen[1].owe_previous, seen[1].owe_target, seen[1].owed_into) \
        == ("p1", 0, 30, 0)
    assert seen[1].successor is None
    # replayed: nothing; a larger cumulative return: only the increase is owed on
    assert await led.claw_back("c1", ["ch_0"], "refund:ch_0", "evt_1", 300, decide) == []
    want[0] = 70
    got = await led.claw_back("c1", ["ch_0"], "refund:ch_0", "evt_2", 1000, decide)
    assert got == [("p0", 40, []), ("p1", 40, [Entry("p1", "refund", 40)])]
    assert (seen[-2].owed_on, seen[-1].owe_previous, seen[-1].owe_target,
            seen[-1].owed_into, seen[-1].clawed_total) == (30, 30, 70, 30, 30)
    recs = await led.entries("c1")
    assert [(e.grant_id, e.request_id) for e in recs if e.kind == "refund"] == [
        ("p1", "carry:p0>p1:refund:ch_0"), ("p1", "carry:p0>p1:refund:ch_0")]


async def test_undo_repay_gives_back_the_newest_repayments_once_per_key(
        backend: Backend) -> None:
    """A withdrawn debt's repayments go back (docs/credits.md, "Settlement"): negative
    ``repay`` entries, newest repayment first, never more than the ledger's repayments
    exceed its debt; the same key again writes nothing and returns what it wrote."""
    led = backend.storage.ledger
    await backend.customer("c1")
    await led.create_grant(NewGrant(_g("g1")))
    await led.create_grant(NewGrant(_g("g2", created=1001)))
    await led.append([LedgerEntry("c1", Entry("", "debt", 30)),
                      LedgerEntry("c1", Entry("g1", "repay", 20))])
    if backend.name == "postgres":
        # PostgreSQL caps a repayment by the debt it shows (docs/fleet.md, "Repayments"):
        # the over-repayment a ledger written before that cap can hold is entered raw
        async with backend.storage.ledger.pool.acquire() as c:  # type: ignore[attr-defined]
            await c.execute("INSERT INTO credit_entries(customer_id, grant_id, kind, amount,"
                            " at_ms) VALUES ('c1', 'g2', 'repay', 30, 0)")
    else:
        await led.append([LedgerEntry("c1", Entry("g2", "repay", 30))])
    assert (await led.load()).debts == {"c1": -20}          # 20 repaid of a debt never written
    got = await led.undo_repay("c1", "withdraw:r1", 50, 5.0)
    assert got == [Entry("g2", "repay", -20)]                # capped at the 20 unmatched
    assert await led.undo_repay("c1", "withdraw:r1", 50, 6.0) == got     # once per key
    assert await led.undo_repay("c1", "withdraw:r2", 50, 6.0) == []      # nothing unmatched
    snap = await led.load()
    assert snap.debts == {"c1": 0}
    assert {g.id: g.remaining for g in replay(snap.grants, snap.entries).values()} == {
        "g1": 80, "g2": 90}
    [rec] = [e for e in await led.entries("c1") if e.request_id == "withdraw:r1"]
    assert (rec.kind, rec.amount, rec.at_ms) == ("repay", -20, 5000)


async def test_effective_at_and_carried_are_kept(backend: Backend) -> None:
    led = backend.storage.ledger
    await backend.customer("c1")
    g = GrantState("g1", "c1", 100, 50, 9000, 1000, "admin", effective_at=5000)
    await led.create_grant(NewGrant(g, idempotency_key="k", carried=30))
    [loaded] = (await led.load()).grants
    assert (loaded.effective_at, loaded.expires_at) == (5000, 9000)
    assert await led.grant_carried("g1") == 30
    assert await led.grant_carried("nope") == 0
    await led.create_grant(NewGrant(_g("g2")))
    assert [x.effective_at for x in (await led.load()).grants if x.id == "g2"] == [None]


async def test_payment_refs_are_recorded_on_an_existing_grant(backend: Backend) -> None:
    led = backend.storage.ledger
    await backend.customer("c1")
    await led.create_grant(NewGrant(_g("g1"), idempotency_key="k", payment_refs=("in_1",),
                                    paid_minor=0))               # granted before payment
    assert await led.paid_for("in_1") == 0
    again, created = await led.create_grant(NewGrant(_g("g2"), idempotency_key="k",
                                                     payment_refs=("in_1", "ch_1"),
                                                     paid_minor=2000))
    assert (again.id, created) == ("g1", False)
    assert await led.paid_for("in_1") == 2000 and await led.paid_for("ch_1") == 2000
    await led.create_grant(NewGrant(_g("g3"), idempotency_key="k", payment_refs=("in_1",),
                                    paid_minor=5))               # the larger amount stays
    assert await led.paid_for("in_1") == 2000
    assert await led.paid_for("unknown") == 0
    assert await led.payment_customer(["ch_1"]) == "c1"


async def test_plan_grant_lookups(backend: Backend) -> None:
    led = backend.storage.ledger
    await backend.customer("c1")
    await backend.customer("c2")
    await led.create_grant(NewGrant(_g("p1"), idempotency_key="stripe:plan:sub_1:100",
                                    period=(100, 200)))
    await led.create_grant(NewGrant(_g("p2"), idempotency_key="stripe:plan:sub_1:200",
                                    period=(200, 300)))
    await led.create_grant(NewGrant(_g("x", "c2"), idempotency_key="stripe:planchange:sub_2:1:e",
                                    period=(1, 50)))
    assert await led.plan_grant_for("c1", "sub_1", 150) == ("p1", 100, 200)
    assert await led.plan_grant_for("c1", "sub_1", 200) == ("p2", 200, 300)   # [start, end)
    assert await led.plan_grant_for("c1", "sub_1", 300) is None
    assert await led.plan_grant_for("c2", "sub_1", 150) is None               # not its grant
    assert await led.subscription_customer("sub_1") == "c1"
    assert await led.subscription_customer("sub_2") == "c2"                  # a plan change
    assert await led.subscription_customer("sub_3") is None


async def test_plan_invoices_open_paid_unpaid(backend: Backend) -> None:
    led = backend.storage.ledger
    await backend.customer("c1")
    await led.create_grant(NewGrant(_g("p1")))
    assert await led.plan_invoice_state("in_1") is None
    await led.record_plan_invoice("in_1", "p1", "c1", "sub_1", "open", 10)
    await led.record_plan_invoice("in_2", "p1", "c1", "sub_2", "open", 10)
    await led.record_plan_invoice("in_3", "p1", "c1", "sub_1", "paid", 10)
    assert await led.open_plan_invoices("c1") == [("in_1", "p1"), ("in_2", "p1")]
    assert await led.open_plan_invoices("c1", "sub_1") == [("in_1", "p1")]
    assert await led.subscription_customer("sub_9") is None
    await led.record_plan_invoice("in_1", "p1", "c1", "sub_1", "open", 11)    # idempotent
    assert await led.plan_invoice_state("in_1") == "open"
    await led.record_plan_invoice("in_1", "p1", "c1", "sub_1", "paid", 12)    # open -> paid
    assert await led.plan_invoice_state("in_1") == "paid"
    assert not await led.write_off_plan_invoice("in_1", 13)                 # paid is final
    assert await led.write_off_plan_invoice("in_2", 13)                     # open -> unpaid
    assert not await backend.peer().ledger.write_off_plan_invoice("in_2", 14)
    await led.record_plan_invoice("in_2", "p1", "c1", "sub_2", "paid", 15)    # unpaid is final
    assert await led.plan_invoice_state("in_2") == "unpaid"
    assert await led.open_plan_invoices("c1") == []
    with pytest.raises(ValueError):
        await led.record_plan_invoice("in_4", "p1", "c1", "sub_1", "unpaid", 16)


async def test_members_racing_on_a_plan_invoice_decide_once(backend: Backend) -> None:
    """Two members (fleet) writing off one open plan invoice: exactly one succeeds; two
    recording a repeated grant's payment with different amounts keep the larger."""
    led = backend.storage.ledger
    await backend.customer("c1")
    await led.create_grant(NewGrant(_g("p1"), idempotency_key="stripe:plan:sub_1:1",
                                    period=(0, 100), payment_refs=("in_1",)))
    await led.record_plan_invoice("in_1", "p1", "c1", "sub_1", "open", 10)
    peer = backend.peer()
    offs = await asyncio.gather(*(s.ledger.write_off_plan_invoice("in_1", 20 + i)
                                  for i, s in enumerate([backend.storage, peer] * 3)))
    assert sorted(offs) == [False] * 5 + [True]
    assert await peer.ledger.plan_invoice_state("in_1") == "unpaid"
    await asyncio.gather(*(s.ledger.create_grant(NewGrant(
        _g(f"x{i}"), idempotency_key="stripe:plan:sub_1:1", payment_refs=("in_1",),
        paid_minor=amount)) for i, (s, amount) in enumerate(
            zip([backend.storage, peer] * 2, [700, 2000, 5, 1999], strict=True))))
    assert await led.paid_for("in_1") == 2000


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_give_back_capped_by_a_debt_made_meanwhile_leaves_book_and_ledger_equal(
        backend: Backend) -> None:
    """h/rcredits review, SQLite only (a single process's settlement: its book owes debt the
    ledger does not show yet, which PostgreSQL never repays, docs/fleet.md, "Repayments"): a
    withdrawn row's give-back (4 a top-up repaid) is still pending when the top-up's
    payment is refunded in full, which makes its 4 repaid a claw-back debt; ``undo_repay``
    then finds the ledger's debt netted to 0 and gives back nothing.
    ``CreditService.give_back_due`` must leave the book owing what the ledger owes (0), not
    the 4 (balance 1: the 1 the withheld request had debited)."""
    import time

    from proxy.credits.book import CreditBook
    from proxy.credits.service import CreditService, load_book

    led = backend.storage.ledger
    await backend.customer("c1")
    svc = CreditService(None, CreditBook(), led)  # type: ignore[arg-type]
    await svc.grant("c1", "1", idempotency_key="g1")
    now = time.time()
    hold = svc.book.try_hold("c1", 1_000_000, now, block=True, debt_ok=True)
    assert hold is not None
    (entries, _), = svc.book.settle(hold, [5_000_000], now)
    await svc.grant("c1", "10", idempotency_key="g2", payment=(("in_2",), 1000))
    assert svc.withdraw("c1", entries, "withdraw:r1") == 4_000_000
    await svc.claw_back("c1", ["in_2"], 1000, "refund:in_2", "evt_r")
    assert await svc.give_back_due() == 0
    at = time.time()
    reloaded = load_book(await led.load())
    assert (reloaded.balance("c1", at), reloaded.debt("c1")) == (1_000_000, 0)
    assert (svc.book.balance("c1", at), svc.book.debt("c1")) == (1_000_000, 0)
