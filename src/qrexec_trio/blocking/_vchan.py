"""A data vchan served with blocking calls, on every backend, trio-free.

The short-lived clients are the *server* of their data vchan (the caller
serves, wire-protocol.md §6). On the local backends they offer it under its
name (:class:`~qrexec_trio.xen._offer.Offer`, the same rendezvous as the trio
backends, so a client of either kind finds it) and take the one peer; on Xen
they offer it in xenstore through libxenvchan.

Two kinds of connected vchan come out of :func:`serve_one`, with one
interface for :mod:`._io`'s poll loop: :class:`BlockingVchan` (a unix socket)
and :class:`RingBlockingVchan` (shm or Xen: libxenvchan's non-blocking API,
see :mod:`qrexec_trio.xen._ring`). A round of that loop asks
:meth:`~BlockingVchan.ready` what the vchan can do before it polls (a ring
may have data, or room, that no event will announce: then the poll only
looks) and again with what poll reported for :meth:`~BlockingVchan.fileno`.
"""

from __future__ import annotations

import errno
import select
import time
from _socket import SOCK_SEQPACKET, SOCK_STREAM
from _socket import socket as raw_socket

from ..protocol import DATA_RING_SIZE
from ..xen._errors import VchanConnectTimeout, VchanError
from ..xen._offer import Offer, local_own_domain, local_socket_dir, server_path
from ..xen._registry import chosen_backend_name
from ._io import PeerGone, remaining_ms, wait

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

    from ..xen._ring import RingDriver
    from ..xen._shm_driver import ShmServerSetup

#: What a socket vchan reports as free space: the protocol's chunk limit (a
#: socket has no ring to measure), as the trio backend does.
_SOCKET_SPACE: Final = 65536
_RECEIVE_SIZE: Final = 65536 + 8


def backend_problem() -> str | None:
    """Why this driver cannot serve a vchan here (None if it can); the trio
    implementation then runs the call, and reports the problem if it has it too."""
    name = chosen_backend_name()
    if name == "socket":
        return None
    if name == "shm":
        try:
            from ..xen import _shm_driver  # noqa: F401, PLC0415 (compiled: load when chosen)
        except ImportError as exc:
            return f"the shm vchan backend is not built ({exc})"
        return None
    if name == "xen":
        from ..xen._xen_driver import xen_available  # noqa: PLC0415 (as above)

        available, reason = xen_available()
        return None if available else reason
    return f"there is no {name!r} vchan backend"


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

    def ready(self, revents: int, *, reading: bool, writing: bool) -> int:
        """What it can do now, given what poll() reported for its fd (0: nothing,
        or not polled yet): poll bits, POLLIN to receive, POLLOUT to send. A
        socket knows only what poll says."""
        return revents

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


class RingBlockingVchan:
    """One connected ring vchan (shm or Xen), for a poll loop.

    Its fd is the event channel: readable when the peer signalled (wrote,
    read, or closed). A peer signals only what we asked for, by looking
    (``data_ready``, ``buffer_space``); :meth:`ready` looks every round before
    the poll, so a signal sent after it looked wakes the poll, and one sent
    before is seen by the look itself (libxenvchan's rule, as in
    :mod:`qrexec_trio.xen._ring`).
    """

    __slots__ = ("_buffer", "_driver", "_fd", "peer_domain", "port")

    def __init__(self, driver: RingDriver, peer_domain: int, port: int) -> None:
        self._driver = driver
        self._fd = driver.fd_for_select()
        self._buffer = bytearray(_RECEIVE_SIZE)
        self.peer_domain = peer_domain
        self.port = port

    def fileno(self) -> int:
        return self._fd

    def poll_mask(self, *, reading: bool, writing: bool) -> int:
        """Readable, whatever we wait for; nothing if we wait for nothing (a fd
        that stays readable, as a gone shm peer's does, must not spin the loop)."""
        return select.POLLIN if reading or writing else 0

    def ready(self, revents: int, *, reading: bool, writing: bool) -> int:
        """What it can do now (POLLIN: receive, POLLOUT: send), given what poll()
        reported for its fd (0: nothing, or not polled yet). Asks the peer to
        signal the next change of what it looks at."""
        if revents:
            _consume_event(self._driver)  # or the fd stays readable
        can = 0
        # A closed peer ends reading (receive says so) and writing (send says so).
        if reading and (self._driver.data_ready() > 0 or self._driver.is_open() == 0):
            can |= select.POLLIN
        if writing and (self._driver.buffer_space() > 0 or self._driver.is_open() == 0):
            can |= select.POLLOUT
        return can

    def receive(self) -> bytes | None:
        """Bytes received; ``b""`` at the end (the peer closed); None if none yet."""
        got = self._driver.read_into(self._buffer, _RECEIVE_SIZE)
        if got > 0:
            return bytes(memoryview(self._buffer)[:got])
        return b"" if got < 0 else None

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Bytes written now (0 if the ring is full); :class:`PeerGone` if the peer left."""
        written = self._driver.write(data)
        if written < 0:
            raise PeerGone(errno.EPIPE, "vchan peer has gone")
        return written

    def buffer_space(self) -> int:
        return self._driver.buffer_space()

    def close(self) -> None:
        self._driver.close()


if TYPE_CHECKING:
    #: What :func:`serve_one` returns.
    DataVchan = BlockingVchan | RingBlockingVchan


# -- serving -------------------------------------------------------------------------------


def serve_one(peer_domain: int, port: int, *, timeout: float,
              read_min: int = DATA_RING_SIZE, write_min: int = DATA_RING_SIZE) -> DataVchan:
    """Offer vchan ``port`` to ``peer_domain`` and take its peer, waiting at most ``timeout``
    seconds (0: forever). ``read_min``/``write_min`` size a ring backend's rings
    (a socket has none). Raises :class:`VchanConnectTimeout`, or
    :class:`~qrexec_trio.xen.VchanError` if it cannot be offered."""
    forever = not timeout or timeout == float("inf")
    deadline = None if forever else time.monotonic() + timeout
    name = chosen_backend_name()
    if name == "shm":
        return _serve_shm(peer_domain, port, timeout, deadline, read_min=read_min,
                          write_min=write_min)
    if name == "xen":
        return _serve_xen(peer_domain, port, timeout, deadline, read_min=read_min,
                          write_min=write_min)
    return _serve_socket(peer_domain, port, timeout, deadline)


def _wait_readable(fd: int, deadline: float | None) -> bool:
    """Whether ``fd`` became readable (or hung up) before the deadline (None: never)."""
    return bool(wait({fd: select.POLLIN}, deadline))


def _consume_event(driver: RingDriver) -> None:
    """Take one event off a ring's event channel (its fd was readable)."""
    try:
        driver.wait()
    except OSError as exc:
        raise VchanError(f"vchan event channel failed: {exc}") from exc


