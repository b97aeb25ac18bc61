"""The shm vchan backend: our own C ring in a memfd, eventfds for event channels.

The ring (``shm_ring.c``) has libxenvchan's semantics and is driven through
:class:`ShmDriver`, which :class:`~._ring.RingVchan` (the one trio wrapper of
every ring backend) turns into a stream.

Rendezvous. The server offers ``$VCHAN_SOCKET_DIR/vchan.<server>.<client>.<port>.sock``,
named as the socket backend does, but a ``SOCK_SEQPACKET`` socket, so that a
peer on the socket backend fails at once with a clear error rather than
reading our handshake as vchan data. At :meth:`ShmVchanListener.accept` it
withdraws the name and sends the one client one message, :data:`HELLO`
(magic, version, ring orders, region size), carrying ``SCM_RIGHTS`` [memfd,
server's eventfd, client's eventfd]. The client checks all of it, maps the
memory, marks itself live and signals the server.

Peer death. The rendezvous connection stays open for the life of the vchan,
inside the epoll fd that is the wait point; a peer that exits, even by
SIGKILL, hangs it up, which wakes the other side and makes it read as closed.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
import stat
import struct
from typing import TYPE_CHECKING, Final, final

import trio

from ._interface import Vchan, VchanConnectTimeout, VchanError, VchanListener
from ._local import LocalBackend, Offer, Rendezvous, poll_until_offered
from ._ring import RingVchan
from ._shm_cffi import ffi, lib

if TYPE_CHECKING:
    from ._shm_cffi import CData  # only the stub has it

#: The rendezvous message: magic, version, left (client->server) and right
#: (server->client) ring orders, region size in bytes. Little-endian.
HELLO: Final = struct.Struct("<8sIHHI")
HELLO_MAGIC: Final = b"qtshmvc\x00"
MIN_RING: Final = 1 << 10
MAX_RING: Final = 1 << 20
_FDS_SENT: Final = 3
# Room for more fds than we expect, so that a wrong count is seen and every
# received fd is closed, rather than the kernel silently dropping the excess.
_FDS_ROOM: Final = 16
_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_BACKLOG: Final = 4


def ring_order(size: int) -> int:
    """log2 of a valid ring size; :class:`VchanError` for anything else."""
    if size < MIN_RING or size > MAX_RING or size & (size - 1):
        raise VchanError(
            f"vchan ring size {size} is not allowed: it must be a power of two "
            f"from {MIN_RING} to {MAX_RING} bytes"
        )
    return size.bit_length() - 1


def region_size(left_order: int, right_order: int) -> int:
    """Bytes of a region with these ring orders (header plus both rings)."""
    return lib.shm_region_size(left_order, right_order)


def _why(cell: CData, err: int) -> str:
    why = ffi.string(cell[0]).decode()
    return f"{why} ({os.strerror(err)})" if err else why


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()


@final
class ShmDriver:
    """One end of a shm vchan: libxenvchan's synchronous, non-blocking API.

    Implements :class:`~._ring.RingDriver`. After :meth:`close` every call is
    harmless: reads and writes report a closed peer, waits return at once.
    """

    def __init__(self, handle: CData) -> None:
        self._v: CData | None = handle

    @classmethod
    def server(cls, memfd: int, own_efd: int, peer_efd: int,
               read_order: int, write_order: int) -> ShmDriver:
        """Initialise the region in ``memfd`` (already sized) as a server.

        Takes ownership of both eventfds on success only; ``memfd`` stays the caller's.
        """
        why = ffi.new("const char *[1]")
        ffi.errno = 0
        handle = lib.shm_server_new(memfd, own_efd, peer_efd, read_order, write_order, why)
        if handle == ffi.NULL:
            raise VchanError(f"cannot set up a shm vchan: {_why(why, ffi.errno)}")
        return cls(handle)

    @classmethod
    def client(cls, memfd: int, own_efd: int, peer_efd: int, sock: int) -> ShmDriver:
        """Map and check a server's region; take the eventfds and ``sock`` on success.

        Raises :class:`ValueError` (with the reason) if the region is not a valid one.
        """
        why = ffi.new("const char *[1]")
        ffi.errno = 0
        handle = lib.shm_client_new(memfd, own_efd, peer_efd, sock, why)
        if handle == ffi.NULL:
            raise ValueError(_why(why, ffi.errno))
        return cls(handle)

    def attach(self, sock: int) -> None:
        """Server side: watch the rendezvous connection (owned by the driver from now on)."""
        if self._v is None or lib.shm_server_attach(self._v, sock) < 0:
            raise VchanError("cannot watch the shm vchan's rendezvous connection")

    # -- RingDriver -------------------------------------------------------------------

    def read_into(self, buffer: bytearray, size: int) -> int:
        if self._v is None:
            return -1
        return lib.shm_read(self._v, ffi.from_buffer(buffer), min(size, len(buffer)))

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._v is None:
            return -1
        return lib.shm_write(self._v, ffi.from_buffer(data), memoryview(data).nbytes)

    def data_ready(self) -> int:
        return 0 if self._v is None else lib.shm_data_ready(self._v)

    def buffer_space(self) -> int:
        return 0 if self._v is None else lib.shm_buffer_space(self._v)

    def wait(self) -> None:
        if self._v is not None and lib.shm_wait(self._v) < 0:
            code = ffi.errno
            raise OSError(code, f"shm vchan wait: {os.strerror(code)}")

    def fd_for_select(self) -> int:
        return -1 if self._v is None else lib.shm_fd_for_select(self._v)

    def is_open(self) -> int:
        return 0 if self._v is None else lib.shm_is_open(self._v)

    def client_arrived(self) -> bool:
        """Server side: the client claimed the ring (it may have left again since:
        then what it sent is still to be read)."""
        return self._v is not None and lib.shm_header_of(self._v).cli_live != 2

    def close(self) -> None:
        if self._v is not None:
            handle, self._v = self._v, None
            lib.shm_close(handle)

    # -- packets (libxenvchan's send/recv: all or nothing) -----------------------------

    def send(self, packet: bytes | bytearray | memoryview) -> int:
        """``len(packet)`` if it was written whole, 0 if it does not fit yet, -1
        if the peer closed; :class:`ValueError` if it could never fit the ring."""
        if self._v is None:
            return -1
        size = memoryview(packet).nbytes
        ffi.errno = 0  # -1 also means a closed peer: tell the two apart
        sent = lib.shm_send(self._v, ffi.from_buffer(packet), size)
        if sent < 0 and ffi.errno == errno.EMSGSIZE:
            raise ValueError(f"a {size}-byte packet can never fit this vchan's ring")
        return sent

    def recv(self, size: int) -> bytes | None:
        """Exactly ``size`` bytes, or None if they are not all there yet;
        :class:`EOFError` if the peer closed before sending them all."""
        if self._v is None:
            raise EOFError("vchan is closed")
        buffer = bytearray(size)
        ffi.errno = 0
        got = lib.shm_recv(self._v, ffi.from_buffer(buffer), size)
        if got < 0:
            if ffi.errno == errno.EMSGSIZE:
                raise ValueError(f"a {size}-byte packet can never fit this vchan's ring")
            raise EOFError("vchan peer closed before the whole packet arrived")
        return bytes(buffer) if got else None

    # -- for tests ------------------------------------------------------------------------

    def header(self) -> CData:
        """The shared header (``struct shm_header``), for tests."""
        if self._v is None:
            raise ValueError("driver is closed")
        header: CData = lib.shm_header_of(self._v)
        return header

    def set_indexes_for_test(self, value: int) -> None:
        """Move every ring index to ``value``; only before any data moved (and,
        for the client to pick them up, before it connects)."""
        if self._v is not None:
            lib.shm_test_set_indexes(self._v, value)




@final
class ShmVchanListener(VchanListener):
    def __init__(self, path: str, peer_domain: int, port: int, read_min: int, write_min: int,
                 *, send_finish: float) -> None:
        self.peer_domain = peer_domain
        self.port = port
        self._send_finish = send_finish
        left, right = ring_order(read_min), ring_order(write_min)
        self._hello = HELLO.pack(HELLO_MAGIC, lib.SHM_VERSION, left, right,
                                 region_size(left, right))
        owned: list[int] = []
        driver: ShmDriver | None = None
        try:
            memfd = os.memfd_create("qrexec-vchan", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            owned.append(memfd)
            os.ftruncate(memfd, region_size(left, right))
            # Sealed, so no one can shrink it under the other side's mapping (SIGBUS).
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
            own = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            owned.append(own)
            peer = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            owned.append(peer)
            driver = ShmDriver.server(memfd, own, peer, left, right)
            owned.remove(own)  # the driver's now
            owned.remove(peer)
            # In place before listen() returns, so that a client can never miss it.
            offer = Offer(path, socket.SOCK_SEQPACKET, backlog=_BACKLOG, port=port)
        except BaseException as exc:
            if driver is not None:
                driver.close()
            _close_all(owned)
            if isinstance(exc, OSError):
                raise VchanError(f"cannot offer vchan at {path}: {exc.strerror or exc}") from exc
            raise
        self._memfd = memfd
        self._efds = (own, peer)
        self._driver: ShmDriver | None = driver
        self._offer: Offer | None = offer

    async def accept(self, timeout: float) -> Vchan:
        offer = self._offer
        if offer is None or self._driver is None:
            raise trio.ClosedResourceError("vchan listener is closed")
        driver, self._driver = self._driver, None
        vchan: RingVchan | None = None
        try:
            with trio.fail_after(timeout or float("inf")):
                conn = await self._accept_one(offer)
                with conn:
                    await self._send_hello(conn)
                    fd = conn.detach()
                try:
                    driver.attach(fd)
                except BaseException:
                    os.close(fd)
                    raise
                self._release_memfd()
                vchan = RingVchan(driver, self.peer_domain, self.port,
                                  send_finish=self._send_finish)
                await vchan.wait_connected(0)  # bounded by the scope above
            if not driver.client_arrived():
                raise VchanError(
                    f"domain {self.peer_domain} left vchan port {self.port} while connecting"
                )
        except BaseException as exc:
            if vchan is not None:
                await trio.aclose_forcefully(vchan)
            else:
                driver.close()
            self._release_memfd()
            if isinstance(exc, trio.TooSlowError):
                raise VchanConnectTimeout(
                    f"domain {self.peer_domain} did not connect to vchan port {self.port} "
                    f"within {timeout:g}s"
                ) from None
            raise
        return vchan

    async def _send_hello(self, conn: trio.socket.SocketType) -> None:
        fds = array.array("i", [self._memfd, *self._efds])
        try:
            await conn.sendmsg([self._hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError as exc:
            raise VchanError(
                f"domain {self.peer_domain} left vchan port {self.port} while connecting "
                f"({exc.strerror or exc})"
            ) from exc

    async def _accept_one(self, offer: Offer) -> trio.socket.SocketType:
        conn: trio.socket.SocketType | None = None
        try:
            conn, _ = await offer.socket.accept()
        except OSError as exc:  # out of fds, most likely
            raise VchanError(
                f"cannot accept vchan port {self.port}: {exc.strerror or exc}"
            ) from exc
        finally:
            # One client per vchan: withdraw the name as soon as we have it (or gave up).
            self._offer = None
            offer.withdraw(served=conn is not None)
        return conn

    def _release_memfd(self) -> None:
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1

    async def aclose(self) -> None:
        if self._offer is not None:
            self._offer.withdraw(served=False)
            self._offer = None
        if self._driver is not None:
            self._driver.close()
            self._driver = None
        self._release_memfd()
        await trio.lowlevel.checkpoint()


def _check_region(memfd: int, left: int, right: int, size: int) -> str | None:
    """Why ``memfd`` is not the region the hello describes (None if it is)."""
    orders = range(lib.SHM_MIN_ORDER, lib.SHM_MAX_ORDER + 1)
    if left not in orders or right not in orders:
        return f"ring orders {left}/{right} are out of range"
    if size != region_size(left, right):
        return f"region size {size} does not match ring orders {left}/{right}"
    st = os.fstat(memfd)
    if not stat.S_ISREG(st.st_mode):
        return "the shared memory is not a memory file"
    if st.st_size != size:
        return f"the shared memory has {st.st_size} bytes, not {size}"
    try:
        seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if seals & _SEALS != _SEALS:
        return "the shared memory is not sealed against resizing"
    return None


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


async def _handshake(sock: trio.socket.SocketType, path: str, peer_domain: int, port: int,
                     send_finish: float) -> Vchan:
    """Receive and check the server's hello; the vchan on success. Closes ``sock``
    and every received fd on failure."""
    fds: list[int] = []
    try:
        try:
            msg, ancdata, flags, _ = await sock.recvmsg(
                HELLO.size + 1, socket.CMSG_SPACE(_FDS_ROOM * 4), socket.MSG_CMSG_CLOEXEC
            )
        except (ConnectionResetError, BrokenPipeError):
            msg, ancdata, flags = b"", [], 0
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(data[: len(data) - len(data) % received.itemsize])
                fds.extend(received)
        if not msg and not fds:
            raise VchanError(
                f"the server at {path} closed the rendezvous without offering the vchan "
                "(it had another client, or gave up)"
            )
        problem = _check_hello(msg, flags, fds)
        if problem is None:
            _, _, left, right, size = HELLO.unpack(msg)
            problem = _check_region(fds[0], left, right, size)
        if problem is None and not (_is_eventfd(fds[1]) and _is_eventfd(fds[2])):
            problem = "the event channels are not eventfds"
        if problem is not None:
            raise VchanError(f"{path} is not a shm vchan: {problem}")
        memfd, server_efd, client_efd = fds
        conn = sock.detach()
        try:
            driver = ShmDriver.client(memfd, client_efd, server_efd, conn)
        except ValueError as exc:
            os.close(conn)
            raise VchanError(f"{path} is not a shm vchan: {exc}") from None
        fds.remove(server_efd)
        fds.remove(client_efd)
        _close_all(fds)  # the memfd: the mapping is all we need
        return RingVchan(driver, peer_domain, port, send_finish=send_finish)
    finally:
        _close_all(fds)
        sock.close()


def _check_hello(msg: bytes, flags: int, fds: list[int]) -> str | None:
    if flags & socket.MSG_CTRUNC:
        return "its file descriptors did not all arrive (too many, or we are out of fds)"
    if len(fds) != _FDS_SENT:
        return f"it sent {len(fds)} file descriptors, not {_FDS_SENT}"
    if len(msg) != HELLO.size or flags & socket.MSG_TRUNC:
        return f"its hello is {len(msg)} bytes, not {HELLO.size}"
    magic, version, _, _, _ = HELLO.unpack(msg)
    if magic != HELLO_MAGIC:
        return f"bad magic {magic!r}"
    if version != lib.SHM_VERSION:
        return f"version {version}, not {lib.SHM_VERSION}"
    return None


@final
class ShmBackend(LocalBackend):
    name = "shm"

    def listen(
        self, peer_domain: int, port: int, *, read_min: int = 65536, write_min: int = 65536
    ) -> VchanListener:
        return ShmVchanListener(self.server_path(peer_domain, port), peer_domain, port,
                                read_min, write_min, send_finish=self._send_finish)

    async def connect(self, peer_domain: int, port: int, *, timeout: float) -> Vchan:
        path = self.client_path(peer_domain, port)
        rendezvous = Rendezvous(path, port)

        async def attempt() -> Vchan | None:
            try:
                sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            except OSError as exc:
                raise VchanError(f"cannot connect vchan {path}: {exc}") from exc
            try:
                connected = await rendezvous.connect(sock)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EPROTOTYPE:
                    raise VchanError(
                        f"{path} is not a shm vchan: not a packet socket "
                        "(is the peer on another vchan backend?)"
                    ) from None
                raise VchanError(f"cannot connect vchan {path}: {exc}") from exc
            except BaseException:
                sock.close()
                raise
            if not connected:
                sock.close()
                return None
            return await _handshake(sock, path, peer_domain, port, self._send_finish)

        return await poll_until_offered(attempt, timeout=timeout,
                                        what=f"domain {peer_domain} on port {port}")
