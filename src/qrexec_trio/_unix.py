"""Unix-socket helpers that need nothing but the C socket module.

The short-lived clients' blocking driver uses these on every call, so this
module imports no more than ``os``, ``time`` and ``_socket`` (``socket`` alone
would pull in ``enum`` and ``selectors``); :mod:`._sockets` builds the trio
versions on the same functions.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from _socket import AF_UNIX, SOCK_STREAM
from _socket import socket as raw_socket

TYPE_CHECKING = False
if TYPE_CHECKING:
    from _socket import socket as raw_socket
    from collections.abc import Callable, Iterator
    from typing import Final, TypeVar

    S = TypeVar("S", bound=raw_socket)


def remove_stale(path: str, is_kind: Callable[[int], bool] = stat.S_ISSOCK) -> None:
    """Remove a leftover at ``path`` if it is of the expected kind; never anything else."""
    try:
        if is_kind(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def has_kind(path: str, is_kind: Callable[[int], bool] = stat.S_ISSOCK, *,
             follow_symlinks: bool = False) -> bool:
    """Whether ``path`` exists and is of the kind ``is_kind`` tests (a socket by default)."""
    try:
        return is_kind(os.stat(path, follow_symlinks=follow_symlinks).st_mode)
    except OSError:
        return False


def unlink_if_same(path: str, inode: int) -> None:
    """Unlink ``path`` if it still names the file with ``inode``."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


#: Pauses between connect attempts while a listen queue is full: short first,
#: growing to the last. Short, because a server that accepts at all empties its
#: queue fast.
_QUEUE_FULL_FIRST_PAUSE: Final = 0.001
_QUEUE_FULL_LAST_PAUSE: Final = 0.05


class ListenQueueFull(TimeoutError):
    """The server's listen queue stayed full for the whole connect timeout.

    An :class:`OSError` (errno EAGAIN, ``filename`` the socket's path), so that
    callers that report a failed connect by its ``strerror`` report this too.
    """

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(
            errno.EAGAIN,
            f"its listen queue stayed full for {timeout:g}s (the server is not accepting)",
            path,
        )


def attempt_connect(path: str, make: Callable[[int, int], S]) -> S | None:
    """A non-blocking unix stream socket connected to ``path``; None if its queue is full.

    On Linux a non-blocking connect() to a unix socket never is "in progress":
    it connects at once or fails, EAGAIN meaning the listen queue is full.
    (trio's ``connect`` takes that EAGAIN for "in progress" and hands back a
    socket that is not connected, hence this function.) Other errors raise.
    ``make`` is the socket class (``_socket.socket`` or ``socket.socket``).
    """
    sock = make(AF_UNIX, SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.connect(path)
    except BlockingIOError as exc:
        sock.close()
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return None
        raise
    except BaseException:
        sock.close()
        raise
    return sock


def connect_pauses(timeout: float, clock: Callable[[], float]) -> Iterator[float]:
    """Pauses between attempts until ``timeout`` (by ``clock``) is spent; then none.

    Jittered, so that the clients of one burst do not all come back at once
    (from os.urandom: the random module costs more to import than a call).
    """
    deadline = clock() + timeout
    pause = _QUEUE_FULL_FIRST_PAUSE
    while (left := deadline - clock()) > 0:
        yield min(pause * (0.5 + os.urandom(1)[0] / 510), left)
        pause = min(2 * pause, _QUEUE_FULL_LAST_PAUSE)


def connect_blocking(path: str, *, timeout: float, make: Callable[[int, int], S]) -> S:
    """A blocking socket (of class ``make``) connected to ``path``, waiting out a full
    listen queue.

    Raises :class:`ListenQueueFull` if the queue stays full for ``timeout``
    seconds, and :class:`OSError` as connect() does for anything else (no
    such socket, nobody listening, ...).
    """
    pauses = connect_pauses(timeout, time.monotonic)
    while (sock := attempt_connect(path, make)) is None:
        pause = next(pauses, None)
        if pause is None:
            raise ListenQueueFull(path, timeout)
        time.sleep(pause)
    sock.setblocking(True)
    return sock


def recv_by(sock: raw_socket, size: int, deadline: float) -> bytes:
    """At most ``size`` bytes from a blocking socket, by ``deadline`` (``time.monotonic``);
    ``b""`` at its end (a reset too: the peer is gone). :class:`TimeoutError` at the
    deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    sock.settimeout(left)
    try:
        return sock.recv(size)
    except ConnectionResetError:
        return b""


def ensure_standard_fds() -> None:
    """Open /dev/null on whichever of fds 0, 1 and 2 is closed.

    A program started with, say, stdin closed (``<&-``) would otherwise hand
    fd 0 to the first socket it opens and then read its "input" from there.
    A closed stdin reads as empty, a closed stdout or stderr drops what is
    written: what the caller asked for by closing it.
    """
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            # The lowest free number: fd itself, the ones below being open already.
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            # Python found the fd closed at start-up and left sys.stderr (say) None:
            # a logger would then fall back to stdout, which is the call's payload.
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", buffering=1,  # noqa: SIM115
                                    closefd=False, errors="backslashreplace"))
