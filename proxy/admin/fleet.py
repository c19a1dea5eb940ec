"""``GET /admin/fleet``: the fleet as this member sees it (fleet mode only).

Members (rules version, last heartbeat, shipped watermark, leases), the flusher's leader
and this member's own shipping lag and lease holdings (``proxy.fleet.runtime.Fleet.status``).
Single-process mode (SQLite) answers 404 ``not_a_fleet``. With PostgreSQL unreachable the
answer still has this member's own part, ``database`` says so and ``members`` is empty.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from proxy.admin.api import jok
from proxy.errors import HttpError


class FleetStatus(Protocol):
    async def status(self) -> dict[str, Any]: ...


FLEET = web.AppKey("fleet", FleetStatus)


async def get_fleet(request: web.Request) -> web.Response:
    fleet = request.app.get(FLEET)
    if fleet is None:
        raise HttpError("This meterproxy runs alone (storage.backend: sqlite); fleet mode is "
                        "storage.backend: postgres.", status=404, type_="not_a_fleet")
    return jok(await fleet.status())


def fleet_routes() -> list[web.RouteDef]:
    return [web.get("/admin/fleet", get_fleet)]
