"""The request pipeline: one request through the steps, in this order.

    canonical target (proxy.target)      400 invalid_path
    the proxy's own routes               the consumer API under the reserved prefix
                                         (proxy.request.consumer) and the Stripe webhook,
                                         routed by an aiohttp router on the canonical path
    rule match (proxy.rules)
    1. authentication  (auth.py)         401 / 403
    2. admission       (admission.py)    429 / 503 / 402; takes the in-flight slot and hold
    3. forwarding      (forward.py)      502 / 503 / 504
    4. streaming and measuring (stream.py)
    5. settlement      (settle.py)       the usage row; strict: committed before the last bytes
    6. WebSocket relay (websocket.py)    instead of 3-5 for a WebSocket handshake

Every step reports a refusal by raising ``HttpError``; this module turns it into the response
with ``proxy.http_errors.error_response`` (one place, shared with the admin API).

Invariants
- The per-request path does no SQLite I/O and allocates no config objects: rules are
  compiled, keys are a dict lookup, usage rows go to the Store's in-memory buffer. Per
  request it allocates one ``RequestContext`` (``new_context``) and one ``Exchange``.
- strict durability: the last bytes of a metered response are written only after the
  request's usage row is committed (proxy.request.stream).
- Errors the proxy itself answers are JSON ``{"error": {"type", "message"}}`` with the
  request's ``X-Request-Id``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import MatchInfoError
from multidict import istr
from yarl import URL

from proxy import metrics
from proxy.credits.book import CreditBook
from proxy.credits.thresholds import ThresholdWatch
from proxy.errors import HttpError
from proxy.http_errors import error_response
from proxy.request.admission import Admission, LeaseAdmit
from proxy.request.auth import Authenticator
from proxy.request.context import new_context
from proxy.request.settle import Settlement
from proxy.request.stream import Exchange, Streamer
from proxy.request.websocket import WebSocketRelay
from proxy.runtime import Runtime
from proxy.target import canonical

log = logging.getLogger("meterproxy.handler")

_XRID = istr("X-Request-Id")
_NO_PARAMS: Mapping[str, str] = MappingProxyType({})


class Pipeline:
    def __init__(self, rt: Runtime, auth: Authenticator, book: CreditBook | None,
                 watch: ThresholdWatch | None,
                 own_routes: Sequence[web.AbstractRouteDef] = (),
                 lease_admit: LeaseAdmit | None = None) -> None:
        """``lease_admit`` (fleet mode): credits are admitted against the member's lease
        (``proxy.request.admission``)."""
        self.rt = rt
        cfg = rt.cfg
        self.auth = auth
        self.admission = admission = Admission(rt, book, lease_admit)
        strict = cfg.storage.durability == "strict"
        self.settlement = settlement = Settlement(rt.store, rt.keys, book, watch,
                                                  admission.reservations,
                                                  admission.default_estimate, strict)
        drop = frozenset(s.header.lower() for s in cfg.keys.sources
                         if s.header and not cfg.keys.forward_to_upstream) | {"host"}
        self.streamer = Streamer(rt.upstream, admission, settlement, cfg.max_inspect_bytes,
                                 strict, drop)
        self.websockets = WebSocketRelay(rt.upstream, settlement, drop)
        # rule name -> requests_total children by status class (index status // 100)
        self._req_counters: dict[str, list[Any]] = {}
        # the routes the proxy answers itself on the public port, matched on the canonical
        # path: everything under the reserved prefix, and the exact paths of the others
        self.reserved = cfg.reserved_prefix.rstrip("/")
        self.router = web.UrlDispatcher()
        self.router.add_routes(own_routes)
        self.router.freeze()
        self.own_paths = frozenset(
            r.canonical for r in self.router.resources()
            if not (self.reserved and r.canonical.startswith(self.reserved)))

    @property
    def in_flight(self) -> dict[str, int]:
        """Requests in flight per customer (``limits.per_customer_concurrency``)."""
        return self.admission.in_flight

    # ---- entry point ---------------------------------------------------------------

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        rid = request.headers.get(_XRID, "")
        if not rid or len(rid) > 128 or not rid.isprintable():
            rid = os.urandom(16).hex()    # kept only when short and printable (it is stored)
        rule_name = "(invalid_path)"
        resp: web.StreamResponse
        try:
            path, target = canonical(request.raw_path)
            if (self.reserved and path.startswith(self.reserved)) or path in self.own_paths:
                return await self._own_route(request, rid, path)
            rules = self.rt.rules
            match = rules.match(request.method, path, request.headers, request.query)
            rule = match.rule if match is not None else None
            rule_name = rule.name if rule is not None else "(unmatched)"
            key_id = customer_id = ""
            if rule is None or rule.auth == "required":
                entry = self.auth.authenticate(request)
                key_id, customer_id = entry.key_id, entry.customer_id
            metered = rule is not None and bool(rule.usage) and bool(customer_id)
            admission = self.admission
            hold = admission.admit(rule, customer_id, metered) \
                if admission.lease_admit is None \
                else await admission.admit_leased(rule, customer_id, metered)
            try:
                ctx = new_context(request, rid, rule,
                                  match.path_params if match is not None else _NO_PARAMS,
                                  key_id, customer_id, rules.version, started, metered, hold,
                                  path, target)
                # a WebSocket handshake is a GET (RFC 6455 4.1); any other method with an
                # Upgrade header is forwarded as that method (Upgrade is hop-by-hop)
                if request.method == "GET" and \
                        request.headers.get("Upgrade", "").lower() == "websocket":
                    resp = await self.websockets.relay(ctx)
                else:
                    resp = await Exchange(self.streamer, ctx).run()
            finally:
                admission.leave(customer_id, hold)
        except HttpError as exc:
            resp = error_response(exc, rid)
        self._count(rule_name, resp.status)
        return resp

    async def _own_route(self, request: web.Request, rid: str,
                         path: str) -> web.StreamResponse:
        """A route the proxy answers itself (not counted in requests_total, never
        forwarded): resolved by ``self.router`` on the canonical path."""
        try:
            match = await self.router.resolve(request.clone(rel_url=URL.build(path=path)))
            if isinstance(match, MatchInfoError):
                raise HttpError("No such endpoint.", status=404, type_="not_found")
            resp: web.StreamResponse = await match.handler(request)
            return resp
        except HttpError as exc:
            return error_response(exc, rid)

    def _count(self, rule: str, status: int) -> None:
        by_class = self._req_counters.get(rule)
        if by_class is None:
            by_class = self._req_counters[rule] = [None] * 10     # statuses have 3 digits
        c = by_class[status // 100]
        if c is None:
            c = by_class[status // 100] = metrics.requests_total.labels(rule, f"{status // 100}xx")
        c.inc()
