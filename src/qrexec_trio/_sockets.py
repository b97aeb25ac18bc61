"""Unix sockets that daemons listen on: bound safely, served by one accept loop.

Used by the daemon (client socket), the agent (trigger and fdpass sockets),
the admin server and every control socket, so that the rules live once:

* A leftover of a crashed predecessor is removed before binding, but only if
  it is a socket: never a file of another kind someone put there.
* On exit the path is unlinked only if it still names *our* socket (same
  inode): a successor that already bound the path keeps it.
* Accepting rides out EMFILE/ENFILE/ENOMEM (we back off) and ECONNABORTED
  (``SocketListener`` retries), without spinning.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import trio

from ._logging import get_logger

log = get_logger(__name__)

#: The listen backlog of every serving socket.
BACKLOG: Final = 64


def remove_stale(path: str, is_kind: Callable[[int], bool] = stat.S_ISSOCK) -> None:
    """Remove a leftover at ``path`` if it is of the expected kind; never anything else."""
    with contextlib.suppress(FileNotFoundError):
        if is_kind(os.lstat(path).st_mode):
            os.unlink(path)


def has_kind(path: str, is_kind: Callable[[int], bool] = stat.S_ISSOCK, *,
             follow_symlinks: bool = False) -> bool:
    """Whether ``path`` exists and is of the kind ``is_kind`` tests (a socket by default)."""
    try:
        return is_kind(os.stat(path, follow_symlinks=follow_symlinks).st_mode)
    except OSError:
        return False


def unlink_if_same(path: str, inode: int) -> None:
    """Unlink ``path`` if it still names the file with ``inode``."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)


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
    """
    listener = trio.SocketListener(sock)
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _CAPACITY_ERRNOS:
                raise
            log.error("accept failed; backing off", error=str(exc), socket=sock.getsockname())
            await trio.sleep(backoff)
            continue
        handler_nursery.start_soon(handler, stream)
