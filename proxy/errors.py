"""The exception tree of meterproxy: every exception class it defines descends from
``MeterproxyError``.

    MeterproxyError
    ├── ConfigError            the config file is invalid (carries every problem, file:line)
    ├── FileProblem            a file or directory cannot be used (names the path and why)
    ├── StorageError           SQLite could not commit (disk full, locked, read-only)
    │   ├── MeteringUnavailable   a request waiting on a commit in fail_mode closed -> 503
    │   ├── StorageOutcomeUnknown PostgreSQL unreachable or too slow (``PgUnavailable``): a
    │   │                         write may or may not have committed -> 503
    │   │                         storage_outcome_unknown with Retry-After
    │   └── StorageUnavailable    a write could not run, nothing written -> 503
    │                             storage_unavailable with Retry-After: SQLite locked past
    │                             storage.lock_wait (``Store.write``; ``DatabaseBusy``, also a
    │                             sqlite3 error, when it did not wait); a PostgreSQL deadlock
    │                             or serialization failure still there after its retries
    │                             (``PgConflict``: the transaction was rolled back)
    ├── StripeCallError        a call to Stripe did not succeed (proxy.stripe.client.translate)
    │   ├── StripeUnavailable     transient: network, timeout, 5xx, 409, 429, 401/403
    │   │   └── StripeSessionExpired  the v2 meter event session must be renewed
    │   ├── StripeRejected        permanent: Stripe will never accept the call as sent
    │   └── StripeDuplicate       an event with this identifier was delivered earlier
    ├── WebhookSignatureInvalid  a webhook's Stripe-Signature does not verify
    └── HttpError              answered over HTTP: ``status``, ``type``, message, extra fields
        ├── InvalidInput          a value sent to the admin or consumer API  -> 400 invalid_request
        └── UpstreamError          the guarded API could not be reached
            ├── UpstreamUnavailable   connect refused / reset            -> 502 upstream_unavailable
            ├── UpstreamTimeout       no answer within the timeouts      -> 504 upstream_timeout
            └── UpstreamBusy          no pooled connection within pool_wait -> 503 upstream_busy

Other modules define narrower classes under these (``InvalidTarget``, ``FieldError``,
``RulesError``, ``UnitError``, ``ReconcileError`` ...); each still descends from the root,
and those that keep a ``ValueError`` base do so because pydantic or a caller catches it.

An ``HttpError`` becomes a response in exactly one place, ``proxy.http_errors``
(``error_response``), for the public, consumer and admin surfaces alike. Foreign exceptions
are translated in exactly one place each: aiohttp client errors in ``proxy.request.forward``,
sqlite3 errors in ``proxy.store.db``, stripe errors in ``proxy.stripe.client``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class MeterproxyError(Exception):
    """Base of every error meterproxy raises on purpose."""


class ConfigError(MeterproxyError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class FileProblem(MeterproxyError):
    """A file or directory meterproxy needs cannot be used; the message names the absolute
    path and the reason ("cannot open database /abs/x.db: directory /abs does not exist")."""


class HttpError(MeterproxyError):
    """An error meterproxy answers over HTTP itself: the body is
    ``{"error": {"type": type, "message": str(exc), **extra}}`` with ``status``, plus
    ``headers``. Subclasses fix ``status`` and ``type``; a plain ``HttpError`` names them."""

    status = 400
    type = "invalid_request"
    extra: Mapping[str, Any] | None = None
    headers: Mapping[str, str] | None = None

    def __init__(self, message: str, *, status: int | None = None, type_: str | None = None,
                 extra: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if type_ is not None:
            self.type = type_
        if extra is not None:
            self.extra = extra
        if headers is not None:
            self.headers = headers


class InvalidInput(HttpError, ValueError):
    """A value sent to the admin or consumer API is not acceptable (400 invalid_request)."""

    status = 400
    type = "invalid_request"


class StorageError(MeterproxyError):
    pass


class MeteringUnavailable(StorageError, HttpError):
    """Usage cannot be recorded (fail_mode closed): the request is answered 503."""

    status = 503
    type = "metering_unavailable"


class StorageOutcomeUnknown(StorageError, HttpError):
    """The database did not answer (PostgreSQL unreachable, a connection cut, a statement or
    lock wait past ``command_timeout``): a write sent before the failure may or may not have
    committed. Unlike ``StorageUnavailable`` this never promises "nothing was written": read
    the object before sending a write again, or send it with the same ``idempotency_key``."""

    status = 503
    type = "storage_outcome_unknown"
    headers: Mapping[str, str] | None = {"Retry-After": "1"}


class StorageUnavailable(StorageError, HttpError):
    """A write could not run now and was not run at all (its transaction rolled back): the
    SQLite database is locked by another process (after ``storage.lock_wait``), or
    PostgreSQL kept rolling the transaction back to break a deadlock or a serialization
    failure (``PgConflict``, after ``PgPool.retrying``'s attempts). Retrying later is safe.
    (PostgreSQL's other failures are ``StorageOutcomeUnknown``: there a cut connection can
    hide a committed write.)"""

    status = 503
    type = "storage_unavailable"
    headers: Mapping[str, str] | None = {"Retry-After": "1"}


class UpstreamError(HttpError):
    status = 502
    type = "upstream_unavailable"


class UpstreamUnavailable(UpstreamError):
    status = 502
    type = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "upstream_timeout"


class UpstreamBusy(UpstreamError):
    status = 503
    type = "upstream_busy"


class StripeCallError(MeterproxyError):
    """A call to Stripe did not succeed; raised only by :mod:`proxy.stripe.client`, whose
    ``translate`` is the one mapping from the SDK's and the network's exceptions. ``reason``
    is the sentence an operator reads (outbox ``last_error``, reconcile report)."""

    def __init__(self, reason: str, *, status: int | None = None,
                 retry_after: float | None = None, lock_timeout: bool = False,
                 ambiguous: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status                # HTTP status seen, if any
        self.retry_after = retry_after      # seconds, when Stripe said when
        self.lock_timeout = lock_timeout    # a 429 lock (per customer+meter), not a rate limit
        self.ambiguous = ambiguous          # the call may have reached Stripe and still run


class StripeUnavailable(StripeCallError):
    """Transient: resend the same call later (network, timeout, 5xx, 409, 429, 401/403)."""


class StripeSessionExpired(StripeUnavailable):
    """The v2 meter event session token expired or was refused: renew it and resend."""


class StripeRejected(StripeCallError):
    """Permanent: Stripe will never accept the call as sent (unknown id or event name,
    timestamp window, validation, idempotency key reused with other parameters)."""


class StripeDuplicate(StripeCallError):
    """Stripe already has an event with this identifier: it was delivered earlier."""


class WebhookSignatureInvalid(MeterproxyError):
    """A webhook body whose ``Stripe-Signature`` does not verify (or is not UTF-8)."""
