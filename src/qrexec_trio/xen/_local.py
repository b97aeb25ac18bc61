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
  a moment later, so one refusal is not proof. A client refused by the same
  socket on attempts at least :data:`DEAD_AFTER` apart takes the server for
  dead: it removes that socket (never one that replaced it) and fails.

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

import socket
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar, final

import trio

from . import _offer
from ._interface import VchanBackend, VchanConnectTimeout, VchanWithdrawn
from ._offer import (
    FileId,
    consume_withdrawn,
    ends_for_good,
    forget_withdrawals,
    local_own_domain,
    local_socket_dir,
    remove_if_same,
    server_path,
    socket_id,
)

# Upstream's client polls every 100 ms; we start faster and back off to that.
# A data vchan's client usually asks just before its server offers it (both
# learn the port from the same message), so the first retries are what a call
# waits for: short ones, doubling (0.5, 1, 2, 4 ms ...), cost a trivial call
# about 1 ms instead of 5.
RETRY_FIRST: Final = 0.0005
RETRY_MAX: Final = 0.1
#: A socket that refuses connections is taken for a dead server's only when it
#: has refused them for this long (upstream's client polls every 100 ms).
DEAD_AFTER: Final = 0.1

T = TypeVar("T")


@final
class Offer(_offer.Offer):
    """An offer whose client a trio task accepts (on :attr:`socket`)."""

    def __init__(self, path: str, kind: int, *, backlog: int, port: int) -> None:
        super().__init__(path, kind, backlog=backlog, port=port, make=socket.socket)
        assert isinstance(self.raw, socket.socket)
        #: The listening socket, to accept the client on.
        self.socket = trio.socket.from_stdlib_socket(self.raw)

    def _close(self) -> None:
        self.socket.close()


@final
class Rendezvous:
    """One client's attempts at a vchan's offer (see the module's docstring)."""

    def __init__(self, path: str, port: int) -> None:
        self.path = path
        self._ends_for_good = ends_for_good(port)
        self._refused_by: FileId | None = None
        self._first_refused = 0.0

    async def connect(self, sock: trio.socket.SocketType) -> bool:
        """Connect ``sock`` to the offer: True if connected, False if not offered yet.

        Raises :class:`VchanWithdrawn` when the server withdrew or is dead;
        the other errors of ``connect`` propagate (:class:`OSError`).
        """
        offered = socket_id(self.path)
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
        now = trio.current_time()
        if self._refused_by != offered:
            # Perhaps a foreign server between its bind and its listen, or about to
            # replace a dead predecessor's socket: ask again.
            self._refused_by = offered
            self._first_refused = now
            return
        if now - self._first_refused < DEAD_AFTER:
            # Our retries start sub-millisecond: two refusals that close together
            # prove nothing (a foreign server's unlink, bind and listen take a moment).
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
        self.socket_dir = local_socket_dir(socket_dir)
        self.own_domain = local_own_domain(own_domain)
        self._send_finish = send_finish

    def forget_withdrawals(self, first: int, second: int, port: int) -> None:
        forget_withdrawals(self.socket_dir, first, second, port)

    def server_path(self, peer_domain: int, port: int) -> str:
        return server_path(self.socket_dir, self.own_domain, peer_domain, port)

    def client_path(self, peer_domain: int, port: int) -> str:
        return server_path(self.socket_dir, peer_domain, self.own_domain, port)
