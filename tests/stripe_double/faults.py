"""Fault injection for the Stripe test double.

Each route can be given a scripted sequence of faults (consumed one per call,
``"ok"`` or ``None`` meaning "no fault") and/or a probability per fault kind.
The script wins while it lasts; probabilities apply afterwards. Draws use a
seeded :class:`random.Random` so chaos runs are reproducible.

Fault kinds, as the SDK (``StripeClient`` + ``AIOHTTPClient``) sees them:

``500``
    500 ``api_error`` before processing (nothing stored). The answer *is*
    stored under the Idempotency-Key like any 5xx, so a retry with the same
    key replays the 500. SDK: ``stripe.APIError`` (http_status 500).
``429``
    429 ``rate_limit`` with ``Stripe-Should-Retry: true`` and
    ``Stripe-Rate-Limited-Reason``. SDK: ``stripe.RateLimitError`` (retried by
    the SDK itself only when ``max_network_retries`` > 0).
``429_no_retry``
    Same without ``Stripe-Should-Retry``. SDK: ``stripe.RateLimitError``.
``lock_timeout``
    429 with ``code: lock_timeout`` and ``Stripe-Should-Retry: true``.
    SDK: ``stripe.RateLimitError`` (``.code`` is ``None`` for v1 429s: read
    ``err.json_body["error"]["code"]``).
``hang``
    Sleep ``hang_seconds`` (past the client timeout) then drop the
    connection; nothing stored. SDK: ``stripe.APIConnectionError``.
``reset_before``
    Drop the connection without answering; nothing stored.
    SDK: ``stripe.APIConnectionError``.
``commit_then_drop``
    Process and store the request (and its idempotent result), then drop the
    connection. SDK: ``stripe.APIConnectionError``.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

FaultKind = Literal[
    "500", "429", "429_no_retry", "lock_timeout", "hang", "reset_before", "commit_then_drop"
]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "500",
    "429",
    "429_no_retry",
    "lock_timeout",
    "hang",
    "reset_before",
    "commit_then_drop",
)
NO_FAULT = ("ok", "none", "")

#: Route names used for faults, call records and ``calls(route)``.
ROUTES: tuple[str, ...] = (
    "meter_events",
    "meter_event_adjustments",
    "meter_event_session",
    "meter_event_stream",
    "meters_list",
    "meter_retrieve",
    "event_summaries",
    "usage_records",
    "usage_record_summaries",
    "credit_grants",
    "credit_grants_list",
    "credit_grant_retrieve",
    "credit_grant_void",
    "credit_grant_expire",
    "credit_balance_summary",
    "invoice_items",
    "invoice_items_list",
    "invoice_preview",
    "invoice_lines",
    "price_retrieve",
)
ANY_ROUTE = "*"


def _check_kind(kind: str) -> FaultKind:
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
    return kind


def _check_route(route: str) -> str:
    if route != ANY_ROUTE and route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; expected one of {ROUTES} or '*'")
    return route


@dataclass
class RoutePlan:
    script: deque[FaultKind | None] = field(default_factory=deque)
    probabilities: dict[FaultKind, float] = field(default_factory=dict)


class Faults:
    """Per-route fault plans. Not thread-safe; used from the event loop."""

    def __init__(self, seed: int = 0, hang_seconds: float = 2.0) -> None:
        self._plans: dict[str, RoutePlan] = {}
        self.rng = random.Random(seed)
        self.hang_seconds = hang_seconds
        #: (route, fault) for every fault actually injected, in order.
        self.injected: list[tuple[str, FaultKind]] = []

    def seed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def script(self, route: str, faults: Iterable[str | None]) -> None:
        """Append faults to the route's script (``"ok"``/``None`` = a clean call)."""
        plan = self._plans.setdefault(_check_route(route), RoutePlan())
        for item in faults:
            plan.script.append(None if item is None or item in NO_FAULT else _check_kind(item))

    def set_probabilities(self, route: str, probabilities: Mapping[str, float]) -> None:
        """Replace the route's fault probabilities (their sum must be <= 1)."""
        probs = {_check_kind(k): float(v) for k, v in probabilities.items()}
        if any(p < 0 for p in probs.values()) or sum(probs.values()) > 1.0 + 1e-9:
            raise ValueError("probabilities must be >= 0 and sum to at most 1")
        self._plans.setdefault(_check_route(route), RoutePlan()).probabilities = probs

    def clear(self, route: str | None = None) -> None:
        if route is None:
            self._plans.clear()
        else:
            self._plans.pop(route, None)

    def pending(self, route: str) -> int:
        plan = self._plans.get(route)
        return len(plan.script) if plan else 0

    def draw(self, route: str) -> FaultKind | None:
        """The fault for this call of ``route`` (route-specific plan, then ``*``)."""
        for key in (route, ANY_ROUTE):
            plan = self._plans.get(key)
            if plan is None:
                continue
            if plan.script:
                fault = plan.script.popleft()
                return self._note(route, fault)
            if plan.probabilities:
                roll = self.rng.random()
                acc = 0.0
                for kind, p in plan.probabilities.items():
                    acc += p
                    if roll < acc:
                        return self._note(route, kind)
                return None
        return None

    def _note(self, route: str, fault: FaultKind | None) -> FaultKind | None:
        if fault is not None:
            self.injected.append((route, fault))
        return fault

    def configure(self, spec: Mapping[str, Any]) -> None:
        """Apply a JSON spec (the body of ``POST /_double/faults``).

        ``{"clear": true | "<route>", "seed": 1, "hang_seconds": 1.5,
        "route": "meter_events", "script": ["500", "ok"], "probabilities": {"429": 0.1}}``
        or ``{"routes": {"meter_events": {"script": [...], "probabilities": {...}}}}``.
        """
        clear = spec.get("clear")
        if clear is True:
            self.clear()
        elif isinstance(clear, str):
            self.clear(clear)
        if "seed" in spec:
            self.seed(int(spec["seed"]))
        if "hang_seconds" in spec:
            self.hang_seconds = float(spec["hang_seconds"])
        routes: dict[str, Mapping[str, Any]] = dict(spec.get("routes") or {})
        if "route" in spec:
            routes[str(spec["route"])] = spec
        for route, rspec in routes.items():
            if "script" in rspec:
                self.script(route, rspec["script"])
            if "probabilities" in rspec:
                self.set_probabilities(route, rspec["probabilities"])

    def snapshot(self) -> dict[str, Any]:
        return {
            "hang_seconds": self.hang_seconds,
            "routes": {
                r: {
                    "script": [f or "ok" for f in p.script],
                    "probabilities": dict(p.probabilities),
                }
                for r, p in self._plans.items()
            },
            "injected": [[r, f] for r, f in self.injected],
        }
