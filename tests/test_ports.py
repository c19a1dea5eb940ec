"""tests/ports.py and ProxyProcess's ports: no test picks a port that a parallel process can
take before it is bound, and a start on a port fixed in advance that was taken is retried."""

from __future__ import annotations

import socket
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import write_config
from tests.ports import PortInUse, held_port, in_use, with_free_ports
from tests.proxy_process import ProxyProcess


def test_a_held_port_refuses_connections_and_cannot_be_taken() -> None:
    with held_port() as port:
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_with_free_ports_starts_again_on_new_ports_only_for_a_port_in_use() -> None:
    seen: list[list[int]] = []

    def attempt(ports: list[int]) -> int:
        seen.append(ports)
        if len(seen) < 3:
            raise PortInUse
        return len(ports)

    assert with_free_ports(2, attempt) == 2 and len(seen) == 3
    assert in_use("OSError: [Errno 98] error while attempting to bind on address"
                  " ('127.0.0.1', 1): address already in use")
    assert not in_use("ConfigError: storage.path: no such directory")

    def always(ports: list[int]) -> None:
        raise PortInUse

    with pytest.raises(PortInUse):
        with_free_ports(1, always)


async def test_a_restart_whose_port_was_taken_comes_back_on_other_ports(
        tmp_path: Path, upstream: str) -> None:
    """The first start binds free ports and keeps them for restarts; when one was taken
    meanwhile, the restart moves to new ones and ``url`` / ``admin_url`` follow."""
    proc = ProxyProcess(write_config(tmp_path, upstream), tmp_path / "proxy.log")
    proc.spawn()
    try:
        await proc.wait_ready()
        first = proc.url
        assert not first.endswith(":0")
        proc.kill()
        proc.spawn()
        await proc.wait_ready()
        assert proc.url == first                       # a restart keeps its ports
        proc.kill()
        with socket.socket() as squatter:              # another process takes the port
            squatter.bind(("127.0.0.1", int(first.rsplit(":", 1)[1])))
            squatter.listen()
            proc.spawn()
            await proc.wait_ready()
            assert proc.url != first
            async with aiohttp.ClientSession() as s, s.get(proc.admin_url + "/healthz") as r:
                assert r.status == 200
        assert proc.starts == 4 and in_use(proc.log.read_bytes())
    finally:
        proc.ensure_dead()
