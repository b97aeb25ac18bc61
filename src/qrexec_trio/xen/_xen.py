"""The Xen vchan backend: libxenvchan through cffi, as one :class:`RingVchan`.

Names follow the Qubes ``libvchan`` wrapper, so that we talk to upstream
qrexec programs: a server in domain S offering port P to domain C keeps its
offer (``ring-ref``, ``event-channel``) in xenstore at
``/local/domain/<S>/data/vchan/<C>/<P>`` (libxenvchan is given the relative
path ``data/vchan/<C>/<P>``); the client reads it from there. Once the client
is in, the server withdraws the offer so that no second client finds it.

Everything runs non-blocking (``blocking = 0``); the event-channel fd is the
trio wait point and :class:`RingVchan` is the only one that waits on it.
The set-up calls (``*_init``, the xenstore reads) are short synchronous
round trips to xenstored, as in the C tools.

The binding itself (driver, offer, client open) is :mod:`._xen_driver`,
which has no trio: the clients' blocking driver serves data vchans through
it too. The extension is optional: it is built only where libxenvchan.h
existed at install time. Importing this module never fails;
:func:`xen_available` says whether the binding is there and, if not, why.
"""

from __future__ import annotations

from typing import final

import trio

from ._interface import Vchan, VchanBackend, VchanConnectTimeout, VchanError, VchanListener
from ._local import poll_until_offered
from ._ring import RingVchan
from ._xen_driver import (
    XenDriver,
    _check_domain,
    _check_port,
    _format_path,
    _require_binding,
    check_server_request,
    offer_path,
    open_server,
    own_domain_id,
    try_open_client,
    xen_available,
    xenstore_has,
)

# The binding's names that users of the backend (and its tests) take from here.
__all__ = ["XenBackend", "XenDriver", "XenVchanListener", "_format_path", "offer_path",
           "open_server", "own_domain_id", "try_open_client", "xen_available", "xenstore_has"]


@final
class XenVchanListener(VchanListener):
    def __init__(self, driver: XenDriver, peer_domain: int, port: int,
                 send_finish: float) -> None:
        self.peer_domain = peer_domain
        self.port = port
        self._driver = driver
        self._vchan: RingVchan | None = RingVchan(driver, peer_domain, port,
                                                  send_finish=send_finish)

    async def accept(self, timeout: float) -> Vchan:
        vchan = self._vchan
        if vchan is None:
            raise trio.ClosedResourceError("vchan listener is closed")
        accepted = False
        try:
            try:
                await vchan.wait_connected(timeout)
            except trio.TooSlowError:
                raise VchanConnectTimeout(
                    f"domain {self.peer_domain} did not connect to vchan port {self.port} "
                    f"within {timeout:g}s"
                ) from None
            # One client per vchan: take the offer out of xenstore. If that
            # fails, the close of this vchan still removes it.
            self._driver.withdraw_offer()
            accepted = True
            return vchan
        finally:
            self._vchan = None  # spent either way
            if not accepted:
                with trio.CancelScope(shield=True):
                    await vchan.aclose()

    async def aclose(self) -> None:
        vchan, self._vchan = self._vchan, None
        if vchan is not None:
            await vchan.aclose()  # libxenvchan_close removes the offer
        else:
            await trio.lowlevel.checkpoint()


@final
class XenBackend(VchanBackend):
    """vchans between Xen domains, through libxenvchan.

    ``allow_loopback`` lets both ends live in this domain (a test on a single
    Xen domain); qrexec never needs that, and the Qubes wrapper refuses it.
    """

    name = "xen"

    def __init__(self, own_domain: int | None = None, *, send_finish: float = 2.0,
                 allow_loopback: bool = False) -> None:
        _require_binding()
        if own_domain is None:
            own_domain = own_domain_id()
        _check_domain("own domain", own_domain)
        self.own_domain = own_domain
        self._send_finish = send_finish
        self._allow_loopback = allow_loopback

    def _check(self, peer_domain: int, port: int) -> None:
        _check_domain("peer domain", peer_domain)
        _check_port(port)
        if peer_domain == self.own_domain and not self._allow_loopback:
            raise VchanError(
                f"vchan port {port}: domain {peer_domain} is this domain; a Xen vchan "
                "connects two different domains (as in Qubes, loopback is refused)"
            )

    def listen(
        self, peer_domain: int, port: int, *, read_min: int = 65536, write_min: int = 65536
    ) -> VchanListener:
        self._check(peer_domain, port)
        check_server_request(peer_domain, port, read_min, write_min)
        driver = open_server(peer_domain, port, read_min, write_min)
        return XenVchanListener(driver, peer_domain, port, self._send_finish)

    async def connect(self, peer_domain: int, port: int, *, timeout: float) -> Vchan:
        self._check(peer_domain, port)
        async def attempt() -> XenDriver | None:
            await trio.lowlevel.checkpoint()
            return try_open_client(peer_domain, self.own_domain, port)

        what = (f"domain {peer_domain} on port {port} "
                f"({offer_path(peer_domain, self.own_domain, port)})")
        driver = await poll_until_offered(attempt, timeout=timeout, what=what)
        # No checkpoint between the open and here: the driver cannot leak.
        return RingVchan(driver, peer_domain, port, send_finish=self._send_finish)

