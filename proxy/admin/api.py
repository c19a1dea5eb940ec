"""The admin API, on ``admin_listen`` only (never the public port).

Every ``/admin/*`` route and ``/metrics`` require ``Authorization: Bearer <admin.token>``;
``/healthz`` and ``/readyz`` are open so orchestrators can probe them. Writes go through
the Store's connection (the one writer); reads use a separate aiosqlite connection so a
large export never blocks the event loop.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol

import aiosqlite
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import metrics
from proxy.admin import input as ain
from proxy.credits.mirror import MonetaryService
from proxy.credits.money import Account, rules_problems
from proxy.credits.service import CreditService
from proxy.errors import HttpError, InvalidInput
from proxy.flusher import Flusher
from proxy.http_errors import error_response
from proxy.loglimit import LogLimiter
from proxy.meter_check import MeterCheck
from proxy.periods import default_usage_range
from proxy.pricing import fmt_minor
from proxy.reconcile import Reconciler
from proxy.reports.exports import stream_export
from proxy.reports.usage_report import customer_report
from proxy.runtime import Runtime
from proxy.store import keys as keystore
from proxy.timeutil import rfc3339
from proxy.units import fmt_micro
from proxy.webhooks import WebhookReceiver

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RT = web.AppKey("runtime", Runtime)
READER = web.AppKey("reader", aiosqlite.Connection)
_OPEN = frozenset({"/healthz", "/readyz"})
log = logging.getLogger("meterproxy.admin")
REFUSALS = web.AppKey("refusals", LogLimiter)   # bad admin tokens: log lines are rate-limited
# The services behind the admin routes, set once by ``build_admin_app`` (the composition root
# passes them in); a key that is absent means the service is not running in this process.
CREDITS = web.AppKey("credits", CreditService)
FLUSHER = web.AppKey("flusher", Flusher)
WEBHOOKS = web.AppKey("webhooks", WebhookReceiver)
RECONCILER = web.AppKey("reconciler", Reconciler)
RECONCILE_GRACE = web.AppKey("reconcile_grace", float)
METER_CHECK = web.AppKey("meter_check", MeterCheck)
MONETARY = web.AppKey("monetary", MonetaryService)


class FleetCreditView(Protocol):
    """Fleet mode's view of one customer's credits (``proxy.fleet.runtime.Fleet``)."""

    async def customer_credits(self, customer_id: str) -> dict[str, Any]: ...


FLEET_CREDITS = web.AppKey("fleet_credits", FleetCreditView)


def jok(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, content_type="application/json", body=orjson.dumps(data))


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The admin token, the documented query parameters, then the handler; every refusal
    (``HttpError``, ``LookupError`` for a missing object) is answered by ``error_response``."""
    if request.path not in _OPEN:
        token = request.app[RT].cfg.admin.token
        got = request.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode("utf-8", "surrogateescape"),
                                   f"Bearer {token}".encode()):
            metrics.AUTH_FAIL_ADMIN.inc()
            request.app[REFUSALS].log(logging.WARNING, "bad admin token", "admin request refused (bad token)"
                          " from %s: %s %s", request.remote, request.method, request.path[:200])
            return error_response(HttpError("A valid admin token is required.", status=401,
                                            type_="unauthorized"))
    resource = request.match_info.route.resource
    if resource is not None and request.query:
        allowed = request.app[QUERY_PARAMS].get(
            ("GET" if request.method == "HEAD" else request.method, resource.canonical))
        unknown = set(request.query) - allowed if allowed is not None else set()
        if unknown:
            return error_response(HttpError("unknown query parameter(s): "
                                            + ", ".join(sorted(repr(u)[:40] for u in unknown))))
    # every admin read sees every committed usage row (strict mode journals them first)
    await request.app[RT].store.try_catch_up()
    try:
        return await handler(request)
    except (HttpError, LookupError) as exc:
        return error_response(exc)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise InvalidInput("the body must be a JSON object") from exc
    if not isinstance(data, dict):
        raise InvalidInput("the body must be a JSON object")
    return data


async def _refresh_cache(rt: Runtime) -> None:
    snap = await rt.owners().customers.snapshot()
    rt.keys.replace(snap.keys, snap.customers)


# ---- customers and keys ----------------------------------------------------------------

