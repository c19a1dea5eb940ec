"""Fleet mode's part of start-up and shutdown (``storage.backend: postgres``); the
composition root (``proxy.app``) calls ``open_fleet`` and registers the tasks and the close.

What a member runs, besides serving:

- its local SQLite ``Store`` stays the **journal** (``storage.durability`` on the hot path,
  no network round trip); it is opened with ``keep_journal`` so every group commit, strict
  or batched, journals one row per usage row, never moved into local tables, only shipped
  and then pruned;
- ``PostgresStorage`` is ``rt.storage``: the admin API, the consumer page, exports, webhooks,
  alerts and reconciliation read and write the fleet's truth;
- the **shipper** ships the journal every ``fleet.ship_interval`` (and whenever the flusher
  materializes), then prunes what shipped;
- **keys**: the storage's LISTEN connection moves ``customers.data_version`` when any member
  changes a key or customer; the key cache reloads on the next ``fleet.key_poll_interval``
  tick (a dead listener is reopened; while it is down every tick reloads);
- **leadership** of the ``flusher`` duty, tried every ``leader_ttl / 3``: exactly one member
  stages and delivers; its outbox writes run in fenced transactions (``FencedPool``);
- **leases**: renewed every ``lease_ttl / 3``, returned once idle for ``fleet.lease_idle``;
  abandoned leases reaped by every member
  (``SKIP LOCKED``: reapers never queue behind each other);
- **credits**: every ``fleet.ship_interval`` the credit service's book reloads the customers
  whose shared per-grant state moved (``credits_forever``), so grant views, expiry,
  claw-backs and threshold alerts work from every member's spending.

Shutdown (``Fleet.close``, after requests drained and the final flush): ship the journal,
release leases, resign leadership, close the listener and the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from proxy import metrics
from proxy.config import Config
from proxy.credits.book import CreditBook
from proxy.errors import StorageError
from proxy.fleet.book import LeaseBook
from proxy.fleet.credits import FleetCredits
from proxy.fleet.journal_shipping import JournalShipping
from proxy.fleet.settings import lease_policy, member_id, pool_settings
from proxy.store.db import Store
from proxy.store.postgres import grant_debits
from proxy.store.postgres import members as pg_members
from proxy.store.postgres.conn import Conn
from proxy.store.postgres.errors import PgConflict, PgUnavailable
from proxy.store.postgres.journal import SqliteJournal, shipped_under
from proxy.store.postgres.leader import Deposed, Leadership
from proxy.store.postgres.leases import LeaseStore
from proxy.store.postgres.members import Superseded
from proxy.store.postgres.outbox import PostgresOutbox
from proxy.store.postgres.pool import PgPool
from proxy.store.postgres.storage import PostgresStorage, as_storage, ensure_schema
from proxy.store.protocols import Storage
from proxy.tasks import cancel_and_wait, wait_event
from proxy.units import fmt_micro, to_micro

log = logging.getLogger("meterproxy.fleet")

FLUSHER_DUTY = "flusher"
STATUS_CUSTOMERS = 500
"""At most this many customers (by id) in ``GET /admin/fleet``'s per-customer lease view."""
ERRORS: tuple[type[Exception], ...] = (PgUnavailable, PgConflict, Deposed, Superseded)
"""What the fleet's background loops log and retry (the database away, a deadlock or
serialization failure still there after ``PgPool.retrying``'s attempts, leadership lost,
the member id claimed by another process)."""
_SHUTDOWN_ERRORS: tuple[type[Exception], ...] = (TimeoutError, *ERRORS)


class FencedPool(PgPool):
    """A ``PgPool`` whose every ``acquire`` is a fenced transaction of ``lead``: the outbox
    owner built on it writes only while this member holds the flusher duty with the fence
    it had (``Deposed`` otherwise, nothing written)."""

    def __init__(self, pool: PgPool, lead: Leadership) -> None:
        super().__init__(pool.settings)
        self.inner = pool
        self.lead = lead

    async def open(self, run_migrations: bool = True) -> None:
        raise RuntimeError("a FencedPool borrows an open pool")

    async def close(self) -> None:
        return None

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Conn]:
        async with self.lead.fenced() as conn:
            yield conn


