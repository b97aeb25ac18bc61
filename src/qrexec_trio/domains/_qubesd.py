"""``Domains`` on Qubes: admin calls to qubesd over its unix socket.

One connection per call, as the reference's ``qubesd_call``: connect, write
the request, shut down the write side, read the reply to EOF. Each call as a
whole (connect, write, read) is bounded by ``call_timeout``.

What a domain is made of (``admin.vm.List`` gives only name, class and state):

* ``admin.vm.property.Get+default_dispvm``  -> ``default=.. type=vm NAME`` (empty: none)
* ``admin.vm.property.Get+template_for_dispvms`` -> ``default=.. type=bool True|False``
* ``admin.vm.property.Get+default_user`` -> ``default=.. type=str USER``
* ``admin.vm.property.Get+xid`` -> ``default=.. type=int N`` (-1: not running);
  asked only when the state is not ``Halted``
* ``admin.vm.tag.List`` -> one tag a line

A property or tag call that qubesd answers with an error (dom0 has no
``default_user``, for one) leaves that field at the ``Domain`` default. A
reply that breaks the protocol, or no reply at all, fails the whole listing:
a half-understood qubesd is not one to guess about.

What the policy needs about every domain comes in one call instead,
``internal.GetSystemInfo`` (:meth:`QubesdDomains.get_system_info`), as the
reference's policy daemon asks it. qubesd serves the ``internal.*`` calls on
its *internal* socket (``/run/qubesd.internal.sock``), not on the admin one:
that call needs a client made with that path.
"""

from __future__ import annotations

import re
from typing import Any, Final

import trio

from .._config import Timeouts
from .._defaults import QUBESD_SOCKET
from .._logging import get_logger
from .._sockets import connect_unix
from ..protocol import is_qube_name
from ._admin import (
    COMMUNICATION_ERROR,
    MAX_REPLY_SIZE,
    MAX_SYSTEM_INFO_SIZE,
    PROTOCOL_ERROR,
    AdminProtocolError,
    ListEntry,
    PropertyValue,
    decode_property,
    decode_reply,
    decode_system_info,
    decode_tags,
    decode_vm_list,
    encode_request,
    is_domain_name,
)
from ._interface import Domain, DomainsError

log = get_logger(__name__)

DEFAULT_QUBESD_SOCKET: Final = QUBESD_SOCKET
#: qubesd's socket for dom0's own components (``internal.*`` calls).
DEFAULT_QUBESD_INTERNAL_SOCKET: Final = "/run/qubesd.internal.sock"
SYSTEM_INFO_CALL: Final = "internal.GetSystemInfo"

_XID: Final = re.compile(r"-?[0-9]{1,10}")
_USER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
# qubesd refuses to kill a domain that is not running; for us that is done.
_NOT_RUNNING: Final = "QubesVMNotStartedError"


