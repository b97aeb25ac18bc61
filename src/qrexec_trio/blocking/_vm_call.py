"""Asking the agent for a call, as ``qrexec-client-vm`` does: both of its drivers
(the blocking one and the trio one) share these steps.

Light on imports (no trio, no ``socket``): the blocking driver runs a call with
nothing else loaded. The sockets are made by the class the caller passes
(``_socket.socket`` for the blocking driver, ``socket.socket`` for trio's).
"""

from __future__ import annotations

import errno
import os
import select
import stat
import time

from .._errors import QrexecError
from .._logging import bind_context, get_logger
from .._unix import connect_blocking, has_kind, recv_by
from ..protocol import DATA_RING_SIZE, ProtocolError, TriggerAnswer, TriggerService
from ..protocol._vm_local import (
    FD_NUMBER,
    FIFO_RECORD_SIZE,
    encode_fifo_record,
    fdpass_path,
    fifo_path,
    format_cid,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from _socket import socket as raw_socket
    from collections.abc import Callable
    from typing import Final, TypeVar

    from .._config import Timeouts
    from .._options import Namespace

    S = TypeVar("S", bound=raw_socket)

log = get_logger(__name__)

EXIT_LOCAL_ERROR: Final = 1
EXIT_USAGE: Final = 2
# The FIFO record's fields hold at most this much (each ends with a NUL).
_FIFO_SERVICE_MAX: Final = 63
_FIFO_TARGET_MAX: Final = 31
# --buffer-size: a minimum, rounded up to a ring size every backend takes.
RING_MIN: Final = 1 << 10
RING_MAX: Final = 1 << 20
_INT_MAX: Final = 2**31 - 1

R2: Final = "r2"
TRIGGER: Final = "trigger socket"


class ClientVmError(QrexecError):
    """The call could not be made here; the message says why. Exit status 1."""


class AgentMissing(ClientVmError):
    """No agent listens where it should."""


class Refused(Exception):
    """dom0 (or the agent for it) refused the call. Exit status 126."""


# -- the request -------------------------------------------------------------------


def call_target(raw: str) -> bytes:
    """TARGET as sent: the legacy ``$`` spelling rewritten to ``@``; '' is ``@default``."""
    return (raw.replace("$", "@") or "@default").encode("utf-8", "surrogateescape")


def trigger_frame(source: bytes, target: bytes, service: bytes, ident: bytes) -> bytes:
    """A TRIGGER_SERVICE4 message, checked by the rules dom0 applies (fail here, clearly)."""
    return TriggerService(4, source, target, ident, service).encode()


def request_frame(args: Namespace) -> tuple[bytes, bytes, bytes]:
    """(target, service, TRIGGER_SERVICE4 frame) of the call ``args`` ask for."""
    target = call_target(args.target)
    service = args.service.encode("utf-8", "surrogateescape")
    source = (args.source_qube or "").encode("utf-8", "surrogateescape")
    try:
        frame = trigger_frame(source, target, service, b"SOCKET")
    except ProtocolError as exc:
        raise ClientVmError(f"invalid request: {exc}") from exc
    return target, service, frame


def prefix_data(args: Namespace) -> bytes:
    prefix: str = args.prefix_data or ""
    return prefix.encode("utf-8", "surrogateescape")


def r2_offered(agent_socket: str) -> bool:
    """Whether the agent at ``agent_socket`` has the R2 fdpass socket and FIFO beside it."""
    return (has_kind(fdpass_path(agent_socket), follow_symlinks=True)
            and has_kind(fifo_path(agent_socket), stat.S_ISFIFO, follow_symlinks=True))


def r2_unusable(args: Namespace, target: bytes, service: bytes) -> str | None:
    """Why this request cannot go through the FIFO record, if it cannot."""
    if args.source_qube:
        return "the R2 record has no source qube"
    if len(service) > _FIFO_SERVICE_MAX or len(target) > _FIFO_TARGET_MAX:
        return "names too long for the R2 record"
    return None


def choose_path(args: Namespace, target: bytes, service: bytes) -> str:
    """R2 when the agent offers it and the request fits it; else the trigger socket."""
    if args.use_trigger_socket:
        return TRIGGER
    unusable = r2_unusable(args, target, service)
    if args.use_r2_fdpass:
        if unusable is not None:
            raise ClientVmError(f"--use-r2-fdpass: {unusable}")
        return R2
    if unusable is not None:
        log.info(f"{unusable}; using the trigger socket")
        return TRIGGER
    if r2_offered(args.agent_socket):
        return R2
    log.debug("the agent offers no R2 fdpass socket; using the trigger socket")
    return TRIGGER


def agent_missing(path: str, exc: OSError) -> ClientVmError:
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENXIO):
        return AgentMissing(f"qrexec-agent is not running ({path})")
    return ClientVmError(f"cannot use {path}: {exc.strerror or exc}")


