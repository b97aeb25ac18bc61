"""qrexec-client-vm: call a service from inside a VM (wire-protocol.md §7.2, §13.2;
r2-design.md §4). A drop-in for the reference's program.

``qrexec-client-vm [options] TARGET SERVICE[+ARG] [PROG [ARGS...]]``

Options stop at the first operand, so PROG's own options pass through. TARGET
may use ``@default``, ``@dispvm[:X]`` or the legacy ``$`` spelling (rewritten
to ``@``); an empty TARGET means ``@default``.

Two ways to ask the agent (paths and layouts in :mod:`._vm_local`); the
program picks one by itself:

* **R2**, when the agent offers it (its fdpass socket ``PATH-fdpass`` and its
  FIFO ``PATH-fifo`` exist beside the trigger socket; ``--use-r2-fdpass``
  insists on it). Three connections to the fdpass socket give three sockets
  and their connection id; one record in the FIFO asks for the call. The
  agent runs the data vchan itself and relays it to the sockets: socket 0
  carries the remote stdout, socket 1 our input, socket 2 the status channel
  (remote stderr, then the exit status or a refusal). With PROG, PROG runs as
  our child on sockets 0 and 1 (its stderr is ours) while we read the status
  channel. The FIFO record has no source field and fixed-size fields, so
  ``--source-qube`` and names too long for the record use the trigger socket;
  ``--buffer-size`` does not apply (the agent's data vchan uses the default
  rings).
* **The trigger socket** ``PATH`` (today's reference agent has only this one;
  ``--use-trigger-socket`` insists on it). We send one MSG_TRIGGER_SERVICE4,
  read the 8-byte answer (EOF: refused), serve the data vchan ourselves and
  run the caller side of the call, with PROG as a child on socket pairs, or
  with our own stdio.

Either way, as the reference does: without PROG our stdout is closed as soon
as the remote stdout ends, and we exit once the remote exit status came, even
if our stdin is still open (it is not read further). If whoever reads our
stdout goes away, its data is dropped from then on, our stdin is still sent,
and the exit status is still the remote one. With PROG, PROG's stdin and
stdout are connected to the service, its stderr is ours; ``SAVED_FD_0`` and
``SAVED_FD_1`` name duplicates of our own stdin and stdout, and
``SAVED_FD_2`` of our stderr only if ``PASS_LOCAL_STDERR`` is set.

Exit status: the remote status if non-zero, else PROG's (0 without PROG); 128+N
for a local PROG killed by signal N; 126 refused ("Request refused"); 255 if
the call died before an exit status; 2 usage; 1 local error (no agent, bad
name or buffer size, PROG not found).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import select
import shutil
import socket
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog
import trio

from .._config import Timeouts
from .._errors import QrexecError
from .._logging import get_logger
from .._sockets import connect_unix, connect_unix_blocking, has_kind
from ..nursery import (
    CallerEnd,
    FramedLink,
    call_data,
    caller_exit_code,
    child_process,
    open_caller_link,
)
from ..nursery import exit_status as process_exit_status
from ..protocol import (
    DATA_RING_SIZE,
    Data,
    Direction,
    ExitCode,
    ExitStatus,
    MessageReader,
    ProtocolError,
    ServiceRefused,
    Stream,
    TriggerAnswer,
    TriggerService,
    filter_escape_chars,
)
from ..xen import VchanBackend, get_backend
from ._cli import add_logging_options, run_until_signal, setup_logging
from ._local_io import LocalOutput, local_ends, stdin_socket_problem
from ._vm_local import (
    DEFAULT_AGENT_SOCKET,
    FD_NUMBER,
    FIFO_RECORD_SIZE,
    encode_fifo_record,
    fdpass_path,
    fifo_path,
    format_cid,
)

log = get_logger(__name__)

EXIT_LOCAL_ERROR: Final = 1
EXIT_USAGE: Final = 2
# The FIFO record's fields hold at most this much (each ends with a NUL).
_FIFO_SERVICE_MAX: Final = 63
_FIFO_TARGET_MAX: Final = 31
# --buffer-size: a minimum, rounded up to a ring size every backend takes.
_RING_MIN: Final = 1 << 10
_RING_MAX: Final = 1 << 20
_INT_MAX: Final = 2**31 - 1
_C_INTEGER: Final = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")

R2: Final = "r2"
TRIGGER: Final = "trigger socket"


class ClientVmError(QrexecError):
    """The call could not be made here; the message says why. Exit status 1."""


class Refused(Exception):
    """dom0 (or the agent for it) refused the call. Exit status 126."""


# -- the request -------------------------------------------------------------------


def _target(raw: str) -> bytes:
    return (raw.replace("$", "@") or "@default").encode("utf-8", "surrogateescape")


def trigger_frame(source: bytes, target: bytes, service: bytes, ident: bytes) -> bytes:
    """A TRIGGER_SERVICE4 message, checked by the rules dom0 applies (fail here, clearly)."""
    return TriggerService(4, source, target, ident, service).encode()


def r2_offered(agent_socket: str) -> bool:
    """Whether the agent at ``agent_socket`` has the R2 fdpass socket and FIFO beside it."""
    return (has_kind(fdpass_path(agent_socket), follow_symlinks=True)
            and has_kind(fifo_path(agent_socket), stat.S_ISFIFO, follow_symlinks=True))


def r2_unusable(args: argparse.Namespace, target: bytes, service: bytes) -> str | None:
    """Why this request cannot go through the FIFO record, if it cannot."""
    if args.source_qube:
        return "the R2 record has no source qube"
    if len(service) > _FIFO_SERVICE_MAX or len(target) > _FIFO_TARGET_MAX:
        return "names too long for the R2 record"
    return None


def choose_path(args: argparse.Namespace, target: bytes, service: bytes) -> str:
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


# -- R2: fdpass sockets and the FIFO (synchronous: nothing runs concurrently yet) -----


def _agent_missing(path: str, exc: OSError) -> ClientVmError:
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENXIO):
        return ClientVmError(f"qrexec-agent is not running ({path})")
    return ClientVmError(f"cannot use {path}: {exc.strerror or exc}")


def _fdpass_socket(path: str, timeout: float) -> tuple[socket.socket, int]:
    """One connection to the fdpass socket and the agent's number for it."""
    try:
        sock = connect_unix_blocking(path, timeout=timeout)
    except OSError as exc:
        raise _agent_missing(path, exc) from exc
    try:
        sock.settimeout(timeout)
        number = b""
        while len(number) < FD_NUMBER.size:
            chunk = sock.recv(FD_NUMBER.size - len(number))
            if not chunk:
                raise ClientVmError(f"qrexec-agent closed {path} before sending the fd number")
            number += chunk
        sock.settimeout(None)
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