class QubesdDomains:
    """The registry and lifecycle of domains as qubesd manages them."""

    def __init__(self, socket_path: str = DEFAULT_QUBESD_SOCKET, *,
                 timeouts: Timeouts | None = None, call_timeout: float | None = None) -> None:
        self.socket_path = socket_path
        self.timeouts = timeouts if timeouts is not None else Timeouts()
        self.call_timeout = (call_timeout if call_timeout is not None
                             else (timeouts or Timeouts()).admin_call)

    async def list(self) -> list[Domain]:
        listing = decode_vm_list(await self.call("admin.vm.List", "dom0"))
        # One domain after the other: a listing is rare, and qubesd serialises
        # most of it anyway.
        return [await self._describe(entry) for entry in listing]

    async def start(self, name: str) -> None:
        # qubesd answers once the domain runs and its qrexec daemon is
        # connected; it answers success for a domain that already runs.
        await self.call("admin.vm.Start", name)

    async def create_disposable(self, template: str) -> str:
        value = await self.call("admin.vm.CreateDisposable", template)
        try:
            name = value.decode("ascii")
        except UnicodeDecodeError:
            raise AdminProtocolError("CreateDisposable value", "not ASCII") from None
        if not is_domain_name(name):
            raise AdminProtocolError("CreateDisposable value", "not a qube name or uuid:<uuid>")
        return name

    async def kill(self, name: str) -> None:
        try:
            await self.call("admin.vm.Kill", name)
        except DomainsError as exc:
            if exc.kind != _NOT_RUNNING:
                raise
            log.debug("kill: domain was not running", domain=name)

    async def get_system_info(self) -> dict[str, Any]:
        """qubesd's facts about every domain, for the policy (decoded JSON).

        The request is ``internal.GetSystemInfo dom0 name dom0\\0`` (destination
        dom0, no argument, no payload); qubesd serves it on its internal socket.
        Checking the facts is the caller's (``system_info_from_json``).
        """
        value = await self.call(SYSTEM_INFO_CALL, "dom0", max_reply=MAX_SYSTEM_INFO_SIZE)
        return decode_system_info(value)

    async def call(self, method: str, dest: str, arg: str = "", payload: bytes = b"", *,
                   max_reply: int = MAX_REPLY_SIZE) -> bytes:
        """One admin call; its value, or DomainsError (qubesd's type as ``kind``).

        A reply longer than ``max_reply`` bytes breaks the protocol.
        """
        request = encode_request(method, dest, arg=arg, payload=payload)
        what = f"{method}+{arg}" if arg else method
        try:
            with trio.fail_after(self.call_timeout):
                raw = await self._exchange(request, what, max_reply)
        except trio.TooSlowError:
            raise DomainsError(
                COMMUNICATION_ERROR,
                f"{what} {dest}: no answer from {self.socket_path} "
                f"within {self.call_timeout:g} s",
            ) from None
        if not raw:
            raise DomainsError(
                COMMUNICATION_ERROR,
                f"{what} {dest}: {self.socket_path} closed the connection without answering",
            )
        try:
            return decode_reply(raw, max_size=max_reply)
        except DomainsError as exc:
            log.debug("admin call failed", call=what, dest=dest, kind=exc.kind,
                      error=exc.message)
            raise

    async def _exchange(self, request: bytes, what: str, max_reply: int) -> bytes:
        try:
            stream = await connect_unix(self.socket_path, timeout=self.call_timeout)
        except OSError as exc:
            raise DomainsError(
                COMMUNICATION_ERROR,
                f"{what}: cannot connect to {self.socket_path}: {exc.strerror or exc}",
            ) from exc
        async with stream:
            try:
                await stream.send_all(request)
                await stream.send_eof()
            except trio.BrokenResourceError:
                # qubesd may answer and close before reading everything (a
                # refusal): what it said is still ours to read.
                pass
            reply = bytearray()
            while True:
                try:
                    chunk = await stream.receive_some(1 << 16)
                except trio.BrokenResourceError as exc:
                    raise DomainsError(
                        COMMUNICATION_ERROR, f"{what}: connection to qubesd broken: {exc}"
                    ) from exc
                if not chunk:
                    return bytes(reply)
                reply += chunk
                if len(reply) > max_reply:
                    raise AdminProtocolError(f"{what} reply", f"longer than {max_reply} bytes")

    # -- one domain's details -------------------------------------------------------

    async def _describe(self, entry: ListEntry) -> Domain:
        base = Domain(name=entry.name, type=entry.klass)
        default_dispvm, for_dispvms = base.default_dispvm, base.template_for_dispvms
        default_user, domid, tags = base.default_user, base.domid, base.tags
        prop = await self._property(entry.name, "default_dispvm")
        if prop is not None:
            default_dispvm = _vm_value(prop, "default_dispvm")
        prop = await self._property(entry.name, "template_for_dispvms")
        if prop is not None:
            for_dispvms = _bool_value(prop, "template_for_dispvms")
        prop = await self._property(entry.name, "default_user")
        if prop is not None:
            default_user = _user_value(prop)
        if entry.state != "Halted":
            prop = await self._property(entry.name, "xid")
            if prop is not None:
                domid = _xid_value(prop)
        value = await self._refusable("admin.vm.tag.List", entry.name)
        if value is not None:
            tags = decode_tags(value)
        return Domain(name=entry.name, type=entry.klass, domid=domid, tags=tags,
                      default_user=default_user, default_dispvm=default_dispvm,
                      template_for_dispvms=for_dispvms)

    async def _property(self, name: str, prop: str) -> PropertyValue | None:
        value = await self._refusable("admin.vm.property.Get", name, prop)
        return None if value is None else decode_property(value)

    async def _refusable(self, method: str, name: str, arg: str = "") -> bytes | None:
        """The call's value, or None when qubesd refused it (the field keeps its default)."""
        try:
            return await self.call(method, name, arg)
        except DomainsError as exc:
            if exc.kind in (PROTOCOL_ERROR, COMMUNICATION_ERROR):
                raise
            return None


def _vm_value(prop: PropertyValue, name: str) -> str | None:
    if prop.value == "":
        return None
    if not is_qube_name(prop.value):
        raise AdminProtocolError(f"property {name}", "not a qube name")
    return prop.value


def _bool_value(prop: PropertyValue, name: str) -> bool:
    if prop.value not in ("True", "False"):
        raise AdminProtocolError(f"property {name}", "not True or False")
    return prop.value == "True"


def _user_value(prop: PropertyValue) -> str:
    if not _USER.fullmatch(prop.value):
        raise AdminProtocolError("property default_user", "not a user name")
    return prop.value


def _xid_value(prop: PropertyValue) -> int | None:
    if not _XID.fullmatch(prop.value):
        raise AdminProtocolError("property xid", "not an integer")
    xid = int(prop.value)
    if xid < -1:
        raise AdminProtocolError("property xid", "below -1")
    return None if xid == -1 else xid
