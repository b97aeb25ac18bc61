"""The shm vchan backend: the C ring through its driver, then the backend's rendezvous."""

from __future__ import annotations

import array
import fcntl
import os
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from qrexec_trio.xen import Vchan, VchanConnectTimeout, VchanError, VchanWithdrawn

shm = pytest.importorskip("qrexec_trio.xen._shm", reason="the shm extension is not built")
ShmBackend = shm.ShmBackend
ShmDriver = shm.ShmDriver
lib = pytest.importorskip("qrexec_trio.xen._shm_cffi").lib

WRITE, READ = lib.SHM_NOTIFY_WRITE, lib.SHM_NOTIFY_READ


# -- driver level: two ends in this process, set up by hand ------------------------------


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _memfd(size: int) -> int:
    fd = os.memfd_create("test-vchan", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


class Pair:
    """A server and a client driver over one region, as the rendezvous leaves them.

    ``hangup`` is the far end of the server's rendezvous socket, held here
    instead of by the client, so a test can make the server see the peer die.
    """

    def __init__(self, read_size: int = 4096, write_size: int = 4096,
                 start: int | None = None) -> None:
        left, right = shm.ring_order(read_size), shm.ring_order(write_size)
        memfd = _memfd(shm.region_size(left, right))
        server_efd, client_efd = _eventfd(), _eventfd()
        self.server = ShmDriver.server(memfd, server_efd, client_efd, left, right)
        if start is not None:
            self.server.set_indexes_for_test(start)
        assert self.server.is_open() == 2  # no client yet
        server_sock, self.hangup = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.server.attach(server_sock.detach())
        client_sock, self._client_far = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The client gets its own copies, as SCM_RIGHTS would give it.
        self.client = ShmDriver.client(memfd, os.dup(client_efd), os.dup(server_efd),
                                       client_sock.detach())
        os.close(memfd)

    def close(self) -> None:
        self.server.close()
        self.client.close()
        self.hangup.close()
        self._client_far.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _read(driver, size: int) -> bytes | int:
    buffer = bytearray(size)
    got = driver.read_into(buffer, size)
    return bytes(buffer[:got]) if got >= 0 else got


def _quiet(p: Pair) -> None:
    """Forget the requests and signals of the setup, so a test sees only its own."""
    header = p.server.header()
    header.cli_notify = 0
    header.srv_notify = 0
    p.server.wait()
    p.client.wait()
    assert not _readable(p.server.fd_for_select())
    assert not _readable(p.client.fd_for_select())


def test_the_client_connecting_opens_both_ends(pair: Pair) -> None:
    header = pair.server.header()
    assert (header.magic, header.version) == (lib.SHM_MAGIC, lib.SHM_VERSION)
    assert (header.left_order, header.right_order) == (12, 12)
    assert (header.cli_live, header.srv_live) == (1, 1)
    assert pair.server.is_open() == 1
    assert pair.client.is_open() == 1
    # The client signalled its arrival.
    assert _readable(pair.server.fd_for_select())


def test_stream_write_takes_what_fits_and_read_what_is_there(pair: Pair) -> None:
    assert _read(pair.server, 100) == b""  # empty: 0, not end-of-file
    assert pair.client.write(bytes(range(256)) * 20) == 4096  # 5120 offered, the ring holds 4096
    assert pair.client.buffer_space() == 0
    assert pair.client.write(b"more") == 0
    assert pair.server.data_ready() == 4096
    assert _read(pair.server, 1000) == (bytes(range(256)) * 4)[:1000]
    assert pair.client.buffer_space() == 1000
    assert pair.client.write(b"x" * 2000) == 1000
    got = _read(pair.server, 10000)
    assert got == ((bytes(range(256)) * 20)[1000:4096] + b"x" * 1000)


@pytest.mark.parametrize("start", [0, 4096 - 7, 2**32 - 5000, 2**32 - 1])
def test_ring_wraps_around_its_end_and_the_u32_indexes(start: int) -> None:
    p = Pair(start=start)
    try:
        sent = bytearray()
        received = bytearray()
        chunk = 0
        while len(received) < 3 * 2**16:
            chunk += 1
            data = os.urandom(1 + (chunk * 977) % 3000)  # sizes that never align with the ring
            assert p.client.write(data) == len(data)
            sent += data
            received += _read(p.server, 4096)
        assert received == sent
        assert p.server.header().left.prod == (start + len(sent)) % 2**32
        if start > 2**32 - 3 * 2**16:
            assert p.server.header().left.prod < start  # the free-running index wrapped
    finally:
        p.close()


def test_packets_are_all_or_nothing(pair: Pair) -> None:
    assert pair.client.send(b"a" * 3000) == 3000
    assert pair.client.send(b"b" * 2000) == 0  # only 1096 bytes are free: nothing is written
    assert pair.server.data_ready() == 3000
    assert pair.server.recv(3001) is None  # not all there: nothing is consumed
    assert pair.server.data_ready() == 3000
    assert pair.server.recv(3000) == b"a" * 3000
    assert pair.client.send(b"b" * 2000) == 2000
    assert pair.server.recv(2000) == b"b" * 2000
    with pytest.raises(ValueError, match="never fit"):
        pair.client.send(bytes(4097))
    with pytest.raises(ValueError, match="never fit"):
        pair.server.recv(4097)


def test_data_ready_asks_the_writer_to_signal_once(pair: Pair) -> None:
    _quiet(pair)
    header = pair.server.header()
    server_fd = pair.server.fd_for_select()
    # Nobody asked: a write signals no one (no needless wake-up).
    assert pair.client.write(b"a") == 1
    assert not _readable(server_fd)
    # The server asks, in the client's notify byte; the next write signals and clears it.
    assert pair.server.data_ready() == 1
    assert header.cli_notify & WRITE
    assert pair.client.write(b"b") == 1
    assert not header.cli_notify & WRITE
    assert _readable(server_fd)
    pair.server.wait()  # consumes the event
    assert not _readable(server_fd)
    assert pair.client.write(b"c") == 1  # the request was used up
    assert not _readable(server_fd)


def test_buffer_space_asks_the_reader_to_signal_once(pair: Pair) -> None:
    _quiet(pair)
    header = pair.server.header()
    client_fd = pair.client.fd_for_select()
    assert pair.client.write(bytes(4096)) == 4096
    assert _read(pair.server, 10) == bytes(10)
    assert not _readable(client_fd)
    assert pair.client.buffer_space() == 10
    assert header.srv_notify & READ  # the client asked, in the server's notify byte
    assert _read(pair.server, 10) == bytes(10)
    assert not header.srv_notify & READ
    assert _readable(client_fd)
    pair.client.wait()
    assert not _readable(client_fd)


def test_a_full_ring_arms_the_reader_by_itself(pair: Pair) -> None:
    _quiet(pair)
    assert pair.client.write(bytes(5000)) == 4096  # did not all fit: asks for a signal
    assert pair.server.header().srv_notify & READ
    _read(pair.server, 1)
    assert _readable(pair.client.fd_for_select())


def test_one_mib_through_a_4_kib_ring(pair: Pair) -> None:
    payload = os.urandom(2**20)
    received = bytearray()
    offset = 0
    while len(received) < len(payload):
        written = pair.client.write(payload[offset:offset + 65536])
        assert written > 0
        offset += written
        received += _read(pair.server, 65536)
    assert received == payload


def test_end_of_file_comes_only_after_the_data_is_drained(pair: Pair) -> None:
    assert pair.client.write(b"x" * 3000) == 3000
    pair.client.close()
    assert pair.server.header().cli_live == 0
    assert _readable(pair.server.fd_for_select())  # the close signals unasked
    pair.server.wait()
    assert pair.server.is_open() == 0
    assert pair.server.write(b"too late") == -1
    assert pair.server.send(b"too late") == -1
    assert _read(pair.server, 1000) == b"x" * 1000
    with pytest.raises(EOFError):  # 2000 are left and no more will come
        pair.server.recv(2001)
    assert _read(pair.server, 5000) == b"x" * 2000
    assert _read(pair.server, 5000) == -1
    assert _read(pair.server, 5000) == -1


def test_a_hung_up_rendezvous_socket_reads_as_a_dead_peer(pair: Pair) -> None:
    # The peer's process dies: its live byte stays 1, but its socket closes.
    assert pair.client.write(b"last") == 4
    _quiet(pair)
    assert pair.server.header().cli_live == 1
    pair.hangup.close()
    assert _readable(pair.server.fd_for_select())  # the death itself wakes the waiter
    pair.server.wait()
    assert pair.server.is_open() == 0
    assert pair.server.write(b"x") == -1
    assert _read(pair.server, 100) == b"last"
    assert _read(pair.server, 100) == -1


def test_is_open_notices_a_hangup_without_a_wait(pair: Pair) -> None:
    pair.hangup.close()
    assert pair.server.is_open() == 0


def test_indexes_moved_out_of_range_by_the_peer_read_as_closed(pair: Pair) -> None:
    header = pair.server.header()
    header.left.prod = header.left.cons + 10**6  # more than the ring can hold
    assert _read(pair.server, 100) == -1
    assert pair.server.is_open() == 0
    assert pair.server.write(b"x") == -1
    header.left.cons = header.left.prod + 10**6  # the server's write ring is the right one
    header.right.cons = header.right.prod + 10**6
    assert pair.client.write(b"x") == -1


def test_a_closed_driver_is_harmless(pair: Pair) -> None:
    pair.server.close()
    pair.server.close()
    assert _read(pair.server, 10) == -1
    assert pair.server.write(b"x") == -1
    assert pair.server.data_ready() == pair.server.buffer_space() == pair.server.is_open() == 0
    pair.server.wait()


def test_packet_errors_are_told_apart(pair: Pair) -> None:
    with pytest.raises(ValueError, match="never fit"):
        pair.client.send(bytes(8192))
    pair.server.close()
    assert pair.client.send(b"x") == -1  # the peer closed: not "too big", whatever errno was
    with pytest.raises(EOFError):
        pair.client.recv(1)


def test_the_c_ring_compiles_without_warnings(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc here")
    source = Path(shm.__file__).with_name("shm_ring.c")
    result = subprocess.run(
        [gcc, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-c", str(source),
         "-o", str(tmp_path / "shm_ring.o")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_the_client_refuses_a_region_that_is_not_one() -> None:
    server_efd, client_efd = _eventfd(), _eventfd()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    garbage = _memfd(shm.region_size(10, 10))
    os.pwrite(garbage, b"not a header" * 5, 0)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="magic"):
        ShmDriver.client(garbage, client_efd, server_efd, b.fileno())
    assert len(os.listdir("/proc/self/fd")) == before  # it took nothing and left nothing
    for fd in (server_efd, client_efd, garbage):
        os.close(fd)
    a.close()
    b.close()


# -- backend level ---------------------------------------------------------------------


@pytest.fixture
def backends(short_tmp: Path) -> tuple[ShmBackend, ShmBackend]:
    """dom0 (0) and a VM (42) sharing one socket dir."""
    return ShmBackend(str(short_tmp), 0), ShmBackend(str(short_tmp), 42)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _pair(backends, port: int, ring: int = 4096) -> tuple[Vchan, Vchan]:
    dom0, vm = backends
    listener = dom0.listen(42, port, read_min=ring, write_min=ring)
    server: list[Vchan] = []
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            server.append(await listener.accept(10))

        nursery.start_soon(accept)
        client = await vm.connect(0, port, timeout=10)
    return server[0], client


async def test_connect_accept_exchange_and_release_everything(backends, short_tmp) -> None:
    before = _fd_count()
    dom0, vm = backends
    listener = dom0.listen(42, 600)
    assert (short_tmp / "vchan.0.42.600.sock").is_socket()
    async with trio.open_nursery() as nursery:
        got: list[Vchan] = []

        async def accept() -> None:
            got.append(await listener.accept(10))

        nursery.start_soon(accept)
        client = await vm.connect(0, 600, timeout=10)
    server = got[0]
    assert not (short_tmp / "vchan.0.42.600.sock").exists()  # withdrawn once taken
    assert (server.peer_domain, client.peer_domain, server.port, client.port) == (42, 0, 600, 600)
    assert server.buffer_space() == client.buffer_space() == 65536
    await client.send_all(b"hello")
    assert await server.receive_some(100) == b"hello"
    await server.send_all(b"world")
    assert await client.receive_some(100) == b"world"
    await server.send_all(b"last words")
    await server.aclose()
    assert await client.receive_some(100) == b"last words"
    assert await client.receive_some(100) == b""
    await client.aclose()
    assert _fd_count() == before


async def test_every_fd_is_close_on_exec(backends) -> None:
    before = set(os.listdir("/proc/self/fd"))
    server, client = await _pair(backends, 601)
    new = set(os.listdir("/proc/self/fd")) - before
    assert len(new) == 8  # per end: epoll, two eventfds, the rendezvous connection
    for fd in new:
        assert fcntl.fcntl(int(fd), fcntl.F_GETFD) & fcntl.FD_CLOEXEC, os.readlink(
            f"/proc/self/fd/{fd}")
    await client.aclose()
    await server.aclose()


@pytest.mark.parametrize("size", [0, 512, 1000, 3000, 4097, 2**20 + 1, 2**21, -4096])
async def test_bad_ring_sizes_are_refused(backends, short_tmp, size: int) -> None:
    dom0, _ = backends
    before = _fd_count()
    with pytest.raises(VchanError, match="power of two from 1024 to 1048576"):
        dom0.listen(42, 602, read_min=size)
    with pytest.raises(VchanError, match="power of two"):
        dom0.listen(42, 602, write_min=size)
    assert _fd_count() == before
    assert not list(short_tmp.iterdir())


@pytest.mark.parametrize("size", [1024, 2**20])
async def test_the_extreme_ring_sizes_work(backends, size: int) -> None:
    server, client = await _pair(backends, 603, ring=size)
    assert client.buffer_space() == size
    await client.send_all(bytes(size))
    assert server.buffer_space() == size
    got = 0
    while got < size:
        got += len(await server.receive_some())
    await client.aclose()
    await server.aclose()


async def test_running_out_of_fds_is_a_vchan_error_and_leaks_nothing(backends, short_tmp) -> None:
    dom0, _ = backends
    before = _fd_count()
    taken = {int(fd) for fd in os.listdir("/proc/self/fd")}
    # The lowest limit that leaves exactly two free fd numbers: listen needs five.
    limit = next(n for n in range(1, 1 << 20) if n - len([fd for fd in taken if fd < n]) == 2)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        with pytest.raises(VchanError, match="vchan") as caught:
            dom0.listen(42, 640)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "Too many open files" in str(caught.value)
    assert _fd_count() == before
    assert not list(short_tmp.iterdir())


async def test_a_non_socket_at_the_name_is_never_replaced(backends, short_tmp) -> None:
    dom0, _ = backends
    precious = short_tmp / "vchan.0.42.604.sock"
    precious.write_text("keep me")
    before = _fd_count()
    with pytest.raises(VchanError, match="exists and is not a socket"):
        dom0.listen(42, 604)
    assert precious.read_text() == "keep me"
    assert _fd_count() == before


async def test_a_stale_socket_is_replaced(backends, short_tmp) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(short_tmp / "vchan.0.42.605.sock"))
    stale.close()  # the file stays behind, nobody listens
    server, client = await _pair(backends, 605)
    await client.aclose()
    await server.aclose()


async def test_listener_close_and_accept_timeout_release_everything(backends, short_tmp) -> None:
    dom0, vm = backends
    before = _fd_count()
    async with dom0.listen(42, 606):
        assert (short_tmp / "vchan.0.42.606.sock").exists()
    assert not (short_tmp / "vchan.0.42.606.sock").exists()
    listener = dom0.listen(42, 606)
    with pytest.raises(VchanConnectTimeout):
        await listener.accept(0.1)
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept(0.1)
    await listener.aclose()
    assert _fd_count() == before
    with pytest.raises(VchanWithdrawn):  # the accept that timed out left its marker
        await vm.connect(0, 606, timeout=0.1)
    with pytest.raises(VchanConnectTimeout):  # the marker was taken: nothing is offered
        await vm.connect(0, 607, timeout=0.1)
    assert _fd_count() == before


async def test_the_client_waits_for_a_late_server(backends) -> None:
    dom0, vm = backends
    got: list[Vchan] = []
    async with trio.open_nursery() as nursery:

        async def client() -> None:
            got.append(await vm.connect(0, 607, timeout=10))

        nursery.start_soon(client)
        await trio.testing.wait_all_tasks_blocked()
        server = await dom0.serve_one(42, 607, timeout=10)
    await got[0].send_all(b"late")
    assert await server.receive_some() == b"late"
    await got[0].aclose()
    await server.aclose()


async def test_a_second_client_is_refused(backends) -> None:
    server, client = await _pair(backends, 608)
    _, vm = backends
    with pytest.raises(VchanConnectTimeout):
        await vm.connect(0, 608, timeout=0.2)  # the name was withdrawn: no offer any more
    await client.aclose()
    await server.aclose()


async def test_of_two_clients_already_queued_one_wins_and_one_is_told(backends) -> None:
    dom0, vm = backends
    listener = dom0.listen(42, 609)
    outcomes: list[object] = []

    async def client() -> None:
        try:
            outcomes.append(await vm.connect(0, 609, timeout=10))
        except VchanError as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        nursery.start_soon(client)
        await trio.testing.wait_all_tasks_blocked()  # both are queued on the socket
        server = await listener.accept(10)
    errors = [o for o in outcomes if isinstance(o, VchanError)]
    vchans = [o for o in outcomes if isinstance(o, Vchan)]
    assert len(errors) == len(vchans) == 1
    assert not isinstance(errors[0], VchanConnectTimeout)
    assert "without offering the vchan" in str(errors[0])
    await vchans[0].aclose()
    await server.aclose()


async def test_a_client_that_connects_writes_and_leaves_at_once_is_still_served(backends) -> None:
    dom0, vm = backends
    listener = dom0.listen(42, 610)
    got: list[Vchan] = []
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            got.append(await listener.accept(10))

        nursery.start_soon(accept)
        client = await vm.connect(0, 610, timeout=10)
        # Before the server has run again: it finds the client already gone.
        driver = client._driver  # type: ignore[attr-defined]
        assert driver.write(b"quick") == 5
        await client.aclose()
    server = got[0]
    assert await server.receive_some() == b"quick"
    assert await server.receive_some() == b""
    await server.aclose()


async def test_a_client_that_leaves_before_claiming_the_ring_fails_the_accept(
        backends, short_tmp) -> None:
    dom0, _ = backends
    before = _fd_count()
    listener = dom0.listen(42, 611)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            failure: list[BaseException] = []

            async def accept() -> None:
                try:
                    await listener.accept(0)  # no timeout: only the hang-up ends it
                except VchanError as exc:
                    failure.append(exc)

            nursery.start_soon(accept)
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            await sock.connect(str(short_tmp / "vchan.0.42.611.sock"))
            _, ancdata, _, _ = await sock.recvmsg(100, socket.CMSG_SPACE(64),
                                                  socket.MSG_CMSG_CLOEXEC)
            for _, _, data in ancdata:
                for fd in array.array("i", data):
                    os.close(fd)
            sock.close()
    assert "left vchan port 611 while connecting" in str(failure[0])
    assert _fd_count() == before  # the listener's memfd, eventfds and socket are gone too


# -- impostors at the rendezvous ----------------------------------------------------------


async def _impostor(path: Path, kind: int, message: bytes, fds: list[int],
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """A server that is not ours: sends ``message`` with ``fds`` to one client, then
    waits for it to hang up."""
    listening = trio.socket.socket(socket.AF_UNIX, kind)
    with listening:
        await listening.bind(str(path))
        listening.listen(1)
        task_status.started()
        conn, _ = await listening.accept()
        with conn:
            if fds:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                await conn.sendmsg([message], rights)
            elif message:
                await conn.send(message)
            for fd in fds:
                os.close(fd)
            await conn.recv(1)  # until the client hangs up


def _hello(left: int = 12, right: int = 12, size: int | None = None,
           magic: bytes = b"qtshmvc\x00", version: int = 1) -> bytes:
    if size is None:
        size = shm.region_size(left, right)
    return struct.pack("<8sIHHI", magic, version, left, right, size)


def _region(left: int = 12, right: int = 12, size: int | None = None, seal: bool = True,
            header: bool = True) -> int:
    """A memfd laid out as a server would, then changed as the arguments say."""
    proper = shm.region_size(left, right)
    fd = os.memfd_create("impostor", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, proper)
    if header:
        driver = ShmDriver.server(fd, _eventfd(), _eventfd(), left, right)
        driver.close()  # the header stays in the memory
    os.ftruncate(fd, proper if size is None else size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


IMPOSTORS = {
    "garbage, no fds": (socket.SOCK_SEQPACKET, lambda: (b"HTTP/1.1 200 OK\r\n", []),
                        "not a shm vchan: it sent 0 file descriptors"),
    "a stream socket": (socket.SOCK_STREAM, lambda: (b"x", []), "not a packet socket"),
    "one fd": (socket.SOCK_SEQPACKET, lambda: (_hello(), [_region()]),
               "sent 1 file descriptors, not 3"),
    "too many fds": (socket.SOCK_SEQPACKET,
                     lambda: (_hello(), [_region(), *(_eventfd() for _ in range(19))]),
                     "did not all arrive"),
    "bad magic": (socket.SOCK_SEQPACKET,
                  lambda: (_hello(magic=b"notours!"), [_region(), _eventfd(), _eventfd()]),
                  "bad magic"),
    "bad version": (socket.SOCK_SEQPACKET,
                    lambda: (_hello(version=9), [_region(), _eventfd(), _eventfd()]),
                    "version 9"),
    "short hello": (socket.SOCK_SEQPACKET,
                    lambda: (b"qtshmvc\x00", [_region(), _eventfd(), _eventfd()]),
                    "hello is 8 bytes"),
    "memfd too small": (socket.SOCK_SEQPACKET,
                        lambda: (_hello(), [_region(size=1000), _eventfd(), _eventfd()]),
                        "has 1000 bytes, not 8256"),
    "memfd too big": (socket.SOCK_SEQPACKET,
                      lambda: (_hello(), [_region(size=3 * 2**20), _eventfd(), _eventfd()]),
                      "not 8256"),
    "size not of the orders": (socket.SOCK_SEQPACKET,
                               lambda: (_hello(size=10000),
                                        [_region(size=10000), _eventfd(), _eventfd()]),
                               "does not match ring orders"),
    "orders out of range": (socket.SOCK_SEQPACKET,
                            lambda: (_hello(left=21), [_region(), _eventfd(), _eventfd()]),
                            "out of range"),
    "unsealed memfd": (socket.SOCK_SEQPACKET,
                       lambda: (_hello(), [_region(seal=False), _eventfd(), _eventfd()]),
                       "not sealed"),
    "no header in the memory": (socket.SOCK_SEQPACKET,
                                lambda: (_hello(), [_region(header=False), _eventfd(),
                                                    _eventfd()]),
                                "bad magic or version in the shared memory"),
    "pipes for eventfds": (socket.SOCK_SEQPACKET,
                           lambda: (_hello(), [_region(), *os.pipe()]),
                           "not eventfds"),
}


@pytest.mark.parametrize("impostor", list(IMPOSTORS))
async def test_a_rendezvous_that_is_not_ours_is_refused_without_leaking(
        backends, short_tmp, impostor: str) -> None:
    _, vm = backends
    kind, make, reason = IMPOSTORS[impostor]
    before = _fd_count()
    message, fds = make()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(_impostor, short_tmp / "vchan.0.42.620.sock", kind, message, fds)
            with pytest.raises(VchanError, match="is not a shm vchan") as caught:
                await vm.connect(0, 620, timeout=5)
            nursery.cancel_scope.cancel()
    assert reason in str(caught.value)
    assert not isinstance(caught.value, VchanConnectTimeout)
    assert _fd_count() == before  # every fd it was sent is closed again


# -- a dying peer ----------------------------------------------------------------------------

_PEER = textwrap.dedent("""
    import sys, trio
    from qrexec_trio.xen._shm import ShmBackend

    async def main():
        backend = ShmBackend(sys.argv[1], 42)
        if sys.argv[2] == "client":
            vchan = await backend.connect(0, 630, timeout=20)
        else:
            vchan = await backend.serve_one(0, 630, timeout=20, read_min=4096, write_min=4096)
        print("ready", flush=True)
        await trio.sleep_forever()  # never reads, never writes: then dies by SIGKILL

    trio.run(main)
""")


@pytest.mark.parametrize("peer_role", ["client", "server"])
async def test_peer_sigkill_wakes_a_blocked_reader_and_writer(
        backends, short_tmp, peer_role: str) -> None:
    dom0, _ = backends
    peer = await trio.lowlevel.open_process(
        [sys.executable, "-c", _PEER, str(short_tmp), peer_role], stdout=subprocess.PIPE)
    try:
        if peer_role == "client":
            vchan = await dom0.serve_one(42, 630, timeout=20, read_min=4096, write_min=4096)
        else:
            vchan = await dom0.connect(42, 630, timeout=20)
        assert peer.stdout is not None
        assert (await peer.stdout.receive_some(10)).startswith(b"ready")
        outcome: dict[str, object] = {}
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                outcome["read"] = await vchan.receive_some(10)

            async def writer() -> None:
                try:
                    while True:  # the 4 KiB ring fills, then the writer blocks
                        await vchan.send_all(bytes(65536))
                except trio.BrokenResourceError:
                    outcome["write"] = "broken"

            nursery.start_soon(reader)
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            assert outcome == {}  # both are blocked on the live peer
            peer.send_signal(signal.SIGKILL)
            # A bound that fails a hang, not a timing assertion.
            with trio.fail_after(10):
                await peer.wait()
            nursery.cancel_scope.deadline = trio.current_time() + 10
        assert not nursery.cancel_scope.cancelled_caught, "the peer's death woke no one"
        assert outcome == {"read": b"", "write": "broken"}
        await vchan.aclose()
    finally:
        if peer.returncode is None:
            peer.kill()
        await peer.wait()


# -- many at once -----------------------------------------------------------------------------


@pytest.fixture
def many_fds() -> Iterator[None]:
    """256 channels hold 2048 fds here (both ends in one process): make room."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4096
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_256_channels_at_once(backends, many_fds) -> None:
    before = _fd_count()
    pairs = [await _pair(backends, 1000 + i) for i in range(256)]
    for number, (server, client) in enumerate(pairs):
        await client.send_all(number.to_bytes(2, "little"))
        await server.send_all(number.to_bytes(2, "big"))
    for number, (server, client) in enumerate(pairs):
        assert await server.receive_some(2) == number.to_bytes(2, "little")
        assert await client.receive_some(2) == number.to_bytes(2, "big")
    for server, client in pairs:
        await client.aclose()
        await server.aclose()
    assert _fd_count() == before