def r2_request(
    agent_socket: str, service: bytes, target: bytes, timeouts: Timeouts
) -> tuple[socket.socket, socket.socket, socket.socket]:
    """Get three (blocking) sockets from the agent and ask for the call with their CID."""
    fifo = fifo_path(agent_socket)
    try:
        # First, as R2 does: no FIFO reader means no agent, before anything else.
        fifo_fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _agent_missing(fifo, exc) from exc
    sockets: list[socket.socket] = []
    try:
        numbers = []
        for _ in range(3):
            sock, number = _fdpass_socket(fdpass_path(agent_socket), timeouts.handshake)
            sockets.append(sock)
            numbers.append(number)
        cid = format_cid((numbers[0], numbers[1], numbers[2]))
        record = encode_fifo_record(service, target, cid)
        assert len(record) == FIFO_RECORD_SIZE
        _write_record(fifo_fd, record, timeouts.handshake)
        # The agent and dom0 know the call by this request id too.
        structlog.contextvars.bind_contextvars(request=cid.decode())
        log.debug("request written")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    finally:
        os.close(fifo_fd)
    return sockets[0], sockets[1], sockets[2]


def _resolve_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ClientVmError(f"{name}: program not found or not executable")
    return path


# -- R2 without PROG: copy our stdio to the sockets --------------------------------


