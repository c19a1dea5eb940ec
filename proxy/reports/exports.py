"""Exports of individual metered requests (disputes): CSV and JSON, streamed from the audit
table through the read-only connection, so a large export never blocks the event loop.

One line per request and meter, columns ``COLUMNS``: time, request_id, customer_id, key_id,
rule, rules_version, status, meter, quantity, credits, billable, flags, method, path.
Summing ``billable`` per meter over a period gives the units the period's invoice line
bills (before Stripe's whole-unit rounding, whose remainder is carried: README "Reporting to Stripe").
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from proxy.store.protocols import UsageLedger
from proxy.timeutil import rfc3339
from proxy.units import fmt_micro

COLUMNS = ("time", "request_id", "customer_id", "key_id", "rule", "rules_version", "status",
           "meter", "quantity", "credits", "billable", "flags", "method", "path")


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.:@-]")

# OWASP "CSV injection": a cell starting with one of these is a formula to a spreadsheet.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(v: str) -> str:
    """One CSV cell, RFC 4180 quoted when needed, with formula injection neutralized: a value
    starting with = + - @ TAB or CR gets a leading single quote, so a spreadsheet shows it as
    text (``=HYPERLINK(...)`` -> ``'=HYPERLINK(...)``). Applies to every cell of every CSV
    export; the JSON export carries the raw values."""
    if v.startswith(_FORMULA_START):
        v = "'" + v
    if any(c in v for c in ',"\r\n'):
        return '"' + v.replace('"', '""') + '"'
    return v


async def audit_rows(usage: UsageLedger, customer_id: str, start: float,
                     end: float) -> AsyncIterator[list[dict[str, Any]]]:
    async for rows in usage.audit_stream(customer_id, start, end, batch=500):
        yield [{"time": rfc3339(a.at_ms / 1000)[:-1] + f".{a.at_ms % 1000:03d}Z",
                "request_id": a.request_id, "customer_id": a.customer_id, "key_id": a.key_id,
                "rule": a.rule, "rules_version": a.rules_version, "status": a.status,
                "meter": a.meter, "quantity": fmt_micro(a.quantity),
                "credits": fmt_micro(a.credits), "billable": fmt_micro(a.billable),
                "flags": a.flags, "method": a.method, "path": a.path} for a in rows]


async def stream_export(request: web.BaseRequest, usage: UsageLedger, customer_id: str,
                        start: float, end: float, fmt: str) -> web.StreamResponse:
    ctype = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
    # the id comes from the URL: only id characters may reach the header
    name = _UNSAFE_NAME.sub("_", customer_id)[:128]
    resp = web.StreamResponse(headers={
        "Content-Type": ctype,
        "Content-Disposition": f'attachment; filename="{name}-usage.{fmt}"'})
    await resp.prepare(request)
    if fmt == "csv":
        await resp.write((",".join(COLUMNS) + "\r\n").encode())
    else:
        await resp.write(orjson.dumps({"customer": customer_id, "from": rfc3339(start),
                                       "to": rfc3339(end)})[:-1] + b', "requests": [')
    first = True
    async for batch in audit_rows(usage, customer_id, start, end):
        if fmt == "csv":
            lines = [",".join(csv_cell(str(r[c])) for c in COLUMNS) for r in batch]
            await resp.write(("\r\n".join(lines) + "\r\n").encode())
        else:
            chunk = b",".join(orjson.dumps(r) for r in batch)
            await resp.write(chunk if first else b"," + chunk)
            first = False
    if fmt == "json":
        await resp.write(b"]}")
    await resp.write_eof()
    return resp
