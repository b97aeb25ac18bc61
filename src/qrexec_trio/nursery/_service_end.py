"""Starting a planned command and presenting it to the pump as a :class:`ServiceEnd`."""

from __future__ import annotations

import dataclasses
import errno
import select
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import final

import trio

from .._config import Timeouts
from .._sockets import connect_unix
from ..protocol import ExitStatus
from ..services import LaunchError, Plan, ProgramPlan, SocketPlan
from ..services._plan import TcpPlan
from ._process import GroupLedger, child_process, exit_status
from ._pump import ServiceEnd
from ._stdio_switch import StdioSwitch, SwitchableOutput, stdio_switch


def _spawn_error(exc: OSError, what: str) -> LaunchError:
    status = ExitStatus.SERVICE_NOT_FOUND if exc.errno == errno.ENOENT else ExitStatus.PROBLEM
    return LaunchError(status, f"cannot start {what}: {exc.strerror or exc}")


def _start(
    plan: ProgramPlan, timeouts: Timeouts, ledger: GroupLedger | None,
    stdio: int = subprocess.PIPE, *, stdin: int | None = None,
    stderr: int | None = subprocess.PIPE,
) -> AbstractAsyncContextManager[trio.Process]:
    identity = plan.identity
    return child_process(
        plan.argv,
        timeouts=timeouts,
        env=plan.env,
        cwd=plan.cwd,
        executable=plan.executable,
        user=identity.uid,
        group=identity.gid,
        extra_groups=identity.groups if identity.uid is not None else None,
        ledger=ledger,
        stdin=stdio if stdin is None else stdin,
        stdout=stdio,
        stderr=stdio if stdio != subprocess.PIPE else stderr,
    )


@asynccontextmanager
async def open_service(
    plan: Plan, timeouts: Timeouts, ledger: GroupLedger | None = None, *,
    forward_stderr: bool = True,
) -> AsyncIterator[ServiceEnd]:
    """Start ``plan``; raises :class:`LaunchError` if it cannot start.

    With ``forward_stderr`` false (dom0 services, as the reference), the
    service's stderr is this program's own (its log), and the caller gets only
    the empty MSG_DATA_STDERR, first.

    Leaving the scope with an exception kills the service's process group
    (or closes the connection to a socket or TCP service).
    """
    if isinstance(plan, SocketPlan | TcpPlan):
        async with _open_socket_service(plan, timeouts) as end:
            yield end
        return
    async with _open_program(plan, timeouts, ledger, forward_stderr) as end:
        yield end


@asynccontextmanager
async def _open_program(
    plan: ProgramPlan, timeouts: Timeouts, ledger: GroupLedger | None, forward_stderr: bool
) -> AsyncIterator[ServiceEnd]:
    """A program whose stdin is a socket it may also write to (the SIGUSR1 switch).

    Its ``QREXEC_AGENT_PID`` is its connection's own stand-in (see
    :mod:`._stdio_switch`), so a SIGUSR1 switches exactly this connection.
    """
    switching = False
    try:
        async with stdio_switch(timeouts, ledger) as switch:
            switching = True
            env = {**plan.env, "QREXEC_AGENT_PID": str(switch.pid)}
            async with _run_program(dataclasses.replace(plan, env=env), timeouts, ledger,
                                    switch, forward_stderr) as end:
                yield end
    except OSError as exc:
        if switching:
            raise
        raise LaunchError(ExitStatus.PROBLEM,
                          f"cannot start the QREXEC_AGENT_PID stand-in: {exc}") from exc


@asynccontextmanager
async def _run_program(plan: ProgramPlan, timeouts: Timeouts, ledger: GroupLedger | None,
                       switch: StdioSwitch, forward_stderr: bool) -> AsyncIterator[ServiceEnd]:
    ours, theirs = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    started = False
    try:
        stderr = subprocess.PIPE if forward_stderr else None
        async with _start(plan, timeouts, ledger, stdin=theirs.fileno(), stderr=stderr) as proc:
            started = True
            theirs.close()
            assert proc.stdout is not None

            async def wait() -> int:
                # The switch is watched for exactly as long as the service runs.
                async with trio.open_nursery() as watching:
                    watching.start_soon(switch.watch)
                    status = await proc.wait()
                    switch.check()
                    watching.cancel_scope.cancel()
                return exit_status(status)

            async def close_input() -> None:
                # Half-close: after a switch the service still writes to fd 0.
                # A plain shutdown(), as for socket services: it does not
                # contend with a send still blocked in the input task.
                await trio.lowlevel.checkpoint()
                with suppress(OSError):
                    stream.socket.shutdown(socket.SHUT_WR)

            output = SwitchableOutput(proc.stdout, stream, switch)
            yield ServiceEnd(stream, output, proc.stderr, wait, close_input)
    except OSError as exc:
        if started:
            raise
        raise _spawn_error(exc, plan.what) from exc
    finally:
        theirs.close()
        with trio.CancelScope(shield=True):
            await stream.aclose()


# -- socket and TCP services --------------------------------------------------
#
# What the reference agent does with a service that is a connection rather
# than a process (libqrexec process_io.c), and so what we do:
#
# * the caller's STDIN EOF shuts down the socket's write side (half-close);
# * the service's output EOF is STDOUT EOF;
# * the call ends (EXIT_CODE 0: there is no process) once both directions are
#   done: output at EOF, and input closed by the caller's EOF or by the
#   service hanging up (POLLHUP / POLLERR on the socket);
# * ``exit-on-service-eof``: it ends at output EOF, caller's input open or not,
#   and the socket is closed after EXIT_CODE, never half-closed first;
# * ``exit-on-client-eof``: it ends at the caller's EOF: STDOUT EOF (what the
#   service had not yet sent is dropped), EXIT_CODE 0, the socket closed.


