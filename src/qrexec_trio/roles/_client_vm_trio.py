"""qrexec-client-vm's calls through trio: what the blocking driver does not run.

A local PROG (as our child on socket pairs or on the R2 sockets, its stderr
ours), ``--use-stdin-socket``, and the trigger-socket path on a vchan backend
whose extension is not built (:func:`qrexec_trio.blocking.client_vm_problem`
names the case). The
steps of asking the agent are shared with the blocking driver
(:mod:`..blocking._vm_call`); the caller's rules with everything
(:class:`~qrexec_trio.protocol.CallerSession`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from dataclasses import dataclass

import trio

from .._config import Timeouts
from .._logging import get_logger
from .._options import Namespace
from .._sockets import connect_unix
from ..blocking._vm_call import (
    TRIGGER,
    ClientVmError,
    Refused,
    agent_missing,
    choose_path,
    prefix_data,
    r2_request,
    request_frame,
    ring_size,
)
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
    Data,
    Direction,
    ExitCode,
    MessageReader,
    ProtocolError,
    ServiceRefused,
    Stream,
    TriggerAnswer,
    filter_escape_chars,
)
from ..xen import VchanBackend, get_backend
from ._cli import run_until_signal
from ._local_io import LocalOutput, local_ends

log = get_logger(__name__)


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
    args: Namespace, sockets: tuple[socket.socket, socket.socket, socket.socket]
) -> int:
    stdin_sock, stdout_sock, status_sock = (_stream(sock) for sock in sockets)
    ends = local_ends(args.use_stdin_socket)
    async with stdin_sock, stdout_sock, status_sock, ends as (source, output, stderr):
        status: int | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_copy_input, source, stdout_sock, prefix_data(args))
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
    args: Namespace, program: Program,
    sockets: tuple[socket.socket, socket.socket, socket.socket], timeouts: Timeouts,
) -> int:
    """PROG on sockets 0 and 1 (blocking, as any program expects); we read the status."""
    stdin_sock, stdout_sock, status_sock = sockets
    local: int | None = None

    async def run_program() -> None:
        nonlocal local
        with stdin_sock, stdout_sock:  # ours are closed once PROG has them
            prefix = prefix_data(args)
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
    """``size`` bytes, or ``None`` if the peer closed (or broke) the stream first."""
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


async def ask_agent(agent_socket: str, frame: bytes,
                    timeouts: Timeouts) -> tuple[trio.SocketStream, int, int]:
    """:func:`._vm_call.ask_agent` for trio programs (the in-process API too): send the
    trigger; the open socket and where to serve the data vchan. Raises
    :class:`Refused`, :class:`ClientVmError` (:class:`AgentMissing`)."""
    try:
        stream = await connect_unix(agent_socket, timeout=timeouts.handshake)
    except OSError as exc:
        raise agent_missing(agent_socket, exc) from exc
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
    args: Namespace, frame: bytes, program: Program | None, backend: VchanBackend,
    timeouts: Timeouts,
) -> int:
    stream, domain, port = await ask_agent(args.agent_socket, frame, timeouts)
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
    args: Namespace, source: trio.abc.ReceiveStream, sink: trio.abc.SendStream,
    errors: trio.abc.SendStream,
) -> CallerEnd:
    return CallerEnd(input=source, output=sink, errors=errors, prefix=prefix_data(args),
                     filter_stdout=args.filter_stdout, filter_stderr=args.filter_stderr)


async def _call_with_program(
    link: FramedLink, args: Namespace, program: Program, timeouts: Timeouts
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


def run(args: Namespace, timeouts: Timeouts) -> int:
    """Run the call under trio; its exit status."""
    target, service, frame = request_frame(args)
    # Resolved before anything is asked of dom0.
    program = Program.prepare(args.prog) if args.prog else None
    path = choose_path(args, target, service)
    log.debug("request path chosen", path=path)
    if path == TRIGGER:
        backend = get_backend(send_finish=timeouts.send_finish)
        return run_until_signal(lambda: trigger_call(args, frame, program, backend, timeouts))
    sockets = r2_request(args.agent_socket, service, target, timeouts, socket.socket)
    if program is not None:
        return run_until_signal(lambda: r2_program(args, program, sockets, timeouts))
    return run_until_signal(lambda: r2_copy(args, sockets))
