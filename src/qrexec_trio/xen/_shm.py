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
from typing import Final, final

import trio

from ._interface import Vchan, VchanConnectTimeout, VchanError, VchanListener
from ._local import LocalBackend, Offer, Rendezvous, poll_until_offered
from ._ring import RingVchan
from ._shm_cffi import lib
from ._shm_driver import (
    BACKLOG,
    FDS_SENT,
    HELLO,
    HELLO_MAGIC,
    SEALS,
    ShmDriver,
    ShmServerSetup,
    close_all,
    left_while_connecting,
    region_size,
    ring_order,
)

__all__ = ["HELLO", "HELLO_MAGIC", "ShmBackend", "ShmDriver", "ShmVchanListener",
           "region_size", "ring_order"]

# Room for more fds than we expect, so that a wrong count is seen and every
# received fd is closed, rather than the kernel silently dropping the excess.
_FDS_ROOM: Final = 16


@final
class ShmVchanListener(VchanListener):
    def __init__(self, path: str, peer_domain: int, port: int, read_min: int, write_min: int,
                 *, send_finish: float) -> None:
        self.peer_domain = peer_domain
        self.port = port
        self._send_finish = send_finish
        setup: ShmServerSetup | None = None
        try:
            setup = ShmServerSetup(read_min, write_min)
            # In place before listen() returns, so that a client can never miss it.
            offer = Offer(path, socket.SOCK_SEQPACKET, backlog=BACKLOG, port=port)
        except BaseException as exc:
            if setup is not None:
                setup.close()
            if isinstance(exc, OSError):
                raise VchanError(f"cannot offer vchan at {path}: {exc.strerror or exc}") from exc
            raise
        self._setup: ShmServerSetup | None = setup
        self._offer: Offer | None = offer

    async def accept(self, timeout: float) -> Vchan:
        offer = self._offer
        if offer is None or self._setup is None:
            raise trio.ClosedResourceError("vchan listener is closed")
        setup, self._setup = self._setup, None
        vchan: RingVchan | None = None
        try:
            with trio.fail_after(timeout or float("inf")):
                conn = await self._accept_one(offer)
                with conn:
                    await self._send_hello(conn, setup)
                    fd = conn.detach()
                driver = setup.attach(fd)
                vchan = RingVchan(driver, self.peer_domain, self.port,
                                  send_finish=self._send_finish)
                await vchan.wait_connected(0)  # bounded by the scope above
            if not driver.client_arrived():
                raise left_while_connecting(self.peer_domain, self.port)
        except BaseException as exc:
            if vchan is not None:
                await trio.aclose_forcefully(vchan)
            setup.close()
            if isinstance(exc, trio.TooSlowError):
                raise VchanConnectTimeout(
                    f"domain {self.peer_domain} did not connect to vchan port {self.port} "
                    f"within {timeout:g}s"
                ) from None
            raise
        return vchan

    async def _send_hello(self, conn: trio.socket.SocketType, setup: ShmServerSetup) -> None:
        try:
            await conn.sendmsg([setup.hello], setup.hello_fds())
        except OSError as exc:
            raise left_while_connecting(
                self.peer_domain, self.port, f" ({exc.strerror or exc})") from exc

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

    async def aclose(self) -> None:
        if self._offer is not None:
            self._offer.withdraw(served=False)
            self._offer = None
        if self._setup is not None:
            self._setup.close()
            self._setup = None
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
    if seals & SEALS != SEALS:
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
        close_all(fds)  # the memfd: the mapping is all we need
        return RingVchan(driver, peer_domain, port, send_finish=send_finish)
    finally:
        close_all(fds)
        sock.close()


def _check_hello(msg: bytes, flags: int, fds: list[int]) -> str | None:
    if flags & socket.MSG_CTRUNC:
        return "its file descriptors did not all arrive (too many, or we are out of fds)"
    if len(fds) != FDS_SENT:
        return f"it sent {len(fds)} file descriptors, not {FDS_SENT}"
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