def parse_buffer_size(text: str) -> int:
    """As the reference: a C integer (decimal, 0x hex, 0 octal) starting with a digit,
    at most INT_MAX; 0 is the default. Raises :class:`ClientVmError`."""
    if not text[:1].isdigit():
        raise ClientVmError("Bad buffer size: does not begin with a number")
    hexadecimal = text[1:2] in ("x", "X") and text[0] == "0"
    digits, base = (text[2:], 16) if hexadecimal else (text, 8 if text[0] == "0" else 10)
    allowed = "0123456789abcdefABCDEF"[:22 if base == 16 else base]
    if not digits or any(char not in allowed for char in digits):
        raise ClientVmError("Bad buffer size: trailing junk")
    value = int(digits, base)
    if value > _INT_MAX:
        raise ClientVmError(f"Bad buffer size: {text} is out of range")
    return value


def ring_size(buffer_size: int) -> int:
    """The ring for a requested minimum: a power of two every backend takes."""
    if buffer_size == 0:
        return DATA_RING_SIZE
    size = RING_MIN
    while size < min(buffer_size, RING_MAX):
        size <<= 1
    return size


# -- today's trigger socket: the request and its answer -----------------------------


def _receive_exactly(sock: raw_socket, size: int, deadline: float) -> bytes | None:
    """``size`` bytes from a blocking socket by ``deadline``; None if it ended first."""
    data = b""
    while len(data) < size:
        chunk = recv_by(sock, size - len(data), deadline)
        if not chunk:
            return None
        data += chunk
    return data


def ask_agent(agent_socket: str, frame: bytes, timeouts: Timeouts,
              make: Callable[[int, int], S]) -> tuple[S, int, int]:
    """Send the trigger; returns the socket (open for the whole call: closing it tells
    the agent we are done) and where to serve the data vchan. Raises
    :class:`Refused` if the agent closed without an answer."""
    try:
        sock = connect_blocking(agent_socket, timeout=timeouts.handshake, make=make)
    except OSError as exc:
        raise agent_missing(agent_socket, exc) from exc
    try:
        sock.settimeout(timeouts.handshake)
        sock.sendall(frame)
        # The answer takes a policy decision: the agent gives dom0 this long.
        try:
            reply = _receive_exactly(sock, TriggerAnswer.SIZE,
                                     time.monotonic() + timeouts.request_answer)
        except TimeoutError:
            raise ClientVmError(
                f"no answer from qrexec-agent within {timeouts.request_answer:g}s") from None
        if reply is None:
            raise Refused
        answer = TriggerAnswer.decode(reply)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock, answer.connect_domain, answer.connect_port


# -- R2: fdpass sockets and the FIFO ---------------------------------------------------


def _fdpass_socket(path: str, timeout: float, make: Callable[[int, int], S]) -> tuple[S, int]:
    """One connection to the fdpass socket and the agent's number for it."""
    try:
        sock = connect_blocking(path, timeout=timeout, make=make)
    except OSError as exc:
        raise agent_missing(path, exc) from exc
    try:
        number = _receive_exactly(sock, FD_NUMBER.size, time.monotonic() + timeout)
        if number is None:
            raise ClientVmError(f"qrexec-agent closed {path} before sending the fd number")
        sock.settimeout(None)
    except TimeoutError:
        sock.close()
        raise ClientVmError(f"qrexec-agent sent no fd number on {path}") from None
    except BaseException:
        sock.close()
        raise
    return sock, int(FD_NUMBER.unpack(number)[0])


def _write_record(fd: int, record: bytes, timeout: float) -> None:
    """One atomic write (the record is shorter than PIPE_BUF), waiting at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            written = os.write(fd, record)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientVmError("qrexec-agent does not read its trigger FIFO") from None
            select.select([], [fd], [], left)
            continue
        if written != len(record):
            raise ClientVmError(f"short write to the trigger FIFO ({written} bytes)")
        return


def r2_request(agent_socket: str, service: bytes, target: bytes, timeouts: Timeouts,
               make: Callable[[int, int], S]) -> tuple[S, S, S]:
    """Get three (blocking) sockets from the agent and ask for the call with their CID."""
    fifo = fifo_path(agent_socket)
    try:
        # First, as R2 does: no FIFO reader means no agent, before anything else.
        fifo_fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise agent_missing(fifo, exc) from exc
    sockets: list[S] = []
    try:
        numbers = []
        for _ in range(3):
            sock, number = _fdpass_socket(fdpass_path(agent_socket), timeouts.handshake, make)
            sockets.append(sock)
            numbers.append(number)
        cid = format_cid((numbers[0], numbers[1], numbers[2]))
        record = encode_fifo_record(service, target, cid)
        assert len(record) == FIFO_RECORD_SIZE
        _write_record(fifo_fd, record, timeouts.handshake)
        # The agent and dom0 know the call by this request id too.
        bind_context(request=cid.decode())
        log.debug("request written")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    finally:
        os.close(fifo_fd)
    return sockets[0], sockets[1], sockets[2]
