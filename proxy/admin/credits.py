"""Admin routes for prepaid credits: grant (idempotent), list, void, and the ledger entries
behind a customer's balance. Same admin-token middleware as every admin route."""

from __future__ import annotations

import time

from aiohttp import web

from proxy.admin import input as ain
from proxy.admin.api import CREDITS, MONETARY, RT, _json_body, jok
from proxy.admin.input import FieldError
from proxy.credits.mirror import MirrorProblem
from proxy.credits.service import grant_json
from proxy.errors import HttpError, InvalidInput
from proxy.store.protocols import GrantMirrorRecord
from proxy.timeutil import rfc3339
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


def _mirror_json(r: GrantMirrorRecord) -> dict[str, object]:
    return {"grant_id": r.grant_id, "customer_id": r.customer_id, "want": r.want,
            "done": r.done, "stripe_grant_id": r.stripe_grant_id, "status": r.status,
            "attempts": r.attempts,
            "next_attempt_at": rfc3339(r.next_attempt_at) if r.status == "pending" else None,
            "last_error": r.last_error, "updated_at": rfc3339(r.updated_at)}


async def list_mirrors(request: web.Request) -> web.Response:
    """The Stripe credit grant mirrors of monetary customers' grants."""
    q = request.query
    status = q.get("status")
    if status is not None and status not in ("pending", "mirrored", "dead"):
        raise FieldError("status", "must be pending, mirrored or dead")
    cid = q.get("customer_id")
    limit = ain.integer(q.get("limit", "500"), "limit", 1, 5000)
    rows = await request.app[RT].owners().mirrors.rows(status=status, customer_id=cid,
                                                      limit=limit)
    return jok({"mirrors": [_mirror_json(r) for r in rows]})


async def requeue_mirrors(request: web.Request) -> web.Response:
    """Dead-lettered mirrors (``grant_ids``, or all) back to pending."""
    body = await _json_body(request) if request.body_exists else {}
    if set(body) - {"grant_ids"}:
        raise InvalidInput(f"unknown field(s): {', '.join(sorted(set(body) - {'grant_ids'}))}")
    ids = body.get("grant_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) > 1000
                            or not all(isinstance(i, str) for i in ids)):
        raise FieldError("grant_ids", "must be a list of at most 1000 grant ids")
    n = await request.app[RT].owners().mirrors.requeue(ids, int(time.time()))
    if (svc := request.app.get(MONETARY)) is not None:
        svc.wake.set()
    return jok({"requeued": n})


async def balance_check(request: web.Request) -> web.Response:
    """Monetary customers' local balances against Stripe's credit balance summaries, now:
    one (``customer_id``) or all."""
    svc = request.app.get(MONETARY)
    if svc is None or svc.stripe is None:
        raise HttpError("Balance checks need the monetary credits mode with a Stripe key and "
                        "a sink other than dry_run.", status=409, type_="monetary_unavailable")
    body = await _json_body(request) if request.body_exists else {}
    if set(body) - {"customer_id"}:
        raise InvalidInput(f"unknown field(s): {', '.join(sorted(set(body) - {'customer_id'}))}")
    cid = body.get("customer_id")
    if cid is not None:
        try:
            return jok({"checks": [await svc.balance_check(ain.text(cid, "customer_id", 128))]})
        except MirrorProblem as exc:
            raise HttpError(str(exc), status=409, type_="monetary_unavailable") from exc
    return jok({"checks": await svc.check_all()})


def credit_routes() -> list[web.RouteDef]:
    return [
        web.get("/admin/credits/mirrors", list_mirrors),
        web.post("/admin/credits/mirrors/requeue", requeue_mirrors),
        web.post("/admin/credits/balance-check", balance_check),
        web.post("/admin/customers/{id}/grants", post_grant),
        web.get("/admin/customers/{id}/grants", list_grants),
        web.post("/admin/grants/{grant_id}/void", void_grant),
        web.get("/admin/customers/{id}/credits/ledger", ledger_entries),
    ]
