"""What the two local backends (socket, shm) and the client side of all three share.

The local backends name a vchan after upstream's socket libvchan,
``vchan.<server>.<client>.<port>.sock`` in ``$VCHAN_SOCKET_DIR``, and learn
their own domain id from ``$VCHAN_DOMAIN``. Every client polls until the
server has offered the vchan, backing off as upstream's client does.

Both local backends offer a vchan as a listening unix socket under its name
(:class:`Offer`), and their clients tell its states apart the same way
(:class:`Rendezvous`):

* **Not offered yet**: no socket under the name. The client polls.
* **Withdrawn**: a server that gives up without having got its client
  (accept timeout, cancellation, close) leaves a marker beside the name,
  ``<name>.withdrawn``. A client that finds it removes it and fails at once
  (:class:`VchanWithdrawn`): its caller is gone, and waiting out its timeout
  would only keep the call's data port taken. A new offer of the name removes
  the marker before it appears.
* **Dead**: a server killed outright leaves its socket behind, which refuses
  connections. Ours bind at a private name, listen, and only then rename the
  socket to the vchan's name, so a live server of ours never refuses; a
  foreign one (upstream's socket libvchan) binds the name itself and listens
  a moment later, so one refusal is not proof. A client refused twice, on
  separate attempts, by the same socket takes the server for dead: it removes
  that socket (never one that replaced it) and fails at once.

What this does not guarantee:

* A marker that no client consumed (its client died, or gave up before the
  server did) stays until the name is offered again. Meanwhile the first
  client of a later vchan of the same name (a port used again) that looks
  before its own server has offered fails at once, wrongly.
* A foreign server stopped between its bind and its listen for longer than
  a client's retry interval is taken for dead; so is one that, in that
  window, replaced the dead socket by unlinking it and binding anew if its
  socket got the same inode number. (Ours cannot: their socket exists
  before the rename frees the old one.)

The control vchan (:data:`VCHAN_BASE_PORT`) is exempt from all this: its
server offers it again after every loss and its client waits for the next
offer, so for it nothing is final.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar, final

import trio

from .._sockets import remove_stale
from ..protocol import VCHAN_BASE_PORT
from ._interface import VchanBackend, VchanConnectTimeout, VchanError, VchanWithdrawn

DEFAULT_SOCKET_DIR: Final = "/var/run/vchan"
# Upstream's client polls every 100 ms; we start faster and back off to that.
RETRY_FIRST: Final = 0.005
RETRY_MAX: Final = 0.1

T = TypeVar("T")


def socket_name(server_domain: int, client_domain: int, port: int) -> str:
    return f"vchan.{server_domain}.{client_domain}.{port}.sock"


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


def _socket_id(path: str) -> FileId | None:
    """The identity of the socket at ``path`` (None if there is none, or something else)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISSOCK(info.st_mode) else None


def _private_name(path: str) -> str:
    """An unused name beside ``path``, shorter than any vchan's (so a socket fits)."""
    return os.path.join(os.path.dirname(path), f".v{secrets.token_hex(6)}")


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
    with contextlib.suppress(OSError):
        os.rename(aside, path)
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


def _drain_backlog(raw: socket.socket) -> bool:
    """Close the connections waiting in a listening socket's queue; whether there were any."""
    found = False
    while True:
        try:
            conn, _ = raw.accept()
        except OSError:  # BlockingIOError once empty (trio made it non-blocking)
            return found
        conn.close()
        found = True


