"""Finding a service handler (wire-protocol.md §12).

For each directory of the service path, ``SVC+ARG`` is looked up; only if no
directory has it, ``SVC``. A handler is an executable file or a unix socket
(a socket service); anything else is a problem (exit 125), and no handler at
all is "not found" (exit 127).
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from .._errors import QrexecError
from ..protocol import MAX_SERVICE_BASENAME_LEN, ExitStatus, RpcCall

DEFAULT_SERVICE_PATH: Final = "/run/qubes-rpc:/usr/local/etc/qubes-rpc:/etc/qubes-rpc"


class LaunchError(QrexecError):
    """A command cannot be started; ``status`` is the exit code to report."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ServiceKind(enum.Enum):
    EXECUTABLE = "executable"
    SOCKET = "socket"
    #: An R2-style handler: a non-executable file run with /bin/sh (multiplexer only).
    SCRIPT = "script"


@dataclass(frozen=True, slots=True)
class FoundService:
    path: str
    kind: ServiceKind


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
