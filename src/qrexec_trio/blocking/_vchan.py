"""A data vchan served with blocking calls: the socket backend's, trio-free.

The short-lived clients are the *server* of their data vchan (the caller
serves, wire-protocol.md §6): they offer it under its name
(:class:`~qrexec_trio.xen._offer.Offer`, the same rendezvous as the trio
backend, so a client of either kind finds it) and take the one peer.

Only the socket backend is driven here; the ring backends (shm, Xen) need
their trio wrapper today, and a client on them takes the trio path
(:func:`backend_problem`).
"""

from __future__ import annotations

import errno
import os
import select
from _socket import SOCK_STREAM
from _socket import socket as raw_socket

from ..xen._errors import VchanConnectTimeout
from ..xen._offer import Offer, local_own_domain, local_socket_dir, server_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

#: What a socket vchan reports as free space: the protocol's chunk limit (a
#: socket has no ring to measure), as the trio backend does.
_SOCKET_SPACE: Final = 65536
_RECEIVE_SIZE: Final = 65536 + 8


class PeerGone(OSError):
    """The other end of the vchan went away while we were sending."""


def backend_name() -> str:
    """The backend this process uses: ``$QREXEC_VCHAN``, else xen under Xen, else socket."""
    chosen = os.environ.get("QREXEC_VCHAN")
    if chosen:
        return chosen
    return "xen" if os.path.exists("/dev/xen") else "socket"


def backend_problem() -> str | None:
    """Why this driver cannot serve a vchan here (None if it can)."""
    name = backend_name()
    return None if name == "socket" else f"the {name} vchan backend has no blocking driver"


class BlockingVchan:
    """One connected vchan over a unix socket, non-blocking, for a poll loop."""

    __slots__ = ("_sock", "peer_domain", "port")

    def __init__(self, sock: raw_socket, peer_domain: int, port: int) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.peer_domain = peer_domain
        self.port = port

    def fileno(self) -> int:
        return self._sock.fileno()

    def poll_mask(self, *, reading: bool, writing: bool) -> int:
        """What to poll its fd for, to read and/or to write."""
        return (select.POLLIN if reading else 0) | (select.POLLOUT if writing else 0)

    def receive(self) -> bytes | None:
        """Bytes received; ``b""`` at the end (the peer closed); None if none yet."""
        try:
            return self._sock.recv(_RECEIVE_SIZE)
        except BlockingIOError:
            return None
        except ConnectionResetError:
            # A peer that died with unread data in its queue resets the socket;
            # for a vchan that is simply the end.
            return b""

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Bytes sent now (0 if there is no room); :class:`PeerGone` if the peer left."""
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise PeerGone(errno.EPIPE, "vchan peer has gone") from exc

    def buffer_space(self) -> int:
        return _SOCKET_SPACE

    def close(self) -> None:
        self._sock.close()


def serve_one(peer_domain: int, port: int, *, timeout: float) -> BlockingVchan:
    """Offer vchan ``port`` to ``peer_domain`` and take its peer, waiting at most ``timeout``
    seconds (0: forever). Raises :class:`VchanConnectTimeout`, or
    :class:`~qrexec_trio.xen.VchanError` if it cannot be offered."""
    path = server_path(local_socket_dir(), local_own_domain(), peer_domain, port)
    offer = Offer(path, SOCK_STREAM, backlog=1, port=port)
    served = False
    try:
        waiting = select.poll()
        waiting.register(offer.raw.fileno(), select.POLLIN)
        forever = not timeout or timeout == float("inf")
        if not waiting.poll(None if forever else int(timeout * 1000)):
            raise VchanConnectTimeout(
                f"domain {peer_domain} did not connect to vchan port {port} within {timeout:g}s")
        # The C socket's accept (socket.socket.accept wraps it); typeshed omits it.
        fd, _ = offer.raw._accept()  # type: ignore[attr-defined]
        served = True
    finally:
        # One client per vchan: withdraw the name as soon as we have it (or gave up).
        offer.withdraw(served=served)
    return BlockingVchan(raw_socket(fileno=fd), peer_domain, port)
