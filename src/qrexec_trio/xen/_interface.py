"""The one async stream interface every vchan backend implements.

A vchan is a reliable, bidirectional byte stream between two domains, named by
(peer domain, port). One side is the server (it offers the channel), the other
the client. There is no half-close: closing either end ends both directions,
and the reader sees end-of-file once it has drained what was already sent.

Backends must keep two promises beyond :class:`trio.abc.Stream`:

* **Frames are never torn.** If :meth:`Vchan.send_all` is cancelled after it
  has sent part of its buffer, it finishes the rest in a shielded scope
  bounded by ``send_finish`` seconds and then lets the cancellation through;
  if that fails the vchan is closed. A reader therefore never sees half a
  message followed by another one.
* **A dead peer is end-of-file.** A peer that exits or is killed makes
  :meth:`Vchan.receive_some` return ``b""`` and :meth:`Vchan.send_all` raise
  :class:`trio.BrokenResourceError`.
"""

from __future__ import annotations

import abc

import trio

from ._errors import VchanConnectTimeout as VchanConnectTimeout  # noqa: PLC0414
from ._errors import VchanError as VchanError  # noqa: PLC0414
from ._errors import VchanWithdrawn as VchanWithdrawn  # noqa: PLC0414


class Vchan(trio.abc.Stream):
    """One connected vchan."""

    #: The domain at the other end.
    peer_domain: int
    #: The vchan port.
    port: int

    @abc.abstractmethod
    def buffer_space(self) -> int:
        """Bytes that can be sent now without waiting (the free ring space).

        The data pump sizes its chunks with this, as the reference does.
        """


class VchanListener(abc.ABC):
    """A vchan offered by the server side, waiting for its one client."""

    peer_domain: int
    port: int

    @abc.abstractmethod
    async def accept(self, timeout: float) -> Vchan:
        """Wait (at most ``timeout`` seconds; 0 = forever) for the client.

        Raises :class:`VchanConnectTimeout` on timeout. The listener is spent
        afterwards: a second client is refused.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Withdraw the offer (idempotent)."""

    async def __aenter__(self) -> VchanListener:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class VchanBackend(abc.ABC):
    """Makes vchans: the server side with :meth:`listen`, the client side with :meth:`connect`."""

    name: str
    #: This domain's id.
    own_domain: int

    @abc.abstractmethod
    def listen(
        self, peer_domain: int, port: int, *, read_min: int = 65536, write_min: int = 65536
    ) -> VchanListener:
        """Offer a vchan to ``peer_domain`` on ``port`` (returns at once)."""

    @abc.abstractmethod
    async def connect(self, peer_domain: int, port: int, *, timeout: float) -> Vchan:
        """Connect to the vchan ``peer_domain`` offers on ``port``.

        Waits for the offer to appear, at most ``timeout`` seconds (0 = forever);
        raises :class:`VchanConnectTimeout` on timeout, and
        :class:`VchanWithdrawn` at once where the backend can tell that the
        server gave up or died.
        """

    def forget_withdrawals(self, first: int, second: int, port: int) -> None:  # noqa: B027
        """Forget what servers of vchans between ``first`` and ``second`` on ``port``
        left for late clients (the local backends' withdrawn markers): the daemon
        that allocates ``port`` calls this when it hands the port out and when it
        frees it. Nothing to do for backends that leave nothing."""

    async def serve_one(
        self,
        peer_domain: int,
        port: int,
        *,
        timeout: float,
        read_min: int = 65536,
        write_min: int = 65536,
    ) -> Vchan:
        """:meth:`listen` and :meth:`VchanListener.accept` in one step."""
        async with self.listen(peer_domain, port, read_min=read_min, write_min=write_min) as lst:
            return await lst.accept(timeout)
