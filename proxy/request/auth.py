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
from proxy.store.keys import KeyEntry

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

    def authenticate(self, request: web.BaseRequest) -> KeyEntry:
        """The key entry of an active key of an active customer, or raises ``HttpError``."""
        raw = self.extract_key(request)
        if raw is None:
            raise HttpError("No API key was sent. Send it as 'Authorization: Bearer <key>'.",
                            status=401, type_="missing_api_key")
        keys = self.rt.keys
        entry = keys.lookup(raw)
        if entry is None:
            metrics.AUTH_FAIL_API_KEY.inc()
            self.refusals.log(logging.WARNING, "unknown API key", "unknown API key from %s",
                              request.remote)
            raise HttpError("The API key is not valid.", status=401, type_="invalid_api_key")
        if entry.revoked:
            raise HttpError("This API key has been revoked.", status=403, type_="key_revoked")
        cust = keys.customers.get(entry.customer_id)
        if cust is None or cust.status == "suspended":
            raise HttpError("This account is suspended. Contact support.", status=403,
                            type_="customer_suspended")
        return entry

    def extract_key(self, request: web.BaseRequest) -> str | None:
        headers = request.headers
        for name, scheme in self.key_headers:
            value = headers.get(name)
            if not value:
                continue
            if scheme:
                prefix, _, token = value.partition(" ")
                if prefix.lower() != scheme or not (token := token.strip()):
                    continue
                return token
            return value.strip()
        for q in self.key_query:
            v = request.query.get(q)
            if v:
                return v
        return None
