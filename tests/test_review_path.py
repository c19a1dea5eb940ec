"""Adversarial review (request path): each test shows one defect through a real proxy, a real
upstream on loopback and real SQLite files."""

from __future__ import annotations

import asyncio
import json

import orjson
from aiohttp import web

from tests.conftest import Proxy, ProxyFactory
from tests.servers import serve

Q = 1_000_000

HEADER_RULES = """\
version: 1
meters:
  units: {stripe_event_name: units}
rules:
  - name: small-model
    match: {methods: [POST], path: /v1/infer, headers: {X-Model: "small"}}
    usage:
      - {meter: units, quantity: 1}
  - name: default-model
    match: {methods: [POST], path: /v1/infer}
    usage:
      - {meter: units, quantity: 10}
"""


async def _raw(port: int, head: list[bytes], body: bytes = b"") -> tuple[int, bytes]:
    """One request on its own connection, the head lines as given; reads until close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def _audit(p: Proxy, rid: str) -> list[tuple[str, int]]:
    with p.db() as db:
        return db.execute("SELECT rule, quantity FROM audit WHERE request_id = ?",
                          (rid,)).fetchall()


async def test_a_header_named_by_connection_is_matched_but_not_forwarded(
        make_proxy: ProxyFactory) -> None:
    """A rule matched ``X-Model: small`` (1 unit), but the consumer also named X-Model in
    ``Connection``, so the proxy drops it on the way up (hop-by-hop): the upstream serves its
    default model while the request is billed as the small one. What is matched by a rule
    must be what is forwarded upstream."""
    seen: dict[str, str | None] = {}

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        model = request.headers.get("X-Model")
        seen[request.headers["X-Request-Id"]] = model
        return web.json_response({"model": model or "large-default"})

    app = web.Application()
    app.router.add_post("/v1/infer", handle)
    async with serve(app) as url:
        p = await make_proxy(url, rules_text=HEADER_RULES)
        key = await p.customer_with_key("acme")
        port = p.server.public_port
        common = [b"POST /v1/infer HTTP/1.1", b"Host: 127.0.0.1",
                  b"Authorization: Bearer " + key.encode(), b"Content-Length: 2",
                  b"X-Model: small"]
        # the honest request: matched small, the upstream serves small
        status, _ = await _raw(port, [*common, b"Connection: close", b"X-Request-Id: honest"],
                               b"{}")
        assert status == 200
        assert seen["honest"] == "small"
        # the trick: the same header, named by Connection
        status, body = await _raw(port, [*common, b"Connection: close, X-Model",
                                         b"X-Request-Id: trick"], b"{}")
        assert status == 200
        served = orjson.loads(body)["model"]
        rows = _audit(p, "trick")
        # billed as what the upstream served: the small rule only if it received X-Model
        expected_rule = "small-model" if seen["trick"] == "small" else "default-model"
        assert (served, [r[0] for r in rows]) == (served, [expected_rule]), \
            f"upstream served {served!r} (X-Model={seen['trick']!r}) but billed {rows}"


def _big_answer(echo: dict[str, object]) -> bytes:
    """An answer over the default 1 MiB inspection cap (many short strings, as a logprobs
    answer has), its usage first, then the consumer's metadata merged at the top level."""
    doc: dict[str, object] = {"usage": {"total_tokens": 5000},
                              "logprobs": ["tok"] * 300_000}
    doc.update(echo)
    return orjson.dumps(doc)


async def test_the_over_cap_key_scan_takes_a_dotted_key_for_a_nested_one(
        make_proxy: ProxyFactory) -> None:
    """ijson names paths by joining keys with '.', so a top-level key
    ``"usage.total_tokens"`` (here echoed from the consumer's request, as APIs that return
    the request's fields do) was taken for ``usage.total_tokens``: a body over
    ``max_inspect_bytes`` was billed the consumer's 7 tokens instead of the 5000 it reports
    (orjson, below the cap, reads 5000). The scan now gives up on such a body and the
    usage's fallback is billed and flagged."""

    async def handle(request: web.Request) -> web.Response:
        req = json.loads(await request.read())
        body = _big_answer(req.get("metadata", {}))
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    async with serve(app) as url:
        p = await make_proxy(url)
        key = await p.customer_with_key("acme")
        headers = {"Authorization": f"Bearer {key}"}
        for rid, meta in (("plain", {}), ("dotted", {"usage.total_tokens": 7})):
            async with p.session.post(p.url + "/v1/chat/completions",
                                      headers={**headers, "X-Request-Id": rid},
                                      json={"model": "m", "messages": [],
                                            "metadata": meta}) as r:
                assert r.status == 200
                assert orjson.loads(await r.read())["usage"] == {"total_tokens": 5000}
        with p.db() as db:
            billed = {rid: (q, flags) for rid, q, flags in db.execute(
                "SELECT request_id, quantity, flags FROM audit WHERE meter = 'llm_tokens'")}
        assert billed["plain"][0] == 5000 * Q
        # the scan cannot tell the echoed key from the nested one: it gives up, and the
        # usage's fallback is billed and flagged (never the consumer's 7)
        q, flags = billed["dotted"]
        assert q != 7 * Q
        assert "over_cap" in str(flags) or "unreadable" in str(flags), flags


