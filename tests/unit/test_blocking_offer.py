"""The blocking driver's vchan offer on the socket backend: a peer that never comes, and
one that comes (the same rendezvous as the trio backend's, so a trio client finds it)."""

from __future__ import annotations

import os
import select
import threading
from pathlib import Path

import pytest
import trio

from qrexec_trio.blocking._vchan import serve_one
from qrexec_trio.xen import SocketBackend, VchanConnectTimeout, VchanWithdrawn
from qrexec_trio.xen._offer import server_path, withdrawn_marker


@pytest.fixture
def vchan_dir(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VCHAN_SOCKET_DIR", str(short_tmp))
    monkeypatch.setenv("VCHAN_DOMAIN", "0")
    monkeypatch.setenv("QREXEC_VCHAN", "socket")
    return short_tmp


def test_a_peer_that_never_comes_times_out_and_the_offer_is_withdrawn(vchan_dir: Path) -> None:
    with pytest.raises(VchanConnectTimeout, match="did not connect to vchan port 600"):
        serve_one(7, 600, timeout=0.05)
    path = server_path(str(vchan_dir), 0, 7, 600)
    assert not os.path.lexists(path)
    # A client still to come learns at once that nobody will serve it.
    assert os.path.exists(withdrawn_marker(path))

    async def late_client() -> None:
        with pytest.raises(VchanWithdrawn):
            await SocketBackend(str(vchan_dir), 7).connect(0, 600, timeout=30)

    trio.run(late_client)


def test_a_trio_client_connects_to_the_blocking_offer(vchan_dir: Path) -> None:
    got: list[bytes] = []

    async def client() -> None:
        vchan = await SocketBackend(str(vchan_dir), 7).connect(0, 601, timeout=30)
        async with vchan:
            await vchan.send_all(b"ping")
            got.append(await vchan.receive_some())

    thread = threading.Thread(target=trio.run, args=(client,))
    thread.start()
    vchan = serve_one(7, 601, timeout=30)
    try:
        received = b""
        while len(received) < 4:
            assert select.select([vchan.fileno()], [], [], 30)[0], "no data in 30 s"
            received += vchan.receive() or b""
        assert received == b"ping"
        assert vchan.send(b"pong") == 4
    finally:
        thread.join(30)
        vchan.close()
    assert got == [b"pong"]
    assert not os.path.lexists(server_path(str(vchan_dir), 0, 7, 601))
