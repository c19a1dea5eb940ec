"""Admin routes for prepaid credits: grant (idempotent), list, void, and the ledger entries
behind a customer's balance. Same admin-token middleware as every admin route."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from proxy.admin import _json_body, jok
from proxy.credits.service import CreditService, grant_json
from proxy.store.keys import InvalidInput
from proxy.timeutil import parse_time

CREDITS = web.AppKey("credits", CreditService)


def _expires(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise InvalidInput("expires_at must be an RFC 3339 time, unix seconds or null")
    try:
        return int(parse_time(str(value)))
    except ValueError as exc:
        raise InvalidInput("expires_at must be an RFC 3339 time, unix seconds or null") from exc


async def post_grant(request: web.Request) -> web.Response:
    svc = request.app[CREDITS]
    cid = request.match_info["id"]
    body = await _json_body(request)
    unknown = set(body) - {"credits", "expires_at", "priority", "idempotency_key", "source"}
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")
    credits = body.get("credits")
    if not isinstance(credits, (str, int)) or isinstance(credits, bool):
        raise InvalidInput("credits must be a decimal string, e.g. \"1000\"")
    key = body.get("idempotency_key")
    if key is not None and not isinstance(key, str):
        raise InvalidInput("idempotency_key must be a string")
    source = body.get("source", "admin")
    if not isinstance(source, str):
        raise InvalidInput("source must be a string")
    g, created = svc.grant(cid, credits, expires_at=_expires(body.get("expires_at")),
                           priority=body.get("priority", 50), source=source,
                           idempotency_key=key)
    return jok(grant_json(g, time.time()), 201 if created else 200)


async def list_grants(request: web.Request) -> web.Response:
    svc = request.app[CREDITS]
    return jok(svc.summary(request.match_info["id"]))


async def void_grant(request: web.Request) -> web.Response:
    svc = request.app[CREDITS]
    g = svc.void(request.match_info["grant_id"])
    return jok(grant_json(g, time.time()))


async def ledger_entries(request: web.Request) -> web.Response:
    svc = request.app[CREDITS]
    return jok({"entries": svc.entries(request.match_info["id"])})


def credit_routes() -> list[web.RouteDef]:
    return [
        web.post("/admin/customers/{id}/grants", post_grant),
        web.get("/admin/customers/{id}/grants", list_grants),
        web.post("/admin/grants/{grant_id}/void", void_grant),
        web.get("/admin/customers/{id}/credits/ledger", ledger_entries),
    ]
