"""Putting usage into the shared ledger the way a fleet member does: journal rows shipped
by the real ``Shipper`` (the hot path never writes PostgreSQL)."""

from __future__ import annotations

from proxy.metrics import REGISTRY
from proxy.store.postgres.shipping import LocalRow, ShipItem, Shipper
from proxy.store.postgres.storage import PostgresStorage

C = 1_000_000    # one unit in micro-units


def conflicts(outcome: str) -> float:
    """``meterproxy_fleet_pg_conflicts_total{outcome}``: transactions PostgreSQL rolled back
    (deadlock, serialization failure) and the pool ran again ("retried") or gave up."""
    return REGISTRY.get_sample_value("meterproxy_fleet_pg_conflicts_total",
                                     {"outcome": outcome}) or 0.0


def usage_row(seq: int, customer: str, at: float, *, meter: str = "api_calls",
              quantity: int = C, billable: int | None = None, key: str = "k1",
              version: str = "v1", request_id: str | None = None,
              extra_meter: str | None = None) -> LocalRow:
    items = [ShipItem(meter, quantity, billable=quantity if billable is None else billable)]
    if extra_meter is not None:
        items.append(ShipItem(extra_meter, C, billable=C))
    return LocalRow(seq, request_id or f"req-{customer}-{seq}", int(at * 1000), customer, key,
                    "rule", version, 200, tuple(items), method="POST", path="/v1/x")


async def ship(s: PostgresStorage, member_id: str, rows: list[LocalRow]) -> int:
    """Ship ``rows`` as ``member_id``; returns how many ledger items were new."""
    return (await Shipper(s.pool, member_id).ship(rows)).inserted
