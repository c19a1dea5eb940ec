"""The exception tree of meterproxy.

    MeterproxyError
    ├── ConfigError            the config file is invalid (carries every problem, file:line)
    ├── FileProblem            a file or directory cannot be used (names the path and why)
    ├── StorageError           SQLite could not commit (disk full, locked, read-only)
    │   └── MeteringUnavailable   raised to a request waiting on a commit in fail_mode closed
    ├── UpstreamError          the guarded API could not be reached
    │   ├── UpstreamUnavailable   connect refused / reset            -> 502 upstream_unavailable
    │   ├── UpstreamTimeout       no answer within the timeouts      -> 504 upstream_timeout
    │   └── UpstreamBusy          no pooled connection within pool_wait -> 503 upstream_busy
    └── SinkError              a usage sink (Stripe) failed; see proxy.sinks.base for kinds

Foreign exceptions are translated in exactly one place each: aiohttp client errors in
``proxy.request.forward``, sqlite3 errors in ``proxy.store.db``, stripe errors in ``proxy.sinks``.
"""

from __future__ import annotations


class MeterproxyError(Exception):
    """Base of every error meterproxy raises on purpose."""


class ConfigError(MeterproxyError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class FileProblem(MeterproxyError):
    """A file or directory meterproxy needs cannot be used; the message names the absolute
    path and the reason ("cannot open database /abs/x.db: directory /abs does not exist")."""


class StorageError(MeterproxyError):
    pass


class MeteringUnavailable(StorageError):
    pass


class UpstreamError(MeterproxyError):
    status = 502
    type = "upstream_unavailable"


class UpstreamUnavailable(UpstreamError):
    status = 502
    type = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "upstream_timeout"


class SinkError(MeterproxyError):
    pass


class UpstreamBusy(UpstreamError):
    status = 503
    type = "upstream_busy"
