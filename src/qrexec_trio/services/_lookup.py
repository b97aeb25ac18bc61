"""Finding a service handler (wire-protocol.md §12).

For each directory of the service path, ``SVC+ARG`` is looked up; only if no
directory has it, ``SVC``. A handler is an executable file, a unix socket (a
socket service) or a symlink to ``/dev/tcp[/HOST[/PORT]]`` (a TCP service:
the link is read, never followed, as no such file exists); anything else is a
problem (exit 125), and no handler at all is "not found" (exit 127).
"""

from __future__ import annotations

import errno
import os
import stat

from .._errors import QrexecError

# Light enum and record, typing only for type checkers: the multiplexer imports
# this module on every call (issue 14).
from .._light import Enum, frozen_record
from ..protocol import MAX_SERVICE_BASENAME_LEN, ExitStatus

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Final

    from ..protocol import RpcCall

DEFAULT_SERVICE_PATH: Final = "/run/qubes-rpc:/usr/local/etc/qubes-rpc:/etc/qubes-rpc"


class LaunchError(QrexecError):
    """A command cannot be started; ``status`` is the exit code to report."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ServiceKind(Enum):
    EXECUTABLE = "executable"
    SOCKET = "socket"
    #: A symlink to ``/dev/tcp``, ``/dev/tcp/HOST`` or ``/dev/tcp/HOST/PORT``.
    TCP = "tcp"
    #: An R2-style handler: a non-executable file run with /bin/sh (multiplexer only).
    SCRIPT = "script"


@frozen_record
class FoundService:
    path: str
    kind: ServiceKind
    #: TCP services: the symlink's target (``/dev/tcp...``).
    link: str | None = None


#: The prefix a symlink's target has when the service is a TCP connection.
DEV_TCP: Final = "/dev/tcp"


def _tcp_link(path: str) -> str | None:
    """The target of ``path`` if it is a symlink to ``/dev/tcp[/...]``, else ``None``."""
    try:
        target = os.readlink(path)
    except OSError:
        return None  # not a symlink (or gone): the ordinary stat() decides
    if target == DEV_TCP or target.startswith(DEV_TCP + "/"):
        return target
    return None


def _numeric_host(host: str, service: str) -> str:
    """``host`` as a numeric IPv4 or IPv6 address (``[v6]`` accepted); else 125."""
    import ipaddress  # noqa: PLC0415 (TCP services only: kept off the multiplexer's start-up)

    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        raise LaunchError(
            ExitStatus.PROBLEM, f"invalid host {host!r} for TCP service {service}"
        ) from None
    if bare is not host and address.version != 6:
        raise LaunchError(
            ExitStatus.PROBLEM, f"invalid host {host!r} for TCP service {service}"
        )
    return bare


def _port(text: str, service: str) -> int:
    """A decimal port, 1 to 65535, without leading zeros (as the reference checks)."""
    if not (text.isascii() and text.isdigit()) or text[0] == "0" or int(text) > 65535:
        raise LaunchError(ExitStatus.PROBLEM, f"invalid port {text!r} for TCP service {service}")
    return int(text)


def tcp_address(link: str, argument: str | None) -> tuple[str, int]:
    """Host and port of a TCP service from its symlink target and the call's argument.

    * ``/dev/tcp/HOST/PORT``: the argument must be empty;
    * ``/dev/tcp/HOST``: the argument is the port;
    * ``/dev/tcp``: the argument is ``HOST+PORT``, split at its last ``+``,
      with ``:`` of an IPv6 host written as ``+`` (``_`` is refused).

    The host is a numeric IPv4 or IPv6 address (an IPv6 one may be written
    in brackets in the link). Anything else raises :class:`LaunchError` (125).
    """
    rest = link[len(DEV_TCP):]
    if rest == "/":
        raise LaunchError(ExitStatus.PROBLEM, f"{link} not followed by host")
    host: str | None = None
    port: str | None = None
    if rest:
        host, slash, tail = rest[1:].partition("/")
        if slash:
            port = tail
    where = DEV_TCP + (f"/{host}" if host is not None else "")
    if port is not None:
        if argument:
            raise LaunchError(
                ExitStatus.PROBLEM, f"Unexpected argument {argument} to service {where}"
            )
    elif not argument:
        raise LaunchError(
            ExitStatus.PROBLEM, f"No or empty argument provided, cannot connect to {where}"
        )
    elif host is None:
        encoded, plus, port = argument.rpartition("+")
        if not plus:
            raise LaunchError(
                ExitStatus.PROBLEM, f"No port provided, cannot connect to {argument}"
            )
        if "_" in encoded:
            raise LaunchError(
                ExitStatus.PROBLEM, f"Underscore not allowed in hostname {encoded}"
            )
        host = encoded.replace("+", ":")
    else:
        port = argument
    assert host is not None and port is not None
    return _numeric_host(host, where), _port(port, where)


def service_path(environ: Mapping[str, str] | None = None) -> list[str]:
    """The service directories, from ``QREXEC_SERVICE_PATH`` or the default."""
    env = os.environ if environ is None else environ
    raw = env.get("QREXEC_SERVICE_PATH") or DEFAULT_SERVICE_PATH
    return [d for d in raw.split(":") if d]


def _usable_name(name: str) -> bool:
    # A name is one path component: it must not climb out of the service directory.
    return (
        bool(name)
        and "/" not in name
        and "\0" not in name
        and name not in (".", "..")
        and len(name.encode("utf-8", "surrogateescape")) <= MAX_SERVICE_BASENAME_LEN
    )


def find_service(
    call: RpcCall, directories: Sequence[str], *, allow_scripts: bool = False
) -> FoundService:
    """The handler for ``call``; raises :class:`LaunchError` (127 or 125) otherwise.

    With ``allow_scripts`` (the multiplexer, as in R2), a regular file without
    the x bit is a handler too, to be run with ``/bin/sh``.
    """
    for name in call.lookup_names:
        if not _usable_name(name):
            continue
        for directory in directories:
            path = os.path.join(directory, name)
            link = _tcp_link(path)
            if link is not None:
                return FoundService(path, ServiceKind.TCP, link)
            try:
                info = os.stat(path)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue  # absent here (a dangling symlink counts as absent)
                raise LaunchError(
                    ExitStatus.PROBLEM, f"cannot stat {path}: {exc.strerror}"
                ) from exc
            if stat.S_ISSOCK(info.st_mode):
                return FoundService(path, ServiceKind.SOCKET)
            if stat.S_ISREG(info.st_mode) and os.access(path, os.X_OK):
                return FoundService(path, ServiceKind.EXECUTABLE)
            if stat.S_ISREG(info.st_mode) and allow_scripts:
                return FoundService(path, ServiceKind.SCRIPT)
            raise LaunchError(
                ExitStatus.PROBLEM, f"service handler {path} is not executable nor a socket"
            )
    raise LaunchError(
        ExitStatus.SERVICE_NOT_FOUND,
        f"service {call.descriptor!r} not found in {list(directories)}",
    )
