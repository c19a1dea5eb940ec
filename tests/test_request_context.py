"""The frozen per-request context (proxy.request.context): ``new_context`` builds exactly what
``RequestContext(...)`` builds, and the result is frozen and has no ``__dict__``."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.request.context import RequestContext, new_context

ARGS = ("req", "rid-1", None, (("model", "m"),), "key_1", "cust", "v1", 1.5, True, None,
        "/v1/x", "/v1/x?a=1")


def test_new_context_equals_the_dataclass_constructor() -> None:
    built = new_context(*ARGS)               # type: ignore[arg-type]
    plain = RequestContext(*ARGS)            # type: ignore[arg-type]
    assert type(built) is RequestContext
    # (params: a hashable stand-in, so the frozen dataclass's hash can be compared too)
    assert built == plain and hash(built) == hash(plain) and repr(built) == repr(plain)
    assert dataclasses.astuple(built) == ARGS
    assert [f.name for f in dataclasses.fields(RequestContext)] == [
        "request", "rid", "rule", "params", "key_id", "customer_id", "version", "started",
        "metered", "hold", "path", "target"]


def test_the_context_is_frozen_and_slotted() -> None:
    ctx = new_context(*ARGS)                 # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.rid = "other"                    # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del ctx.customer_id                  # type: ignore[misc]
    assert not hasattr(ctx, "__dict__")
    assert dataclasses.replace(ctx, rid="r2").rid == "r2" and ctx.rid == "rid-1"
