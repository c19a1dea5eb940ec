"""Acceptance (issue 11, #3) on real processes: a key created on one member works on the
others, and a key revoked on member A is refused (403 key_revoked) on B and C within the stated bound
(docs/fleet.md: ``fleet.key_poll_interval`` plus one query; 1 s asserted here with the
interval at 200 ms)."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.fleet.members import admin_call, fleet_of, wait_status

BOUND = 1.0


async def test_key_revoked_on_one_member_is_refused_on_the_others(tmp_path: Path,
                                                                 upstream: str) -> None:
    async with fleet_of(tmp_path, upstream) as fleet:
        a, b, c = await fleet.start(["a", "b", "c"])
        async with aiohttp.ClientSession() as s:
            await admin_call(s, a, "POST", "/admin/customers", {"id": "cust"})
            created = await admin_call(s, a, "POST", "/admin/customers/cust/keys", {"name": "k"})
            key, kid = created["key"], created["key_id"]
            for m in (b, c):
                assert await wait_status(s, m.url + "/v1/items", key, 200, BOUND) < BOUND
            await admin_call(s, a, "DELETE", f"/admin/keys/{kid}")
            took = [await wait_status(s, m.url + "/v1/items", key, 403, BOUND)
                    for m in (b, c)]
            assert max(took) < BOUND
            # every member answers for the fleet: B lists the key as revoked
            keys = await admin_call(s, b, "GET", "/admin/customers/cust/keys")
            assert [k["revoked_at"] is not None for k in keys] == [True], keys
