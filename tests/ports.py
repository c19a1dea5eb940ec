"""Ports for tests, without the pick-then-bind race.

``free_port()`` (tests/conftest.py) binds port 0, closes the socket and returns the number: a
parallel process can take the port before the test's server binds it. So:

- a server that can listen on port 0 and report its port does that (``make_proxy`` and
  ``start()`` in process; ``ProxyProcess`` reads a subprocess's ports from its log line);
- a port that must refuse connections is ``held_port()``: bound for the whole block (nobody
  else can take it) but never listening, so a connection to it is refused;
- a port that must be known before the start (written into a config or a command line) is
  picked by ``with_free_ports``, which starts again on new ports when the start failed with
  EADDRINUSE (the attempt raises ``PortInUse``, e.g. after ``in_use(log)``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tests.conftest import free_port

T = TypeVar("T")
TRIES = 5


class PortInUse(Exception):
    """A start failed because a port picked for it was taken meanwhile (EADDRINUSE)."""


def in_use(output: str | bytes) -> bool:
    """A process's output says it could not bind: address already in use."""
    text = output.decode(errors="replace") if isinstance(output, bytes) else output
    return "address already in use" in text.lower() or "errno 98" in text.lower()


@contextmanager
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections for the whole block (bound, not
    listening: no other process can take it meanwhile)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def with_free_ports(n: int, attempt: Callable[[list[int]], T], tries: int = TRIES) -> T:
    """``attempt(ports)`` with ``n`` free ports; when it raises ``PortInUse`` (one of them was
    taken before it was bound), again with new ones, up to ``tries`` times. ``attempt``
    cleans up what it started before raising."""
    for i in range(tries):
        try:
            return attempt([free_port() for _ in range(n)])
        except PortInUse:
            if i == tries - 1:
                raise
    raise AssertionError("unreachable")
