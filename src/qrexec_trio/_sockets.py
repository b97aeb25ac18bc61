"""Unix sockets that daemons listen on: bound safely, served by one accept loop.

Used by the daemon (client socket), the agent (trigger and fdpass sockets),
the admin server and every control socket, so that the rules live once:

* A leftover of a crashed predecessor is removed before binding, but only if
  it is a socket: never a file of another kind someone put there.
* On exit the path is unlinked only if it still names *our* socket (same
  inode): a successor that already bound the path keeps it.
* Accepting rides out EMFILE/ENFILE/ENOMEM (we back off) and ECONNABORTED
  (``SocketListener`` retries), without spinning.
* Every socket listens with the system's largest backlog, and their clients
  connect through :func:`connect_unix` (or :func:`connect_unix_blocking`),
  which waits out a full listen queue instead of failing: a burst of callers
  is queued, not refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import trio

from ._logging import get_logger

# Defined trio-free in ._unix for the light clients; the trio programs import them here.
from ._unix import ListenQueueFull as ListenQueueFull  # noqa: PLC0414
from ._unix import attempt_connect, connect_blocking, connect_pauses
from ._unix import has_kind as has_kind  # noqa: PLC0414
from ._unix import remove_stale as remove_stale  # noqa: PLC0414
from ._unix import unlink_if_same as unlink_if_same  # noqa: PLC0414

log = get_logger(__name__)

_SOMAXCONN_PATH: Final = "/proc/sys/net/core/somaxconn"


def system_max_backlog() -> int:
    """The largest listen backlog the kernel grants (``net.core.somaxconn``).

    The kernel silently caps listen()'s argument at somaxconn, so asking for
    more would be harmless; reading it instead makes the backlog we really get
    visible. Without /proc, the C library's SOMAXCONN.
    """
    try:
        with open(_SOMAXCONN_PATH, encoding="ascii") as file:
            value = int(file.read())
    except (OSError, ValueError):
        return socket.SOMAXCONN
    return value if value > 0 else socket.SOMAXCONN


#: The listen backlog of every serving socket: the system's maximum, so that a
#: burst of clients waits in the queue rather than meeting a full one.
BACKLOG: Final = system_max_backlog()


@contextlib.contextmanager
def listening_socket(path: str, *, mode: int, backlog: int = BACKLOG
                     ) -> Iterator[trio.socket.SocketType]:
    """A listening unix stream socket at ``path`` with ``mode``; removed on exit if still ours.

    Bound synchronously (a unix path needs no resolution), so that it is in
    place before the caller reports ready. Raises :class:`OSError`.
    """
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.closing(raw):
        remove_stale(path)
        raw.bind(path)
        inode = os.lstat(path).st_ino
        try:
            # Between bind and chmod the socket has the umask's mode; the
            # directory it lives in is what keeps strangers out meanwhile.
            os.chmod(path, mode)
            raw.listen(backlog)
            yield trio.socket.from_stdlib_socket(raw)
        finally:
            unlink_if_same(path, inode)


#: accept() errors that mean "out of a resource for now": back off and retry.
_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


async def serve_socket(
    sock: trio.socket.SocketType,
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    handler_nursery: trio.Nursery,
    *,
    backoff: float = 0.1,
) -> None:
    """Accept on ``sock`` until cancelled, each connection a task of ``handler_nursery``.

    Unlike ``trio.serve_listeners`` the stream belongs to the handler, which
    may keep it after returning (the agent's fdpass sockets wait in a table
    for their claim). ``SocketListener`` already retries ECONNABORTED and
    friends; out of fds or memory, we wait ``backoff`` and try again rather
    than spin or die.

    When serving ends (cancelled: a graceful stop, the program's end), ``sock``
    is closed at once: a client connecting later is refused, not left in the
    backlog waiting for an accept that will never come.
    """
    listener = trio.SocketListener(sock)
    try:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                log.error("accept failed; backing off", error=str(exc),
                          socket=sock.getsockname())
                await trio.sleep(backoff)
                continue
            handler_nursery.start_soon(handler, stream)
    finally:
        sock.close()


# -- the client side -------------------------------------------------------------------

async def connect_unix(path: str, *, timeout: float) -> trio.SocketStream:
    """A stream connected to the unix socket at ``path``, waiting out a full listen queue.

    Raises :class:`ListenQueueFull` if the queue stays full for ``timeout``
    seconds, and :class:`OSError` as connect() does for anything else (no
    such socket, nobody listening, ...).
    """
    pauses = connect_pauses(timeout, trio.current_time)
    while True:
        await trio.lowlevel.checkpoint()
        sock = attempt_connect(path, socket.socket)
        if sock is not None:
            return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        pause = next(pauses, None)
        if pause is None:
            raise ListenQueueFull(path, timeout)
        await trio.sleep(pause)


def connect_unix_blocking(path: str, *, timeout: float) -> socket.socket:
    """:func:`connect_unix` for synchronous code: a blocking socket, or the same errors."""
    return connect_blocking(path, timeout=timeout, make=socket.socket)
