"""A client of a VM's qrexec-daemon (its ``qrexec.<name>`` socket): what every
driver of that exchange shares, plus the blocking driver of it.

The exchange (wire-protocol.md §7.1): the daemon sends HELLO, the client
answers with its own and one request (MSG_EXEC_CMDLINE, MSG_JUST_EXEC or
MSG_SERVICE_CONNECT); for the first two the daemon replies with the data
port to serve, or closes the socket to refuse. The socket stays open for the
whole call: the daemon closes it when the agent reports the call's end.

The trio driver is :func:`qrexec_trio.roles._connect.request_port`; the
short-lived ``qrexec-client`` uses :func:`request_port_blocking`. Light on
imports (no trio, no ``socket``), as the blocking driver needs.
"""

from __future__ import annotations

import errno
import os
import time

from .._errors import QrexecError
from .._unix import connect_blocking, recv_by
from ..protocol import (
    CLIENT_PROTOCOL_VERSION,
    Direction,
    Hello,
    MessageReader,
    PortAssigned,
    RemoteProtocolError,
    negotiate_version,
)
from ._io import feed

TYPE_CHECKING = False
if TYPE_CHECKING:
    from _socket import socket as raw_socket
    from collections.abc import Callable
    from typing import Final, TypeAlias, TypeVar

    from .._config import Timeouts
    from ..protocol import Event, ExecCmdline, JustExec, ServiceConnect

    S = TypeVar("S", bound=raw_socket)
    #: What a client asks a daemon for.
    DaemonRequest: TypeAlias = ExecCmdline | JustExec | ServiceConnect

#: Names that mean dom0 as a target.
DOM0_NAMES: Final = ("dom0", "@adminvm", "uuid:00000000-0000-0000-0000-000000000000")


class ConnectError(QrexecError):
    """The connection could not be built; the message says why."""


class TargetNotRunning(ConnectError):
    """The target's qrexec-daemon is not there."""


class RequestRefused(ConnectError):
    """The daemon closed the connection instead of answering (e.g. an unknown request id)."""


def daemon_socket_path(socket_dir: str, target: str) -> str:
    return os.path.join(socket_dir, f"qrexec.{target}")


def connect_failure(path: str, target: str, exc: OSError) -> ConnectError:
    """What a failed connect to ``target``'s daemon socket means."""
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        return TargetNotRunning(f"qrexec-daemon for {target!r} is not running ({path})")
    return ConnectError(f"cannot connect to {path}: {exc.strerror}")


def port_from_reply(reply: Event | None, request: DaemonRequest,
                    target: str) -> tuple[int, int]:
    """The (domain, port) of the daemon's reply to ``request``; raises if it refused."""
    if reply is None:
        raise RequestRefused(f"qrexec-daemon for {target!r} refused the request")
    # The reader lets nothing but PortAssigned through on this link.
    assert isinstance(reply, PortAssigned), reply
    if reply.request_type != request.msg_type:
        raise RemoteProtocolError(
            "reply.type", f"expected {request.msg_type.name}, got {reply.request_type.name}")
    return reply.connect_domain, reply.connect_port


# -- the blocking driver -----------------------------------------------------------


def _next_event(sock: raw_socket, reader: MessageReader, deadline: float) -> Event | None:
    """The next message on a blocking socket by ``deadline`` (None: closed between two)."""
    while (event := reader.next_event()) is None:
        if reader.at_clean_eof:
            return None
        try:
            feed(reader, recv_by(sock, 65536, deadline))
        except TimeoutError:
            raise TimeoutError("qrexec-daemon did not answer in time") from None
    return event


def request_port_blocking(socket_dir: str, target: str, request: DaemonRequest,
                          timeouts: Timeouts, make: Callable[[int, int], S]
                          ) -> tuple[S, int, int]:
    """Send one request to ``target``'s daemon; returns (socket, domid, port)."""
    path = daemon_socket_path(socket_dir, target)
    try:
        sock = connect_blocking(path, timeout=timeouts.handshake, make=make)
    except OSError as exc:
        raise connect_failure(path, target, exc) from exc
    try:
        deadline = time.monotonic() + timeouts.handshake
        reader = MessageReader(Direction.DAEMON_TO_CLIENT)
        hello = _next_event(sock, reader, deadline)
        if hello is None:
            raise RemoteProtocolError("hello", "peer closed before its HELLO")
        assert isinstance(hello, Hello)  # the reader lets nothing else through first
        reader.version = negotiate_version(CLIENT_PROTOCOL_VERSION, hello.version,
                                           CLIENT_PROTOCOL_VERSION)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(Hello(CLIENT_PROTOCOL_VERSION).encode() + request.encode())
        domain, port = port_from_reply(_next_event(sock, reader, deadline), request, target)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock, domain, port
