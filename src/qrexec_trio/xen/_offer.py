"""How the local backends offer a vchan under its name, with nothing but the C
socket module: the short-lived clients' blocking driver serves data vchans
through this, and must not pay for trio (see :mod:`._local` for the states a
name goes through and what clients make of them).
"""

from __future__ import annotations

import os
import stat
from _socket import AF_UNIX, SHUT_RD
from _socket import socket as raw_socket

from .._unix import remove_stale
from ..protocol import VCHAN_BASE_PORT
from ._errors import VchanError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Final

DEFAULT_SOCKET_DIR: Final = "/var/run/vchan"


def socket_name(server_domain: int, client_domain: int, port: int) -> str:
    return f"vchan.{server_domain}.{client_domain}.{port}.sock"


def server_path(socket_dir: str, server_domain: int, client_domain: int, port: int) -> str:
    """Where the server of (server_domain, client_domain, port) offers it."""
    return os.path.join(socket_dir, socket_name(server_domain, client_domain, port))


def local_socket_dir(explicit: str | None = None) -> str:
    """The shared vchan directory: ``explicit``, else ``$VCHAN_SOCKET_DIR``, else the default."""
    return explicit or os.environ.get("VCHAN_SOCKET_DIR", DEFAULT_SOCKET_DIR)


def local_own_domain(explicit: int | None = None) -> int:
    """This domain's id: ``explicit``, else ``$VCHAN_DOMAIN`` (default 0)."""
    if explicit is not None:
        return explicit
    raw = os.environ.get("VCHAN_DOMAIN", "0")
    try:
        return int(raw)
    except ValueError:
        raise VchanError(f"VCHAN_DOMAIN={raw!r} is not a domain id") from None


#: Beside a vchan's name: its server withdrew the offer without a client.
WITHDRAWN_SUFFIX: Final = ".withdrawn"

#: A file's identity: (device, inode).
FileId = tuple[int, int]


def withdrawn_marker(path: str) -> str:
    return path + WITHDRAWN_SUFFIX


def ends_for_good(port: int) -> bool:
    """Whether a withdrawn or dead offer on ``port`` is final (see the module's docstring)."""
    return port != VCHAN_BASE_PORT


def _file_id(path: str) -> FileId | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def socket_id(path: str) -> FileId | None:
    """The identity of the socket at ``path`` (None if there is none, or something else)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISSOCK(info.st_mode) else None


def _private_name(path: str) -> str:
    """An unused name beside ``path``, shorter than any vchan's (so a socket fits)."""
    return os.path.join(os.path.dirname(path), f".v{os.urandom(6).hex()}")


def remove_if_same(path: str, file_id: FileId) -> bool:
    """Remove ``path`` if it still names the file ``file_id``; whether it did.

    A file that took the name meanwhile (a new server's offer) is never
    removed: the name is moved aside in one step, and what was moved is put
    back unless it is the file we meant. While it is aside (microseconds) the
    name is missing, which a polling client simply retries.
    """
    aside = _private_name(path)
    try:
        os.rename(path, aside)
    except OSError:  # gone already, or not ours to move
        return False
    if _file_id(aside) == file_id:
        os.unlink(aside)
        return True
    try:
        os.rename(aside, path)
    except OSError:
        pass
    return False