class LockedShipping:
    """``JournalShipping`` with one ship at a time (the timer and the flusher's materialize
    both ship) and the journal pruned after each ship."""

    def __init__(self, shipping: JournalShipping, store: Store) -> None:
        self.shipping = shipping
        self.store = store
        self.lock = asyncio.Lock()
        self.last_ok: float | None = None        # wall clock of the last complete ship
        self.shipped = 0

    @property
    def watermark(self) -> int:
        return self.shipping.shipper.watermark

    async def resume(self) -> None:
        """At start, before any row is journaled: load the shared ledger's watermark for
        this member id and put the journal's next seq above it (a journal that starts
        empty, its volume gone, must not reuse a shipped seq). Rows the journal holds at or
        below the watermark that the shared ledger does not hold under the id at their seq
        (numbered here while another process of the id shipped its own rows under those
        seqs: this one was killed or stalled, and its volume came back) are renumbered
        above it, so they ship instead of being taken for shipped and pruned
        (``JournalShipping.numbered_elsewhere``)."""
        async with self.lock:
            watermark = await self.shipping.resume()
            self.store.raise_journal_floor(watermark)
            found = await self.shipping.numbered_elsewhere(watermark)
            if found.seqs:
                moved = self.store.renumber_journal(found.seqs, watermark)
                log.warning("renumbered %d journal row(s) of member %s in %s: journaled under "
                            "seqs %d..%d, which another process of that member id shipped "
                            "rows of its own under; they ship above its watermark %d",
                            moved, self.shipping.member_id, self.store.path, found.seqs[0],
                            found.seqs[-1], watermark)
            if found.debited:
                log.warning("%d journal row(s) of member %s in %s at or below its watermark "
                            "%d are not in the shared ledger, but their grant debits are "
                            "(shipped under the old seqs before the usage): not shipped again "
                            "(the grant would be debited twice); their usage is not in the "
                            "shared ledger", found.debited, self.shipping.member_id,
                            self.store.path, watermark)
            if found.older:
                log.warning("%d journal row(s) of member %s in %s at or below its watermark "
                            "%d are not in the shared ledger and are older than what the "
                            "audit retention pruned: taken for shipped rows it pruned, and "
                            "not shipped", found.older, self.shipping.member_id,
                            self.store.path, watermark)

    async def ship_pending(self) -> int:
        async with self.lock:
            n = await self.shipping.ship_pending()
            self.shipped += n
            self.last_ok = time.time()
            if n:
                self.store.prune_journal(self.watermark)
            return n

    def pending(self) -> int:
        """Journal rows not shipped yet (a local read)."""
        return self.store.journal_rows_after(self.watermark)


