"""A qubesd-like admin socket in front of any ``Domains``.

The local world runs this so that its daemons make their DispVMs exactly as
on Qubes, through :class:`QubesdDomains`. It answers the calls that client
makes, nothing else:

* ``admin.vm.List`` (dest ``dom0``: every domain; else only dest)
* ``admin.vm.property.Get+{default_dispvm,template_for_dispvms,default_user,xid}``
* ``admin.vm.tag.List``
* ``admin.vm.Start``, ``admin.vm.Kill``
* ``admin.vm.CreateDisposable`` (dest ``dom0``: the caller's ``default_dispvm``)
* ``internal.GetSystemInfo`` (dest ``dom0``): every domain's facts for the policy,
  in qubesd's JSON, from the live listing (DispVMs included, ``power_state`` as
  the domain runs or not). qubesd serves it on a socket of its own; here one
  socket serves all.

Each connection is one task: read the request to EOF (bounded in size and
time), answer, close. Whatever a connection does, the server goes on serving
the others: a malformed request gets an error reply (``ProtocolError``), an
unknown method ``QubesNotImplementedError``, a failed operation its
``DomainsError`` kind.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import structlog
import trio

from .._logging import get_logger
from .._sockets import listening_socket, serve_socket
from ._admin import (
    MAX_REPLY_SIZE,
    MAX_REQUEST_SIZE,
    MAX_SYSTEM_INFO_SIZE,
    AdminProtocolError,
    AdminRequest,
    ListEntry,
    PropertyValue,
    decode_request,
    encode_property,
    encode_reply_error,
    encode_reply_ok,
    encode_system_info,
    encode_tags,
    encode_vm_list,
    is_domain_name,
)
from ._interface import Domain, Domains, DomainsError

log = get_logger(__name__)

#: The reply kind for a request that breaks the protocol (qubesd's own name for it).
REQUEST_ERROR: Final = "ProtocolError"
NOT_IMPLEMENTED: Final = "QubesNotImplementedError"
NOT_FOUND: Final = "QubesVMNotFoundError"
NO_SUCH_PROPERTY: Final = "QubesNoSuchPropertyError"

_SOCKET_MODE: Final = 0o660


class AdminCallRefused(Exception):
    """A call answered with an error reply of ``kind`` (a qubesd exception name)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


#: A method of our own: the request in, the reply's value out (or AdminCallRefused).
AdminMethod = Callable[[AdminRequest], Awaitable[bytes]]


