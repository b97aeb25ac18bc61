"""What the two local backends (socket, shm) and the client side of all three share.

The local backends name a vchan after upstream's socket libvchan,
``vchan.<server>.<client>.<port>.sock`` in ``$VCHAN_SOCKET_DIR``, and learn
their own domain id from ``$VCHAN_DOMAIN``. Every client polls until the
server has offered the vchan, backing off as upstream's client does.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import trio

from ._interface import VchanBackend, VchanConnectTimeout, VchanError

DEFAULT_SOCKET_DIR: Final = "/var/run/vchan"
# Upstream's client polls every 100 ms; we start faster and back off to that.
RETRY_FIRST: Final = 0.005
RETRY_MAX: Final = 0.1

T = TypeVar("T")


def socket_name(server_domain: int, client_domain: int, port: int) -> str:
    return f"vchan.{server_domain}.{client_domain}.{port}.sock"


def claim_socket_path(path: str) -> None:
    """Make room for our socket: replace a stale socket, never anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise VchanError(f"cannot offer vchan at {path}: it exists and is not a socket")
    os.unlink(path)




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