def _timed_out(peer_domain: int, port: int, timeout: float) -> VchanConnectTimeout:
    return VchanConnectTimeout(
        f"domain {peer_domain} did not connect to vchan port {port} within {timeout:g}s")


def _local_path(peer_domain: int, port: int) -> str:
    return server_path(local_socket_dir(), local_own_domain(), peer_domain, port)


def _accept_one(offer: Offer, peer_domain: int, port: int, timeout: float,
                deadline: float | None) -> int:
    """The one client's connection (an fd); the offer is withdrawn either way."""
    served = False
    try:
        if not _wait_readable(offer.raw.fileno(), deadline):
            raise _timed_out(peer_domain, port, timeout)
        # The C socket's accept (socket.socket.accept wraps it); typeshed omits it.
        fd: int = offer.raw._accept()[0]  # type: ignore[attr-defined]
        served = True
    finally:
        # One client per vchan: withdraw the name as soon as we have it (or gave up).
        offer.withdraw(served=served)
    return fd


def _serve_socket(peer_domain: int, port: int, timeout: float,
                  deadline: float | None) -> BlockingVchan:
    offer = Offer(_local_path(peer_domain, port), SOCK_STREAM, backlog=1, port=port)
    fd = _accept_one(offer, peer_domain, port, timeout, deadline)
    return BlockingVchan(raw_socket(fileno=fd), peer_domain, port)


def _wait_connected(driver: RingDriver, deadline: float | None) -> bool:
    """Server side: until the client is in (``is_open`` leaves 2); False at the deadline.
    A client signals as it connects, so the event fd wakes us."""
    fd = driver.fd_for_select()
    while driver.is_open() == 2:
        if not _wait_readable(fd, deadline):
            return False
        _consume_event(driver)
    return True


def _serve_shm(peer_domain: int, port: int, timeout: float, deadline: float | None, *,
               read_min: int, write_min: int) -> RingBlockingVchan:
    from ..xen._shm_driver import (  # noqa: PLC0415 (compiled: loaded only when chosen)
        BACKLOG,
        ShmServerSetup,
        left_while_connecting,
    )

    path = _local_path(peer_domain, port)
    try:
        setup = ShmServerSetup(read_min, write_min)
    except OSError as exc:
        raise VchanError(f"cannot offer vchan at {path}: {exc.strerror or exc}") from exc
    try:
        offer = Offer(path, SOCK_SEQPACKET, backlog=BACKLOG, port=port)
        conn = _accept_one(offer, peer_domain, port, timeout, deadline)
        driver = setup.attach(_send_hello(conn, setup, peer_domain, port, deadline))
    finally:
        setup.close()  # what it did not hand out
    try:
        if not _wait_connected(driver, deadline):
            raise _timed_out(peer_domain, port, timeout)
        if not driver.client_arrived():
            raise left_while_connecting(peer_domain, port)
    except BaseException:
        driver.close()
        raise
    return RingBlockingVchan(driver, peer_domain, port)


def _send_hello(conn: int, setup: ShmServerSetup, peer_domain: int, port: int,
                deadline: float | None) -> int:
    """Send the shm hello on the accepted connection ``conn``; ``conn`` again
    (closed on failure)."""
    from ..xen._shm_driver import left_while_connecting  # noqa: PLC0415 (as above)

    sock = raw_socket(fileno=conn)
    try:
        # A fresh connection's queue has room for the hello; the timeout only
        # bounds the unthinkable.
        remaining = remaining_ms(deadline)
        sock.settimeout(None if remaining is None else max(remaining, 1) / 1000)
        sock.sendmsg([setup.hello], setup.hello_fds())
    except OSError as exc:
        sock.close()
        raise left_while_connecting(peer_domain, port, f" ({exc.strerror or exc})") from exc
    return sock.detach()


def _serve_xen(peer_domain: int, port: int, timeout: float, deadline: float | None, *,
               read_min: int, write_min: int) -> RingBlockingVchan:
    from ..xen._xen_driver import (  # noqa: PLC0415 (compiled: loaded only when chosen)
        check_server_request,
        open_server,
    )

    check_server_request(peer_domain, port, read_min, write_min)
    driver = open_server(peer_domain, port, read_min, write_min)
    try:
        if not _wait_connected(driver, deadline):
            raise _timed_out(peer_domain, port, timeout)
        # One client per vchan: take the offer out of xenstore. If that fails,
        # the close of this vchan still removes it.
        driver.withdraw_offer()
    except BaseException:
        driver.close()
        raise
    return RingBlockingVchan(driver, peer_domain, port)
