"""qrexec-client-vm: call a service from inside a VM (wire-protocol.md §7.2, §13.2;
r2-design.md §4).

``qrexec-client-vm [options] TARGET SERVICE[+ARG] [PROG [ARGS...]]``

Options stop at the first operand, so PROG's own options pass through. TARGET
may use ``@default``, ``@dispvm[:X]`` or the legacy ``$`` spelling (rewritten
to ``@``); an empty TARGET means ``@default``.

Two ways to ask the agent (paths and layouts in :mod:`._vm_local`):

* **R2 (default).** Three connections to the agent's fdpass socket give three
  sockets and their connection id; one record in the agent's FIFO asks for
  the call. The agent runs the data vchan itself and relays it to the
  sockets. With PROG, we exec it on the sockets at once (stdin = socket 0,
  stdout = socket 1, stderr = socket 2 only if ``PASS_LOCAL_STDERR`` is set;
  the originals stay reachable as ``SAVED_FD_0``/``_1``/``_2``); PROG's exit
  status is the result. Without PROG we copy stdin to socket 1 and socket 0 to
  stdout, and read the outcome from the status channel on socket 2: remote
  stderr, then the remote exit status or a refusal. The FIFO record has no
  source field and fixed-size fields, so ``--source-qube`` and names too long
  for the record use today's path instead; ``--buffer-size`` does not apply
  (the agent's data vchan uses the default rings).
* **Today's trigger socket** (``--use-trigger-socket``). We send one
  MSG_TRIGGER_SERVICE4, read the 8-byte answer (EOF: refused), serve the data
  vchan ourselves and run the caller side of the call, with PROG as a child
  on socket pairs (stderr inherited) or with our own stdio.

Exit status: 126 refused ("Request refused"); 2 usage; 1 local error (no
agent, bad name, PROG not found); 255 if the call died before an exit code;
otherwise the remote status, or with PROG (today's path) the remote status if
non-zero, else PROG's.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import select
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

import structlog
import trio

from .._config import Timeouts
from .._errors import QrexecError
from .._logging import get_logger
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
from ._cli import add_logging_options, local_stdio, run_until_signal, setup_logging
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

EXIT_LOCAL_ERROR = 1
# The FIFO record's fields hold at most this much (each ends with a NUL).
_FIFO_SERVICE_MAX = 63
_FIFO_TARGET_MAX = 31


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


def _wants_trigger_socket(args: argparse.Namespace, target: bytes, service: bytes) -> bool:
    if args.use_trigger_socket or args.source_qube:
        return True
    if len(service) > _FIFO_SERVICE_MAX or len(target) > _FIFO_TARGET_MAX:
        log.info("names too long for the R2 record; using the trigger socket")
        return True
    return False


# -- R2: fdpass sockets and the FIFO (synchronous: nothing runs concurrently yet) -----


def _agent_missing(path: str, exc: OSError) -> ClientVmError:
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENXIO):
        return ClientVmError(f"qrexec-agent is not running ({path})")
    return ClientVmError(f"cannot use {path}: {exc.strerror or exc}")


def _fdpass_socket(path: str, timeout: float) -> tuple[socket.socket, int]:
    """One connection to the fdpass socket and the agent's number for it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise _agent_missing(path, exc) from exc
        number = b""
        while len(number) < FD_NUMBER.size:
            chunk = sock.recv(FD_NUMBER.size - len(number))
            if not chunk:
                raise ClientVmError(f"qrexec-agent closed {path} before sending the fd number")
            number += chunk
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
    """Get three sockets from the agent and ask for the call with their CID."""
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


def exec_program(
    program: str, argv: Sequence[str],
    sockets: tuple[socket.socket, socket.socket, socket.socket], prefix: bytes,
    timeouts: Timeouts,
) -> NoReturn:
    """Become PROG with the three sockets as its stdio (R2). Never returns."""
    stdin_sock, stdout_sock, status_sock = sockets
    if prefix:
        stdout_sock.settimeout(timeouts.handshake)
        stdout_sock.sendall(prefix)
    pass_stderr = "PASS_LOCAL_STDERR" in os.environ
    env = dict(os.environ)
    for fd in (0, 1, 2) if pass_stderr else (0, 1):
        saved = os.dup(fd)
        os.set_inheritable(saved, True)
        env[f"SAVED_FD_{fd}"] = str(saved)
    # PROG gets ordinary blocking descriptors (a timeout makes them non-blocking).
    for sock in sockets:
        sock.setblocking(True)
    os.dup2(stdin_sock.fileno(), 0)
    os.dup2(stdout_sock.fileno(), 1)
    if pass_stderr:
        # PROG writes its stderr here and never reads: say so, so that the
        # agent's status frames fail at once instead of filling the buffer.
        status_sock.shutdown(socket.SHUT_RD)
        os.dup2(status_sock.fileno(), 2)
    for sock in sockets:
        sock.close()  # without PASS_LOCAL_STDERR this tells the agent: no status reader
    try:
        os.execve(program, [os.path.basename(argv[0]), *argv[1:]], env)
    except OSError as exc:
        message = f"qrexec-client-vm: cannot run {argv[0]}: {exc.strerror}\n"
        os.write(int(env.get("SAVED_FD_2", "2")), message.encode())
        os._exit(EXIT_LOCAL_ERROR)