def _stream(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def _copy_input(
    source: trio.abc.ReceiveStream, sink: trio.SocketStream, prefix: bytes
) -> None:
    """Our input -> socket 1 (the call's input), then EOF."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        if prefix:
            await sink.send_all(prefix)
        while True:
            try:
                data = await source.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                break
            await sink.send_all(data)
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await sink.send_eof()


async def _copy_output(source: trio.SocketStream, sink: LocalOutput, filtered: bool) -> None:
    """Socket 0 -> our output; at its EOF (the remote stdout ended) the output is closed."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await source.receive_some():
            if sink.closed:
                continue  # the reader went away: drop it, as the reference does
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await sink.send_all(filter_escape_chars(data) if filtered else data)
    await sink.close()


async def read_status(
    channel: trio.SocketStream, stderr: trio.abc.SendStream, *, filtered: bool
) -> int | None:
    """The status channel: remote stderr to ``stderr``; the exit status at the end.

    Raises :class:`Refused`; ``None`` if the channel ended without an outcome.
    """
    reader = MessageReader(Direction.AGENT_TO_CLIENT_VM)
    while True:
        match reader.next_event():
            case None:
                try:
                    data = await channel.receive_some()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    if reader.buffered:
                        log.warning("status channel ended inside a message")
                    return None
                reader.feed(data)
            case Data(Stream.STDERR, chunk):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stderr.send_all(filter_escape_chars(chunk) if filtered else chunk)
            case ExitCode(status):
                return status
            case ServiceRefused():
                raise Refused
            case other:  # the reader lets nothing else through on this link
                raise AssertionError(f"unexpected {other!r}")


async def _outcome(channel: trio.SocketStream, stderr: trio.abc.SendStream,
                   filtered: bool) -> int | None:
    try:
        return await read_status(channel, stderr, filtered=filtered)
    except ProtocolError as exc:
        log.error("the agent broke the status channel", error=str(exc))
        return None


async def r2_copy(
    args: argparse.Namespace, sockets: tuple[socket.socket, socket.socket, socket.socket]
) -> int:
    stdin_sock, stdout_sock, status_sock = (_stream(sock) for sock in sockets)
    ends = local_ends(args.use_stdin_socket)
    async with stdin_sock, stdout_sock, status_sock, ends as (source, output, stderr):
        status: int | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_copy_input, source, stdout_sock, _prefix(args))
            async with trio.open_nursery() as outcome:
                outcome.start_soon(_copy_output, stdin_sock, output, args.filter_stdout)
                status = await _outcome(status_sock, stderr, args.filter_stderr)
            # Our input may stay open (a terminal, `sleep 30 |`): the call is over regardless.
            nursery.cancel_scope.cancel()
    if status is None:
        log.warning("the call ended without an exit status")
    return caller_exit_code(status if status is not None else -1, None)


# -- PROG (both paths) -----------------------------------------------------------------


@dataclass
class Program:
    """PROG: its path, and copies of our stdio it finds as SAVED_FD_n.

    The copies are made first thing, so that they get low numbers (a shell's
    ``>&$SAVED_FD_1`` takes one digit), as the reference's do.
    """

    path: str
    argv: list[str]
    env: dict[str, str]
    saved: list[int]

    @classmethod
    def prepare(cls, argv: list[str]) -> Program:
        path = _resolve_program(argv[0])
        # SAVED_FD_2 only with PASS_LOCAL_STDERR, set to anything (the reference's rule).
        fds = (0, 1, 2) if "PASS_LOCAL_STDERR" in os.environ else (0, 1)
        saved = {fd: os.dup(fd) for fd in fds}
        env = dict(os.environ, **{f"SAVED_FD_{fd}": str(dup) for fd, dup in saved.items()})
        return cls(path, argv, env, list(saved.values()))

    def close_saved(self) -> None:
        for dup in self.saved:
            os.close(dup)
        self.saved = []


async def _start_program(
    stack: contextlib.AsyncExitStack, program: Program, *, stdin: int, stdout: int,
    timeouts: Timeouts,
) -> trio.Process:
    """PROG as our child (in ``stack``) on ``stdin``/``stdout``, with our stderr."""
    try:
        return await stack.enter_async_context(child_process(
            [os.path.basename(program.argv[0]), *program.argv[1:]], executable=program.path,
            timeouts=timeouts, stdin=stdin, stdout=stdout, stderr=None, env=program.env,
            pass_fds=program.saved,
        ))
    except OSError as exc:
        raise ClientVmError(f"cannot run {program.argv[0]}: {exc.strerror}") from exc
    finally:
        program.close_saved()  # PROG has its own copies now