def mark_withdrawn(path: str) -> bool:
    """Leave the withdrawn marker of ``path``; whether we made it.

    Only ever a new regular file (``O_EXCL``, ``O_NOFOLLOW``): whatever is
    there already, a symlink included, is left alone.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        os.close(os.open(withdrawn_marker(path), flags, 0o600))
    except OSError:
        # Marked already, or no room: a client still to come then waits out
        # its timeout, as it did before markers existed.
        return False
    return True


def forget_withdrawals(socket_dir: str, first: int, second: int, port: int) -> None:
    """Remove the withdrawn markers of both vchans between ``first`` and ``second`` on
    ``port`` (either may be the server): garbage once the port's call is over, and
    wrong for the next call that gets the port."""
    for server, client in ((first, second), (second, first)):
        remove_stale(withdrawn_marker(server_path(socket_dir, server, client, port)),
                     stat.S_ISREG)


def consume_withdrawn(path: str) -> bool:
    """Whether ``path`` carries a withdrawn marker; removes it, so it serves one client."""
    marker = withdrawn_marker(path)
    try:
        if not stat.S_ISREG(os.lstat(marker).st_mode):
            return False
        os.unlink(marker)
    except FileNotFoundError:
        return False  # none, or a new offer removed it: poll on
    except OSError:
        pass  # there, but not ours to remove: it still says what it says
    return True


def _drain_backlog(raw: raw_socket) -> bool:
    """Close the connections waiting in a listening socket's queue; whether there were any."""
    raw.setblocking(False)
    found = False
    while True:
        try:
            # The C socket's accept (socket.socket.accept wraps it); typeshed omits it.
            fd, _ = raw._accept()  # type: ignore[attr-defined]
        except OSError:  # BlockingIOError once empty
            return found
        os.close(fd)
        found = True


class Offer:
    """A vchan offered under its name: a listening unix socket (see the module's docstring).

    Bound at a private name, listening, and renamed to the vchan's name only
    then, so that a client never finds the name refusing while we live.
    Raises :class:`VchanError` if the name is taken by something that is not
    a socket (never replaced), or the socket cannot be made.
    """

    def __init__(self, path: str, kind: int, *, backlog: int, port: int,
                 make: Callable[[int, int], raw_socket] = raw_socket) -> None:
        self.path = path
        self._ends_for_good = ends_for_good(port)
        raw = make(AF_UNIX, kind)
        try:
            self._file_id = self._bind_in_place(raw, backlog)
        except BaseException as exc:
            raw.close()
            if isinstance(exc, OSError):
                raise VchanError(f"cannot offer vchan at {path}: {exc.strerror or exc}") from exc
            raise
        #: The listening socket, to accept the client on.
        self.raw = raw
        self._withdrawn = False

    def _bind_in_place(self, raw: raw_socket, backlog: int) -> FileId:
        if os.path.lexists(self.path) and socket_id(self.path) is None:
            raise VchanError(f"cannot offer vchan at {self.path}: it exists and is not a socket")
        # Before the name appears, so that no client of ours takes it for this offer's.
        remove_stale(withdrawn_marker(self.path), stat.S_ISREG)
        staging = _private_name(self.path)
        raw.bind(staging)
        try:
            bound = os.lstat(staging)
            raw.listen(backlog)
            # Replaces a socket a dead server left, in one step.
            os.rename(staging, self.path)
        except BaseException:
            try:
                os.unlink(staging)
            except OSError:
                pass
            raise
        return bound.st_dev, bound.st_ino

    def withdraw(self, *, served: bool) -> None:
        """Take the name back and close the socket (idempotent).

        Unless ``served`` (a client was accepted), leave the withdrawn marker,
        so that a client still to come fails at once. Only while the name is
        still ours: a server that took it over since has a client of its own.
        """
        if self._withdrawn:
            return
        self._withdrawn = True
        try:
            if remove_if_same(self.path, self._file_id) and not served and self._ends_for_good:
                self._leave_marker()
        finally:
            self._close()

    def _close(self) -> None:
        self.raw.close()

    def _leave_marker(self) -> None:
        marked = mark_withdrawn(self.path)
        # A client that connected just before the name went is in our queue:
        # closing its connection tells it, and it will not look for a marker,
        # which would then wait for the next client of the name. A shut
        # listening socket refuses new connections, so none slips in after
        # the queue was found empty; such a refused client finds the marker.
        try:
            self.raw.shutdown(SHUT_RD)
        except OSError:
            pass
        if _drain_backlog(self.raw) and marked:
            remove_stale(withdrawn_marker(self.path), stat.S_ISREG)


