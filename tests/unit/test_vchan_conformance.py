"""One conformance suite for every vchan backend present.

socket and shm run everywhere; xen needs a Xen domain (/dev/xen) and is
skipped elsewhere, with that reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from qrexec_trio.roles._cli import raise_fd_limit
from qrexec_trio.xen import Vchan, VchanBackend, get_backend

BACKENDS = ["socket", "shm", "xen"]


def _make(name: str, directory: Path, domain: int) -> VchanBackend:
    env = {"VCHAN_SOCKET_DIR": str(directory), "VCHAN_DOMAIN": str(domain)}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        return get_backend(name)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


Backends = tuple[str, VchanBackend, VchanBackend, int, int]


@pytest.fixture(params=BACKENDS)
def backends(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[Backends]:
    """(name, server's backend, client's backend, the server's and the client's domain).

    The local backends play two domains (0 and 42) in one directory. On Xen
    both ends are this domain, which the xen backend allows only on request.
    """
    name = request.param
    if name == "xen":
        if not os.path.exists("/dev/xen"):
            pytest.skip("the xen backend needs a Xen domain (/dev/xen is missing here)")
        from qrexec_trio.xen._xen import XenBackend

        backend = XenBackend(allow_loopback=True)
        yield name, backend, backend, backend.own_domain, backend.own_domain
        return
    yield name, _make(name, short_tmp, 0), _make(name, short_tmp, 42), 0, 42


async def _pair(backends: Backends, port: int, ring: int = 65536) -> tuple[Vchan, Vchan]:
    _, dom0, vm, server_domain, client_domain = backends
    listener = dom0.listen(client_domain, port, read_min=ring, write_min=ring)
    async with trio.open_nursery() as nursery:
        server: list[Vchan] = []

        async def accept() -> None:
            server.append(await listener.accept(10))

        nursery.start_soon(accept)
        client = await vm.connect(server_domain, port, timeout=10)
    return server[0], client


async def test_round_trip_and_eof_after_drain(backends) -> None:
    server, client = await _pair(backends, 700)
    await client.send_all(b"hello")
    assert await server.receive_some(100) == b"hello"
    await server.send_all(b"last words")
    await server.aclose()  # closed with data still in the ring
    got = b""
    while chunk := await client.receive_some(100):
        got += chunk
    assert got == b"last words"
    await client.aclose()


async def test_one_mib_through_a_4_kib_ring_wraps_around(backends) -> None:
    server, client = await _pair(backends, 701, ring=4096)
    payload = os.urandom(1024 * 1024)
    received = bytearray()
    async with trio.open_nursery() as nursery:

        async def reader() -> None:
            while len(received) < len(payload):
                received.extend(await server.receive_some(65536))

        nursery.start_soon(reader)
        await client.send_all(payload)  # far bigger than the ring: written in parts
    assert bytes(received) == payload
    await client.aclose()
    await server.aclose()


async def test_operations_checkpoint(backends) -> None:
    server, client = await _pair(backends, 702)
    with trio.testing.assert_checkpoints():
        await client.send_all(b"x")
    with trio.testing.assert_checkpoints():
        assert await server.receive_some(1) == b"x"
    await client.aclose()
    await server.aclose()


async def test_cancelled_receive_leaves_the_channel_usable(backends) -> None:
    server, client = await _pair(backends, 703)
    with trio.move_on_after(0.1) as scope:
        await server.receive_some(10)  # nothing comes: cancelled while waiting
    assert scope.cancelled_caught
    await client.send_all(b"after")
    assert await server.receive_some(10) == b"after"
    await client.aclose()
    await server.aclose()


async def test_256_channels_at_once(backends) -> None:
    raise_fd_limit()  # 512 ends of a ring vchan hold a few fds each
    pairs = [await _pair(backends, 1000 + i, ring=4096) for i in range(256)]
    for number, (_, client) in enumerate(pairs):
        await client.send_all(number.to_bytes(2, "little"))
    for number, (server, client) in enumerate(pairs):
        assert await server.receive_some(2) == number.to_bytes(2, "little")
        await client.aclose()
        await server.aclose()


_PEER = textwrap.dedent("""
    import sys, trio
    from qrexec_trio.xen import get_backend

    async def main():
        backend = get_backend(sys.argv[1])
        vchan = await backend.connect(int(sys.argv[3]), int(sys.argv[2]), timeout=20)
        print("ready", flush=True)
        await trio.sleep_forever()  # never reads, never writes: then dies by SIGKILL

    trio.run(main)
""")


async def test_peer_sigkill_wakes_a_blocked_reader_and_writer(backends, short_tmp) -> None:
    name, dom0, _, server_domain, client_domain = backends
    port = 704
    listener = dom0.listen(client_domain, port, read_min=4096, write_min=4096)
    env = dict(os.environ, VCHAN_SOCKET_DIR=str(short_tmp), VCHAN_DOMAIN="42")
    peer = await trio.lowlevel.open_process(
        [sys.executable, "-c", _PEER, name, str(port), str(server_domain)], env=env,
        stdout=subprocess.PIPE)
    try:
        server = await listener.accept(20)
        assert peer.stdout is not None
        assert (await peer.stdout.receive_some(10)).startswith(b"ready")
        outcome: dict[str, object] = {}
        woke = trio.Semaphore(0)
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                outcome["read"] = await server.receive_some(10)
                woke.release()

            async def writer() -> None:
                try:
                    while True:  # the ring fills, then the writer blocks
                        await server.send_all(bytes(65536))
                except trio.BrokenResourceError:
                    outcome["write"] = "broken"
                woke.release()

            nursery.start_soon(reader)
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            peer.send_signal(signal.SIGKILL)
            # Both must wake: a bound that fails a hang, not a timing assertion.
            with trio.fail_after(10):
                await woke.acquire()
                await woke.acquire()
            await peer.wait()
        assert outcome == {"read": b"", "write": "broken"}
        await server.aclose()
    finally:
        if peer.returncode is None:
            peer.kill()
            await peer.wait()
