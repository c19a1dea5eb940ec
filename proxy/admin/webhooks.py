"""Admin routes for stored Stripe webhook events: list, show, replay.

Same admin-token middleware as every admin route. Replay re-processes a stored event now,
whatever its status; every effect is idempotent (grants on their key, suspension is a
state), so replaying a processed event changes nothing and a failed one gets another try.
"""

from __future__ import annotations

from aiohttp import web

from proxy.admin import input as ain
from proxy.admin.api import WEBHOOKS, jok
from proxy.webhooks import STATUSES


async def list_events(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is not None:
        ain.choice(status, "status", STATUSES)
    limit = ain.integer(request.query.get("limit", "100"), "limit", 1, 1000)
    return jok({"events": await request.app[WEBHOOKS].list_events(status, limit)})


async def get_event(request: web.Request) -> web.Response:
    return jok(await request.app[WEBHOOKS].get_event(request.match_info["id"]))


async def replay_event(request: web.Request) -> web.Response:
    receiver = request.app[WEBHOOKS]
    event_id = request.match_info["id"]
    await receiver.process(event_id)
    return jok(await receiver.get_event(event_id) | {"payload": None})


def webhook_routes() -> list[web.RouteDef]:
    return [
        web.get("/admin/webhooks", list_events),
        web.get("/admin/webhooks/{id}", get_event),
        web.post("/admin/webhooks/{id}/replay", replay_event),
    ]