class _BlockingStderr(trio.abc.SendStream):
    """Our fd 2 in blocking mode, written from a thread.

    PROG inherits fd 2; a non-blocking trio stream on it would make PROG's own
    stderr writes fail with EAGAIN.
    """

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[await trio.to_thread.run_sync(os.write, 2, view,
                                                      abandon_on_cancel=True):]

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def r2_program(
    args: argparse.Namespace, program: Program,
    sockets: tuple[socket.socket, socket.socket, socket.socket], timeouts: Timeouts,
) -> int:
    """PROG on sockets 0 and 1 (blocking, as any program expects); we read the status."""
    stdin_sock, stdout_sock, status_sock = sockets
    local: int | None = None

    async def run_program() -> None:
        nonlocal local
        with stdin_sock, stdout_sock:  # ours are closed once PROG has them
            prefix = _prefix(args)
            if prefix:
                # Before PROG, which writes to the same socket. A refusal closes it.
                with contextlib.suppress(OSError):
                    await trio.to_thread.run_sync(stdout_sock.sendall, prefix,
                                                  abandon_on_cancel=True)
            async with contextlib.AsyncExitStack() as stack:
                proc = await _start_program(stack, program, stdin=stdin_sock.fileno(),
                                            stdout=stdout_sock.fileno(), timeouts=timeouts)
                stdin_sock.close()
                stdout_sock.close()
                local = process_exit_status(await proc.wait())

    channel = _stream(status_sock)
    async with channel, trio.open_nursery() as nursery:
        nursery.start_soon(run_program)
        status = await _outcome(channel, _BlockingStderr(), args.filter_stderr)
    if status is None:
        log.warning("the call ended without an exit status")
    return caller_exit_code(status if status is not None else -1, local)


# -- today's trigger socket ----------------------------------------------------------


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        try:
            chunk = await stream.receive_some(size - len(data))
        except trio.BrokenResourceError:
            chunk = b""
        if not chunk:
            return None
        data += chunk
    return data


async def _ask_agent(
    agent_socket: str, frame: bytes, timeouts: Timeouts
) -> tuple[trio.SocketStream, int, int]:
    """Send the trigger; returns the open socket and where to serve the data vchan."""
    try:
        stream = await connect_unix(agent_socket, timeout=timeouts.handshake)
    except OSError as exc:
        raise _agent_missing(agent_socket, exc) from exc
    try:
        with trio.fail_after(timeouts.handshake):
            await stream.send_all(frame)
        # The answer takes a policy decision: the agent gives dom0 this long.
        with trio.move_on_after(timeouts.request_answer) as waiting:
            reply = await _receive_exactly(stream, TriggerAnswer.SIZE)
        if waiting.cancelled_caught:
            raise ClientVmError(
                f"no answer from qrexec-agent within {timeouts.request_answer:g}s")
        if reply is None:
            raise Refused
        answer = TriggerAnswer.decode(reply)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise
    return stream, answer.connect_domain, answer.connect_port


async def trigger_call(
    args: argparse.Namespace, frame: bytes, program: Program | None, backend: VchanBackend,
    timeouts: Timeouts,
) -> int:
    stream, domain, port = await _ask_agent(args.agent_socket, frame, timeouts)
    # The socket stays open for the whole call: closing it tells the agent we are done.
    async with stream:
        log.debug("serving the data vchan", domain=domain, port=port)
        link = await open_caller_link(backend, domain, port,
                                      accept_timeout=timeouts.data_vchan_connect,
                                      handshake_timeout=timeouts.handshake,
                                      ring=ring_size(args.buffer_size))
        async with link.stream:
            if program is not None:
                return await _call_with_program(link, args, program, timeouts)
            async with local_ends(args.use_stdin_socket) as (source, output, stderr):
                end = _caller_end(args, source, output, stderr)
                end.close_output = output.close
                status = await call_data(link, end, finish_timeout=timeouts.send_finish)
    return caller_exit_code(status, None)


