"""Adversarial review of the review fixes merged since 9d5a680: each test shows one defect a
fix introduced or left open, through real sockets, real SQLite files and the project's
fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from proxy.errors import StorageUnavailable
from tests.conftest import ProxyFactory
from tests.helpers import wait_until

if TYPE_CHECKING:
    from proxy.credits.book import CreditBook
    from proxy.credits.ledger import Entry
    from tests.test_plan_lifecycle import Env

Q = 1_000_000


async def _one_write(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


async def test_head_over_max_header_bytes_with_full_size_values_in_one_read_is_refused(
        make_proxy: ProxyFactory) -> None:
    """limits.py _head_end gives up ("aiohttp refuses that head itself") when a LINE is over
    max_header_field, but aiohttp's max_field_size bounds a header VALUE (and name), not the
    line: a header whose value is exactly max_header_field is accepted by aiohttp while its
    line ("X-F0: " + value) is longer. Three such headers (12 KB against an 8 KiB
    max_header_bytes) in one read skip the one-read check and are parsed and served."""
    p = await make_proxy(limits={"max_header_bytes": "8KiB", "max_header_field": "4KiB"})
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"".join(
        f"X-F{i}: ".encode() + b"v" * 4096 + b"\r\n" for i in range(3)) + b"\r\n"
    assert len(head) > 8 * 1024
    data = await _one_write(p.server.public_port, head)
    assert data.startswith(b"HTTP/1.1 431 "), data[:60]


async def test_pipelined_head_over_max_header_bytes_in_one_read_is_refused(
        make_proxy: ProxyFactory) -> None:
    """The one-read check looks only at the FIRST blank line of a read: a small request
    followed, in the same read, by a complete head over max_header_bytes (11 KB against
    8 KiB) passes it (the first head ends early), and aiohttp parses and serves both."""
    p = await make_proxy(limits={"max_header_bytes": "8KiB", "max_header_field": "4KiB"})
    small = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"".join(
        f"X-Fill-{i}: ".encode() + b"v" * 1000 + b"\r\n" for i in range(10)) + b"\r\n"
    assert len(big) > 8 * 1024
    data = await _one_write(p.server.public_port, small + big)
    # the big head is refused (431, the connection closed), never served
    assert b"HTTP/1.1 431 " in data, data[:200]
    assert data.count(b"HTTP/1.1 200 ") <= 1, data.count(b"HTTP/1.1 200 ")


async def test_a_paid_rollover_renewal_is_not_withheld_for_as_long_as_an_old_request_lasts(
        tmp_path: Path) -> None:
    """proxy/webhooks.py ``_previous_in_use``: a rollover renewal waits (waiting_period) for
    as long as ANY request of the customer admitted before the previous grant's expiry is in
    flight. Nothing bounds that wait: a WebSocket session holds its admission hold for its
    whole life (pipeline.py: ``admission.leave`` after ``relay``), so one session opened a
    second before the period ends keeps the paid period's allowance ungranted for hours.
    Meanwhile every new request finds no live credit: a ``block`` customer who paid the
    renewal (invoice.paid) is refused (a ``bill`` customer is invoiced overage for usage
    its paid allowance should cover). The renewal should grant the period's own allowance
    at once and carry the previous grant's remainder when it is final."""
    from tests.test_plan_lifecycle import DAY, S0, _at, _inv
    from tests.test_review_credits import rollover_with_request_in_flight

    # a WebSocket session admitted 1 s before the period ends, open for hours
    env, _session = await rollover_with_request_in_flight(tmp_path, 0)
    try:
        book = env.credits.book
        await _at(env, S0 + 5, "evt_1", "invoice.paid",
                  _inv("in_1", "price_roll", (S0, S0 + 30 * DAY), "subscription_cycle"),
                  status="waiting_period")
        # three hours later, the session still open: the renewal still waits
        env.clock.t = S0 + 3 * 3600
        await env.hooks.drain()
        # a new 1-credit request of the customer, whose 50-credit period is paid for
        new = book.try_hold("acme", 1_000_000, S0 + 3 * 3600, block=True, debt_ok=True)
        assert new is not None, "refused: the paid period's allowance was never granted"
    finally:
        env.store.close()



