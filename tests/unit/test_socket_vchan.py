"""The socket vchan backend against the interface's promises."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from qrexec_trio.xen import SocketBackend, VchanConnectTimeout, VchanError, get_backend


@pytest.fixture
def backends(short_tmp: Path) -> tuple[SocketBackend, SocketBackend]:
    """dom0 (0) and a VM (42) sharing one socket dir."""
    return SocketBackend(str(short_tmp), 0), SocketBackend(str(short_tmp), 42)


async def _pair(backends, port: int = 600):
    dom0, vm = backends
    listener = dom0.listen(42, port)
    client = await vm.connect(0, port, timeout=5)
    server = await listener.accept(5)
    return server, client


async def test_server_and_client_exchange_bytes_and_see_eof(backends, short_tmp) -> None:
    server, client = await _pair(backends)
    assert (server.peer_domain, client.peer_domain, server.port) == (42, 0, 600)
    await client.send_all(b"hello")
    assert await server.receive_some(100) == b"hello"
    await server.send_all(b"world")
    assert await client.receive_some(100) == b"world"
    await client.aclose()
    assert await server.receive_some(100) == b""
    await server.aclose()
    # The name is withdrawn once the one client arrived.
    assert not (short_tmp / "vchan.0.42.600.sock").exists()


async def test_socket_name_follows_the_socket_libvchan_convention(backends, short_tmp) -> None:
    dom0, _ = backends
    async with dom0.listen(42, 513):
        assert (short_tmp / "vchan.0.42.513.sock").exists()
    assert not (short_tmp / "vchan.0.42.513.sock").exists()


async def test_client_waits_for_a_late_server(backends) -> None:
    dom0, vm = backends
    async with trio.open_nursery() as nursery:
        connected = []

        async def client() -> None:
            connected.append(await vm.connect(0, 601, timeout=5))

        nursery.start_soon(client)
        await trio.sleep(0.2)
        listener = dom0.listen(42, 601)
        server = await listener.accept(5)
    await connected[0].aclose()
    await server.aclose()


async def test_connect_and_accept_time_out(backends) -> None:
    dom0, vm = backends
    with pytest.raises(VchanConnectTimeout):
        await vm.connect(0, 602, timeout=0.2)
    listener = dom0.listen(42, 602)
    with pytest.raises(VchanConnectTimeout):
        await listener.accept(0.2)


async def test_second_client_is_refused(backends) -> None:
    server, client = await _pair(backends, 603)
    _, vm = backends
    with pytest.raises(VchanConnectTimeout):
        await vm.connect(0, 603, timeout=0.3)
    await server.aclose()
    await client.aclose()


async def test_a_file_that_is_not_a_socket_is_never_removed(backends, short_tmp) -> None:
    dom0, _ = backends
    squatter = short_tmp / "vchan.0.42.604.sock"
    squatter.write_text("not a socket")
    with pytest.raises(VchanError, match="cannot offer vchan"):
        dom0.listen(42, 604)
    assert squatter.read_text() == "not a socket"


async def test_operations_checkpoint(backends) -> None:
    server, client = await _pair(backends, 605)
    with trio.testing.assert_checkpoints():
        await client.send_all(b"x")
    with trio.testing.assert_checkpoints():
        await server.receive_some(1)
    with trio.testing.assert_checkpoints():
        await client.send_all(b"")
    await server.aclose()
    await client.aclose()


async def test_cancelled_send_finishes_its_frame_before_cancelling(backends) -> None:
    """A frame bigger than the socket buffers, cancelled half-way, still arrives whole."""
    server, client = await _pair(backends, 606)
    frame = os.urandom(8 * 1024 * 1024)
    received = bytearray()

    async def slow_reader() -> None:
        await trio.sleep(0.2)  # start only after the sender was cancelled
        while chunk := await server.receive_some(1 << 16):
            received.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_reader)
        with trio.move_on_after(0.05) as scope:
            await client.send_all(frame)
            await client.send_all(b"never sent")
        assert scope.cancelled_caught
        await client.aclose()
    assert bytes(received) == frame
    await server.aclose()


async def test_a_frame_that_cannot_finish_closes_the_vchan(short_tmp: Path) -> None:
    dom0 = SocketBackend(str(short_tmp), 0, send_finish=0.2)
    vm = SocketBackend(str(short_tmp), 42)
    server, client = await _pair((dom0, vm), 609)
    frame = os.urandom(8 * 1024 * 1024)
    sending = trio.CancelScope()

    async def sender() -> None:
        with sending:
            await server.send_all(frame)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        # Once the first bytes arrived, the frame is under way: cancel it there.
        received = len(await client.receive_some(1))
        sending.cancel()
    # The client reads no more, so the frame cannot finish: the link ends after it.
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"next frame")
    while chunk := await client.receive_some(1 << 16):
        received += len(chunk)
    assert 0 < received < len(frame)
    await client.aclose()


async def test_peer_gone_is_eof_for_the_reader_and_broken_for_the_writer(backends) -> None:
    server, client = await _pair(backends, 607)
    await client.aclose()
    assert await server.receive_some(10) == b""
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):
            await server.send_all(b"x" * 65536)
    await server.aclose()


async def test_closed_vchan_raises_closed_resource(backends) -> None:
    server, client = await _pair(backends, 608)
    await server.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_some(1)
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")
    await client.aclose()


def test_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VCHAN_DOMAIN", "7")
    monkeypatch.delenv("QREXEC_VCHAN", raising=False)
    backend = get_backend()
    assert backend.name == "socket" and backend.own_domain == 7
    with pytest.raises(VchanError, match="does not exist"):
        get_backend("warp-drive")
    monkeypatch.setenv("VCHAN_DOMAIN", "forty-two")
    with pytest.raises(VchanError, match="not a domain id"):
        get_backend("socket")
