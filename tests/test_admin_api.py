"""proxy.admin.api: what the admin routes read from the services the composition root passes
to ``build_admin_app`` (readiness from the flusher, a customer's credits and carried
remainders). Through a running proxy, real SQLite, the dry-run sink."""

from __future__ import annotations

from tests.conftest import ProxyFactory
from tests.helpers import wait_until


async def test_readyz_reports_flush_lag_above_the_threshold_until_delivered(
        make_proxy: ProxyFactory) -> None:
    p = await make_proxy(stripe={"flush_lag_ready_threshold": "1s"})
    ready = await p.admin("GET", "/readyz", expect=200)        # nothing undelivered: no lag
    assert ready["problems"] == []
    key = await p.customer_with_key("lag", stripe_customer_id="cus_lag")
    async with p.session.get(p.url + "/v1/items", headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200

    async def readyz() -> tuple[int, list[str]]:
        async with p.session.get(p.admin_url + "/readyz") as r:
            return r.status, list((await r.json())["problems"])
    _, problems = await wait_until(readyz, ok=lambda r: r[0] == 503,
                                   what="the flush lag to show")
    assert len(problems) == 1 and problems[0].startswith("flush lag ") \
        and problems[0].endswith("s exceeds 1s"), problems
    await p.admin("POST", "/admin/flush", expect=200)           # delivered (dry run): no lag
    assert await readyz() == (200, [])


async def test_customer_detail_has_credits_ledger_and_carried_remainder(
        make_proxy: ProxyFactory) -> None:
    p = await make_proxy()
    await p.customer_with_key("det", stripe_customer_id="cus_det")
    await p.admin("POST", "/admin/customers/det/grants",
                  {"credits": "12.5", "idempotency_key": "g1"}, expect=201)
    detail = await p.admin("GET", "/admin/customers/det", expect=200)
    assert detail["unreported_remainder"] == {}
    assert detail["credits"]["balance"] == "12.5"
    # the same service the credit routes answer from
    assert detail["credits"] == await p.admin("GET", "/admin/customers/det/grants", expect=200)
    ledger = await p.admin("GET", "/admin/customers/det/credits/ledger", expect=200)
    assert detail["credit_ledger"] == ledger["entries"]


async def test_post_customer_with_currency_is_one_transaction(make_proxy: ProxyFactory) -> None:
    """``POST /admin/customers`` with a currency creates the customer and sets its currency
    in one transaction: when setting the currency fails (here a trigger another connection
    put on the real database file refuses it), the customer is not created either."""
    import sqlite3

    p = await make_proxy()
    blocker = sqlite3.connect(str(p.tmp / "meter.db"), isolation_level=None)
    blocker.execute("CREATE TRIGGER refuse_currency BEFORE UPDATE OF currency ON customers"
                    " BEGIN SELECT RAISE(ABORT, 'currency refused'); END")
    async with p.session.post(p.admin_url + "/admin/customers", headers=p.admin_headers,
                              json={"id": "half", "currency": "eur"}) as r:
        assert r.status == 500
    assert await p.admin("GET", "/admin/customers", expect=200) == []
    blocker.execute("DROP TRIGGER refuse_currency")
    blocker.close()
    made = await p.admin("POST", "/admin/customers", {"id": "half", "currency": "eur"},
                         expect=201)
    assert made["currency"] == "eur"