def _service_name(plan: SocketPlan | TcpPlan) -> str:
    if isinstance(plan, TcpPlan):
        return f"TCP service {plan.address}"
    return f"socket service {plan.path}"


async def _connect(plan: SocketPlan | TcpPlan, timeout: float) -> trio.SocketStream:
    if isinstance(plan, SocketPlan):
        # A full listen queue is waited out (within the timeout), as the
        # reference's blocking connect() does.
        return await connect_unix(plan.path, timeout=timeout)
    family = socket.AF_INET6 if ":" in plan.host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        await sock.connect((plan.host, plan.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def connect_service(plan: SocketPlan | TcpPlan, timeouts: Timeouts) -> trio.SocketStream:
    """Connect to a socket or TCP service and send its descriptor.

    Both are bounded by ``timeouts.handshake`` (a server that never accepts,
    or never reads); any failure raises :class:`LaunchError` (125), as the
    reference refuses such a call, and nothing is left open.
    """
    what = _service_name(plan)
    stream: trio.SocketStream | None = None
    try:
        with trio.fail_after(timeouts.handshake):
            stream = await _connect(plan, timeouts.handshake)
            if plan.descriptor:
                await stream.send_all(plan.descriptor)
    except trio.TooSlowError:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise LaunchError(
            ExitStatus.PROBLEM,
            f"cannot connect to {what}: no answer within {timeouts.handshake:g}s",
        ) from None
    except (OSError, trio.BrokenResourceError) as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        raise LaunchError(ExitStatus.PROBLEM, f"cannot connect to {what}: {reason}") from exc
    return stream


async def just_exec_service(plan: SocketPlan | TcpPlan, timeouts: Timeouts) -> None:
    """MSG_JUST_EXEC of a socket or TCP service, as the reference does it.

    Connect, send the descriptor (unless ``skip-service-descriptor``), close;
    the caller then reports EXIT_CODE 0 ("started"). Raises
    :class:`LaunchError` (125) if the service cannot be reached.
    """
    stream = await connect_service(plan, timeouts)
    await trio.aclose_forcefully(stream)


@final
class _ServiceOutput(trio.abc.ReceiveStream):
    """The service's side of the socket as the pump reads it.

    ``at_eof`` is set once it reported end-of-file; ``end_now`` makes it
    report end-of-file at once (``exit-on-client-eof``), dropping the rest.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self.at_eof = trio.Event()
        self._ended = False
        self._reading: trio.CancelScope | None = None

    def end_now(self) -> None:
        self._ended = True
        if self._reading is not None:
            self._reading.cancel()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data: bytes | bytearray = b""
        if self._ended:
            await trio.lowlevel.checkpoint()
        else:
            with trio.CancelScope() as self._reading:
                try:
                    data = await self._stream.receive_some(max_bytes)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
            self._reading = None
        if not data:
            self.at_eof.set()
        return data

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _wait_hangup(sock: trio.socket.SocketType) -> None:
    """Return once the socket reports POLLHUP or POLLERR: the service hung up.

    A unix socket reports it once the service closed it; a TCP socket once
    the connection was reset. An epoll set holding only that socket (no
    events asked: hang-up and error are always reported) is readable exactly
    then, and trio can wait for that without polling.
    """
    with select.epoll(1) as watch:
        watch.register(sock.fileno(), 0)
        while True:
            await trio.lowlevel.wait_readable(watch.fileno())
            if watch.poll(0):
                return


@asynccontextmanager
async def _open_socket_service(
    plan: SocketPlan | TcpPlan, timeouts: Timeouts
) -> AsyncIterator[ServiceEnd]:
    stream = await connect_service(plan, timeouts)
    async with stream:
        output = _ServiceOutput(stream)
        #: Set once nothing more goes to the service: the caller's EOF, or a hang-up.
        input_done = trio.Event()

        async def watch_hangup() -> None:
            await _wait_hangup(stream.socket)
            input_done.set()

        async def wait() -> int:
            if plan.exit_on_service_eof:
                await output.at_eof.wait()
                return 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_hangup)
                await output.at_eof.wait()
                await input_done.wait()
                nursery.cancel_scope.cancel()
            return 0

        async def close_input() -> None:
            await trio.lowlevel.checkpoint()
            if input_done.is_set():
                return
            input_done.set()
            if plan.exit_on_client_eof:
                output.end_now()  # the call ends now; the socket is closed after it
                return
            if plan.exit_on_service_eof and output.at_eof.is_set():
                return  # the call is ending: closed after EXIT_CODE, not half-closed
            # Half-close: the service sees EOF but can still answer. A plain
            # shutdown() does not contend with a send still blocked in another task.
            with suppress(OSError):
                stream.socket.shutdown(socket.SHUT_WR)

        yield ServiceEnd(stream, output, None, wait, close_input)


async def spawn_detached(plan: ProgramPlan, timeouts: Timeouts, ledger: GroupLedger | None = None,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """MSG_JUST_EXEC: start with no stdio, report the start, reap it when it ends.

    The process outlives its connection but not the task that started it:
    cancelling that task (agent shutdown) kills its group.
    """
    started = False
    try:
        async with _start(plan, timeouts, ledger, subprocess.DEVNULL) as proc:
            started = True
            task_status.started()
            await proc.wait()
    except OSError as exc:
        if started:
            raise
        raise _spawn_error(exc, plan.what) from exc