def _caller_end(
    args: argparse.Namespace, source: trio.abc.ReceiveStream, sink: trio.abc.SendStream,
    errors: trio.abc.SendStream,
) -> CallerEnd:
    return CallerEnd(input=source, output=sink, errors=errors, prefix=_prefix(args),
                     filter_stdout=args.filter_stdout, filter_stderr=args.filter_stderr)


async def _call_with_program(
    link: FramedLink, args: argparse.Namespace, program: Program, timeouts: Timeouts
) -> int:
    # Socket pairs, as the reference: PROG may rely on shutdown() and friends.
    to_prog, prog_stdin = socket.socketpair()
    from_prog, prog_stdout = socket.socketpair()
    output, source = _stream(to_prog), _stream(from_prog)
    async with output, source, contextlib.AsyncExitStack() as stack:
        with prog_stdin, prog_stdout:  # PROG's ends: closed here once it has them
            proc = await _start_program(stack, program, stdin=prog_stdin.fileno(),
                                        stdout=prog_stdout.fileno(), timeouts=timeouts)

        async def end_prog_input() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                     OSError):
                await output.send_eof()

        end = _caller_end(args, source, output, _BlockingStderr())
        end.close_output = end_prog_input
        status = await call_data(link, end, finish_timeout=timeouts.send_finish)
        await end_prog_input()
        local = process_exit_status(await proc.wait())
    return caller_exit_code(status, local)


# -- command line --------------------------------------------------------------------


def _prefix(args: argparse.Namespace) -> bytes:
    prefix: str = args.prefix_data or ""
    return prefix.encode("utf-8", "surrogateescape")


