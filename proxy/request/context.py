"""The per-request context: what the pipeline knows about one request once it is
authenticated and admitted, built once and read by every later step (forwarding, streaming
and measuring, settlement, the WebSocket relay). Immutable; the state that changes while a
response streams lives in ``proxy.request.stream.Exchange``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from proxy.credits.book import Hold
from proxy.rules import Rule


@dataclass(frozen=True, slots=True)
class RequestContext:
    request: web.Request
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
