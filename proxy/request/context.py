"""The per-request context: what the pipeline knows about one request once it is
authenticated and admitted, built once (``new_context``) and read by every later step
(forwarding, streaming and measuring, settlement, the WebSocket relay). Immutable; the state
that changes while a response streams lives in ``proxy.request.stream.Exchange``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from aiohttp import web

from proxy.credits.book import Hold
from proxy.rules import Rule


@dataclass(frozen=True, slots=True)
class RequestContext:
    request: web.BaseRequest
    rid: str                        # X-Request-Id: the consumer's (short, printable) or generated
    rule: Rule | None               # None: no rule matched (forwarded unmetered, key required)
    params: Mapping[str, str]       # the matched rule's path parameters
    key_id: str                     # "" when the rule needs no key
    customer_id: str
    version: str                    # the rule set's version the rule came from
    started: float                  # time.perf_counter() when the request arrived
    metered: bool                   # a rule with usage and a known customer
    hold: Hold | None               # credits held at admission (settled or released later)
    path: str                       # canonical decoded path (proxy.target)
    target: str                     # canonical target forwarded upstream (proxy.target)


class _Unfrozen:
    """The same slots as RequestContext, assignable. A frozen dataclass's ``__init__`` sets
    each field through ``object.__setattr__`` (a slot-wrapper call that allocates two tuples);
    on the per-request path that cost about 9k instructions (callgrind) for 12 fields. Filling
    this twin and then giving it RequestContext's class costs a fifth of that, and the result
    is an ordinary, frozen RequestContext (equal, hashable, FrozenInstanceError on writes)."""

    __slots__ = tuple(f.name for f in fields(RequestContext))


assert _Unfrozen.__slots__ == RequestContext.__slots__      # the layouts must match


def new_context(request: web.BaseRequest, rid: str, rule: Rule | None, params: Mapping[str, str],
                key_id: str, customer_id: str, version: str, started: float, metered: bool,
                hold: Hold | None, path: str, target: str) -> RequestContext:
    """``RequestContext(...)`` by keyword order, without the frozen ``__init__``'s cost."""
    c = _Unfrozen()
    c.request = request                     # type: ignore[attr-defined]
    c.rid = rid                             # type: ignore[attr-defined]
    c.rule = rule                           # type: ignore[attr-defined]
    c.params = params                       # type: ignore[attr-defined]
    c.key_id = key_id                       # type: ignore[attr-defined]
    c.customer_id = customer_id             # type: ignore[attr-defined]
    c.version = version                     # type: ignore[attr-defined]
    c.started = started                     # type: ignore[attr-defined]
    c.metered = metered                     # type: ignore[attr-defined]
    c.hold = hold                           # type: ignore[attr-defined]
    c.path = path                           # type: ignore[attr-defined]
    c.target = target                       # type: ignore[attr-defined]
    c.__class__ = RequestContext            # type: ignore[assignment]
    return c                                # type: ignore[return-value]
