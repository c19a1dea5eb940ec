"""Admin routes for the Stripe outbox: flush now, the outbox, dead letters and replay.

Mounted by the composition root next to ``proxy.admin.api``; every route sits behind the same
admin-token middleware.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aiohttp import web

from proxy.admin import input as ain
from proxy.admin.api import FLUSHER, jok
from proxy.store.protocols import OutboxEntry
from proxy.timeutil import rfc3339


def _row(e: OutboxEntry) -> dict[str, Any]:
    d = asdict(e)
    for k in ("timestamp", "created_at", "sent_at", "dead_at"):
        if d.get(k) is not None:
            d[k] = rfc3339(d[k])
    d["covered"] = bool(d["covered"])
    d["reason"] = d.pop("last_error")
    return d


async def _query(request: web.Request, *, status: str | None = None,
                 outbox_id: int | None = None, customer_id: str | None = None,
                 limit: int = 500) -> list[dict[str, Any]]:
    rows = await request.app[FLUSHER].shared.rows(status=status, outbox_id=outbox_id,
                                                   customer_id=customer_id, limit=limit)
    return [_row(e) for e in rows]


async def post_flush(request: web.Request) -> web.Response:
    report = await request.app[FLUSHER].flush(force=True)
    return jok(report.to_json())


async def get_dead_letters(request: web.Request) -> web.Response:
    return jok({"dead_letters": await _query(request, status="dead")})


async def replay_dead_letter(request: web.Request) -> web.Response:
    oid = ain.integer(request.match_info["id"], "id", 1, ain.MAX_INT64)
    flusher = request.app[FLUSHER]
    restamp = ain.flag(request.query.get("restamp", False), "restamp")
    if not await flusher.replay(oid, restamp=restamp):
        raise LookupError(f"no dead letter {oid}")
    report = await flusher.flush(force=True)
    rows = await _query(request, outbox_id=oid, limit=1)
    return jok({"replayed": rows[0] if rows else None, "flush": report.to_json()})


async def get_outbox(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is not None:
        ain.choice(status, "status", ("pending", "sent", "dead", "dry_run"))
    customer = request.query.get("customer")
    return jok({"events": await _query(request, status=status or None,
                                       customer_id=customer or None)})


def billing_routes() -> list[web.RouteDef]:
    return [
        web.post("/admin/flush", post_flush),
        web.get("/admin/dead-letters", get_dead_letters),
        web.post("/admin/dead-letters/{id}/replay", replay_dead_letter),
        web.get("/admin/outbox", get_outbox),
    ]