@dataclass
class Fleet:
    cfg: Config
    member_id: str
    pool: PgPool
    storage: PostgresStorage
    store: Store
    shipping: LockedShipping
    lead: Leadership
    leases: LeaseStore
    book: LeaseBook
    credits: FleetCredits
    instance: str | None = None         # this process's claim on member_id (members.claim)
    # why this process stopped metering: another process claimed its member id
    superseded: str | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _credit_revs: tuple[int, int] = (-1, -1)     # credit revisions: the pass before, the last

    def owners(self) -> Storage:
        return as_storage(self.storage)

    async def keep_listening(self) -> None:
        """Reopen the storage's LISTEN connection if it died."""
        conn = self.storage.listener
        if conn is not None and not conn.is_closed():
            return
        self.storage.listener = None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)
        await self.storage.watch()

    def flusher_outbox(self) -> PostgresOutbox:
        """The outbox owner the flusher uses: every verb a fenced transaction."""
        return PostgresOutbox(FencedPool(self.pool, self.lead))

    # ---- background loops -----------------------------------------------------------

    async def _guarded(self, what: str, step: Callable[[], Awaitable[object]]) -> None:
        """One pass of a background loop: the database away is a warning, anything else is
        logged with its traceback; the loop goes on either way."""
        try:
            await step()
        except Superseded as exc:
            self._supersede(exc)
        except ERRORS as exc:
            log.warning("%s paused, PostgreSQL unreachable or conflicting, or leadership lost:"
                        " %s", what, exc)
        except Exception:
            log.exception("%s failed; retrying next pass", what)

    def _supersede(self, exc: Superseded) -> None:
        """Another process claimed this member id (this one stalled longer than
        ``leader_ttl``, or two run under one id): this one stops metering for good. Its store
        refuses metered requests as a broken one does (``storage.fail_mode``: closed answers
        503, open forwards them unbilled and counts them as lost), so no usage is journaled
        that this process could not ship; ``/readyz`` says why. The leases under the id are
        the other process's now: this one no longer renews, returns or reaps them (not even
        at shutdown), nor ships or leads."""
        if self.superseded is not None:
            return
        self.superseded = f"member id {self.member_id} was claimed by another process: {exc}"
        self.book.supersede(exc)       # (it calls back here: a no-op now)
        log.critical("%s. This process stopped metering (metered requests refused as with "
                     "broken storage); stop it, and give each process its own "
                     "fleet.member_id", self.superseded)
        self.store.stop_metering(f"fleet: {self.superseded}")

    async def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` or until stopping; True when stopping."""
        return await wait_event(self.stop, seconds)

    async def ship_forever(self) -> None:
        """Ship every ``fleet.ship_interval`` (``close`` ships the rest)."""
        while not await self._pause(self.cfg.fleet.ship_interval):
            await self._guarded("shipping", self.shipping.ship_pending)

    async def lead_forever(self, took_over: list[Callable[[], None]],
                           rules_version: Callable[[], str]) -> None:
        """Every ``leader_ttl / 3``: take or renew the flusher duty (``took_over`` callbacks
        run when this member becomes the leader), say this member is alive with its rules
        version, refresh the fleet gauges."""
        async def lead() -> None:
            was = self.lead.leads()
            if await self.lead.try_lead() and not was:
                log.info("%s leads the flusher (fence %s)", self.member_id, self.lead.fence)
                for cb in took_over:
                    cb()

        async def heartbeat() -> None:
            await pg_members.heartbeat(self.pool, self.member_id, rules_version(),
                                       self.instance)

        while True:
            await self._guarded("flusher leadership", lead)
            await self._guarded("fleet heartbeat", heartbeat)
            self.refresh_gauges()
            if await self._pause(self.cfg.fleet.leader_ttl / 3):
                return

    async def leases_forever(self) -> None:
        """Every ``lease_ttl / 3``: return leases idle for ``fleet.lease_idle``, renew the
        others, reap abandoned ones."""
        grace_ms = round(self.cfg.fleet.reaper_grace * 1000)

        async def renew_and_reap() -> None:
            if self.superseded is not None:
                return          # the leases under the id are the claiming process's
            await self.book.release_idle()
            for cid in list(self.book.held):
                await self.book.renew(cid)
            await self.leases.reap(grace_ms)

        while not await self._pause(self.cfg.fleet.lease_ttl / 3):
            await self._guarded("lease renewal", renew_and_reap)

    # ---- the shared ledger's per-grant state ---------------------------------------------

    async def credit_book(self) -> CreditBook:
        """The credit service's book at start: every customer's grants and debt as the
        shared ledger has them (``grants.used``; one indexed read, not every entry)."""
        book = CreditBook()
        customers, top = await grant_debits.changed(self.pool, -1)
        for cc in await grant_debits.grant_states(self.pool, customers):
            book.replace(cc.customer_id, cc.grants, cc.debt)
        self._credit_revs = (top, top)
        return book

    async def refresh_credits(self, book: CreditBook) -> list[str]:
        """Reload into ``book`` the customers whose shared credit state moved (any member's
        shipped spending, grants, expiries, voids, claw-backs); returns them. Revisions are
        drawn before their transaction commits, so each pass looks back to the watermark of
        the pass before (a write that committed up to one pass late is still seen)."""
        since = self._credit_revs[0]
        customers, top = await grant_debits.changed(self.pool, since)
        for cc in await grant_debits.grant_states(self.pool, customers):
            book.replace(cc.customer_id, cc.grants, cc.debt)
        self._credit_revs = (self._credit_revs[1], max(top, self._credit_revs[1]))
        return customers

    async def reload_credits(self, book: CreditBook, customers: list[str]) -> None:
        """Read ``customers`` back into ``book`` from the shared ledger now (the credit
        service's expiry task, after it wrote for them: ``CreditService.reload``)."""
        for cc in await grant_debits.grant_states(self.pool, customers):
            book.replace(cc.customer_id, cc.grants, cc.debt)

    async def overpaid(self) -> dict[str, int]:
        """Customers whose shared ledger holds repayments beyond their debt (a negative
        debt), for ``CreditService.give_back_unmatched`` at start-up (docs/fleet.md,
        "Repayments")."""
        return await grant_debits.overpaid(self.pool)

    async def credits_forever(self, book: CreditBook,
                              moved: Callable[[list[str]], None]) -> None:
        """Every ``fleet.ship_interval``: ``refresh_credits``, then ``moved(customers)`` (the
        composition root checks their threshold alerts and wakes the expiry loop)."""
        async def step() -> None:
            if got := await self.refresh_credits(book):
                moved(got)

        while not await self._pause(self.cfg.fleet.ship_interval):
            await self._guarded("credit refresh", step)

    async def customer_credits(self, customer_id: str) -> dict[str, Any]:
        """The fleet's view of one customer's credits (the same on every member): the
        account (balance, settled, escrowed, available) and what each member holds in
        leases, granted and reported."""
        acct, held = await self.leases.holdings(customer_id)
        return {"balance": fmt_micro(acct.balance), "settled": fmt_micro(acct.settled),
                "escrowed": fmt_micro(acct.escrowed), "available": fmt_micro(acct.available),
                "leases": [{"member_id": h.member_id, "granted": fmt_micro(h.granted),
                            "reported": fmt_micro(h.reported),
                            "unreported": fmt_micro(h.granted - h.reported),
                            "expires_in_seconds": round(h.expires_in_ms / 1000, 3)}
                           for h in held]}

    # ---- status -------------------------------------------------------------------------

    def refresh_gauges(self) -> None:
        metrics.fleet_leader.set(1 if self.lead.leads() else 0)
        metrics.fleet_journal_pending_rows.set(self.shipping.pending())
        last = self.shipping.last_ok
        metrics.fleet_ship_age_seconds.set(0 if last is None else max(0.0, time.time() - last))
        metrics.fleet_leases_held.set(len(self.book.held))
        metrics.fleet_lease_credits.set(sum(h.remaining for h in self.book.held.values())
                                        / 1_000_000)
        metrics.fleet_lease_refills_total.set(self.book.refills)
        metrics.fleet_lease_idle_returns.set(self.book.idle_returns)
        metrics.fleet_pg_statements.set(self.pool.statements)

    async def status(self) -> dict[str, Any]:
        """``GET /admin/fleet``: every member the database knows (rules version, last
        heartbeat, shipped watermark, leases held), who leads the flusher, per customer
        holding a lease (the first ``STATUS_CUSTOMERS`` by id) the fleet-wide available
        balance and each member's unreported lease credit, and this member's own shipping
        lag (``database: unreachable`` and no members when PostgreSQL cannot be reached)."""
        self.refresh_gauges()
        customers: list[dict[str, Any]] = []
        try:
            rows, leader = await pg_members.members(self.pool, FLUSHER_DUTY)
            leased = await self.leases.leased_customers(STATUS_CUSTOMERS)
            held = await self.leases.holdings_of(leased)
            database = "ok"
        except PgUnavailable as exc:
            log.warning("GET /admin/fleet: PostgreSQL unreachable: %s", exc)
            rows, leader, database, held = [], None, "unreachable", {}
        for cid, (acct, hs) in held.items():
            customers.append({
                "customer_id": cid, "available": fmt_micro(acct.available),
                "escrowed": fmt_micro(acct.escrowed),
                "leases": {h.member_id: fmt_micro(h.granted - h.reported) for h in hs}})
        last = self.shipping.last_ok
        return {
            "member_id": self.member_id,
            "database": database,
            "flusher": None if leader is None else {"leader": leader.holder,
                                                    "fence": leader.fence},
            "this_member": {
                "leads_flusher": self.lead.leads(),
                "journal_pending_rows": self.shipping.pending(),
                "shipped_seq": self.shipping.watermark,
                "seconds_since_ship": None if last is None else round(time.time() - last, 3),
                "leases_held": len(self.book.held),
                "lease_credits_left": fmt_micro(sum(h.remaining
                                                    for h in self.book.held.values())),
                "lease_refills": self.book.refills,
                "pg_statements": self.pool.statements,
            },
            "members": [{
                "id": r.id, "rules_version": r.rules_version, "shipped_seq": r.shipped_seq,
                "started_at": r.started_at.isoformat(), "last_seen": r.last_seen.isoformat(),
                "seconds_since_seen": round(r.seconds_since_seen, 3), "leases": r.leases,
                "lease_credits_unreported": fmt_micro(r.lease_credits_unreported),
            } for r in rows],
            "customers": customers,
        }

    # ---- shutdown -------------------------------------------------------------------

    async def close(self, timeout: float = 10.0) -> None:
        """Ship what is journaled, release leases, resign, close. Each step is bounded and
        a failure is logged: what did not ship stays in the journal for the next start."""
        self.stop.set()
        for t in self.tasks:
            _, late = await asyncio.wait([t], timeout=timeout)
            if late:
                await cancel_and_wait(t)
            elif not t.cancelled() and t.exception() is not None:
                log.warning("fleet shutdown: %s ended with %r", t.get_name(), t.exception())
        steps: tuple[tuple[str, Callable[[], Awaitable[object]]], ...] = (
            ("ship the journal", self.shipping.ship_pending),
            ("release leases", self.book.release_all),
            ("resign the flusher", self.lead.resign),
            ("release the member id", self._release))
        if self.superseded is not None:      # (shipping and leading are refused anyway)
            steps = (("resign the flusher", self.lead.resign),)
        for what, step in steps:
            try:
                async with asyncio.timeout(timeout):
                    await step()
            except _SHUTDOWN_ERRORS as exc:
                log.warning("fleet shutdown: could not %s: %s", what, exc)
        await self.storage.close()
        await self.pool.close()

    async def _release(self) -> None:
        if self.instance is not None:
            await pg_members.release(self.pool, self.member_id, self.instance)


async def _end_earlier_leases(shipping: LockedShipping, leases: LeaseStore) -> None:
    """At start, before serving: ship what an earlier process of this member id journaled,
    then end the leases it left active (their unspent credit back in the balance now, not
    once this member stops renewing them). Not while part of the journal is unshipped:
    those leases then return through the reaper as before."""
    try:
        await shipping.ship_pending()
    except ERRORS as exc:
        log.warning("could not ship the journal at start: %s", exc)
    if shipping.pending():
        return
    back = await leases.end_earlier()
    if back:
        log.info("ended %d lease(s) an earlier process of %s left (%s credits back)",
                 len(back), leases.member_id, fmt_micro(sum(back.values())))


async def _adopt_journal(cfg: Config, pool: PgPool, store: Store, mid: str,
                         instance: str) -> None:
    """At start, with ``mid`` claimed: make ``store``'s journal ``mid``'s. Its rows were
    numbered under the member id recorded in it (``Store.journal_owner``); shipped under
    another id they would be taken for rows that id already shipped (skipped, then pruned:
    lost) or count twice (a container recreated on the same volume with a new hostname, so
    a new default id). A journal another id wrote is first shipped to the end under that
    id (this process claims it for the time: refused while a live process holds it, a
    cloned volume), that id's leases ended as at its own restart, and only then adopted; a
    journal whose rows all shipped under that id is adopted at once (that id, perhaps
    running elsewhere, is neither claimed nor touched). A journal with no id recorded (new,
    or from before migration 16) is the id its rows already shipped under
    (``_shipped_owner``), else ``mid``'s."""
    recorded = store.journal_owner()
    if recorded == mid:
        return
    if recorded is None:
        recorded = await _shipped_owner(cfg, pool, store, mid)
        store.set_journal_owner(recorded)
        if recorded == mid:
            return
    old = LockedShipping(JournalShipping(pool, recorded, SqliteJournal(store.conn),
                                         cfg.fleet.ship_batch, instance), store)
    await old.resume()
    if not old.pending():
        # everything in it already shipped under that id: nothing to ship, and that id
        # (perhaps running elsewhere) keeps its leases; it is not claimed
        store.prune_journal(old.watermark)
        store.set_journal_owner(mid)
        log.warning("the journal %s was member %s's, all of it shipped; it is member %s's "
                    "journal from now on", store.path, recorded, mid)
        return
    stale_ms = round(cfg.fleet.leader_ttl * 1000)
    await pg_members.claim_or_refuse(
        pool, recorded, instance, stale_ms,
        f": the journal {store.path} holds usage member {recorded} journaled, which must ship "
        f"under that id before member {mid} can use the file. A copy of a running member's "
        "volume: give this member an empty storage.path of its own (the running member ships "
        f"those rows itself). A volume of a member {recorded} that was killed while another "
        f"process took its id: start this member once that process stopped (its rows then "
        f"ship under {recorded})")
    try:
        await old.resume()          # (again: the id's watermark once it is claimed)
        shipped = await old.ship_pending()
        store.prune_journal(old.watermark)
        if left := old.pending():        # (ship_pending ships to the end or raises)
            raise RuntimeError(f"{left} journal rows of member {recorded} did not ship")
        back = await LeaseStore(pool, recorded, lease_policy(cfg.fleet)).end_earlier()
    finally:
        await pg_members.release(pool, recorded, instance)
    store.set_journal_owner(mid)
    log.warning("the journal %s was member %s's: shipped its last %d row(s) under %s, ended "
                "%d lease(s) it held (%s credits back); it is member %s's journal from now on",
                store.path, recorded, shipped, recorded, len(back),
                fmt_micro(sum(back.values())), mid)


class JournalOwnerUnknown(StorageError):
    """A journal with no member id recorded whose rows shipped under several ids (start
    refused: the operator names the id with ``fleet.member_id``)."""


async def _shipped_owner(cfg: Config, pool: PgPool, store: Store, mid: str) -> str:
    """The member id a journal with no id recorded (a file from before SQLite migration 16)
    belongs to: the one its rows already shipped under. The version before it kept the
    newest journal row after shipping it, so such a journal still holds a row some id
    shipped; shipped under ``mid`` (another id's watermark) it would count twice, and the
    unshipped rows after it would ship under an id that did not number them. Rows ship in
    seq order and are pruned from the oldest, so the shipped ones are the journal's oldest:
    the oldest ``fleet.ship_batch`` rows are looked up in the shared ledger, in one
    statement. None shipped (or the journal is empty): ``mid``, nothing can ship twice.
    Shipped under several ids (the old version's double count, or a clone): ``mid`` if it is
    one of them (the operator said so with ``fleet.member_id``), else ``JournalOwnerUnknown``."""
    keys = SqliteJournal(store.conn).oldest_keys(cfg.fleet.ship_batch)
    ids = await shipped_under(pool, keys)
    if not ids or mid in ids:
        return mid
    if len(ids) > 1:
        raise JournalOwnerUnknown(
            f"the journal {store.path} records no member id (written by a version before "
            f"SQLite migration 16) and its rows were shipped under several member ids: "
            f"{', '.join(ids)}. Which one journaled them cannot be told, and shipped under "
            f"another id (this process's is {mid}) they would count twice or be lost: start "
            "this member once with fleet.member_id set to that id (it ships the rest under it "
            "and records it in the file; the id can be changed after that)")
    log.warning("the journal %s records no member id (a file from before SQLite migration "
                "16); its rows shipped under member id %s, which it is recorded as",
                store.path, ids[0])
    return ids[0]


async def open_fleet(cfg: Config, store: Store) -> Fleet:
    """Open the pool (migrating the schema), claim the member id (one live process per
    id), adopt the journal (``_adopt_journal``), then the owners on it with ``store`` as
    the local journal, the shipper, the leader lease and the lease book. The caller
    closes."""
    mid = member_id(cfg)
    instance = secrets.token_hex(8)
    pool = PgPool(pool_settings(cfg.storage))
    await pool.open(run_migrations=False)
    claimed = False
    try:
        await ensure_schema(pool)
        await pg_members.claim_or_refuse(pool, mid, instance,
                                         round(cfg.fleet.leader_ttl * 1000))
        claimed = True
        await _adopt_journal(cfg, pool, store, mid, instance)
        # claimed again: last_seen moves (adopting may take up to leader_ttl, and the id is
        # free to another process once not seen for that long)
        await pg_members.claim_or_refuse(pool, mid, instance,
                                         round(cfg.fleet.leader_ttl * 1000))
        shipping = LockedShipping(JournalShipping(pool, mid, SqliteJournal(store.conn),
                                                  cfg.fleet.ship_batch, instance), store)
        await shipping.resume()
        storage = PostgresStorage.on(pool, local=store, shipping=shipping)
        await storage.watch()
        policy = lease_policy(cfg.fleet)
        leases = LeaseStore(pool, mid, policy, instance)
        await _end_earlier_leases(shipping, leases)
        book = LeaseBook(leases, fail_mode=cfg.storage.fail_mode,
                         offline_allowance=to_micro(cfg.fleet.offline_allowance))
        lead = Leadership(pool, FLUSHER_DUTY, mid, round(cfg.fleet.leader_ttl * 1000),
                          policy.drift_margin_ppm, instance)
    except BaseException:
        if claimed:
            with contextlib.suppress(*ERRORS):
                await pg_members.release(pool, mid, instance)
        await pool.close()
        raise
    log.info("fleet member %s on PostgreSQL (schema current)", mid)
    fleet = Fleet(cfg, mid, pool, storage, store, shipping, lead, leases, book,
                  FleetCredits(book, shadow=cfg.credits.enforcement == "shadow"), instance)
    book.on_superseded = fleet._supersede
    return fleet
