"""The monetary credits mode at run time (docs/credits.md): which customers' credits are
money, and each one's open billing period per meter, so settlement burns exactly the
marginal price of a request on the period total.

Pure and synchronous (no I/O, no await): ``MoneyBook.costs`` runs inside settlement's
critical section, so two concurrent requests of one customer each see the period total the
other left, and their burns sum to ``line_amount(combined total)`` exactly
(``proxy.credits.monetary.burn``). The accounts are opened and closed off the request path
by ``proxy.credits.mirror.MonetaryService`` (start-up, customer changes, price refreshes):
a request only asks "is there an account for this customer" (one dict lookup, and none at
all while no customer is monetary).

- An account holds the customer's billing anchor, currency (its own, else the prices'),
  each metered meter's Price in that currency (``currency_options`` respected) and, per
  meter, the open period ``[start, end)`` with its total (micro-units) and what the period
  has burned so far (minor units, covered by credits or not). A request settled after
  ``end`` opens the next period at zero.
- Costs are micro-credits: 1 credit = 1 major unit, so a minor unit is
  ``micro_per_minor(currency)`` micro-credits (10,000 for USD, 1,000,000 for JPY).
- ``quote`` is the admission's money cost of a reservation: the same marginal price,
  without changing the account.
- ``load_charged``: on (re)opening, what the period has burned is taken as the line amount
  of its total, exact for per-unit and graduated prices (the burns of a period always sum
  to it); for a volume price the opener passes ``charged``, the period's requests replayed
  in settlement order (``proxy.credits.monetary.replay``): the highest line reached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from proxy.credits.ledger import Entry
from proxy.credits.monetary import burn, micro_per_minor
from proxy.periods import usage_period
from proxy.pricing import Price, line_amount


class _Meter(Protocol):
    @property
    def price(self) -> Price | None: ...
    @property
    def price_id(self) -> str | None: ...
    @property
    def transform(self) -> object: ...


def monetary_problems(meters: Mapping[str, _Meter], used: Iterable[str]) -> list[str]:
    """Why the monetary mode cannot price these rules (empty: it can). Every meter a rule
    meters needs a Stripe price (``price`` or ``price_id``), and no rules ``transform``
    (Stripe's price carries ``transform_quantity``); the rules file's own prices must share
    one currency (a customer's credits are one currency)."""
    out: list[str] = []
    currencies: set[str] = set()
    for name in sorted(set(used)):
        m = meters.get(name)
        if m is None:
            continue
        if m.price is None and m.price_id is None:
            out.append(f"meter {name!r} has no Stripe price (`price` or `price_id`): the "
                       "monetary credits mode burns credits at the price of usage")
        if m.transform is not None:
            out.append(f"meter {name!r} has a rules `transform`: in the monetary credits mode "
                       "put `transform_quantity` on its Stripe price instead")
        if m.price is not None:
            currencies.add(m.price.currency)
    if len(currencies) > 1:
        out.append("the monetary credits mode needs one currency for every metered price; "
                   f"the rules' prices are in {', '.join(sorted(currencies))}")
    return out


class _Customer(Protocol):
    @property
    def credit_mode(self) -> str | None: ...


class _Usage(Protocol):
    @property
    def meter(self) -> str: ...


class _Rule(Protocol):
    @property
    def usage(self) -> Sequence[_Usage]: ...


class _Rules(Protocol):
    @property
    def meters(self) -> Mapping[str, _Meter]: ...
    @property
    def rules(self) -> Sequence[_Rule]: ...


def in_use(default_mode: str, customers: Iterable[_Customer]) -> bool:
    """The monetary mode is the default (``credits.mode``) or some customer's own mode."""
    return default_mode == "monetary" or any(c.credit_mode == "monetary" for c in customers)


def rules_problems(backend: str, rules: _Rules, monetary: bool) -> list[str]:
    """Why the rules cannot run while the monetary mode is in use (``monetary``): fleet mode
    (``backend`` postgres), or ``monetary_problems`` of every meter a rule meters."""
    if not monetary:
        return []
    if backend == "postgres":
        return ["the monetary credits mode needs storage.backend: sqlite for now: fleet "
                "members do not share the period totals a monetary burn is priced on"]
    return monetary_problems(rules.meters, {u.meter for r in rules.rules for u in r.usage})


def account_prices(prices: Mapping[str, Price], currency: str | None
                   ) -> tuple[str, dict[str, Price], list[str]]:
    """(currency, each meter's price in it, problems): the customer's currency, else the
    prices' one currency; a price neither in that currency nor with a ``currency_options``
    entry for it is a problem (Stripe refuses to bill it)."""
    mine = {m: p.in_currency(currency) for m, p in prices.items()}
    cur = currency.lower() if currency else None
    problems: list[str] = []
    if cur is None:
        found = sorted({p.currency for p in mine.values()})
        if len(found) > 1:
            problems.append(f"prices in several currencies ({', '.join(found)}): set the "
                            "customer's currency")
        cur = found[0] if found else "usd"
    for m, p in sorted(mine.items()):
        if p.currency != cur:
            problems.append(f"meter {m!r}'s price is in {p.currency} and has no "
                            f"currency_options entry for {cur}")
    return cur, mine, problems


def load_charged(price: Price | None, total_micro: int) -> int:
    """What a period with ``total_micro`` has burned, on (re)opening an account: its line
    amount (0 with no usage: the first request burns a tiered price's first flat fee)."""
    if price is None or total_micro <= 0:
        return 0
    return line_amount(price, total_micro)


@dataclass(slots=True)
class MeterPeriod:
    start: int
    end: int
    total: int = 0          # micro-units of the meter this period
    charged: int = 0        # minor units burned this period (covered by credits or not)
    covered: int = 0        # micro-credits of it that credits covered (the rest: invoiced)


@dataclass(slots=True)
class Account:
    customer_id: str
    anchor: int | None
    currency: str
    prices: dict[str, Price]
    per_minor: int
    meters: dict[str, MeterPeriod] = field(default_factory=dict)
    # micro-credits of settlement debt ever recorded for the customer (a block customer's
    # usage beyond its credits): the mirror covers it at Stripe with promotional grants
    debt_total: int = 0

    def period(self, meter: str, now: float) -> MeterPeriod:
        mp = self.meters.get(meter)
        if mp is None or not mp.start <= now < mp.end:
            # the period the request's minute is billed in (``proxy.periods``): with an
            # anchor at 12:30:15, a request at 12:30:40 still counts in the old period's
            # total, as staging puts its minute on the old invoice
            start, end = usage_period(self.anchor, now)
            mp = self.meters[meter] = MeterPeriod(start, end)
        return mp

    def burned(self, now: float) -> int:
        """Minor units the open period has burned, all meters (covered or not)."""
        return sum(mp.charged for mp in self.meters.values() if mp.start <= now < mp.end)

    def covered(self, now: float) -> int:
        """Micro-credits credits covered in the open period, all meters: what Stripe will
        apply from the mirrored grants when it finalizes the period's invoice."""
        return sum(mp.covered for mp in self.meters.values() if mp.start <= now < mp.end)

    def cover(self, meter: str, micro_credits: int, now: float,
              entries: Sequence[Entry] = ()) -> None:
        """Settlement: credits covered ``micro_credits`` of a burn of ``meter``, a block
        customer's debt among its ``entries`` included (``debt_total`` grows by it)."""
        if micro_credits:
            self.period(meter, now).covered += micro_credits
        for e in entries:
            if e.kind == "debt":
                self.debt_total += e.amount


@dataclass(slots=True, eq=False)
class Opening:
    """A customer's account opening while serving (``MonetaryService.open``). Its reads of
    the ledger must see every unit settled before it and none after, so the customer's
    settlements wait in ``waiting``, in order (``Settlement.record`` queues them), and are
    made once it is over. At most ``limit`` wait (memory, and what a crash of a
    ``batched`` store would lose): past it a settlement is made at once, in the mode the
    customer is in (the unit mode, or a previous account being re-opened), and the opening
    is ``spoiled`` (its reads may miss that one: it is tried again later)."""
    limit: int
    waiting: list[Callable[[], None]] = field(default_factory=list)
    spoiled: bool = False


class MoneyBook:
    """The monetary accounts, by customer id. ``active`` is False while there is none."""

    def __init__(self) -> None:
        self._accounts: dict[str, Account] = {}
        self.active = False
        # customers whose account is opening while serving (``MonetaryService.open``)
        self.opening: dict[str, Opening] = {}

    def account(self, customer_id: str) -> Account | None:
        return self._accounts.get(customer_id)

    def accounts(self) -> list[Account]:
        return list(self._accounts.values())

    def open(self, customer_id: str, anchor: int | None, currency: str,
             prices: Mapping[str, Price], totals: Mapping[str, int], now: float,
             covered: Mapping[str, int] | None = None,
             charged: Mapping[str, int] | None = None, debt_total: int = 0) -> Account:
        """(Re)open a customer's account with the period so far: ``totals`` (meter ->
        micro-units), ``covered`` (meter -> micro-credits debited from grants) and, where
        known, ``charged`` (meter -> minor units burned: a volume price's replayed burns,
        ``proxy.credits.monetary.replay``; else the line of the total)."""
        acct = Account(customer_id, anchor, currency, dict(prices), micro_per_minor(currency),
                       debt_total=debt_total)
        for meter in {*totals, *(covered or {})}:
            mp = acct.period(meter, now)
            mp.total = max(totals.get(meter, 0), 0)
            mp.charged = (charged or {}).get(meter,
                                             load_charged(acct.prices.get(meter), mp.total))
            mp.covered = max((covered or {}).get(meter, 0), 0)
        self._accounts[customer_id] = acct
        self.active = True
        return acct

    def reprice(self, customer_id: str, prices: Mapping[str, Price]) -> None:
        """New prices (a refresh or a rules reload); the period state stays."""
        acct = self._accounts.get(customer_id)
        if acct is not None:
            acct.prices = dict(prices)

    def close(self, customer_id: str) -> None:
        """The customer is back in the units mode."""
        self._accounts.pop(customer_id, None)
        self.active = bool(self._accounts)

    def withdraw(self, customer_id: str, at: float, items: Iterable[tuple[str, int, int]],
                 debt: int) -> None:
        """Undo a settlement whose usage row was dropped (a withheld answer, never
        reported to Stripe): ``items`` (meter, micro-units, micro-credits covered) leave
        the period they were settled in (``at``), and its ``debt`` is no longer to be
        covered at Stripe. What the period burned becomes the line of the smaller total
        again (exact for per-unit and graduated prices; a volume price keeps the highest
        line it reached, as its replay does)."""
        acct = self._accounts.get(customer_id)
        if acct is None:
            return
        acct.debt_total = max(acct.debt_total - max(debt, 0), 0)
        for meter, micro, covered in items:
            mp = acct.meters.get(meter)
            if mp is None or not mp.start <= at < mp.end:
                continue
            mp.total = max(mp.total - micro, 0)
            mp.covered = max(mp.covered - covered, 0)
            price = acct.prices.get(meter)
            if price is not None and price.tiers_mode != "volume":
                mp.charged = load_charged(price, mp.total)

    def costs(self, acct: Account, quantities: Sequence[tuple[str, int]],
              now: float) -> list[int]:
        """Each quantity's burn in micro-credits, the account moved past it (the period
        totals grow, what they burned is remembered). A meter without a price burns 0."""
        out: list[int] = []
        for meter, micro in quantities:
            mp = acct.period(meter, now)
            after = mp.total + micro
            price = acct.prices.get(meter)
            b = burn(price, mp.charged, after) if price is not None else 0
            mp.total = after
            mp.charged += b
            out.append(b * acct.per_minor)
        return out

    def quote(self, acct: Account, quantities: Iterable[tuple[str, int]], now: float) -> int:
        """Micro-credits these quantities would burn now (admission's reservation), the
        account unchanged."""
        adds: dict[str, int] = {}
        for meter, micro in quantities:
            adds[meter] = adds.get(meter, 0) + micro
        total = 0
        for meter, micro in adds.items():
            price = acct.prices.get(meter)
            if price is None:
                continue
            mp = acct.meters.get(meter)
            if mp is None or not mp.start <= now < mp.end:
                total += burn(price, 0, micro)
            else:
                total += burn(price, mp.charged, mp.total + micro)
        return total * acct.per_minor