async def test_many_small_pipelined_heads_in_one_read_are_all_served(
        make_proxy: ProxyFactory) -> None:
    """(Guards the fix of the test above: small heads pipelined in one read, more than
    max_header_bytes in all, are each under the bound and all served; a request with a body
    over the bound in the same read as its head too.)"""
    p = await make_proxy(limits={"max_header_bytes": "8KiB", "max_header_field": "4KiB"})
    one = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data = await _one_write(p.server.public_port, one * 399 + last)
    assert len(one) * 400 > 8 * 1024
    assert data.count(b"HTTP/1.1 200 ") == 400
    body = b"x" * 20_000
    data = await _one_write(p.server.public_port,
                            b"POST /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert not data.startswith(b"HTTP/1.1 431 "), data[:60]


async def test_a_withdrawn_debt_already_repaid_by_a_new_grant_gives_the_credits_back(
        tmp_path: Path) -> None:
    """CreditBook.withdraw (the fix for a withheld row's ``debt`` entry) forgets the debt
    in memory, but a debt lives in memory before its row is committed (it is written in the
    usage row's transaction), and a grant made meanwhile repays it at once (a ``repay``
    entry, written in the grant's own transaction). When the row is then withheld (its
    commit failed: the answer was a 503, never billed), the debt is popped but the credits
    its repayment took from the new grant stay taken: the customer pays for a request it
    never got, and the ledger holds a ``repay`` with no ``debt`` (a debt of -4 on restart).
    The order is what Store._on_failure -> app.withdraw produces when a grant's write gets
    in while the usage row's commit is failing (lock_wait, a refused journal insert)."""
    from proxy.credits.service import load_book
    from tests.test_plan_lifecycle import Clock, Env

    env = await Env.open(tmp_path, Clock(0))
    try:
        now = time.time()
        await env.credits.grant("acme", "1", idempotency_key="g1")
        book = env.credits.book
        hold = book.try_hold("acme", 1_000_000, now, block=True, debt_ok=True)
        assert hold is not None
        (entries, _), = book.settle(hold, [5_000_000], now)    # 1 debited, 4 debt
        assert book.debt("acme") == 4_000_000
        # a top-up arrives while the row's commit is failing: it repays the 4 at once
        await env.credits.grant("acme", "10", idempotency_key="g2")
        # the row is withheld: Store._on_failure -> on_withdraw (proxy/app.py), which hands
        # it to CreditService.withdraw; the expiry task writes the give-back
        assert env.credits.withdraw("acme", entries, "withdraw:r1") == 4_000_000
        assert await env.credits.give_back_due() == 1
        # never served, never billed: the 1 debited is back and the 10 are untouched
        assert book.debt("acme") == 0
        assert book.balance("acme", time.time()) == 11_000_000, book.balance("acme", time.time())
        reloaded = load_book(await env.credits.ledger.load())
        assert reloaded.debt("acme") == 0, reloaded.debt("acme")
        assert reloaded.balance("acme", time.time()) == 11_000_000
    finally:
        env.store.close()


async def test_head_over_max_header_bytes_after_a_body_in_the_same_read_is_refused(
        make_proxy: ProxyFactory) -> None:
    """A request whose body ends in a read that then holds a whole next head over
    max_header_bytes (11 KB against 8 KiB): the guard follows the body's framing
    (limits._Framing), so that head is measured and refused, never served."""
    p = await make_proxy(limits={"max_header_bytes": "8KiB", "max_header_field": "4KiB"})
    first = b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789"
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"".join(
        f"X-Fill-{i}: ".encode() + b"v" * 1000 + b"\r\n" for i in range(10)) + b"\r\n"
    data = await _one_write(p.server.public_port, first + big)
    assert b"HTTP/1.1 200 " not in data, data[:200]
    assert b"HTTP/1.1 431 " in data and b"header_too_large" in data, data[:200]


async def _book_and_ledger(env: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """acme's (balance, debt) in the credit book, and in the ledger loaded afresh (what a
    restart would see)."""
    from proxy.credits.service import load_book
    at = time.time()
    book = env.credits.book
    reloaded = load_book(await env.credits.ledger.load())
    return ((book.balance("acme", at), book.debt("acme")),
            (reloaded.balance("acme", at), reloaded.debt("acme")))


async def _withdrawn_after_repay(tmp_path: Path) -> tuple[Env, list[Entry]]:
    """The test above up to the withdrawal: 1 credit, a request debited 1 with 4 of debt,
    a 10-credit top-up that repaid the 4 (in the ledger), then the row withdrawn."""
    from tests.test_plan_lifecycle import Clock, Env

    env = await Env.open(tmp_path, Clock(0))
    now = time.time()
    await env.credits.grant("acme", "1", idempotency_key="g1")
    hold = env.credits.book.try_hold("acme", Q, now, block=True, debt_ok=True)
    assert hold is not None
    (entries, _), = env.credits.book.settle(hold, [5 * Q], now)
    await env.credits.grant("acme", "10", idempotency_key="g2")
    return env, entries


def _refuse_give_backs(path: Path, on: bool) -> None:
    with sqlite3.connect(str(path)) as c:
        if on:
            c.execute("CREATE TRIGGER refuse_give_back BEFORE INSERT ON credit_entries"
                      " WHEN NEW.kind = 'repay' AND NEW.amount < 0"
                      " BEGIN SELECT RAISE(ABORT, 'test: give-back refused'); END")
        else:
            c.execute("DROP TRIGGER refuse_give_back")


async def test_a_give_back_whose_write_fails_stays_pending_and_the_expiry_task_retries_it(
        tmp_path: Path) -> None:
    """The give-back's ledger write fails (a storage error): nothing is applied, the book
    and the ledger still agree (the 4 repaid count in neither balance nor debt: 7), the
    give-back stays pending, and the expiry task writes it once storage takes writes
    again (retried every ``EXPIRY_RETRY``): 11, in the book and in the ledger."""

    env, entries = await _withdrawn_after_repay(tmp_path)
    try:
        _refuse_give_backs(tmp_path / "m.db", True)
        assert env.credits.withdraw("acme", entries, "withdraw:r1") == 4 * Q
        with pytest.raises((StorageUnavailable, sqlite3.Error)):
            await env.credits.give_back_due()
        assert env.credits.give_back_pending() == 4 * Q
        assert await _book_and_ledger(env) == ((7 * Q, 0), (7 * Q, 0))
        task = asyncio.ensure_future(env.credits.run_expiry(max_sleep=0.2))
        try:
            await asyncio.sleep(0.3)
            assert env.credits.give_back_pending() == 4 * Q      # still refused
            _refuse_give_backs(tmp_path / "m.db", False)

            async def given_back() -> bool:
                return env.credits.give_back_pending() == 0
            await wait_until(given_back, timeout=5.0, what="the give-back retried")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert await _book_and_ledger(env) == ((11 * Q, 0), (11 * Q, 0))
    finally:
        env.store.close()


async def test_a_give_back_lost_with_the_process_is_written_at_the_next_start(
        tmp_path: Path) -> None:
    """The process dies with the give-back pending (never written): the ledger holds the
    repayment of a debt that was never committed (its debt sum is -4). At start-up
    (proxy/app.py: ``give_back_unmatched`` over the loaded ledger, the journal already
    materialized) the 4 go back to the grant that repaid them, once: a second start
    writes nothing. A start whose give-back write fails starts anyway, the give-back
    pending for the expiry task."""
    from proxy.credits.service import CreditService, load_book
    from proxy.store.sqlite import SqliteStorage

    env, entries = await _withdrawn_after_repay(tmp_path)
    try:
        env.credits.withdraw("acme", entries, "withdraw:r1")   # ... and the process dies
        _refuse_give_backs(tmp_path / "m.db", True)
        for start in range(3):
            ledger = SqliteStorage.on(env.store).ledger
            snapshot = await ledger.load()
            assert snapshot.debts == {"acme": -4 * Q if start < 2 else 0}
            svc = CreditService(env.store, load_book(snapshot), ledger)
            assert await svc.give_back_unmatched(snapshot.debts) == (1 if start == 1 else 0)
            book = svc.book
            if start == 0:          # refused: pending, the 4 in neither balance nor debt
                assert svc.give_back_pending() == 4 * Q
                assert (book.balance("acme", time.time()), book.debt("acme")) == (7 * Q, 0)
                _refuse_give_backs(tmp_path / "m.db", False)    # ... and it dies again
            else:
                assert svc.give_back_pending() == 0
                assert (book.balance("acme", time.time()), book.debt("acme")) == (11 * Q, 0)
    finally:
        env.store.close()


async def test_a_withdrawn_debt_only_partly_repaid_gives_back_only_that_part(
        tmp_path: Path) -> None:
    """The top-up held 3 and repaid 3 of the 4 (1 still owed in memory): withdrawing the
    row's 4 gives back 3, never more than was repaid; the 1 never was owed."""
    from tests.test_plan_lifecycle import Clock, Env

    env = await Env.open(tmp_path, Clock(0))
    try:
        now = time.time()
        await env.credits.grant("acme", "1", idempotency_key="g1")
        hold = env.credits.book.try_hold("acme", Q, now, block=True, debt_ok=True)
        assert hold is not None
        (entries, _), = env.credits.book.settle(hold, [5 * Q], now)
        await env.credits.grant("acme", "3", idempotency_key="g2")
        assert env.credits.book.debt("acme") == Q
        assert env.credits.withdraw("acme", entries, "withdraw:r1") == 3 * Q
        assert await env.credits.give_back_due() == 1
        assert await env.credits.give_back_due() == 0
        assert await _book_and_ledger(env) == ((4 * Q, 0), (4 * Q, 0))
    finally:
        env.store.close()


async def test_a_give_back_pending_when_a_refund_makes_debt_leaves_book_and_ledger_equal(
        tmp_path: Path) -> None:
    """Review of the give-back: a withdrawn row's give-back is pending (the expiry task has not
    written it yet, or its write failed) when a refund of the top-up that repaid the debt
    arrives: the refund takes the top-up's 6 unused and makes its 4 repaid "spent" a
    debt of 4, which the ledger nets against the 4 repayment (debt 0), so ``undo_repay``
    gives back nothing. The book must then agree with the ledger (debt 0; the request
    never happened: the refund takes the 10, the 1 is left) instead of keeping a debt of
    4 that the next grant repays out of the customer's credits."""
    from proxy.credits.service import load_book
    from tests.test_plan_lifecycle import Clock, Env

    env = await Env.open(tmp_path, Clock(0))
    try:
        now = time.time()
        book = env.credits.book
        await env.credits.grant("acme", "1", idempotency_key="g1")
        hold = book.try_hold("acme", Q, now, block=True, debt_ok=True)
        assert hold is not None
        (entries, _), = book.settle(hold, [5 * Q], now)
        await env.credits.grant("acme", "10", idempotency_key="g2",
                                payment=(("in_g2",), 1000))
        assert book.debt("acme") == 0
        _refuse_give_backs(tmp_path / "m.db", True)
        assert env.credits.withdraw("acme", entries, "withdraw:r1") == 4 * Q
        with pytest.raises((StorageUnavailable, sqlite3.Error)):
            await env.credits.give_back_due()
        await env.credits.claw_back("acme", ["in_g2"], 1000, "refund:in_g2", "evt_r")
        _refuse_give_backs(tmp_path / "m.db", False)
        await env.credits.give_back_due()
        assert env.credits.give_back_pending() == 0
        reloaded = load_book(await env.credits.ledger.load())
        at = time.time()
        assert (reloaded.balance("acme", at), reloaded.debt("acme")) == (Q, 0)
        assert (book.balance("acme", at), book.debt("acme")) == (Q, 0)
    finally:
        env.store.close()


def _credit_state(book: CreditBook, at: float) -> tuple[int, int, list[tuple[str, int, bool]]]:
    return (book.balance("acme", at), book.debt("acme"),
            sorted((g.id, g.remaining, g.voided) for g in book.grants("acme")))


@pytest.mark.parametrize("seed", range(80))
async def test_random_withdrawals_give_backs_and_refunds_keep_the_book_equal_to_the_ledger(
        tmp_path: Path, seed: int) -> None:
    """A property over random sequences of top-ups (each with its own
    payment), committed requests, withheld requests (withdrawn later or committed), refunds
    of a top-up (half or all), voids, give-backs and give-back writes refused or allowed
    again: whenever nothing is in flight and no give-back is pending, the book equals the
    ledger reloaded (balance, debt, every grant's remaining), and no grant and no debt is
    ever negative. (Seed 39 failed before the fix: a debt made while a give-back was
    pending.)"""
    import random

    from proxy.credits.service import load_book
    from proxy.store.db import UsageItem, UsageRow
    from proxy.store.sqlite import SqliteStorage
    from tests.test_plan_lifecycle import Clock, Env

    rnd = random.Random(seed)
    env = await Env.open(tmp_path, Clock(0))
    owners = SqliteStorage.on(env.store)
    svc, book = env.credits, env.credits.book
    in_flight: list[UsageRow] = []
    payments: list[str] = []
    refused = False
    ops: list[str] = []
    try:
        for n in range(60):
            op = rnd.choices(["grant", "commit", "withheld", "withdraw", "commit_withheld",
                              "refund", "give", "refuse", "void"],
                             [3, 2, 3, 3, 1, 2, 2, 2, 1])[0]
            ops.append(op)
            now = time.time()
            if op == "grant":
                await svc.grant("acme", str(rnd.choice([1, 3, 5, 10])), idempotency_key=f"g{n}",
                                payment=((f"in_{n}",), 1000))
                payments.append(f"in_{n}")
            elif op in ("commit", "withheld"):
                hold = book.try_hold("acme", 1, now, block=False, debt_ok=True)
                assert hold is not None
                cost = rnd.choice([1, 2, 4, 7]) * Q
                [(entries, uncovered)] = book.settle(hold, [cost], now)
                row = UsageRow(f"r{n}", now, "acme", "k", "all", "v1", 200,
                               [UsageItem("u", cost, cost - uncovered, 0)],
                               debits=[("u", e) for e in entries], method="GET", path="/x")
                if op == "commit":
                    fut = owners.usage.record(row, wait=True)
                    assert fut is not None
                    await fut
                else:
                    in_flight.append(row)
            elif op == "withdraw" and in_flight:
                row = in_flight.pop(rnd.randrange(len(in_flight)))
                svc.withdraw("acme", [e for _, e in row.debits], f"withdraw:{row.request_id}")
            elif op == "commit_withheld" and in_flight:
                fut = owners.usage.record(in_flight.pop(rnd.randrange(len(in_flight))), wait=True)
                assert fut is not None
                await fut
            elif op == "refund" and payments:
                p = rnd.choice(payments)
                await svc.claw_back("acme", [p], rnd.choice([500, 1000]), f"refund:{p}",
                                    f"evt_{n}")
            elif op == "give":
                try:
                    await svc.give_back_due()
                except (StorageUnavailable, sqlite3.Error):
                    assert refused
            elif op == "refuse":
                _refuse_give_backs(tmp_path / "m.db", not refused)
                refused = not refused
            elif op == "void":
                live = [g for g in book.grants("acme") if not g.voided]
                if live:
                    await svc.void(rnd.choice(live).id)
            assert book.debt("acme") >= 0
            assert all(g.remaining >= 0 for g in book.grants("acme"))
            if not in_flight and not svc.give_back_pending():
                await owners.usage.materialize()
                at = time.time()
                reloaded = load_book(await svc.ledger.load())
                assert _credit_state(reloaded, at) == _credit_state(book, at), " ".join(ops)
    finally:
        env.store.close()
