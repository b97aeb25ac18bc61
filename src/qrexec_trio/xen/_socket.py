"""A vchan over a unix socket: the local backend.

Naming follows the socket libvchan that upstream qrexec tests with
(``qubes-core-vchan-socket``), so that qrexec programs built against it talk
to ours: the server binds ``$VCHAN_SOCKET_DIR/vchan.<server>.<client>.<port>.sock``
and the client connects to it; the own domain id is ``$VCHAN_DOMAIN``. The
bytes on the socket are exactly the bytes of the vchan, nothing added.

The socket fd is the trio wait point, as the event-channel fd is for the
cffi backends.
"""

from __future__ import annotations

import socket
from typing import Final, final

import trio

from ._interface import Vchan, VchanConnectTimeout, VchanError, VchanListener
from ._local import LocalBackend, Offer, Rendezvous, poll_until_offered

# What buffer_space() reports: the chunk limit of the protocol, since a
# socket has no ring whose free space we could read.
_SOCKET_SPACE: Final = 65536
_RECEIVE_SIZE: Final = 65536 + 8


@final
class SocketVchan(Vchan):
    def __init__(self, sock: trio.socket.SocketType, peer_domain: int, port: int,
                 send_finish: float) -> None:
        self._sock = sock
        self.peer_domain = peer_domain
        self.port = port
        self._send_finish = send_finish
        self._closed = False
        self._send_busy = trio.Lock()  # also serves as the one-sender conflict check

    def buffer_space(self) -> int:
        return _SOCKET_SPACE

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._send_busy.locked():
            raise trio.BusyResourceError("another task is sending on this vchan")
        async with self._send_busy:
            await self._send_all_untorn(memoryview(data).cast("B"))

    async def _send_all_untorn(self, view: memoryview) -> None:
        self._check_open()
        if not view:
            await trio.lowlevel.checkpoint()
            return
        sent = 0
        try:
            while sent < len(view):
                sent += await self._send_some(view[sent:])
        except trio.Cancelled:
            if sent == 0:
                raise
            # Half a frame is on the wire: finish it, within bounds, or give up the link.
            with trio.CancelScope(shield=True), trio.move_on_after(self._send_finish):
                while sent < len(view):
                    sent += await self._send_some(view[sent:])
            if sent < len(view):
                self._abort()
            raise

    async def _send_some(self, view: memoryview) -> int:
        try:
            return await self._sock.send(view)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise trio.BrokenResourceError("vchan peer has gone") from exc
        except OSError as exc:
            if self._closed:
                raise trio.ClosedResourceError("vchan was closed") from exc
            raise trio.BrokenResourceError(f"vchan send failed: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await self._sock.wait_writable()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check_open()
        try:
            return await self._sock.recv(max_bytes or _RECEIVE_SIZE)
        except ConnectionResetError:
            # A peer that died with unread data in its queue resets the socket;
            # for a vchan that is simply the end.
            return b""
        except OSError as exc:
            if self._closed:
                raise trio.ClosedResourceError("vchan was closed") from exc
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("vchan was closed")

    def _abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()

    async def aclose(self) -> None:
        self._abort()
        await trio.lowlevel.checkpoint()


@final
class SocketVchanListener(VchanListener):
    def __init__(self, path: str, peer_domain: int, port: int, send_finish: float) -> None:
        self.peer_domain = peer_domain
        self.port = port
        self._send_finish = send_finish
        # In place before listen() returns (a unix path needs no resolution),
        # so that a client can never miss it.
        self._offer: Offer | None = Offer(path, socket.SOCK_STREAM, backlog=1, port=port)

    async def accept(self, timeout: float) -> Vchan:
        offer = self._offer
        if offer is None:
            raise trio.ClosedResourceError("vchan listener is closed")
        conn: trio.socket.SocketType | None = None
        try:
            with trio.fail_after(timeout or float("inf")):
                conn, _ = await offer.socket.accept()
        except trio.TooSlowError:
            raise VchanConnectTimeout(
                f"domain {self.peer_domain} did not connect to vchan port {self.port} "
                f"within {timeout:g}s"
            ) from None
        finally:
            # One client per vchan: withdraw the name as soon as we have it (or gave up).
            self._offer = None
            offer.withdraw(served=conn is not None)
        return SocketVchan(conn, self.peer_domain, self.port, self._send_finish)

    async def aclose(self) -> None:
        if self._offer is not None:
            self._offer.withdraw(served=False)
            self._offer = None
        await trio.lowlevel.checkpoint()


@final
class SocketBackend(LocalBackend):
    name = "socket"

    def listen(
        self, peer_domain: int, port: int, *, read_min: int = 65536, write_min: int = 65536
    ) -> VchanListener:
        return SocketVchanListener(self.server_path(peer_domain, port), peer_domain, port,
                                   self._send_finish)

    async def connect(self, peer_domain: int, port: int, *, timeout: float) -> Vchan:
        path = self.client_path(peer_domain, port)
        rendezvous = Rendezvous(path, port)

        async def attempt() -> Vchan | None:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connected = await rendezvous.connect(sock)
            except OSError as exc:
                sock.close()
                raise VchanError(f"cannot connect vchan {path}: {exc}") from exc
            except BaseException:
                sock.close()
                raise
            if not connected:
                sock.close()
                return None
            return SocketVchan(sock, peer_domain, port, self._send_finish)

        return await poll_until_offered(attempt, timeout=timeout,
                                        what=f"domain {peer_domain} on port {port}")