async def post_customer(request: web.Request) -> web.Response:
    rt = request.app[RT]
    body = await _json_body(request)
    unknown = set(body) - {"id", "stripe_customer_id", "overage", "status", "billing_anchor",
                           "minimum_commitment", "currency", "credit_mode"}
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")
    scid = body.get("stripe_customer_id")
    if scid is not None:
        ain.text(scid, "stripe_customer_id", 255)
    anchor = ain.optional_timestamp(body.get("billing_anchor"), "billing_anchor")
    currency = body.get("currency")
    if currency is not None:
        currency = keystore.currency_code(currency)
    minimum = body.get("minimum_commitment")
    if minimum is not None:
        minimum = ain.integer(minimum, "minimum_commitment", 0, ain.MAX_MINOR_UNITS,
                              strings=False)

    mode: str | None = None
    monetary = request.app.get(MONETARY)
    problems: list[str] = []
    if "credit_mode" in body:
        mode = keystore.credit_mode_value(body["credit_mode"])
        if (mode or rt.cfg.credits.mode) == "monetary":
            problems = rules_problems(rt.cfg.storage.backend, rt.rules, True)
            known = rt.prices()
            problems += [f"meter {m!r}'s Stripe price is not fetched yet; retry shortly"
                         for m in sorted({u.meter for r in rt.rules.rules for u in r.usage})
                         if m not in known and not problems]
            if monetary is None:
                problems.append("the monetary credits mode is not running in this process")
    check_money = "credit_mode" in body and (mode or rt.cfg.credits.mode) == "monetary"

    def refuse(found: list[str]) -> HttpError:
        return HttpError("credit_mode monetary cannot price this customer's usage: "
                         + "; ".join(found), status=409, type_="monetary_unavailable")

    if problems:
        raise refuse(problems)      # before anything is written

    def billing(cust: keystore.Customer) -> tuple[object, object]:
        # pure, inside the upsert's transaction: a refusal rolls the whole write back
        if check_money and monetary is not None and (found := monetary.problems(
                dataclasses.replace(cust, currency=currency or cust.currency))):
            raise refuse(found)
        return (anchor if "billing_anchor" in body else cust.billing_anchor,
                cust.minimum_commitment if minimum is None else minimum)

    # one transaction: a customer is never left created without its currency or
    # credit_mode, nor written at all when its credit_mode is refused
    cust, created = await rt.owners().customers.upsert(
        body.get("id"), body.get("stripe_customer_id"), body.get("overage"), body.get("status"),
        billing if "billing_anchor" in body or "minimum_commitment" in body or check_money
        else None, currency=currency, credit_mode=mode if "credit_mode" in body else keystore.KEEP)
    await _refresh_cache(rt)
    if monetary is not None:
        await monetary.sync()                   # the account opens (or closes) now
    return jok(cust.to_json(), 201 if created else 200)