@final
class Offer:
    """A vchan offered under its name: a listening unix socket (see the module's docstring).

    Bound at a private name, listening, and renamed to the vchan's name only
    then, so that a client never finds the name refusing while we live.
    Raises :class:`VchanError` if the name is taken by something that is not
    a socket (never replaced), or the socket cannot be made.
    """

    def __init__(self, path: str, kind: int, *, backlog: int, port: int) -> None:
        self.path = path
        self._ends_for_good = ends_for_good(port)
        raw = socket.socket(socket.AF_UNIX, kind)
        try:
            self._file_id = self._bind_in_place(raw, backlog)
        except BaseException as exc:
            raw.close()
            if isinstance(exc, OSError):
                raise VchanError(f"cannot offer vchan at {path}: {exc.strerror or exc}") from exc
            raise
        self._raw = raw
        #: The listening socket, to accept the client on.
        self.socket = trio.socket.from_stdlib_socket(raw)
        self._withdrawn = False

    def _bind_in_place(self, raw: socket.socket, backlog: int) -> FileId:
        if os.path.lexists(self.path) and _socket_id(self.path) is None:
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
            with contextlib.suppress(OSError):
                os.unlink(staging)
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
            self.socket.close()

    def _leave_marker(self) -> None:
        marked = mark_withdrawn(self.path)
        # A client that connected just before the name went is in our queue:
        # closing its connection tells it, and it will not look for a marker,
        # which would then wait for the next client of the name. A shut
        # listening socket refuses new connections, so none slips in after
        # the queue was found empty; such a refused client finds the marker.
        with contextlib.suppress(OSError):
            self._raw.shutdown(socket.SHUT_RD)
        if _drain_backlog(self._raw) and marked:
            remove_stale(withdrawn_marker(self.path), stat.S_ISREG)


@final
class Rendezvous:
    """One client's attempts at a vchan's offer (see the module's docstring)."""

    def __init__(self, path: str, port: int) -> None:
        self.path = path
        self._ends_for_good = ends_for_good(port)
        self._refused_by: FileId | None = None

    async def connect(self, sock: trio.socket.SocketType) -> bool:
        """Connect ``sock`` to the offer: True if connected, False if not offered yet.

        Raises :class:`VchanWithdrawn` when the server withdrew or is dead;
        the other errors of ``connect`` propagate (:class:`OSError`).
        """
        offered = _socket_id(self.path)
        try:
            await sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            refused = isinstance(exc, ConnectionRefusedError)
        else:
            return True
        # Out of the except block: our errors are not "during" the connect's.
        if not refused:
            self._fail_if_withdrawn()
        elif offered is not None:
            self._fail_if_dead(offered)
        return False

    def _fail_if_withdrawn(self) -> None:
        if self._ends_for_good and consume_withdrawn(self.path):
            raise VchanWithdrawn(
                f"the server withdrew its offer of vchan {self.path} "
                "(its caller gave up or went away)")

    def _fail_if_dead(self, offered: FileId) -> None:
        if not self._ends_for_good:
            return
        if self._refused_by != offered:
            # Perhaps a foreign server between its bind and its listen: ask again.
            self._refused_by = offered
            return
        remove_if_same(self.path, offered)
        consume_withdrawn(self.path)  # one killed while withdrawing may have left it
        raise VchanWithdrawn(
            f"the server of vchan {self.path} is gone: its socket refuses connections "
            "(it was killed?)")


async def poll_until_offered(attempt: Callable[[], Awaitable[T | None]], *, timeout: float,
                             what: str) -> T:
    """Call ``attempt`` until it returns the vchan (``None``: not offered yet).

    Raises :class:`VchanConnectTimeout` after ``timeout`` seconds (0 = never).
    """
    delay = RETRY_FIRST
    try:
        with trio.fail_after(timeout or float("inf")):
            while True:
                result = await attempt()
                if result is not None:
                    return result
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
    except trio.TooSlowError:
        raise VchanConnectTimeout(f"no vchan offered by {what} within {timeout:g}s") from None


class LocalBackend(VchanBackend):
    """A backend whose vchans are named in a shared directory."""

    def __init__(
        self,
        socket_dir: str | None = None,
        own_domain: int | None = None,
        *,
        send_finish: float = 2.0,
    ) -> None:
        self.socket_dir = socket_dir or os.environ.get("VCHAN_SOCKET_DIR", DEFAULT_SOCKET_DIR)
        if own_domain is None:
            raw = os.environ.get("VCHAN_DOMAIN", "0")
            try:
                own_domain = int(raw)
            except ValueError:
                raise VchanError(f"VCHAN_DOMAIN={raw!r} is not a domain id") from None
        self.own_domain = own_domain
        self._send_finish = send_finish

    def server_path(self, peer_domain: int, port: int) -> str:
        return os.path.join(self.socket_dir, socket_name(self.own_domain, peer_domain, port))

    def client_path(self, peer_domain: int, port: int) -> str:
        return os.path.join(self.socket_dir, socket_name(peer_domain, self.own_domain, port))
