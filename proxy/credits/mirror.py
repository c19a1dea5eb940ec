"""The monetary credits mode's background duties (docs/credits.md): which customers are
monetary, each local grant mirrored as a Stripe credit grant, and the local balance
compared with Stripe's.

``MonetaryService`` (one per process, started by ``proxy.app``):

- ``sync``: opens a ``proxy.credits.money`` account for every customer whose mode
  (``Customer.credit_mode``, else ``credits.mode``) is ``monetary``, with its period totals
  so far, and closes the others. It runs at start-up (before the proxy listens) and
  whenever the key cache's customers or the prices change, so the request path never
  decides a mode: it finds an account or not. A customer switched mid-period is priced on
  the period total recorded when its account opens (docs/credits.md).
- ``discover`` + ``mirror_due``: the mirror. Every grant of a monetary customer gets a
  ``grant_mirrors`` row (``GrantMirrors.want``: ``live``, or ``void`` once voided here;
  after a claw-back or a debt repayment took credits from it, a replacement row
  ``<grant>#t<taken>`` holding what is left, the older rows voided: ``split_key``),
  found by comparing the credit book with the rows, so the grant's own ledger transaction
  is untouched and a crash between it and the row is repaired by the next pass (the book is
  rebuilt from the ledger). A due row is worked by looking for the Stripe grant first
  (``metadata.meterproxy_grant``, ``StripeClient.find_credit_grant``), then creating it
  (idempotency key ``meterproxy-grant-<local id>-<attempt>``) or voiding it: a crash before
  or after a Stripe call, a lost answer or a retry days later neither loses nor duplicates
  a Stripe grant. Failures are retried with backoff (1 s doubling to 1 h) and dead-lettered
  after ``credits.mirror_max_attempts``, or at once when Stripe refuses the request.
- ``balance_check``: Stripe's credit balance summary against the local balance
  (``proxy.credits.monetary.balance_check``: before the period's invoice is finalized,
  Stripe still holds what this period's usage took from the grants here).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from proxy import metrics
from proxy.backoff import backoff
from proxy.config import CreditsConfig
from proxy.credits.book import CreditBook
from proxy.credits.ledger import GrantState
from proxy.credits.monetary import (
    FINALIZATION_GRACE,
    Category,
    balance_check,
    credit_grant_params,
    give_back,
    is_volume,
    micro_per_minor,
    replay,
    true_up,
)
from proxy.credits.money import MoneyBook, Opening, account_prices
from proxy.errors import MeterproxyError, StripeCallError, StripeRejected
from proxy.periods import minute_bounds, period_bounds, usage_period
from proxy.pricing import Price
from proxy.store.keys import Customer, KeyCache
from proxy.store.protocols import CreditLedger, GrantMirrorRecord, GrantMirrors, UsageLedger
from proxy.stripe.client import StripeClient
from proxy.tasks import wait_event

log = logging.getLogger("meterproxy.credits.monetary")

TAKEN = "#t"
FIRST_RETRY = 1.0
MAX_RETRY = 3600.0
# an account's opening deferred (the customer's rows recorded before it were still not
# committed after ``committed``'s wait: a storage outage) is tried again this much later
OPEN_RETRY = 30.0
# at most this many settlements wait for one opening (each keeps its request's context and
# measurement in memory until it is made: a few KB, more for a large request body read)
MAX_WAITING = 10_000
COVERED_SCAN_LIMIT = 1_000_000      # ledger entries read to rebuild a period's covered sum
TRUE_UP_DELAY = 60.0    # seconds after a period end before its give-back is computed (the
                        # last requests settled before the end are committed by then)
DEBT = "debt:"          # mirror row key prefix of a block customer's debt cover
TRUE_UP = "trueup:"     # source (and idempotency key) prefix of a period's give-back grant

# (customer, micro-credits, idempotency key and source, expires_at) -> created now
GiveBack = Callable[[str, int, str, int | None], Awaitable[bool]]


class MirrorProblem(MeterproxyError):
    """A row that cannot be mirrored for a local reason (retried like a Stripe outage)."""


def category(g: GrantState) -> Category:
    """``paid`` for what a Stripe payment bought (packs, plan allowances, prorations: their
    source is ``stripe:<invoice or event>``), ``promotional`` for the rest (admin grants)."""
    return "paid" if g.source.startswith("stripe:") else "promotional"


def split_key(key: str) -> tuple[str, int | None]:
    """A mirror row's key: a local grant id, or ``<grant id>#t<micro-credits taken>`` for
    the Stripe grant that replaces the grant's mirror once credits left it without a request
    spending them (a claw-back's ``refund``, a ``repay`` of debt): Stripe grants cannot
    shrink, so the old one is voided and a replacement holds what is left."""
    base, sep, taken = key.partition(TAKEN)
    return base, (int(taken) if sep and taken.isdigit() else None)


def debt_range(key: str) -> tuple[int, int]:
    """A debt cover row's key ``debt:<customer>:<from>-<to>``: the micro-credits of the
    customer's cumulative settlement debt it covers at Stripe ((0, 0) for another key)."""
    _, _, span = key.rpartition(":")
    lo, sep, hi = span.partition("-")
    if not (key.startswith(DEBT) and sep and lo.isdigit() and hi.isdigit()):
        return 0, 0
    return int(lo), int(hi)


def idempotency_key(r: GrantMirrorRecord) -> str:
    """The create's key: the local grant id and the row's attempt (its attempt count and
    last change), so a resend of one attempt replays it, while the next attempt is a new
    request (Stripe stores a 5xx answer under its key too and would replay it for 24 h).
    Duplicates across attempts are prevented by ``find_credit_grant`` before each create."""
    return f"meterproxy-grant-{r.grant_id}-{r.attempts}-{r.updated_at}"


class MonetaryService:
    def __init__(self, cfg: CreditsConfig, keys: KeyCache, usage: UsageLedger,
                 ledger: CreditLedger, mirrors: GrantMirrors, book: CreditBook,
                 money: MoneyBook, prices: Callable[[], Mapping[str, Price]],
                 stripe: StripeClient | None, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.keys = keys
        self.usage = usage
        self.ledger = ledger
        self.mirrors = mirrors
        self.book = book
        self.money = money
        self.prices = prices
        self.stripe = stripe
        self.clock = clock
        self._seen: tuple[object, dict[str, Price]] | None = None
        # set by the composition root (``Store.committed_for``): waits until the group
        # commit holds no row of the customer, False past its bound (``open``)
        self.committed: Callable[[str], Awaitable[bool]] | None = None
        # ... and ``Store.grouped``: the settlements that waited are made in one group commit
        self.grouped: Callable[[], AbstractContextManager[None]] = nullcontext
        # settlements an opening keeps waiting at most (the composition root: the store's
        # ``max_pending_rows``, at most MAX_WAITING); past it the opening is deferred
        self.max_waiting = MAX_WAITING
        self._open_retry: dict[str, float] = {}    # customer -> when to try its opening again
        # one sync at a time: an admin write's and the loop's would otherwise both open one
        # customer's account, or one open an account a later sync (the customer switched
        # back meanwhile) had found nothing to close for
        self._sync_lock = asyncio.Lock()
        self._known: dict[str, str] | None = None
        self.last_check: dict[str, dict[str, Any]] = {}
        self.wake = asyncio.Event()
        self._taken_from: set[str] = set()      # customers whose grants lost credits
        self._scanned = False                   # every account scanned once since start
        # volume give-backs: set by the composition root (CreditService.grant); the
        # (customer, meter, period start) already settled by this process
        self.give: GiveBack | None = None
        self._trued: set[tuple[str, str, int]] = set()
        self._debt_to: dict[str, int] | None = None
        # customer -> the latest usage-period end of an invoice Stripe finalized (webhooks;
        # persisted by ``mirrors.finalize``, read back at the first pass after a start)
        self._finalized: dict[str, int] | None = None

    def taken(self, customer_id: str) -> None:
        """``CreditService.on_taken``: credits left a grant of this customer without a
        request spending them; its Stripe grants are re-checked on the next pass."""
        self._taken_from.add(customer_id)
        self.wake.set()

    async def finalized(self, customer_id: str, period_end: int) -> None:
        """``invoice.finalized`` (``WebhookReceiver.on_finalized``): Stripe has applied the
        credits to the customer's invoice for usage up to ``period_end``, so a Stripe grant
        kept live past its local expiry (``FINALIZATION_GRACE``) for that invoice is voided
        now, if the local grant expired by ``period_end``. Stored (``mirrors.finalize``)
        before it is acted on, so a restart still voids such grants (a failed write fails
        the webhook's processing, which is retried)."""
        moved = await self.mirrors.finalize(customer_id, period_end, int(self.clock()))
        if self._finalized is not None and period_end > self._finalized.get(customer_id, 0):
            self._finalized[customer_id] = period_end
            moved = True
        if moved:
            self._taken_from.add(customer_id)
            self.wake.set()

    def mode(self, c: Customer) -> str:
        """The customer's credits mode: its own ``credit_mode``, else ``credits.mode``."""
        return c.credit_mode or self.cfg.mode

    def quantum(self, customer_id: str) -> int:
        """Micro-credits in one minor unit of the customer's currency when it is monetary
        (``CreditService.quantum``: grants are whole minor units), else 1."""
        acct = self.money.account(customer_id)
        return acct.per_minor if acct is not None else 1

    def problems(self, c: Customer) -> list[str]:
        """Why this customer's prices cannot be burned in money (a currency mismatch)."""
        return account_prices(dict(self.prices()), c.currency)[2]

    # ---- accounts -------------------------------------------------------------------------

    async def sync(self) -> int:
        """Open/close accounts to match the customers' modes; returns accounts opened. A
        no-op unless the key cache's customers or the prices changed since the last call.
        One at a time (``_sync_lock``); an opening that failed or was deferred leaves the
        next call to try again."""
        async with self._sync_lock:
            try:
                return await self._sync()
            except BaseException:
                self._seen = None
                raise

    async def _sync(self) -> int:
        customers = self.keys.customers
        prices = dict(self.prices())
        if self._seen is not None and self._seen[0] is customers and self._seen[1] == prices:
            return 0
        self._seen = (customers, prices)
        opened = 0
        deferred = False
        now = self.clock()
        for cid, c in customers.items():
            acct = self.money.account(cid)
            if self.mode(c) != "monetary":
                self._open_retry.pop(cid, None)
                if acct is not None:
                    self.money.close(cid)
                    log.info("customer %s: credits are units again", cid)
                continue
            cur, mine, problems = account_prices(prices, c.currency)
            if problems:
                log.error("customer %s cannot use monetary credits: %s", cid,
                          "; ".join(problems))
            if acct is not None and acct.anchor == c.billing_anchor and acct.currency == cur:
                if acct.prices != mine:
                    self.money.reprice(cid, mine)
                continue
            if now < self._open_retry.get(cid, 0.0) or not await self.open(c, cur, mine):
                deferred = True
                continue
            self._open_retry.pop(cid, None)
            opened += 1
        for acct in self.money.accounts():
            if acct.customer_id not in customers:
                self.money.close(acct.customer_id)
        if deferred:
            self._seen = None       # an opening deferred: the next call tries again
        return opened

    async def open(self, c: Customer, currency: str, prices: Mapping[str, Price]) -> bool:
        """Open ``c``'s account from the ledger, while the customer is served. The reads
        below are asynchronous: a request settled while they ran, in the unit mode, would be
        in neither them nor the account, which would then burn at the wrong tier for the
        rest of the period. So from here on its settlements wait (``Opening``,
        ``Settlement.record``, at most ``max_waiting`` of them); once the rows settled
        before are committed (``committed``), the journal caught up and the account open,
        they are made, in order, in the monetary mode. Nothing is refused and no request
        in flight is waited for. False (nothing opened; tried again ``OPEN_RETRY`` later,
        the waiting settlements made in the mode the customer was in) when those rows were
        not committed in time (a storage outage) or more than ``max_waiting`` came; an
        error in the reads is raised, also tried again ``OPEN_RETRY`` later."""
        opening = self.money.opening[c.id] = Opening(self.max_waiting)
        try:
            if self.committed is not None and not await self.committed(c.id):
                why = "its usage rows are not committed yet (storage not taking writes)"
            elif opening.spoiled or not await self._open(c, currency, prices, self.clock(),
                                                         opening):
                why = (f"more than {self.max_waiting} of its requests settled while it "
                       "read the ledger")
            else:
                return True
            self._open_retry[c.id] = self.clock() + OPEN_RETRY
            log.warning("customer %s: its monetary account did not open: %s; tried again "
                        "in %.0f s", c.id, why, OPEN_RETRY)
            return False
        except Exception:
            self._open_retry[c.id] = self.clock() + OPEN_RETRY
            raise
        finally:
            # (no await since the account opened: nothing settled in between)
            if self.money.opening.get(c.id) is opening:
                del self.money.opening[c.id]
            fatal: BaseException | None = None
            with self.grouped():                # (one group commit for them all)
                for settle in opening.waiting:
                    try:
                        settle()
                    except Exception:           # one failing must not strand the others
                        log.exception("customer %s: a settlement that waited for its "
                                      "account's opening failed", c.id)
                    except BaseException as exc:    # (their holds and waiters too)
                        fatal = fatal or exc
            if fatal is not None:
                raise fatal

    async def _open(self, c: Customer, currency: str, prices: Mapping[str, Price],
                    now: float, opening: Opening) -> bool:
        await self.usage.materialize()      # usage (and its debits) still in the journal
        # the period so far by the minute rule (``proxy.periods``), the one the account
        # settles into (``usage_period``): with an anchor at 12:30:15 the minute 12:30:00 and
        # its requests are the previous period's, as staging bills them
        start, period_end = usage_period(c.billing_anchor, now)
        end = min(now + 60, period_end)
        _s, _e, totals = await self.usage.usage(c.id, start, end, now=now)
        covered: dict[str, int] = {}
        start_ms = start * 1000
        debt_total = 0
        for e in await self.ledger.entries(c.id, COVERED_SCAN_LIMIT):
            if e.kind == "debit" and e.meter and e.at_ms >= start_ms:
                covered[e.meter] = covered.get(e.meter, 0) + e.amount
            elif e.kind == "debt" and e.meter:      # settlement debt (claw-backs: no meter)
                debt_total += e.amount
        charged: dict[str, int] = {}
        for meter, price in prices.items():
            if is_volume(price) and meter in totals:
                qs, _cov = await self._period_rows(c.id, meter, start, end)
                charged[meter] = replay(price, qs)[1]
        if opening.spoiled:
            return False            # a settlement was made during the reads: not in them
        self.money.open(c.id, c.billing_anchor, currency, prices,
                        {m: t.quantity for m, t in totals.items()}, now, covered, charged,
                        debt_total)
        log.info("customer %s: monetary credits in %s", c.id, currency)
        return True

    async def _period_rows(self, customer_id: str, meter: str, start: float, end: float
                           ) -> tuple[list[int], int]:
        """The meter's quantities (micro-units) in [start, end) in settlement order (the
        audit rows, by time then commit order), and the micro-credits credits covered."""
        qs: list[int] = []
        covered = 0
        async for batch in self.usage.audit_stream(customer_id, start, end):
            for a in batch:
                if a.meter == meter:
                    qs.append(a.quantity)
                    covered += a.credits
        return qs, covered

    # ---- volume give-backs ------------------------------------------------------------------

    async def true_ups(self) -> int:
        """Once a period has closed (``TRUE_UP_DELAY`` after its end), give back to each
        monetary customer with a volume-priced meter what credits covered beyond the
        period's final line (``proxy.credits.monetary.give_back``): a local grant, keyed
        ``trueup:<meter>:<period start>`` so it is made once whatever restarts, expiring
        with the latest-expiring grant the period's burns came from (the credit it returns
        would have expired with them; none once they all have). Stripe holds it already (it
        applied the mirrored grants to the lower line), so its mirror creates no Stripe
        grant. Returns the grants made."""
        if self.give is None:
            return 0
        made = 0
        now = self.clock()
        for acct in self.money.accounts():
            cid = acct.customer_id
            start = period_bounds(acct.anchor, now)[0]
            if now < start + TRUE_UP_DELAY:
                start = period_bounds(acct.anchor, start - 1)[0]   # the one before is open
            prev_start, prev_end = period_bounds(acct.anchor, start - 1)
            for meter, price in acct.prices.items():
                key = (cid, meter, prev_start)
                if not is_volume(price) or key in self._trued:
                    continue
                await self.usage.materialize()
                qs, covered = await self._period_rows(cid, meter, prev_start, prev_end)
                total, burned = replay(price, qs)
                # never more than the money burns' excess (a period partly burned in the
                # units mode covered unit credits, not money)
                amount = min(give_back(price, covered, total, acct.per_minor),
                             true_up(price, burned, total) * acct.per_minor) if qs else 0
                amount -= amount % acct.per_minor
                expires = await self._give_back_expiry(cid, meter, prev_start, prev_end)
                if amount > 0 and (expires is None or expires > now) and \
                        await self.give(cid, amount, f"{TRUE_UP}{meter}:{prev_start}", expires):
                    made += 1
                    log.info("customer %s: volume give-back of %d micro-credits for %s, "
                             "period from %d", cid, amount, meter, prev_start)
                self._trued.add(key)
        return made

    async def _give_back_expiry(self, customer_id: str, meter: str, start: int, end: int
                                ) -> int | None:
        """The latest expiry among the grants the meter's burns in [start, end) were debited
        from (None when one of them never expires)."""
        lo, hi = minute_bounds(start, end)
        ids = {e.grant_id for e in await self.ledger.entries(customer_id, COVERED_SCAN_LIMIT)
               if e.kind == "debit" and e.meter == meter and e.grant_id
               and lo * 1000 <= e.at_ms < hi * 1000}
        latest = 0
        for gid in ids:
            g = self.book.grant(gid)
            if g is None or g.expires_at is None:
                return None
            latest = max(latest, g.expires_at)
        return latest or None

    # ---- the mirror -----------------------------------------------------------------------

    async def discover(self) -> int:
        """Mirror rows for the book's grants of monetary customers: ``live`` for a grant
        with none (live or not yet effective), ``void`` for every live row of a grant voided
        here, and after a claw-back or a debt repayment took credits from a mirrored grant
        (re-checked for the customers ``taken`` names, and for everyone once after start) a
        replacement row ``<grant>#t<taken>`` with the rows it replaces voided. Returns the
        rows changed."""
        if self._known is None:
            self._known = await self.mirrors.known()
        if self._finalized is None:
            self._finalized = await self.mirrors.finalized()
        known, finalized = self._known, self._finalized
        by_base: dict[str, list[str]] = {}
        for k in known:
            by_base.setdefault(split_key(k)[0], []).append(k)
        if self._scanned:
            scan, self._taken_from = self._taken_from, set()
        else:
            scan, self._scanned = {a.customer_id for a in self.money.accounts()}, True
        now = self.clock()
        rows: list[tuple[str, str, str]] = []
        for acct in self.money.accounts():
            cid = acct.customer_id
            for g in self.book.grants(cid):
                keys = by_base.get(g.id, [])
                live = [k for k in keys if known[k] == "live"]
                if g.voided or (g.expires_at is not None and g.expires_at <= now
                                and g.expires_at <= finalized.get(cid, 0)):
                    rows += [(k, cid, "void") for k in live]
                elif not keys:
                    if g.live(now) or g.pending(now):
                        rows.append((g.id, cid, "live"))
                elif cid in scan and live and (t := await self._taken(g.id)):
                    key = f"{g.id}{TAKEN}{t}"
                    if key not in known:
                        rows += [(k, cid, "void") for k in live] + [(key, cid, "live")]
        if self._debt_to is None:           # customer -> debt covered at Stripe so far
            self._debt_to = {}
            for k in known:
                if k.startswith(DEBT):
                    c = k[len(DEBT):k.rfind(":")]
                    self._debt_to[c] = max(self._debt_to.get(c, 0), debt_range(k)[1])
        for acct in self.money.accounts():
            covered_to = self._debt_to.get(acct.customer_id, 0)
            if acct.debt_total > covered_to:
                rows.append((f"{DEBT}{acct.customer_id}:{covered_to}-{acct.debt_total}",
                             acct.customer_id, "live"))
        if not rows:
            return 0
        n = await self.mirrors.want(rows, int(now))
        for gid, cid, want in rows:
            known[gid] = want
            if gid.startswith(DEBT):
                self._debt_to[cid] = debt_range(gid)[1]
        return n

    async def _taken(self, grant_id: str) -> int:
        """Micro-credits that left the grant without a request spending them."""
        return await self.ledger.entry_total(grant_id, "refund") \
            + await self.ledger.entry_total(grant_id, "repay")

    async def _value(self, g: GrantState, taken: int | None, anchor: int | None,
                     per_minor: int) -> int:
        """What the grant's Stripe credit grant holds (micro-credits, whole minor units):
        its amount less what was taken from it (``taken``, else the ledger's figure now)
        and, for a replacement (``taken`` given), less what requests spent from it before
        the open period (applied by Stripe to invoices already finalized). What the open
        period spends stays in it: Stripe applies that when it finalizes the period's
        invoice."""
        first = taken is None
        if g.source.startswith(TRUE_UP):
            return 0        # a volume give-back: Stripe's grants still hold it
        if taken is None:
            taken = await self._taken(g.id)
        before = 0
        if not first:
            # a replacement: the grant it replaces was at Stripe, which applied what earlier
            # periods spent from it to their invoices. A first mirror made after a period
            # the grant covered locally (Stripe unreachable across the period end) was
            # not: that period's invoice charged the usage in full, so the Stripe grant
            # holds it all and the balance check shows the difference (docs/credits.md)
            start_ms = usage_period(anchor, self.clock())[0] * 1000
            before = sum(e.amount for e in await self.ledger.entries(g.customer_id,
                                                                     COVERED_SCAN_LIMIT)
                         if e.grant_id == g.id and e.kind == "debit" and e.at_ms < start_ms)
        value = max(g.amount - taken - before, 0)
        return value - value % per_minor

    async def mirror_due(self, limit: int = 100) -> int:
        """Work the due rows once; returns how many reached the state they want."""
        if self.stripe is None:
            return 0
        done = 0
        now = self.clock()
        # voids first: a replacement is never live at Stripe beside the grant it replaces
        for r in sorted(await self.mirrors.due(now, limit), key=lambda r: r.want != "void"):
            try:
                await self._mirror(r)
                done += 1
            except (StripeCallError, MirrorProblem) as exc:
                await self._failed(r, exc)
        await self.gauges()
        return done

    async def _failed(self, r: GrantMirrorRecord, exc: Exception) -> None:
        attempts = r.attempts + 1
        dead = isinstance(exc, StripeRejected) or attempts >= self.cfg.mirror_max_attempts
        now = self.clock()
        retry = None if dead else now + backoff(attempts, first=FIRST_RETRY, cap=MAX_RETRY)
        await self.mirrors.fail(r.grant_id, f"{type(exc).__name__}: {exc}", retry, int(now))
        metrics.credit_grant_mirrors_total.labels("dead" if dead else "retry").inc()
        log.warning("credit grant mirror of %s (%s): %s%s", r.grant_id, r.customer_id, exc,
                    " (dead-lettered)" if dead else "")

    async def _mirror(self, r: GrantMirrorRecord) -> None:
        stripe = self.stripe
        assert stripe is not None
        cust = self.keys.customers.get(r.customer_id)
        scid = cust.stripe_customer_id if cust is not None else None
        if not scid:
            raise MirrorProblem(f"customer {r.customer_id!r} has no stripe_customer_id")
        at = int(self.clock())
        if r.done == "none":
            found = await stripe.find_credit_grant(scid, r.grant_id)
            if found is not None:
                sid, voided = found
                if r.want == "void" and not voided:
                    await stripe.void_credit_grant(sid)
                    metrics.credit_grant_mirrors_total.labels("voided").inc()
                metrics.credit_grant_mirrors_total.labels("found").inc()
                await self.mirrors.progress(r.grant_id, "void" if voided else r.want, sid, at)
                return
            if r.want == "void":            # never created at Stripe: nothing to void
                await self.mirrors.progress(r.grant_id, "void", None, at)
                return
            if r.grant_id.startswith(DEBT):
                await self._cover_debt(r, scid, at)
                return
            base, taken = split_key(r.grant_id)
            g = self.book.grant(base)
            if g is None:
                raise MirrorProblem(f"no local grant {base!r}")
            if taken is not None:           # a replacement: only once what it replaces is void
                waiting = [m.grant_id for m in await self.mirrors.rows(
                               customer_id=r.customer_id, limit=100_000)
                           if m.grant_id != r.grant_id and split_key(m.grant_id)[0] == base
                           and m.done != "void" and (m.want == "void" or m.done == "live")]
                if waiting:
                    raise MirrorProblem(f"waiting for {', '.join(sorted(waiting))} to be voided"
                                        " at Stripe before creating its replacement")
            acct = self.money.account(r.customer_id)
            currency = acct.currency if acct is not None else \
                account_prices(dict(self.prices()), cust.currency if cust else None)[0]
            per = micro_per_minor(currency)
            if g.amount % per:
                raise StripeRejected(f"{g.amount} micro-credits is not a whole number of"
                                     f" {currency} minor units")
            value = await self._value(g, taken, cust.billing_anchor if cust else None, per)
            if value <= 0:                  # nothing left to hold at Stripe
                await self.mirrors.progress(r.grant_id, "live", None, at)
                return
            shown = GrantState(r.grant_id, g.customer_id, value, g.priority, g.expires_at,
                               g.created_at, g.source, effective_at=g.effective_at)
            params = credit_grant_params(shown, scid, currency, category(g))
            sid = await stripe.create_credit_grant(params, idempotency_key=idempotency_key(r))
            metrics.credit_grant_mirrors_total.labels("created").inc()
            await self.mirrors.progress(r.grant_id, "live", sid, at)
            return
        if r.want == "void":
            if r.stripe_grant_id:
                try:
                    await stripe.void_credit_grant(r.stripe_grant_id)
                except StripeRejected as exc:
                    if "already voided" not in str(exc):
                        raise
                metrics.credit_grant_mirrors_total.labels("voided").inc()
            await self.mirrors.progress(r.grant_id, "void", None, at)
            return
        await self.mirrors.progress(r.grant_id, r.done, None, at)   # nothing left to do

    async def _cover_debt(self, r: GrantMirrorRecord, scid: str, at: int) -> None:
        """A block customer's settlement debt ``[from, to)`` (``debt_range``) as a
        promotional Stripe credit grant of that amount (rounded up to a whole minor unit),
        priority 0, expiring with the period it was recorded in (plus Stripe's finalization
        grace): every unit is reported, and this grant keeps what credits did not cover off
        the invoice. The debt itself is repaid from the customer's next grant, whose mirror
        then holds that much less (``_value``), so Stripe's credit and the local balance
        agree. Not made once that period's invoice has been finalized (too late to help)."""
        stripe = self.stripe
        assert stripe is not None
        acct = self.money.account(r.customer_id)
        cust = self.keys.customers.get(r.customer_id)
        if acct is None:
            raise MirrorProblem(f"customer {r.customer_id!r} is not monetary")
        lo, hi = debt_range(r.grant_id)
        per = acct.per_minor
        value = -(-(hi - lo) // per) * per
        end = period_bounds(cust.billing_anchor if cust else None, r.created_at)[1]
        if value <= 0 or end + FINALIZATION_GRACE <= at:
            log.warning("debt of customer %s (%s) not covered at Stripe: %s", r.customer_id,
                        r.grant_id, "nothing to cover" if value <= 0 else "period closed")
            await self.mirrors.progress(r.grant_id, "live", None, at)
            return
        shown = GrantState(r.grant_id, r.customer_id, value, 0, end, r.created_at,
                           "debt cover")
        params = credit_grant_params(shown, scid, acct.currency, "promotional")
        sid = await stripe.create_credit_grant(params, idempotency_key=idempotency_key(r))
        metrics.credit_grant_mirrors_total.labels("created").inc()
        await self.mirrors.progress(r.grant_id, "live", sid, at)

    async def gauges(self) -> None:
        for status in ("pending", "dead"):
            metrics.credit_grant_mirrors.labels(status).set(
                len(await self.mirrors.rows(status=status, limit=100_000)))

    # ---- reconciliation ---------------------------------------------------------------------

    async def balance_check(self, customer_id: str) -> dict[str, Any]:
        """One monetary customer's local balance against Stripe's credit balance summary
        (``proxy.credits.monetary.balance_check``), with the local figures it used."""
        if self.stripe is None:
            raise MirrorProblem("no Stripe key: balances cannot be compared")
        acct = self.money.account(customer_id)
        cust = self.keys.customers.get(customer_id)
        if acct is None or cust is None:
            raise LookupError(f"customer {customer_id!r} is not in the monetary credits mode")
        if not cust.stripe_customer_id:
            raise MirrorProblem(f"customer {customer_id!r} has no stripe_customer_id")
        summary = await self.stripe.credit_balance_summary(cust.stripe_customer_id)
        now = self.clock()
        local = self.book.balance(customer_id, now)
        covered_minor = acct.covered(now) // acct.per_minor
        out = balance_check(local, covered_minor, summary, acct.currency)
        pending = await self.mirrors.rows(status="pending", customer_id=customer_id)
        dead = await self.mirrors.rows(status="dead", customer_id=customer_id)
        out.update(customer_id=customer_id, local_balance=local // acct.per_minor,
                   period_covered=covered_minor, period_burned=acct.burned(now),
                   mirrors_pending=len(pending), mirrors_dead=len(dead))
        if out["difference"] and (pending or dead):
            out["explanation"] += (f" ({len(pending)} grant(s) waiting to be mirrored,"
                                   f" {len(dead)} dead-lettered)")
        self.last_check[customer_id] = out
        return out

    async def check_all(self) -> list[dict[str, Any]]:
        """Every monetary customer with a Stripe id; sets the mismatch gauge."""
        out: list[dict[str, Any]] = []
        for acct in self.money.accounts():
            cust = self.keys.customers.get(acct.customer_id)
            if cust is None or not cust.stripe_customer_id:
                continue
            try:
                got = await self.balance_check(acct.customer_id)
            except (StripeCallError, MirrorProblem, LookupError) as exc:
                metrics.credit_balance_checks_total.labels("error").inc()
                out.append({"customer_id": acct.customer_id, "error": str(exc)})
                continue
            metrics.credit_balance_checks_total.labels(
                "match" if got["difference"] == 0 else "mismatch").inc()
            out.append(got)
        metrics.credit_balance_mismatch.set(sum(1 for o in out if o.get("difference")))
        return out

    # ---- the loop ---------------------------------------------------------------------------

    async def run(self, interval: float = 1.0) -> None:
        """Sync accounts, discover and mirror grants every ``interval`` (or when woken),
        and check balances every ``credits.balance_check_interval``."""
        next_check = self.clock() + self.cfg.balance_check_interval
        while True:
            try:
                await self.sync()
                await self.true_ups()
                await self.discover()
                await self.mirror_due()
                if self.cfg.balance_check_interval > 0 and self.clock() >= next_check \
                        and self.stripe is not None:
                    next_check = self.clock() + self.cfg.balance_check_interval
                    await self.check_all()
            except asyncio.CancelledError:
                raise
            except Exception:       # the loop must survive a storage hiccup: retried next pass
                log.exception("monetary credits pass failed")
            self.wake.clear()
            await wait_event(self.wake, interval)