def money_json(acct: Account, balance_micro: int, now: float) -> dict[str, Any]:
    """A monetary customer's credits in money: the balance (formatted in its currency) and
    what the open period has burned, and how much of it credits covered."""
    cur = acct.currency
    return {"mode": "monetary", "currency": cur,
            "balance": fmt_minor(balance_micro // acct.per_minor, cur),
            "period_burned": fmt_minor(acct.burned(now), cur),
            "period_covered_by_credits": fmt_minor(acct.covered(now) // acct.per_minor, cur)}


async def list_customers(request: web.Request) -> web.Response:
    return jok([c.to_json() for c in await request.app[RT].owners().customers.all()])


async def get_customer(request: web.Request) -> web.Response:
    rt = request.app[RT]
    cid = request.match_info["id"]
    cust = await rt.owners().customers.get(cid)
    if cust is None:
        raise LookupError(f"no customer {cid!r}")
    credits = request.app.get(CREDITS)
    monetary = request.app.get(MONETARY)
    report = await customer_report(rt.owners().usage, rt.rules, rt.prices(), cust, credits,
                                   account=monetary.money.account(cid) if monetary else None)
    out = cust.to_json()
    out["period"] = report["period"]
    # documented shape: quantity this period per meter (only meters with usage)
    out["usage"] = {m: v["quantity"] for m, v in report["meters"].items() if v["requests"]}
    out["billing"] = {k: report[k] for k in ("currency", "meters", "total", "prices")}
    out["keys"] = await rt.owners().customers.list_keys(cid)
    if credits is not None:
        rem = await rt.owners().outbox.remainders(cid)
        out.update({"unreported_remainder": {k: fmt_micro(v) for k, v in rem.items()},
                    "credits": credits.summary(cid),
                    "credit_ledger": await credits.entries(cid, limit=50)})
        acct = monetary.money.account(cid) if monetary is not None else None
        if acct is not None:
            now = time.time()
            out["credits"]["money"] = money_json(acct, credits.book.balance(cid, now), now)
    if (fleet := request.app.get(FLEET_CREDITS)) is not None:
        out["fleet_credits"] = await fleet.customer_credits(cid)
    return jok(out)


async def post_key(request: web.Request) -> web.Response:
    rt = request.app[RT]
    cid = request.match_info["id"]
    body = await _json_body(request) if request.body_exists else {}
    if set(body) - {"name"}:
        raise InvalidInput(f"unknown field(s): {', '.join(sorted(set(body) - {'name'}))}")
    name = ain.text(body.get("name", ""), "name", 200)
    created = await rt.owners().customers.create_key(cid, name)
    await _refresh_cache(rt)
    return jok(created, 201)


async def list_keys(request: web.Request) -> web.Response:
    rt = request.app[RT]
    cid = request.match_info["id"]
    if await rt.owners().customers.get(cid) is None:
        raise LookupError(f"no customer {cid!r}")
    return jok(await rt.owners().customers.list_keys(cid))


async def delete_key(request: web.Request) -> web.Response:
    rt = request.app[RT]
    kid = request.match_info["key_id"]
    changed = await rt.owners().customers.revoke_key(kid)
    await _refresh_cache(rt)
    return jok({"key_id": kid, "revoked": True, "changed": changed})


# ---- usage ----------------------------------------------------------------------------

def _range(request: web.Request) -> tuple[float, float]:
    """``from``/``to`` of the query; by default ``periods.default_usage_range`` (the
    customer's current billing period)."""
    cust = request.app[RT].keys.customers.get(request.match_info.get("id", ""))
    return ain.time_range(request.query.get("from"), request.query.get("to"),
                          *default_usage_range(cust.billing_anchor if cust else None,
                                               time.time()))


async def get_usage(request: web.Request) -> web.Response:
    cid = request.match_info["id"]
    start, end = _range(request)
    _, _, totals = await request.app[RT].owners().usage.usage(cid, start, end)
    return jok({"customer": cid, "from": rfc3339(start), "to": rfc3339(end),
                "meters": {m: fmt_micro(v.quantity) for m, v in totals.items()}})


async def get_usage_csv(request: web.Request) -> web.StreamResponse:
    start, end = _range(request)
    return await stream_export(request, request.app[RT].owners().usage, request.match_info["id"], start,
                               end, "csv")


async def get_events(request: web.Request) -> web.StreamResponse:
    """Individual metered requests for disputes: ``?format=csv|json&from=&to=``."""
    fmt = ain.choice(request.query.get("format", "json"), "format", ("csv", "json"))
    start, end = _range(request)
    return await stream_export(request, request.app[RT].owners().usage, request.match_info["id"], start,
                               end, fmt)


# ---- health and metrics -----------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    return jok({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RT]
    problems = []
    if rt.store.check_file() is not None or not rt.store.healthy:  # deleted/replaced/corrupt
        problems.append(f"storage: {rt.store.last_error}")
    check = request.app.get(METER_CHECK)
    if check is not None:
        problems.extend(check.ready_problems())
    flusher = request.app.get(FLUSHER)
    threshold = rt.cfg.stripe.flush_lag_ready_threshold
    if flusher is not None and (lag := await flusher.lag()) > threshold:
        problems.append(f"flush lag {lag:.0f}s exceeds {threshold:.0f}s")
    body = {"status": "degraded" if problems else "ready", "problems": problems,
            "rules_version": rt.rules.version, "rules_error": rt.rules_error}
    return jok(body, 503 if problems else 200)


async def metrics_endpoint(request: web.Request) -> web.Response:
    resp = web.Response(body=generate_latest(metrics.REGISTRY))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def rules_info(request: web.Request) -> web.Response:
    rt = request.app[RT]
    return jok({"version": rt.rules.version, "rules": [r.name for r in rt.rules.rules],
                "meters": sorted(rt.rules.meters), "last_reload_error": rt.rules_error})


@functools.cache
def load_openapi() -> bytes:
    """The OpenAPI document, ``proxy/static/openapi.yaml``, as JSON bytes: read and parsed
    once per process (the pure-Python YAML parse takes ~0.2 s, which every start of an admin
    app paid: a reload, each worker, each test's proxy)."""
    from ruamel.yaml import YAML

    text = resources.files("proxy.static").joinpath("openapi.yaml").read_text("utf-8")
    return orjson.dumps(YAML(typ="safe", pure=True).load(text))


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document (a fresh copy: the caller may change it)."""
    doc: dict[str, Any] = orjson.loads(load_openapi())
    return doc


@functools.cache
def _query_parameters() -> dict[tuple[str, str], frozenset[str]]:
    return query_parameters(openapi_document())


def query_parameters(doc: dict[str, Any]) -> dict[tuple[str, str], frozenset[str]]:
    """(method, path) -> the query parameters the document allows; others are a 400."""
    out: dict[tuple[str, str], frozenset[str]] = {}
    params = doc["components"]["parameters"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            names = set()
            for p in [*item.get("parameters", ()), *op.get("parameters", ())]:
                p = params[p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p
                if p["in"] == "query":
                    names.add(p["name"])
            out[(method.upper(), path)] = frozenset(names)
    return out


OPENAPI = web.AppKey("openapi", bytes)
QUERY_PARAMS = web.AppKey("query_params", dict[tuple[str, str], frozenset[str]])


async def openapi_doc(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


def not_yet(what: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        raise HttpError(f"{what} is not available in this build.", status=501,
                        type_="not_implemented")
    return handler


def build_admin_app(rt: Runtime, reader: aiosqlite.Connection,
                    extra_routes: list[web.RouteDef] | None = None, *,
                    credits: CreditService | None = None, flusher: Flusher | None = None,
                    webhooks: WebhookReceiver | None = None,
                    reconciler: Reconciler | None = None, meter_check: MeterCheck | None = None,
                    reconcile_grace: float | None = None) -> web.Application:
    """The admin application. Each service given is reachable by its routes through one typed
    key (``CREDITS``, ``FLUSHER``, ...); one not given leaves its key unset."""
    app = web.Application(middlewares=[_auth], client_max_size=1024 * 1024)
    app[RT] = rt
    app[READER] = reader
    if credits is not None:
        app[CREDITS] = credits
    if flusher is not None:
        app[FLUSHER] = flusher
    if webhooks is not None:
        app[WEBHOOKS] = webhooks
    if reconciler is not None:
        app[RECONCILER] = reconciler
    if meter_check is not None:
        app[METER_CHECK] = meter_check
    if reconcile_grace is not None:
        app[RECONCILE_GRACE] = reconcile_grace
    app[OPENAPI] = load_openapi()
    app[QUERY_PARAMS] = _query_parameters()
    app[REFUSALS] = LogLimiter(log)
    routes = [
        web.get("/admin/openapi.json", openapi_doc),
        web.post("/admin/customers", post_customer),
        web.get("/admin/customers", list_customers),
        web.get("/admin/customers/{id}", get_customer),
        web.post("/admin/customers/{id}/keys", post_key),
        web.get("/admin/customers/{id}/keys", list_keys),
        web.delete("/admin/keys/{key_id}", delete_key),
        web.get("/admin/customers/{id}/usage", get_usage),
        web.get("/admin/customers/{id}/usage.csv", get_usage_csv),
        web.get("/admin/customers/{id}/events", get_events),
        web.get("/admin/rules", rules_info),
        web.get("/metrics", metrics_endpoint),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
    ]
    defined = {(r.method, r.path) for r in (extra_routes or [])}
    later = [("POST", "/admin/customers/{id}/grants", "Credit grants"),
             ("POST", "/admin/flush", "Flushing to Stripe"),
             ("POST", "/admin/reconcile", "Reconciliation"),
             ("GET", "/admin/dead-letters", "Dead letters"),
             ("POST", "/admin/dead-letters/{id}/replay", "Dead-letter replay")]
    for method, path, what in later:
        if (method, path) not in defined:
            routes.append(web.route(method, path, not_yet(what)))
    app.add_routes(routes + list(extra_routes or []))
    return app
