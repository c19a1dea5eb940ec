"""The rules' meters checked against Stripe's Billing Meters, at start and on rules reload.

Owns: :func:`meter_problems` (pure), :func:`list_meters` and :class:`MeterCheck`.

meterproxy reports *delta* events (one per customer, meter and hour window, each adding to
the period total) with the payload keys ``stripe_customer_id`` and ``value``. A Stripe meter
bills them correctly only if it is active, sums (``default_aggregation.formula == "sum"``),
reads those two payload keys, and is not pre-aggregated: a meter with ``event_time_window``
(``hour`` / ``day``) keeps only the newest event per window, so every delta but the last of
a window would be dropped. Any other meter is refused, naming the meter, its event name and
the problem.

Policy (docs/billing-semantics.md):
- Stripe answered and a meter is wrong: start is refused (``ConfigError``, exit 2); a rules
  reload with such a meter is refused and the old rules stay in force.
- Stripe cannot be asked (network, 5xx, 429, auth): the proxy starts anyway (a sidecar must
  not take the API down because Stripe is unreachable); usage keeps being recorded and
  staged; the check is retried in the background every ``stripe.meter_check_retry``;
  ``meterproxy_stripe_meters_verified`` is 0 and ``/readyz`` reports degraded until it
  passes. If the late check finds a wrong meter, it stays degraded and logs the problems
  (the events then dead-letter or mis-bill at Stripe; fix the meter and replay).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

from proxy import metrics
from proxy.errors import StripeCallError
from proxy.stripe.client import StripeClient, StripeMeterInfo

__all__ = ["CUSTOMER_KEY", "VALUE_KEY", "MeterCheck", "StripeMeterInfo", "list_meters",
           "meter_problems", "problem", "unusable"]

log = logging.getLogger("meterproxy.meter_check")

CUSTOMER_KEY = "stripe_customer_id"     # what the sinks put in the payload
VALUE_KEY = "value"
PAGE = 100

EventNames = Mapping[str, tuple[str, str | None]]


def unusable(candidates: Sequence[StripeMeterInfo]) -> tuple[str, StripeMeterInfo | None]:
    """Why the Stripe meters of one event name cannot total our delta events, as a kind, with
    the meter it is about: ``("", meter)`` when the first active one is usable; else
    ``"missing"`` (no meter), ``"inactive"`` (none active; the first one), ``"formula"`` (not
    ``sum``), ``"keys"`` (other payload keys) or ``"window"`` (pre-aggregated). The one
    ladder both the start-up check and reconciliation decide with. Pure."""
    active = [m for m in candidates if m.status == "active"]
    if not active:
        return ("inactive", candidates[0]) if candidates else ("missing", None)
    m = active[0]
    if m.formula != "sum":
        return "formula", m
    if m.customer_key != CUSTOMER_KEY or m.value_key != VALUE_KEY:
        return "keys", m
    if m.event_time_window is not None:
        return "window", m
    return "", m


def problem(where: str, candidates: Sequence[StripeMeterInfo]) -> str | None:
    """The sentence saying why ``candidates`` (the Stripe meters of one event name) cannot
    total our delta events, prefixed with ``where`` (what the caller calls that event name),
    or None when they can. The one wording of :func:`unusable`'s ladder, used by the start-up
    check and by reconciliation. Pure."""
    kind, m = unusable(candidates)
    if not kind:
        return None
    if m is None:
        return f"{where}: no Stripe meter has this event name"
    if kind == "inactive":
        return f"{where}: Stripe meter {m.id} is {m.status}, not active"
    if kind == "formula":
        return (f"{where}: Stripe meter {m.id} aggregates with {m.formula!r}; meterproxy sends "
                "delta events, which only a 'sum' meter totals correctly")
    if kind == "keys":
        return (f"{where}: Stripe meter {m.id} reads payload keys "
                f"{m.customer_key!r}/{m.value_key!r}; meterproxy sends "
                f"{CUSTOMER_KEY!r}/{VALUE_KEY!r}")
    return (f"{where}: Stripe meter {m.id} is pre-aggregated (event_time_window "
            f"{m.event_time_window!r}): it keeps only the newest event per "
            f"{m.event_time_window}, but meterproxy sends several delta events per window; "
            "use a meter without event_time_window")


def meter_problems(event_names: EventNames,
                   meters: Sequence[StripeMeterInfo]) -> list[str]:
    """Every rules meter (and covered event name) whose Stripe meter would mis-bill our
    delta events, one sentence each, in meter order. Pure."""
    by_event: dict[str, list[StripeMeterInfo]] = {}
    for m in meters:
        by_event.setdefault(m.event_name, []).append(m)
    out = []
    for meter, (event, covered) in sorted(event_names.items()):
        for name in (event, covered):
            if name is not None:
                p = problem(f"meter {meter!r} (event name {name!r})",
                            by_event.get(name, []))
                if p is not None:
                    out.append(p)
    return out


async def list_meters(stripe: StripeClient) -> list[StripeMeterInfo] | str:
    """Every meter of the account (all pages), or why Stripe could not be asked."""
    try:
        return await stripe.list_meters(page_size=PAGE)
    except StripeCallError as exc:
        return exc.reason


class MeterCheck:
    """The check's state for /readyz and the metric; ``run`` asks Stripe once."""

    def __init__(self, stripe: StripeClient, event_names: Callable[[], EventNames],
                 retry: float) -> None:
        self.stripe = stripe
        self.event_names = event_names
        self.retry = retry
        self.verified = False
        self.problems: list[str] = []
        self.unreachable: str | None = None
        self._wake = asyncio.Event()
        metrics.stripe_meters_verified.set(0)

    async def check(self, event_names: EventNames) -> list[str] | None:
        """Problems of ``event_names`` (empty: all good), or None when Stripe could not be
        asked. Does not change the state."""
        meters = await list_meters(self.stripe)
        if isinstance(meters, str):
            metrics.stripe_meter_checks_total.labels("unreachable").inc()
            self.unreachable = meters
            return None
        problems = meter_problems(event_names, meters)
        metrics.stripe_meter_checks_total.labels("mismatch" if problems else "ok").inc()
        return problems

    def record(self, problems: list[str] | None) -> None:
        """Adopt a check's outcome for the rules now in force."""
        if problems is None:
            self.verified = False
            self._wake.set()           # the background loop retries
        else:
            self.unreachable = None
            self.problems = problems
            self.verified = not problems
            for p in problems:
                log.error("Stripe meter check: %s", p)
        metrics.stripe_meters_verified.set(1 if self.verified else 0)

    def ready_problems(self) -> list[str]:
        if self.verified:
            return []
        if self.problems:
            return [f"stripe meters: {p}" for p in self.problems]
        return [f"stripe meters not verified yet (Stripe unreachable: {self.unreachable}); "
                f"retrying every {self.retry:.0f}s"]

    async def run(self) -> None:
        """Retry an unreachable check until Stripe answers (then wait for the next need)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while not self.verified and not self.problems:
                await asyncio.sleep(self.retry)
                self.record(await self.check(self.event_names()))

    async def close(self) -> None:
        await self.stripe.close()
