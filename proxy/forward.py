"""Upstream: owns the one aiohttp ClientSession (keep-alive pool) to the guarded API.

This is the only module that touches aiohttp's client exceptions: they are translated
to ``UpstreamUnavailable`` (502) and ``UpstreamTimeout`` (504) here. Bodies are passed
through byte for byte (``auto_decompress=False``): what the consumer receives is what
the upstream sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable

HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection"))


def strip_hop_by_hop(headers: Mapping[str, str], out: CIMultiDict[str],
                     drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """Copy end-to-end headers into ``out`` (hop-by-hop and those named by Connection dropped).
    ``drop`` holds lower-case names."""
    conn = headers.get("Connection")
    skip = HOP_BY_HOP | drop if drop else HOP_BY_HOP
    if conn:
        skip = skip | {t.strip().lower() for t in conn.split(",") if t.strip()}
    add = out.add
    for k, v in headers.items():
        if k.lower() not in skip:
            add(k, v)
    return out


class Upstream:
    def __init__(self, cfg: UpstreamConfig) -> None:
        self.base = cfg.url
        # canonical target -> upstream URL; bounded (yarl's own parse cache is slower to hit)
        self._urls: dict[str, URL] = {}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout,
                                              sock_read=cfg.read_timeout)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.pool_size, ttl_dns_cache=300,
                                           enable_cleanup_closed=False),
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def request(self, method: str, target: str, headers: CIMultiDict[str],
                      data: Any) -> aiohttp.ClientResponse:
        """``target`` is the canonical request target (proxy.target): it reaches the
        upstream byte for byte (``encoded=True``: yarl neither re-quotes nor normalizes)."""
        url = self._urls.get(target)
        if url is None:
            url = URL(self.base + target, encoded=True)
            if len(target) <= 256:
                if len(self._urls) >= 4096:
                    self._urls.clear()
                self._urls[target] = url
        try:
            return await self.session.request(method, url, headers=headers, data=data,
                                              allow_redirects=False, compress=None)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("the upstream did not answer in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(f"the upstream could not be reached ({type(exc).__name__})") \
                from exc

    async def ws_connect(self, target: str, headers: CIMultiDict[str],
                         protocols: tuple[str, ...]) -> aiohttp.ClientWebSocketResponse:
        url = URL(self.base.replace("http", "ws", 1) + target, encoded=True)
        try:
            return await self.session.ws_connect(url, headers=headers, protocols=protocols,
                                                 autoclose=False, autoping=False)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("the upstream did not answer in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(f"the upstream could not be reached ({type(exc).__name__})") \
                from exc

    async def close(self) -> None:
        await self.session.close()


# What reading an upstream body can raise; the handler loops over the body itself (an async
# generator wrapper costs several µs per chunk) and hands these to ``body_error``.
BODY_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError, TimeoutError)


def body_error(exc: BaseException) -> UpstreamError:
    """Translate a failure while reading the upstream body (mid-stream)."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("the upstream stopped sending mid-body")
    return UpstreamUnavailable(f"the upstream connection broke mid-body ({type(exc).__name__})")