UPLOAD_RULES = """\
version: 1
meters:
  gb_processed: {stripe_event_name: gb_processed}
rules:
  - name: process
    match: {methods: [POST], path: /v1/process}
    usage:
      - {meter: gb_processed, quantity: request.bytes}
"""


async def test_a_gzip_request_body_is_billed_its_compressed_size(
        make_proxy: ProxyFactory) -> None:
    """rules/example.yaml bills ``gb_processed`` by ``request.bytes``. The proxy forwards a
    compressed request body as sent and counts its bytes on the wire; an upstream that
    decodes ``Content-Encoding`` (aiohttp's server does by default, so do Starlette's
    GZipMiddleware users, nginx gunzip, ...) processes the decoded body. 4 MB of JSON
    compressed to a few KB is billed a few KB: a compression trick that makes the work
    nearly free. The quantity must be what the upstream processed (or the request
    refused, as a request-body rule refuses it with 415)."""
    import gzip

    processed: dict[str, int] = {}

    async def handle(request: web.Request) -> web.Response:
        data = await request.read()          # aiohttp decodes Content-Encoding: gzip
        processed[request.headers["X-Request-Id"]] = len(data)
        return web.json_response({"processed": len(data)})

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/process", handle)
    async with serve(app) as url:
        p = await make_proxy(url, rules_text=UPLOAD_RULES)
        key = await p.customer_with_key("acme")
        plain = orjson.dumps({"rows": [{"v": 0}] * 500_000})
        packed = gzip.compress(plain)
        async with p.session.post(p.url + "/v1/process", data=packed,
                                  headers={"Authorization": f"Bearer {key}",
                                           "Content-Encoding": "gzip",
                                           "Content-Type": "application/json",
                                           "X-Request-Id": "gz"}) as r:
            status = r.status
            await r.read()
        with p.db() as db:
            billed = db.execute("SELECT quantity FROM audit WHERE request_id = 'gz'"
                                ).fetchall()
        if status == 415:
            assert billed == [] and "gz" not in processed
        else:
            assert status == 200 and processed["gz"] == len(plain) > 50 * len(packed)
            assert billed == [(len(plain) * Q,)], \
                f"upstream processed {len(plain)} bytes, billed {billed} micro-units"


async def test_a_utf8_bom_hides_the_request_json_from_the_meter(
        make_proxy: ProxyFactory) -> None:
    """RFC 8259 8.1: a JSON parser MAY ignore a leading byte order mark, and Python upstreams
    do (Starlette/FastAPI and Flask call ``json.loads`` on the bytes; so does this one). The
    proxy's orjson refuses it, so a 3-byte prefix turns ``request.json.n`` into its fallback
    (the test rules' ``on_unreadable: 7``) while the upstream does the work for n = 1000 (and
    an ``openai_chat`` stream gets no ``include_usage``: the estimate instead of the tokens).
    README lists 1 MiB of padding as the way to force the fallback; this costs 3 bytes."""
    done: dict[str, int] = {}

    async def handle(request: web.Request) -> web.Response:
        n = json.loads(await request.read())["n"]     # what Starlette's request.json() does
        done[request.headers["X-Request-Id"]] = n
        return web.json_response({"done": n})

    app = web.Application()
    app.router.add_post("/v1/echo", handle)
    async with serve(app) as url:
        p = await make_proxy(url)
        key = await p.customer_with_key("acme")
        for rid, prefix in (("plain", b""), ("bom", b"\xef\xbb\xbf")):
            async with p.session.post(p.url + "/v1/echo", data=prefix + b'{"n": 1000}',
                                      headers={"Authorization": f"Bearer {key}",
                                               "Content-Type": "application/json",
                                               "X-Request-Id": rid}) as r:
                assert r.status == 200
        assert done == {"plain": 1000, "bom": 1000}
        with p.db() as db:
            billed = dict(db.execute(
                "SELECT request_id, quantity FROM audit WHERE meter = 'units'"))
        assert billed == {"plain": 1000 * Q, "bom": 1000 * Q}


