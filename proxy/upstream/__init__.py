"""A keep-alive HTTP/1.1 upstream connection pool on asyncio Protocols, parsing responses
with httptools (llhttp): meant to replace aiohttp's ClientSession on the forwarding path.
See docs/PERFORMANCE.md ("The upstream core") for the API and its rules."""

from proxy.upstream.config import Origin, PoolConfig
from proxy.upstream.connection import Response, Upgraded
from proxy.upstream.errors import (
    BodyError,
    BodyTimeout,
    ConnectError,
    ConnectionClosed,
    ConnectTimeout,
    PoolBusy,
    ProtocolError,
    ResponseTimeout,
)
from proxy.upstream.pool import UpstreamPool

__all__ = ["BodyError", "BodyTimeout", "ConnectError", "ConnectTimeout", "ConnectionClosed",
           "Origin", "PoolBusy", "PoolConfig", "ProtocolError", "Response", "ResponseTimeout",
           "Upgraded", "UpstreamPool"]
