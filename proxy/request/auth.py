"""Step 1, authentication: the consumer's API key -> (key id, customer id).

The key is read from the configured sources (``keys.sources``: a header with an optional
scheme, or a query parameter) and looked up in the in-memory key cache (no I/O). A refusal
is raised as an ``HttpError`` and answered by ``proxy.http_errors``:

    no key                      401 missing_api_key
    unknown key                 401 invalid_api_key   (logged, rate-limited: anyone can send one)
    revoked key                 403 key_revoked
    customer unknown/suspended  403 customer_suspended

Used by the pipeline for every rule with ``auth: required`` (and unmatched paths) and, directly,
by the consumer routes (``proxy.request.consumer``).
"""

from __future__ import annotations

import logging

from aiohttp import web
from multidict import istr

from proxy import metrics
from proxy.errors import HttpError
from proxy.loglimit import LogLimiter
from proxy.runtime import Runtime
from proxy.store.keys import KeyCache, KeyEntry

log = logging.getLogger("meterproxy.handler")


class Authenticator:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        sources = rt.cfg.keys.sources
        # (header, scheme in lower case or ""): the scheme compared without case
        self.key_headers = tuple((istr(s.header), (s.scheme or "").lower())
                                 for s in sources if s.header)
        self.key_query = tuple(s.query for s in sources if s.query)
        self.refusals = LogLimiter(log)   # unknown API keys: any caller can send them at will
        # The first key header's value -> the key entry it named, for the key cache's
        # snapshot ``_memo_of`` (``KeyCache.generation``: a reload starts an empty memo). A
        # value that names a key once names the same key for as long as the snapshot lasts
        # (``extract_key`` takes the first header's token whenever it yields one); the
        # entry's own checks (revoked, customer suspended) are made on every request. Only
        # keys found are remembered (no memory for junk), and only in their plain spelling
        # ('<scheme> <key>', one space, or the bare key): a key padded with whitespace names
        # the same key in as many spellings as the sender likes, each up to
        # limits.max_header_field long, and keeping them would let one customer fill memory.
        self._first = self.key_headers[0][0] if self.key_headers else None
        scheme = self.key_headers[0][1] if self.key_headers else ""
        self._plain_extra = len(scheme) + 1 if scheme else 0   # a plain value's length - key's
        self._memo: dict[str, KeyEntry] = {}
        self._memo_of = -1

    _MEMO_MAX = 100_000

    def authenticate(self, request: web.BaseRequest) -> KeyEntry:
        """The key entry of an active key of an active customer, or raises ``HttpError``."""
        keys = self.rt.keys
        if self._memo_of != keys.generation:
            self._memo, self._memo_of = {}, keys.generation
        first = self._first
        value = request.headers.get(first) if first is not None else None
        entry = self._memo.get(value) if value else None
        if entry is None:
            raw = self.extract_key(request)
            entry = self._look_up(request, raw, keys)
            if value and raw is not None and len(value) == len(raw) + self._plain_extra \
                    and raw == _token(value, self.key_headers[0][1]):    # the first header's
                if len(self._memo) >= self._MEMO_MAX:
                    self._memo.clear()
                self._memo[value] = entry
        if entry.revoked:
            raise HttpError("This API key has been revoked.", status=403, type_="key_revoked")
        cust = keys.customers.get(entry.customer_id)
        if cust is None or cust.status == "suspended":
            raise HttpError("This account is suspended. Contact support.", status=403,
                            type_="customer_suspended")
        return entry

    def _look_up(self, request: web.BaseRequest, raw: str | None, keys: KeyCache) -> KeyEntry:
        """The key entry the request's key ``raw`` names, or raises (401)."""
        if raw is None:
            raise HttpError("No API key was sent. Send it as 'Authorization: Bearer <key>'.",
                            status=401, type_="missing_api_key")
        entry = keys.lookup(raw)
        if entry is None:
            metrics.AUTH_FAIL_API_KEY.inc()
            self.refusals.log(logging.WARNING, "unknown API key", "unknown API key from %s",
                              request.remote)
            raise HttpError("The API key is not valid.", status=401, type_="invalid_api_key")
        return entry

    def extract_key(self, request: web.BaseRequest) -> str | None:
        headers = request.headers
        for name, scheme in self.key_headers:
            value = headers.get(name)
            if value and (token := _token(value, scheme)) is not None:
                return token
        for q in self.key_query:
            v = request.query.get(q)
            if v:
                return v
        return None


def _token(value: str, scheme: str) -> str | None:
    """The key a key header's (non-empty) ``value`` carries: after ``scheme`` (lower case,
    compared without case) when there is one; None when it carries none."""
    if scheme:
        prefix, _, token = value.partition(" ")
        if prefix.lower() != scheme or not (token := token.strip()):
            return None
        return token
    return value.strip()