async def test_a_refused_websocket_handshake_leaves_no_upstream_session_open(
        make_proxy: ProxyFactory) -> None:
    """The proxy connects the WebSocket upstream first (with its own Sec-WebSocket-Key), then
    answers the consumer's handshake. A consumer handshake aiohttp refuses (no
    Sec-WebSocket-Key: 400) raises before the relay's try, so the upstream session it opened
    is never closed: each such request leaves an upstream WebSocket (and a connection of the
    relay's aiohttp connector, limited to pool_size) open until the upstream gives up."""
    from tests.helpers import wait_until

    open_sessions: set[int] = set()

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        open_sessions.add(id(ws))
        try:
            async for _ in ws:
                pass
        finally:
            open_sessions.discard(id(ws))
        return ws

    app = web.Application()
    app.router.add_get("/v1/realtime", ws_handler)
    async with serve(app, shutdown_timeout=0.5) as url:
        p = await make_proxy(url)
        key = await p.customer_with_key("acme")
        for i in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", p.server.public_port)
            writer.write(b"\r\n".join([
                b"GET /v1/realtime HTTP/1.1", b"Host: 127.0.0.1",
                b"Authorization: Bearer " + key.encode(), b"Upgrade: websocket",
                b"Connection: Upgrade", b"Sec-WebSocket-Version: 13",
                f"X-Request-Id: ws-{i}".encode()]) + b"\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.close()
            assert head.startswith(b"HTTP/1.1 400"), head
        await wait_until(lambda: len(open_sessions), ok=lambda n: n == 0, timeout=3,
                         what="the upstream sessions of refused handshakes to close")


async def test_valid_json_orjson_refuses_hides_the_request_json_from_the_meter(
        make_proxy: ProxyFactory) -> None:
    """Valid JSON (RFC 8259) that orjson refuses: a number beyond a double's range, an
    escaped lone surrogate. A Python upstream reads it (``json.loads``) and serves n = 1000; the proxy
    bills ``request.json.n``'s fallback (``on_unreadable: 7``). An unused 10-byte field
    does what README says takes 1 MiB of padding."""
    done: dict[str, int] = {}

    async def handle(request: web.Request) -> web.Response:
        n = json.loads(await request.read())["n"]
        done[request.headers["X-Request-Id"]] = n
        return web.json_response({"done": n})

    app = web.Application()
    app.router.add_post("/v1/echo", handle)
    async with serve(app) as url:
        p = await make_proxy(url)
        key = await p.customer_with_key("acme")
        bodies = {"plain": b'{"n": 1000}', "huge": b'{"n": 1000, "x": 1e400}',
                  "surrogate": b'{"n": 1000, "user": "\\ud800"}'}
        for rid, body in bodies.items():
            async with p.session.post(p.url + "/v1/echo", data=body,
                                      headers={"Authorization": f"Bearer {key}",
                                               "Content-Type": "application/json",
                                               "X-Request-Id": rid}) as r:
                assert r.status == 200
        assert done == dict.fromkeys(bodies, 1000)
        with p.db() as db:
            billed = dict(db.execute(
                "SELECT request_id, quantity FROM audit WHERE meter = 'units'"))
        assert billed == dict.fromkeys(bodies, 1000 * Q)


async def test_a_complete_head_over_max_header_bytes_in_one_read_is_refused(
        make_proxy: ProxyFactory) -> None:
    """docs/resources.md: 'limits.max_header_bytes: a request head (request line and all
    headers) over this size in total: 431'. The bound is only checked while a head is
    incomplete: a head that arrives whole in one read (here 11 KB against an 8 KiB bound,
    one write on loopback) is parsed and served, so the documented total is not a bound
    (the real one is max_headers x max_header_field)."""
    p = await make_proxy(limits={"max_header_bytes": "8KiB", "max_header_field": "4KiB"})
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"".join(
        f"X-Fill-{i}: ".encode() + b"v" * 1000 + b"\r\n" for i in range(10)) + b"\r\n"
    assert len(head) > 8 * 1024
    reader, writer = await asyncio.open_connection("127.0.0.1", p.server.public_port)
    writer.write(head)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    assert data.startswith(b"HTTP/1.1 431 "), data[:60]


async def test_a_query_key_is_not_forwarded_to_the_upstream(make_proxy: ProxyFactory) -> None:
    """docs/configuration.md, keys.forward_to_upstream: '`false` strips it (the upstream
    never sees meterproxy's keys)'. A key sent in the query (``keys.sources: [{query:
    api_key}]``) is forwarded with the rest of the query, verbatim."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with serve(app) as url:
        p = await make_proxy(url, keys={"sources": [{"query": "api_key"}]})
        key = await p.customer_with_key("acme")
        async with p.session.get(p.url + f"/v1/items?a=1&api_key={key}&b=2") as r:
            assert r.status == 200
        assert len(seen) == 1
        assert key not in seen[0], seen[0]
        assert seen[0] == "/v1/items?a=1&b=2"
