"""Admin routes for the Stripe outbox: flush now, the outbox, dead letters and replay.

Mounted by the composition root next to ``proxy.admin.api``; every route sits behind the same
admin-token middleware.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.admin import input as ain
from proxy.admin.api import READER, jerror, jok
from proxy.flusher import Flusher
from proxy.timeutil import rfc3339

FLUSHER = web.AppKey("flusher", Flusher)

_OUTBOX_COLS = ("id, identifier, customer_id, meter, event_name, covered, value, timestamp,"
                " created_at, status, attempts, sent_at, sink, outcome, last_error, dead_at")


def _row(cols: list[str], r: Any) -> dict[str, Any]:
    d = dict(zip(cols, r, strict=True))
    for k in ("timestamp", "created_at", "sent_at", "dead_at"):
        if d.get(k) is not None:
            d[k] = rfc3339(d[k])
    d["covered"] = bool(d["covered"])
    d["reason"] = d.pop("last_error")
    return d


async def _query(request: web.Request, where: str, args: tuple[Any, ...],
                 limit: int = 500) -> list[dict[str, Any]]:
    db = request.app[READER]
    async with db.execute(f"SELECT {_OUTBOX_COLS} FROM outbox WHERE {where} ORDER BY id DESC"
                          f" LIMIT {int(limit)}", args) as cur:
        cols = [d[0] for d in cur.description]
        return [_row(cols, r) async for r in cur]


async def post_flush(request: web.Request) -> web.Response:
    report = await request.app[FLUSHER].flush(force=True)
    return jok(report.to_json())


async def get_dead_letters(request: web.Request) -> web.Response:
    return jok({"dead_letters": await _query(request, "status='dead'", ())})


async def replay_dead_letter(request: web.Request) -> web.Response:
    oid = ain.integer(request.match_info["id"], "id", 1, ain.MAX_INT64)
    flusher = request.app[FLUSHER]
    restamp = ain.flag(request.query.get("restamp", False), "restamp")
    if not await flusher.replay(oid, restamp=restamp):
        return jerror(404, "not_found", f"no dead letter {oid}")
    report = await flusher.flush(force=True)
    rows = await _query(request, "id=?", (oid,), 1)
    return jok({"replayed": rows[0] if rows else None, "flush": report.to_json()})


async def get_outbox(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is not None:
        ain.choice(status, "status", ("pending", "sent", "dead", "dry_run"))
    where, args = ("status=?", (status,)) if status else ("1=1", ())
    customer = request.query.get("customer")
    if customer:
        where += " AND customer_id=?"
        args = (*args, customer)
    return jok({"events": await _query(request, where, args)})


def billing_routes() -> list[web.RouteDef]:
    return [
        web.post("/admin/flush", post_flush),
        web.get("/admin/dead-letters", get_dead_letters),
        web.post("/admin/dead-letters/{id}/replay", replay_dead_letter),
        web.get("/admin/outbox", get_outbox),
    ]