# -- R2 without PROG: copy our stdio to the sockets --------------------------------


def _stream(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def _copy_input(
    source: trio.abc.ReceiveStream, sink: trio.SocketStream, prefix: bytes
) -> None:
    """stdin -> socket 1 (the call's input), then EOF."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        if prefix:
            await sink.send_all(prefix)
        while data := await source.receive_some():
            await sink.send_all(data)
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await sink.send_eof()


async def _copy_output(
    source: trio.SocketStream, sink: trio.abc.SendStream, filtered: bool
) -> None:
    """socket 0 -> stdout until the agent ends it; a vanished reader just stops getting it."""
    writable = True
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await source.receive_some():
            if not writable:
                continue
            try:
                await sink.send_all(filter_escape_chars(data) if filtered else data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                writable = False


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


async def r2_copy(
    args: argparse.Namespace, sockets: tuple[socket.socket, socket.socket, socket.socket]
) -> int:
    stdin_sock, stdout_sock, status_sock = (_stream(sock) for sock in sockets)
    async with stdin_sock, stdout_sock, status_sock, local_stdio() as (stdin, stdout, stderr):
        status: int | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_copy_input, stdin, stdout_sock, _prefix(args))
            async with trio.open_nursery() as outcome:
                outcome.start_soon(_copy_output, stdin_sock, stdout, args.filter_stdout)
                try:
                    status = await read_status(status_sock, stderr,
                                               filtered=args.filter_stderr)
                except ProtocolError as exc:
                    log.error("the agent broke the status channel", error=str(exc))
            # Stdin may stay open (a terminal): the call is over regardless.
            nursery.cancel_scope.cancel()
    if status is None:
        log.warning("the call ended without an exit status")
    return caller_exit_code(status if status is not None else -1, None)


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
        stream = await trio.open_unix_socket(agent_socket)
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
    args: argparse.Namespace, frame: bytes, program: str | None, backend: VchanBackend,
    timeouts: Timeouts,
) -> int:
    stream, domain, port = await _ask_agent(args.agent_socket, frame, timeouts)
    # The socket stays open for the whole call: closing it tells the agent we are done.
    async with stream:
        log.debug("serving the data vchan", domain=domain, port=port)
        link = await open_caller_link(backend, domain, port,
                                      accept_timeout=timeouts.data_vchan_connect,
                                      handshake_timeout=timeouts.handshake,
                                      ring=args.buffer_size)
        async with link.stream:
            if program is not None:
                return await _call_with_program(link, args, program, timeouts)
            async with local_stdio() as (stdin, stdout, stderr):
                end = _caller_end(args, stdin, stdout, stderr)
                status = await call_data(link, end, finish_timeout=timeouts.send_finish)
    return caller_exit_code(status, None)


def _caller_end(
    args: argparse.Namespace, source: trio.abc.ReceiveStream, sink: trio.abc.SendStream,
    errors: trio.abc.SendStream,
) -> CallerEnd:
    return CallerEnd(input=source, output=sink, errors=errors, prefix=_prefix(args),
                     filter_stdout=args.filter_stdout, filter_stderr=args.filter_stderr)


class _BlockingStderr(trio.abc.SendStream):
    """Our fd 2 in blocking mode, written from a thread.

    PROG inherits fd 2; a non-blocking trio stream on it would make PROG's own
    stderr writes fail with EAGAIN.
    """

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[await trio.to_thread.run_sync(os.write, 2, view):]

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def _call_with_program(
    link: FramedLink, args: argparse.Namespace, program: str, timeouts: Timeouts
) -> int:
    # Socket pairs, as the reference: PROG may rely on shutdown() and friends.
    to_prog, prog_stdin = socket.socketpair()
    from_prog, prog_stdout = socket.socketpair()
    output, source = _stream(to_prog), _stream(from_prog)
    # As on the R2 path, PROG finds our own stdio again as SAVED_FD_n.
    saved = {fd: os.dup(fd) for fd in ((0, 1, 2) if "PASS_LOCAL_STDERR" in os.environ
                                       else (0, 1))}
    env = dict(os.environ, **{f"SAVED_FD_{fd}": str(dup) for fd, dup in saved.items()})
    async with output, source, contextlib.AsyncExitStack() as stack:
        with prog_stdin, prog_stdout:  # PROG's ends: closed here once it has them
            try:
                proc = await stack.enter_async_context(child_process(
                    [os.path.basename(args.prog[0]), *args.prog[1:]], executable=program,
                    timeouts=timeouts, stdin=prog_stdin.fileno(), stdout=prog_stdout.fileno(),
                    stderr=None, env=env, pass_fds=tuple(saved.values()),
                ))
            except OSError as exc:
                raise ClientVmError(f"cannot run {args.prog[0]}: {exc.strerror}") from exc
            finally:
                for dup in saved.values():
                    os.close(dup)  # PROG has its own copies now

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
    prefix: str = args.prefix_data
    return prefix.encode("utf-8", "surrogateescape")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrexec-client-vm",
        description="Call a qrexec service in another qube.",
        epilog="Exit status: the remote service's (or PROG's), 126 if refused, "
        "255 if the call died, 1 on local errors.",
    )
    parser.add_argument("-a", "--agent-socket", default=DEFAULT_AGENT_SOCKET, metavar="PATH",
                        help=f"the agent's trigger socket (default {DEFAULT_AGENT_SOCKET}); "
                        "its fdpass socket and FIFO are PATH-fdpass and PATH-fifo")
    parser.add_argument("--buffer-size", type=_positive_int, default=DATA_RING_SIZE,
                        metavar="N", help="data vchan ring size, today's path only "
                        f"(default {DATA_RING_SIZE})")
    parser.add_argument("-t", "--filter-escape-chars-stdout", dest="filter_stdout",
                        action="store_true", default=None,
                        help="replace escape characters in remote stdout "
                        "(default: when stdout is a terminal and there is no PROG)")
    parser.add_argument("--no-filter-escape-chars-stdout", dest="filter_stdout",
                        action="store_false")
    parser.add_argument("-T", "--filter-escape-chars-stderr", dest="filter_stderr",
                        action="store_true", default=None,
                        help="replace escape characters in remote stderr "
                        "(default: when stderr is a terminal)")
    parser.add_argument("--no-filter-escape-chars-stderr", dest="filter_stderr",
                        action="store_false")
    parser.add_argument("-p", "--prefix-data", default="", metavar="DATA",
                        help="send DATA before stdin")
    parser.add_argument("-s", "--source-qube", metavar="NAME",
                        help="ask for the call on behalf of qube NAME (uses the trigger socket)")
    parser.add_argument("--use-trigger-socket", action="store_true",
                        help="use today's trigger socket instead of the R2 fdpass path")
    add_logging_options(parser, default="warning")
    parser.add_argument("target", metavar="TARGET", help="the qube to call ('' = @default)")
    parser.add_argument("service", metavar="SERVICE[+ARG]", help="the service to call")
    parser.add_argument("prog", nargs=argparse.REMAINDER, metavar="PROG [ARGS...]",
                        help="a program to connect to the service instead of stdin/stdout")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


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
    program = _resolve_program(args.prog[0]) if args.prog else None
    if _wants_trigger_socket(args, target, service):
        backend = get_backend(send_finish=timeouts.send_finish)
        return run_until_signal(lambda: trigger_call(args, frame, program, backend, timeouts))
    sockets = r2_request(args.agent_socket, service, target, timeouts)
    if program is not None:
        exec_program(program, args.prog, sockets, _prefix(args), timeouts)
    return run_until_signal(lambda: r2_copy(args, sockets))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_options_end(parser, sys.argv[1:] if argv is None else argv))
    setup_logging(args, "qrexec-client-vm")
    _default_filters(args)
    try:
        return run(args, Timeouts.from_env())
    except Refused:
        print("Request refused", file=sys.stderr)
        return int(ExitStatus.REFUSED)
    except (QrexecError, trio.TooSlowError) as exc:
        print(f"qrexec-client-vm: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_LOCAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