async def serve_admin(
    domains: Domains | None,
    socket_path: str,
    *,
    methods: Mapping[str, AdminMethod] | None = None,
    request_timeout: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``started`` once the socket accepts connections.

    ``domains`` answers qubesd's calls (``None``: none of them); ``methods``
    adds calls of our own (a control socket serves only those).
    """
    numbers = itertools.count(1)
    table = _Table(domains, dict(methods or {}))

    async def handle(stream: trio.SocketStream) -> None:
        with structlog.contextvars.bound_contextvars(admin_conn=next(numbers)):
            await _serve_connection(table, stream, request_timeout)


    with listening_socket(socket_path, mode=_SOCKET_MODE) as sock:
        log.info("serving admin calls", socket=socket_path)
        async with trio.open_nursery() as nursery:
            task_status.started()
            await serve_socket(sock, handle, nursery)


@dataclass(frozen=True)
class _Table:
    domains: Domains | None
    methods: dict[str, AdminMethod]

    def find(self, method: str) -> AdminMethod | None:
        if method in self.methods:
            return self.methods[method]
        handler = _HANDLERS.get(method)
        domains = self.domains
        if handler is None or domains is None:
            return None
        return functools.partial(handler, domains)


async def _serve_connection(table: _Table, stream: trio.SocketStream,
                            request_timeout: float) -> None:
    async with stream:
        unread = False
        try:
            with trio.fail_after(request_timeout):
                data = await _read_request(stream)
        except trio.TooSlowError:
            log.warning("admin client sent no complete request in time")
            reply = encode_reply_error(REQUEST_ERROR, "request not complete in time")
        except AdminCallRefused as exc:
            log.warning("admin request refused", error=exc.message)
            reply = encode_reply_error(exc.kind, exc.message)
            unread = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("admin client went away")
            return
        else:
            reply = await _answer(table, data)
        try:
            with trio.fail_after(request_timeout):
                await stream.send_all(reply)
                if unread:
                    # Closing with unread input resets the connection, and the
                    # reset can overtake the reply: let the client finish first.
                    await stream.send_eof()
                    while await stream.receive_some(1 << 16):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            log.debug("admin client did not take its reply")


async def _read_request(stream: trio.SocketStream) -> bytes:
    data = bytearray()
    while True:
        chunk = await stream.receive_some(MAX_REQUEST_SIZE + 1)
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > MAX_REQUEST_SIZE:
            raise AdminCallRefused(REQUEST_ERROR, f"request longer than {MAX_REQUEST_SIZE} bytes")


async def _answer(table: _Table, data: bytes) -> bytes:
    """The reply to one whole request; never raises (but Cancelled)."""
    try:
        request = decode_request(data)
    except AdminProtocolError as exc:
        log.warning("malformed admin request", field=exc.field, rule=exc.rule)
        return encode_reply_error(REQUEST_ERROR, exc.message)
    with structlog.contextvars.bound_contextvars(call=request.call, dest=request.dest):
        handler = table.find(request.method)
        try:
            if handler is None:
                raise AdminCallRefused(NOT_IMPLEMENTED, f"no method {request.method}")
            value = await handler(request)
            reply = encode_reply_ok(value, max_size=_REPLY_LIMITS.get(request.method,
                                                                      MAX_REPLY_SIZE))
        except AdminCallRefused as exc:
            log.info("admin call refused", kind=exc.kind, error=exc.message)
            return encode_reply_error(exc.kind, exc.message)
        except DomainsError as exc:
            log.info("admin call failed", kind=exc.kind, error=exc.message)
            return _error_reply(exc.kind, exc.message)
        except Exception:
            # A bug in a Domains implementation must not end the server.
            log.exception("admin call crashed")
            return encode_reply_error("QubesException", "internal error")
        # A listing is one call per domain and field: only changes are news.
        if request.method in _QUERIES:
            log.debug("admin call done")
        else:
            log.info("admin call done")
        return reply


def _error_reply(kind: str, message: str) -> bytes:
    try:
        return encode_reply_error(kind, message)
    except AdminProtocolError:
        # A Domains implementation made up a kind the wire cannot carry.
        return encode_reply_error("QubesException", f"{kind}: {message}")


# -- the calls -----------------------------------------------------------------------

_Handler = Callable[[Domains, AdminRequest], Awaitable[bytes]]


def _expect(request: AdminRequest, *, arg: bool = False, payload: bool = False) -> None:
    if request.arg and not arg:
        raise AdminCallRefused(REQUEST_ERROR, f"{request.method} takes no argument")
    if request.payload and not payload:
        raise AdminCallRefused(REQUEST_ERROR, f"{request.method} takes no payload")


def _dest_name(request: AdminRequest) -> str:
    if request.dest == "@adminvm":
        return "dom0"
    if request.dest_is_keyword:
        raise AdminCallRefused(NOT_FOUND, f"no domain for keyword {request.dest}")
    return request.dest


async def _find(domains: Domains, name: str) -> Domain:
    for domain in await domains.list():
        if domain.name == name:
            return domain
    raise AdminCallRefused(NOT_FOUND, f"no such domain: {name}")


def _list_entry(domain: Domain) -> ListEntry:
    return ListEntry(domain.name, domain.type, "Running" if domain.running else "Halted")


async def _vm_list(domains: Domains, request: AdminRequest) -> bytes:
    _expect(request)
    name = _dest_name(request)
    if name == "dom0":
        listing = await domains.list()
    else:
        listing = [await _find(domains, name)]
    return encode_vm_list(_list_entry(domain) for domain in listing)


_PROPERTIES: Final[dict[str, Callable[[Domain], PropertyValue]]] = {
    "default_dispvm": lambda d: PropertyValue("vm", d.default_dispvm or ""),
    "template_for_dispvms": lambda d: PropertyValue("bool", str(d.template_for_dispvms)),
    "default_user": lambda d: PropertyValue("str", d.default_user),
    "xid": lambda d: PropertyValue("int", str(-1 if d.domid is None else d.domid)),
}


async def _property_get(domains: Domains, request: AdminRequest) -> bytes:
    _expect(request, arg=True)
    getter = _PROPERTIES.get(request.arg)
    if getter is None:
        raise AdminCallRefused(NO_SUCH_PROPERTY, f"no property {request.arg!r}")
    return encode_property(getter(await _find(domains, _dest_name(request))))


async def _tag_list(domains: Domains, request: AdminRequest) -> bytes:
    _expect(request)
    return encode_tags((await _find(domains, _dest_name(request))).tags)


async def _start(domains: Domains, request: AdminRequest) -> bytes:
    _expect(request)
    await domains.start(_dest_name(request))
    return b""


async def _kill(domains: Domains, request: AdminRequest) -> bytes:
    _expect(request)
    await domains.kill(_dest_name(request))
    return b""


async def _create_disposable(domains: Domains, request: AdminRequest) -> bytes:
    _expect(request, payload=True)
    if request.payload:
        # The reference asks for ``uuid`` when it addresses domains by UUID;
        # our domains have names only.
        raise AdminCallRefused(NOT_IMPLEMENTED, "disposables are named, not addressed by UUID")
    template = _dest_name(request)
    if template == "dom0":
        # As qubesd: dom0 as destination means "the caller's default".
        source = await _find(domains, request.source)
        if source.default_dispvm is None:
            raise AdminCallRefused("QubesException", f"{source.name} has no default_dispvm")
        template = source.default_dispvm
    name = await domains.create_disposable(template)
    if not is_domain_name(name):
        raise AdminCallRefused("QubesException", f"made a disposable with a bad name: {name!r}")
    return name.encode("ascii")


async def _system_info(domains: Domains, request: AdminRequest) -> bytes:
    _expect(request)
    if _dest_name(request) != "dom0":
        # As qubesd: the call is addressed to the AdminVM.
        raise AdminCallRefused(REQUEST_ERROR, "expected destination to be AdminVM")
    return encode_system_info(await domains.list())


_QUERIES: Final = frozenset({"admin.vm.List", "admin.vm.property.Get", "admin.vm.tag.List",
                             "internal.GetSystemInfo"})
_REPLY_LIMITS: Final = {"internal.GetSystemInfo": MAX_SYSTEM_INFO_SIZE}

_HANDLERS: Final[dict[str, _Handler]] = {
    "admin.vm.List": _vm_list,
    "admin.vm.property.Get": _property_get,
    "admin.vm.tag.List": _tag_list,
    "admin.vm.Start": _start,
    "admin.vm.Kill": _kill,
    "admin.vm.CreateDisposable": _create_disposable,
    "internal.GetSystemInfo": _system_info,
}
