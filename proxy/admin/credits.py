"""Admin routes for prepaid credits: grant (idempotent), list, void, and the ledger entries
behind a customer's balance. Same admin-token middleware as every admin route."""

from __future__ import annotations

import time

from aiohttp import web

from proxy.admin import input as ain
from proxy.admin.api import CREDITS, _json_body, jok
from proxy.admin.input import FieldError
from proxy.credits.service import grant_json
from proxy.errors import InvalidInput
from proxy.units import fmt_micro


async def post_grant(request: web.Request) -> web.Response:
    svc = request.app[CREDITS]
    cid = request.match_info["id"]
    body = await _json_body(request)
    unknown = set(body) - {"credits", "expires_at", "priority", "idempotency_key", "source"}
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")
    if "credits" not in body:
        raise FieldError("credits", "is required")
    micro = ain.credits_micro(body["credits"])
    key = body.get("idempotency_key")
    if key is not None:
        key = ain.text(key, "idempotency_key", 255)
    source = ain.text(body.get("source", "admin"), "source", 64)
    g, created = await svc.grant(
        cid, fmt_micro(micro),
        expires_at=ain.optional_timestamp(body.get("expires_at"), "expires_at"),
        priority=ain.integer(body.get("priority", 50), "priority", 0, 100, strings=False),
        source=source, idempotency_key=key)
    return jok(grant_json(g, time.time()), 201 if created else 200)


async def list_grants(request: web.Request) -> web.Response:
    svc = request.app[CREDITS]
    return jok(svc.summary(request.match_info["id"]))


async def void_grant(request: web.Request) -> web.Response:
    svc = request.app[CREDITS]
    g = await svc.void(request.match_info["grant_id"])
    return jok(grant_json(g, time.time()))


async def ledger_entries(request: web.Request) -> web.Response:
    svc = request.app[CREDITS]
    return jok({"entries": await svc.entries(request.match_info["id"])})


def credit_routes() -> list[web.RouteDef]:
    return [
        web.post("/admin/customers/{id}/grants", post_grant),
        web.get("/admin/customers/{id}/grants", list_grants),
        web.post("/admin/grants/{grant_id}/void", void_grant),
        web.get("/admin/customers/{id}/credits/ledger", ledger_entries),
    ]