class _Once(argparse.Action):
    """An option that may be given once (the reference's ``-p``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} can only be used once")
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrexec-client-vm",
        description="Call a qrexec service in another qube.",
        epilog="Exit status: the remote service's if non-zero, else PROG's; 126 if "
        "refused, 255 if the call died, 2 on usage errors, 1 on other local errors. "
        "PASS_LOCAL_STDERR: PROG also gets SAVED_FD_2.",
    )
    parser.add_argument("-a", "--agent-socket", default=DEFAULT_AGENT_SOCKET, metavar="PATH",
                        help=f"the agent's trigger socket (default {DEFAULT_AGENT_SOCKET}); "
                        "its R2 fdpass socket and FIFO, if it has them, are PATH-fdpass "
                        "and PATH-fifo")
    parser.add_argument("--buffer-size", default="0", metavar="N",
                        help="minimum data vchan ring size, trigger-socket path only "
                        f"(default and 0: {DATA_RING_SIZE}; rounded up to a power of two "
                        f"from {_RING_MIN} to {_RING_MAX})")
    parser.add_argument("-t", "--filter-escape-chars-stdout", dest="filter_stdout",
                        action="store_true", default=None,
                        help="replace escape characters in remote stdout "
                        "(default: when stdout is a terminal and there is no PROG)")
    parser.add_argument("--no-filter-escape-chars-stdout", dest="filter_stdout",
                        action="store_false", help="opposite of -t")
    parser.add_argument("-T", "--filter-escape-chars-stderr", dest="filter_stderr",
                        action="store_true", default=None,
                        help="replace escape characters in remote stderr "
                        "(default: when stderr is a terminal)")
    parser.add_argument("--no-filter-escape-chars-stderr", dest="filter_stderr",
                        action="store_false", help="opposite of -T")
    parser.add_argument("-p", "--prefix-data", action=_Once, default=None, metavar="DATA",
                        help="send DATA before stdin (once)")
    parser.add_argument("--use-stdin-socket", action="count", default=0,
                        help="stdin is a stream socket carrying both directions "
                        "(remote stdout goes back into it); not with PROG")
    parser.add_argument("-s", "--source-qube", metavar="NAME",
                        help="ask for the call on behalf of qube NAME (trigger socket only; "
                        "not in the reference)")
    paths = parser.add_mutually_exclusive_group()
    paths.add_argument("--use-trigger-socket", action="store_true",
                       help="always use the agent's trigger socket PATH, as today's "
                       "reference does (default: when the agent has no R2 fdpass socket)")
    paths.add_argument("--use-r2-fdpass", action="store_true",
                       help="always use the R2 fdpass socket and FIFO (default: when the "
                       "agent has them and the request fits the R2 record)")
    add_logging_options(parser, default="warning")
    parser.add_argument("target", metavar="TARGET", help="the qube to call ('' = @default)")
    parser.add_argument("service", metavar="SERVICE[+ARG]", help="the service to call")
    parser.add_argument("prog", nargs=argparse.REMAINDER, metavar="PROG [ARGS...]",
                        help="a program to connect to the service instead of stdin/stdout")
    return parser


def parse_buffer_size(text: str) -> int:
    """As the reference: a C integer (decimal, 0x hex, 0 octal) starting with a digit,
    at most INT_MAX; 0 is the default. Raises :class:`ClientVmError`."""
    if not text[:1].isdigit():
        raise ClientVmError("Bad buffer size: does not begin with a number")
    if _C_INTEGER.fullmatch(text) is None:
        raise ClientVmError("Bad buffer size: trailing junk")
    value = int(text, 16) if text[1:2] in ("x", "X") else int(text, 8 if text[0] == "0" else 10)
    if value > _INT_MAX:
        raise ClientVmError(f"Bad buffer size: {text} is out of range")
    return value


def ring_size(buffer_size: int) -> int:
    """The ring for a requested minimum: a power of two every backend takes."""
    if buffer_size == 0:
        return DATA_RING_SIZE
    size = _RING_MIN
    while size < min(buffer_size, _RING_MAX):
        size <<= 1
    return size


def _options_end(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """Options end at the first operand, as with getopt's ``+``: mark it with ``--``.

    An option's value is glued to it (``--opt=VALUE``, ``-oVALUE``), so that a
    value starting with ``-`` is taken as getopt takes it.
    """
    takes_value = {
        option
        for action in parser._actions  # argparse has no public accessor
        if action.nargs != 0
        for option in action.option_strings
    }
    out: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token == "--":
            return [*out, token, *tokens]
        if token == "-" or not token.startswith("-"):
            return [*out, "--", token, *tokens]
        value = next(tokens, None) if token in takes_value else None
        if value is None:
            out.append(token)
        else:
            out.append(f"{token}={value}" if token.startswith("--") else token + value)
    return out


def _default_filters(args: argparse.Namespace) -> None:
    if args.filter_stdout is None:
        args.filter_stdout = not args.prog and os.isatty(1)
    if args.filter_stderr is None:
        args.filter_stderr = os.isatty(2)


def run(args: argparse.Namespace, timeouts: Timeouts) -> int:
    target = _target(args.target)
    service = args.service.encode("utf-8", "surrogateescape")
    source = (args.source_qube or "").encode("utf-8", "surrogateescape")
    try:
        frame = trigger_frame(source, target, service, b"SOCKET")
    except ProtocolError as exc:
        raise ClientVmError(f"invalid request: {exc}") from exc
    # Resolved before anything is asked of dom0.
    program = Program.prepare(args.prog) if args.prog else None
    path = choose_path(args, target, service)
    log.debug("request path chosen", path=path)
    if path == TRIGGER:
        backend = get_backend(send_finish=timeouts.send_finish)
        return run_until_signal(lambda: trigger_call(args, frame, program, backend, timeouts))
    sockets = r2_request(args.agent_socket, service, target, timeouts)
    if program is not None:
        return run_until_signal(lambda: r2_program(args, program, sockets, timeouts))
    return run_until_signal(lambda: r2_copy(args, sockets))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_options_end(parser, sys.argv[1:] if argv is None else argv))
    setup_logging(args, "qrexec-client-vm")
    if args.use_stdin_socket > 1:
        parser.error("--use-stdin-socket passed twice")
    if args.use_stdin_socket and args.prog:
        parser.error("cannot spawn a local process with --use-stdin-socket")
    if args.use_stdin_socket and (problem := stdin_socket_problem()) is not None:
        parser.error(problem)
    _default_filters(args)
    try:
        args.buffer_size = parse_buffer_size(args.buffer_size)
        return run(args, Timeouts.from_env())
    except Refused:
        print("Request refused", file=sys.stderr)
        return int(ExitStatus.REFUSED)
    except (QrexecError, trio.TooSlowError) as exc:
        print(f"qrexec-client-vm: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_LOCAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
