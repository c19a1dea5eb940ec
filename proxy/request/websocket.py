"""Step 6 (instead of 3-5 for a WebSocket handshake), the WebSocket relay: a GET with
``Upgrade: websocket`` is connected upstream, then frames are copied both ways until either
side closes. A metered session is recorded once it ends, as one request with status 200
(flag ``websocket``); its frames are not measured.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import aiohttp
from aiohttp import web

from proxy.request.context import RequestContext
from proxy.request.forward import Upstream, matched_headers, upstream_headers
from proxy.request.settle import Settlement
from proxy.rules import UNREADABLE, Measurement
from proxy.tasks import spawn

_WS_HEADERS = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
               "Sec-WebSocket-Protocol")


def is_websocket(request: web.BaseRequest) -> bool:
    """A WebSocket handshake is a GET (RFC 6455 4.1); any other method with an Upgrade
    header is forwarded as that method (Upgrade is hop-by-hop): what was matched."""
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


class WebSocketRelay:
    def __init__(self, upstream: Upstream, settlement: Settlement,
                 drop_headers: frozenset[str]) -> None:
        self.upstream = upstream
        self.settlement = settlement
        self.drop_headers = drop_headers

    async def relay(self, ctx: RequestContext) -> web.StreamResponse:
        """Raises ``UpstreamError`` when the upstream refuses or cannot be reached."""
        request = ctx.request
        headers = upstream_headers(request, ctx.rid, self.drop_headers)
        for h in _WS_HEADERS:
            headers.popall(h, None)
        protocols = tuple(p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "")
                          .split(",") if p.strip())
        upstream_ws = await self.upstream.ws_connect(ctx.target, headers, protocols)
        try:
            return await self._session(ctx, upstream_ws, protocols)
        finally:
            self.upstream.release_slot()

    async def _session(self, ctx: RequestContext, upstream_ws: aiohttp.ClientWebSocketResponse,
                       protocols: tuple[str, ...]) -> web.StreamResponse:
        request = ctx.request
        server_ws = web.WebSocketResponse(protocols=protocols, autoping=False)
        try:
            await server_ws.prepare(request)
        except BaseException:
            # the consumer's handshake was refused (or it left): the upstream session opened
            # for it is closed, never left to the upstream's timeout or the GC
            await upstream_ws.close()
            raise
        try:
            await _pump(server_ws, upstream_ws)
        finally:
            # recorded before the closing handshakes: either close can be cut short by a
            # CancelledError (a consumer that drops its TCP connection instead of answering
            # a Close, or while the upstream's Close reply is awaited: aiohttp cancels the
            # handler, handler_cancellation=True), and the pipeline then releases the hold;
            # the session ended when the frames stopped, so it is recorded once, here
            try:
                self._record(ctx)
            finally:
                await upstream_ws.close()
                await server_ws.close()
        return server_ws

    def _record(self, ctx: RequestContext) -> None:
        rule = ctx.rule
        if rule is not None and rule.usage and ctx.customer_id:
            # an upgraded session counts as a success (2xx) for count_when
            status = 200
            request = ctx.request
            m = Measurement(status=status,
                            request_headers=matched_headers(request.headers),
                            response_headers={}, query=request.query,
                            path_params=ctx.params, request_json=UNREADABLE,
                            response_body=None, request_bytes=0, response_bytes=0,
                            duration_ms=Decimal(int((time.perf_counter() - ctx.started)
                                                    * 1000)))
            self.settlement.record(ctx, rule, m, status, "websocket")


_WS = aiohttp.WSMsgType
_WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def relay_frames(src: _WebSocket, dst: _WebSocket) -> None:
    """Copy frames one way until either side closes."""
    async for msg in src:
        if msg.type == _WS.TEXT:
            await dst.send_str(msg.data)
        elif msg.type == _WS.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type == _WS.PING:
            await dst.ping(msg.data)
        elif msg.type == _WS.PONG:
            await dst.pong(msg.data)
        elif msg.type in (_WS.CLOSE, _WS.ERROR):
            break


async def _pump(server: web.WebSocketResponse, client: aiohttp.ClientWebSocketResponse) -> None:
    tasks = [spawn("ws-down", relay_frames(client, server)),
             spawn("ws-up", relay_frames(server, client))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
