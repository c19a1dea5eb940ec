"""The pool's errors: a small typed set, each a subclass of the proxy's ``UpstreamError`` so a
caller can map it by ``status``/``type`` the way ``proxy.forward`` maps aiohttp's errors
(refused or reset -> 502, no answer in time -> 504, no connection in time -> 503).

    UpstreamError
    ├── UpstreamUnavailable (502)
    │   ├── ConnectError        the TCP/TLS connection could not be made (refused, unreachable, DNS, TLS)
    │   ├── ConnectionClosed    closed or reset before a complete response head (retry spent or not allowed)
    │   ├── ProtocolError       the response head or its framing is invalid, or over a limit
    │   └── BodyError           the response broke mid-body (closed, reset, bad chunk): abort the consumer
    │       └── BodyTimeout     (504) the upstream went silent mid-body for read_timeout
    ├── UpstreamTimeout (504)
    │   ├── ConnectTimeout      no connection within connect_timeout
    │   └── ResponseTimeout     no complete response head: silent for read_timeout
    └── UpstreamBusy (503)
        └── PoolBusy            no connection free within pool_wait (the request was not sent)
"""

from __future__ import annotations

from proxy.errors import UpstreamBusy, UpstreamTimeout, UpstreamUnavailable


class ConnectError(UpstreamUnavailable):
    pass


class ConnectionClosed(UpstreamUnavailable):
    pass


class ProtocolError(UpstreamUnavailable):
    pass


class BodyError(UpstreamUnavailable):
    """Raised while iterating a response body: what was delivered before it is all there is."""


class BodyTimeout(BodyError):
    status = 504
    type = "upstream_timeout"


class ConnectTimeout(UpstreamTimeout):
    pass


class ResponseTimeout(UpstreamTimeout):
    pass


class PoolBusy(UpstreamBusy):
    pass
