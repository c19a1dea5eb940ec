"""The request pipeline: one request through the steps, in this order.

It is the public port's whole request handler: aiohttp's low-level ``web.Server`` hands
every parsed request straight to ``Pipeline.__call__`` (no Application, no router). What
the Application's catch-all route did before the pipeline, it does first, identically:

    Expect (HTTP/1.1)                    "100-continue": 100 Continue written; else 417
    a target the catch-all route         404 (aiohttp's text page; only checked for a
    "/{tail:.*}" did not match           target not starting with '/' or one the
                                         canonical step refuses)
    canonical target (proxy.target)      400 invalid_path
    the proxy's own routes               the consumer API under the reserved prefix
                                         (proxy.request.consumer) and the Stripe webhook,
                                         routed by an aiohttp router on the canonical path
    method override (method_override)    400 method_override_refused: an override header
                                         or ``_method`` query parameter naming another
                                         method than the request's (``method_override``)
    a header or query parameter the      400 ambiguous_request (``repeated``)
    rules read, sent more than once
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
import random
import re
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import cast
from urllib.parse import unquote_plus

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import MatchInfoError
from multidict import CIMultiDictProxy, istr
from yarl import URL

from proxy import metrics
from proxy.credits.book import CreditBook
from proxy.credits.thresholds import ThresholdWatch
from proxy.errors import HttpError
from proxy.http_errors import error_response
from proxy.request.admission import Admission, LeaseAdmit
from proxy.request.auth import Authenticator
from proxy.request.context import new_context
from proxy.request.forward import matched_headers
from proxy.request.settle import Settlement
from proxy.request.stream import Exchange, Streamer
from proxy.request.websocket import WebSocketRelay
from proxy.rules.model import RuleSet
from proxy.runtime import Runtime
from proxy.target import InvalidTarget, canonical

log = logging.getLogger("meterproxy.handler")

_XRID = istr("X-Request-Id")
# the headers upstream frameworks take a method from (Rack::MethodOverride, Symfony/Laravel,
# Express method-override, Google APIs, ASP.NET); istr: looked up with no case folding
_OVERRIDES = (istr("X-HTTP-Method-Override"), istr("X-HTTP-Method"), istr("X-Method-Override"))
_XHMO, _XHM, _XMO = _OVERRIDES


def new_request_id() -> str:
    """A generated X-Request-Id: 32 lowercase hex digits, the first 12 the time in
    milliseconds, the other 20 random (80 bits: unique within a millisecond). Time-ordered,
    so the audit's ``request_id`` index takes them at its right edge: random ids dirtied one
    index page per row, which made materializing 1.5-3x dearer per row and doubled the WAL
    written per request (docs/PERFORMANCE.md, "Strict latency tail"). The random part comes
    from ``random`` (seeded from the OS at start, per process), not ``os.urandom``: a system
    call per request for bits that need to be unique, not secret (a consumer may send any id
    of its own)."""
    return f"{time.time_ns() // 1_000_000:012x}{_bits(80):020x}"


_bits = random.getrandbits      # (looked up once, not per request)
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
        # rule name -> requests answered by status class (index status // 100), added to
        # requests_total at each scrape (a plain increment per request)
        self._req_counts: dict[str, list[int]] = {}
        metrics.before_scrape(self.flush_counts)
        # the routes the proxy answers itself on the public port, matched on the canonical
        # path: everything under the reserved prefix, and the exact paths of the others
        self.reserved = cfg.reserved_prefix.rstrip("/")
        self.router = web.UrlDispatcher()
        self.router.add_routes(own_routes)
        self.router.freeze()
        self.own_paths = frozenset(
            r.canonical for r in self.router.resources()
            if not (self.reserved and r.canonical.startswith(self.reserved)))
        # the catch-all route the public Application had: consulted only for a target the
        # canonical step refuses (aiohttp answered 404 before the pipeline when it did not
        # match, e.g. "OPTIONS *" or an authority-form target)
        self.catch_all = web.UrlDispatcher()
        self.catch_all.add_route("*", "/{tail:.*}", _unreachable)
        self.catch_all.freeze()
        # the query parameters that carry API keys, dropped from the target on the way up
        # unless keys.forward_to_upstream (the upstream never sees meterproxy's keys)
        self.key_params = frozenset() if cfg.keys.forward_to_upstream \
            else frozenset(auth.key_query)
        # method_override: refuse: a request naming another method than its own is refused
        self.refuse_override = cfg.method_override == "refuse"

    @property
    def in_flight(self) -> dict[str, int]:
        """Requests in flight per customer (``limits.per_customer_concurrency``)."""
        return self.admission.in_flight

    # ---- entry point ---------------------------------------------------------------

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        if request.headers.get(hdrs.EXPECT):
            await _expect(request)
        rid = request.headers.get(_XRID, "")
        if not rid or len(rid) > 128 or not rid.isprintable():
            rid = new_request_id()    # kept only when short and printable (it is stored)
        rule_name = "(invalid_path)"
        resp: web.StreamResponse
        raw = request.raw_path
        if raw[:1] != "/" and await self._unrouted(request):
            raise web.HTTPNotFound()        # e.g. an absolute-form target with no path
        try:
            path, target = canonical(raw)
            if self.key_params and "?" in target:
                target = without_params(target, self.key_params)
            if (self.reserved and path.startswith(self.reserved)) or path in self.own_paths:
                return await self._own_route(request, rid, path)
            # (one membership test per header name; the query is scanned only when it could
            # hold a `_method` parameter: "method" or an escape in the target)
            if self.refuse_override and (
                    _XHMO in (h := request.headers) or _XHM in h or _XMO in h
                    or ("?" in target and ("method" in target or "%" in target))) \
                    and (why := method_override(request.method, h, target)) is not None:
                rule_name = "(method_override)"
                raise HttpError(why, status=400, type_="method_override_refused")
            rules = self.rt.rules
            headers = matched_headers(request.headers)
            if (rules.header_spellings or rules.param_spellings) and \
                    (why := repeated(rules, headers, request)) is not None:
                rule_name = "(ambiguous_request)"
                raise HttpError(why, status=400, type_="ambiguous_request")
            match = rules.match(request.method, path, headers,
                                request.query if rules.reads_query else _NO_PARAMS)
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
            if isinstance(exc, InvalidTarget) and await self._unrouted(request):
                raise web.HTTPNotFound() from None
            resp = error_response(exc, rid)
        # (_count, inlined: every request passes here)
        if (by_class := self._req_counts.get(rule_name)) is None:
            by_class = self._req_counts[rule_name] = [0] * 10     # statuses have 3 digits
        by_class[resp.status // 100] += 1
        return resp

    async def _unrouted(self, request: web.BaseRequest) -> bool:
        """The public Application's catch-all route would not have matched this target (it
        answered 404 before the pipeline): asked only for a target not starting with '/' or
        one the canonical step refuses; any other matches (its path starts with '/' and,
        once decoded, holds no LF: the canonical step refuses an encoded one)."""
        return isinstance(await self.catch_all.resolve(cast(web.Request, request)),
                          MatchInfoError)

    async def _own_route(self, request: web.BaseRequest, rid: str,
                         path: str) -> web.StreamResponse:
        """A route the proxy answers itself (not counted in requests_total, never
        forwarded): resolved by ``self.router`` on the canonical path."""
        try:
            # (the router reads only the method and the URL; the handlers take a BaseRequest)
            match = await self.router.resolve(
                cast(web.Request, request.clone(rel_url=URL.build(path=path))))
            if isinstance(match, MatchInfoError):
                raise HttpError("No such endpoint.", status=404, type_="not_found")
            resp: web.StreamResponse = await match.handler(cast(web.Request, request))
            return resp
        except HttpError as exc:
            return error_response(exc, rid)

    def flush_counts(self) -> None:
        """Add the requests counted since the last scrape to requests_total."""
        for rule, by_class in self._req_counts.items():
            for i, n in enumerate(by_class):
                if n:
                    metrics.requests_total.labels(rule, f"{i}xx").inc(n)
                    by_class[i] = 0


_QUERY_SEP = re.compile("[&;]")


def method_override(method: str, headers: CIMultiDictProxy[str], target: str) -> str | None:
    """Why the request names another method than its own (the refusal's message), or None.

    Another method: a value of ``X-HTTP-Method-Override``, ``X-HTTP-Method`` or
    ``X-Method-Override`` (every line of each, every comma-separated item of a line, each
    stripped) or of a ``_method`` query parameter that is not ``method`` in any case; an
    empty one included. A query parameter's name is read as the most lenient framework reads
    it (PHP): percent- and ``+``-decoded, leading spaces dropped, ``.`` and spaces made ``_``,
    anything from a ``[`` on dropped (``_method[]``); ``;`` separates parameters as ``&`` does
    (older Rack). So a spelling any of them reads as ``_method`` is refused, never forwarded."""
    own = method.upper()
    for name in _OVERRIDES:
        for line in headers.getall(name, ()):
            if any(v.strip().upper() != own for v in line.split(",")):
                return (f"The request's {name} header names another method than its own "
                        f"({method}): rules meter the request's method, and the upstream could "
                        "run the other one. Send the request with the method it means.")
    query = target.partition("?")[2]
    for part in _QUERY_SEP.split(query) if query else ():
        raw, _, value = part.partition("=")
        if php_param(raw) == "_method" and unquote_plus(value).strip().upper() != own:
            return ("The query parameter _method names another method than the request's own "
                    f"({method}): rules meter the request's method, and the upstream could run "
                    "the other one. Send the request with the method it means.")
    return None


def php_param(raw: str) -> str:
    """A query parameter's raw name as PHP reads it: percent- and ``+``-decoded, leading
    spaces dropped, ``.`` and spaces made ``_``, anything from a ``[`` on dropped."""
    return unquote_plus(raw).lstrip(" ").partition("[")[0].replace(".", "_").replace(" ", "_")


def lenient_param(raw: str) -> str:
    """A query parameter's name as the most lenient framework reads it: ``php_param``,
    case-folded (ASP.NET reads names without case)."""
    return php_param(raw).casefold()


def repeated(rules: RuleSet, headers: CIMultiDictProxy[str],
             request: web.BaseRequest) -> str | None:
    """Why the request is ambiguous to the rules (the refusal's message), or None.

    A header that some rule matches on or reads a quantity from (``RuleSet.header_spellings``)
    sent more than once (as the upstream receives it), or in another spelling an upstream
    may read as it (``_`` for ``-``: CGI, WSGI and FastCGI upstreams turn both into
    ``HTTP_X_TIER``); a query parameter the rules read (``single_params``) present more than
    once as the most lenient framework splits and names parameters (``&`` or ``;``,
    ``lenient_param``), or present that way but not by its exact name (``Pages``,
    ``pages[]``). The rules read one value by the exact name; an upstream may read another
    value or spelling and act on a request other than the one metered."""
    if spellings := rules.header_spellings:
        seen: set[str] = set()
        for k, _ in headers.items():     # (every line: keys() folds repeats)
            low = k.lower()
            folded = low.replace("_", "-")
            if (own := spellings.get(folded)) is None:
                continue
            if folded in seen or low != own:
                return (f"The request sends the {own} header more than once or in another "
                        "spelling: the rules read it, and its value must be unambiguous. "
                        "Send it once, spelled as documented.")
            seen.add(folded)
    if rules.param_spellings and (qs := request.rel_url.raw_query_string):
        wanted = rules.param_spellings
        lenient: dict[str, int] = {}
        for part in _QUERY_SEP.split(qs):
            name = lenient_param(part.partition("=")[0])
            if name in wanted:
                lenient[name] = lenient.get(name, 0) + 1
        if lenient:
            query = request.query
            for name in rules.single_params:
                n = lenient.get(name.casefold(), 0)
                if n > 1 or n != len(query.getall(name, ())):
                    return (f"The request sends the query parameter {name} more than once "
                            "or in another spelling: the rules read it, and its value must "
                            "be unambiguous. Send it once, spelled as documented.")
    return None


def without_params(target: str, names: frozenset[str]) -> str:
    """``target`` without the query parameters named ``names`` (compared decoded, as the
    key lookup reads them); every other byte of the query as it was, the ``?`` dropped when
    nothing is left."""
    path, _, query = target.partition("?")
    kept = [p for p in query.split("&") if unquote_plus(p.partition("=")[0]) not in names]
    return f"{path}?{'&'.join(kept)}" if any(kept) else path


async def _expect(request: web.BaseRequest) -> None:
    """What aiohttp's Application ran for a request with an ``Expect`` header before its
    handler (``_default_expect_handler``, then a drain): HTTP/1.1 ``100-continue`` gets
    ``100 Continue`` at once, any other expectation 417; HTTP/1.0 ignores it."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version == (1, 1):
        if expect.lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        else:
            raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
    await request.writer.drain()


async def _unreachable(request: web.BaseRequest) -> web.StreamResponse:
    raise AssertionError("the catch-all router only answers whether a target matches")
