"""One exception tree (every class meterproxy defines under MeterproxyError, each class of
proxy/errors.py raised somewhere) and the one place an exception becomes an HTTP response."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

import proxy
from proxy import errors
from proxy.errors import HttpError, InvalidInput, MeterproxyError, UpstreamTimeout
from proxy.http_errors import error_response

ROOT = Path(proxy.__file__).parent


def _body(resp: web.Response) -> Any:
    assert isinstance(resp.body, bytes)
    return orjson.loads(resp.body)


def _modules() -> list[str]:
    names = ["proxy"]
    for info in pkgutil.walk_packages([str(ROOT)], prefix="proxy."):
        if info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return names


def _sources() -> dict[Path, str]:
    return {p: p.read_text() for p in ROOT.rglob("*.py")}


def test_every_exception_class_meterproxy_defines_descends_from_the_root() -> None:
    found: list[type[BaseException]] = []
    for name in _modules():
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == name:
                found.append(obj)
    outside = [f"{c.__module__}.{c.__qualname__}" for c in found
               if not issubclass(c, MeterproxyError)]
    assert outside == []
    assert len(found) >= 20       # the walk really found the tree (not an empty pass)
    assert {"proxy.target", "proxy.rules.model", "proxy.admin.input"} <= {c.__module__ for c in found}


def test_every_class_in_errors_is_raised_somewhere() -> None:
    """Raised (constructed) outside errors.py; a grouping class (UpstreamError, StorageError,
    StorageOutcomeUnknown through the PostgreSQL backend's PgUnavailable) counts through a
    raised subclass, wherever that is defined, and must be caught by name somewhere."""
    for name in _modules():
        importlib.import_module(name)           # every subclass defined anywhere

    def below(c: type) -> list[type]:
        return [s for d in c.__subclasses__() for s in (d, *below(d))]

    sources = {p: s for p, s in _sources().items() if p != ROOT / "errors.py"}
    text = "\n".join(sources.values())
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, BaseException) and c.__module__ == "proxy.errors"]
    assert all(issubclass(c, MeterproxyError) for c in classes)

    def constructed(c: type) -> bool:
        return re.search(rf"(?<!class )\b{c.__name__}\(", text) is not None

    for c in classes:
        if c is MeterproxyError:
            continue
        subs = below(c)
        if constructed(c):
            continue
        assert subs and any(constructed(s) for s in subs), f"{c.__name__} is never raised"
        assert re.search(rf"except[^:\n]*\b{c.__name__}\b", text), f"{c.__name__} is never caught"
    assert not hasattr(errors, "SinkError")


def test_invalid_input_lives_in_errors_and_is_a_400() -> None:
    import proxy.store.keys as keys
    assert not any(re.search(r"^class InvalidInput", s, re.M)
                   for p, s in _sources().items() if p.name != "errors.py")
    assert keys.InvalidInput is InvalidInput
    assert issubclass(InvalidInput, ValueError)      # validators and callers catch ValueError
    resp = error_response(InvalidInput("name: must be text"))
    assert resp.status == 400
    assert _body(resp) == {"error": {"type": "invalid_request",
                                                 "message": "name: must be text"}}


def test_error_response_public_shape_with_request_id_extra_and_headers() -> None:
    exc = HttpError("This request needs 2 credits and 1 are available.", status=402,
                    type_="insufficient_credits",
                    extra={"balance": "1", "required": "2", "top_up_url": None},
                    headers={"X-Credits-Remaining": "1"})
    resp = error_response(exc, "rid-1")
    assert resp.status == 402 and resp.content_type == "application/json"
    assert resp.headers["X-Request-Id"] == "rid-1"
    assert resp.headers["X-Credits-Remaining"] == "1"
    body = _body(resp)
    assert body == {"error": {"type": "insufficient_credits",
                              "message": "This request needs 2 credits and 1 are available.",
                              "balance": "1", "required": "2", "top_up_url": None}}
    assert list(body["error"])[:2] == ["type", "message"]


def test_error_response_class_status_and_admin_lookups() -> None:
    resp = error_response(UpstreamTimeout("the upstream did not answer in time"))
    assert resp.status == 504 and "X-Request-Id" not in resp.headers
    assert _body(resp) == {"error": {"type": "upstream_timeout",
                                                 "message": "the upstream did not answer in time"}}
    resp = error_response(LookupError("no customer 'x'"))
    assert resp.status == 404
    assert _body(resp) == {"error": {"type": "not_found",
                                                 "message": "no customer 'x'"}}
    assert _body(error_response(KeyError()))["error"]["message"] == "not found"


def test_a_status_given_at_raise_does_not_change_the_class() -> None:
    HttpError("x", status=418, type_="teapot")
    assert (HttpError.status, HttpError.type) == (400, "invalid_request")
    assert (HttpError("y").status, HttpError("y").type) == (400, "invalid_request")
