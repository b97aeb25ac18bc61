"""Starting a planned command and presenting it to the pump as a :class:`ServiceEnd`."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress

import trio

from .._config import Timeouts
from ..protocol import ExitStatus
from ..services import LaunchError, Plan, ProgramPlan, SocketPlan
from ._process import GroupLedger, child_process, exit_status
from ._pump import ServiceEnd
from ._streams import EofWatch


def _spawn_error(exc: OSError, what: str) -> LaunchError:
    status = ExitStatus.SERVICE_NOT_FOUND if exc.errno == errno.ENOENT else ExitStatus.PROBLEM
    return LaunchError(status, f"cannot start {what}: {exc.strerror or exc}")


def _start(
    plan: ProgramPlan, timeouts: Timeouts, ledger: GroupLedger | None,
    stdio: int = subprocess.PIPE,
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
        stdin=stdio,
        stdout=stdio,
        stderr=stdio,
    )


@asynccontextmanager
async def open_service(
    plan: Plan, timeouts: Timeouts, ledger: GroupLedger | None = None
) -> AsyncIterator[ServiceEnd]:
    """Start ``plan``; raises :class:`LaunchError` if it cannot start.

    Leaving the scope with an exception kills the service's process group.
    """
    if isinstance(plan, SocketPlan):
        async with _open_socket_service(plan) as end:
            yield end
        return
    started = False
    try:
        async with _start(plan, timeouts, ledger) as proc:
            started = True
            assert proc.stdin is not None and proc.stdout is not None
            assert proc.stderr is not None
            stdin = proc.stdin

            async def wait() -> int:
                return exit_status(await proc.wait())

            async def close_input() -> None:
                await trio.aclose_forcefully(stdin)

            yield ServiceEnd(stdin, proc.stdout, proc.stderr, wait, close_input)
    except OSError as exc:
        if started:
            raise
        raise _spawn_error(exc, plan.what) from exc


@asynccontextmanager
async def _open_socket_service(plan: SocketPlan) -> AsyncIterator[ServiceEnd]:
    try:
        stream = await trio.open_unix_socket(plan.path)
    except OSError as exc:
        raise LaunchError(
            ExitStatus.PROBLEM, f"cannot connect to socket service {plan.path}: {exc.strerror}"
        ) from exc
    async with stream:
        await stream.send_all(plan.descriptor)
        # A socket service has no exit status: it is done when its output ends.
        output = EofWatch(stream)

        async def wait() -> int:
            await output.at_eof.wait()
            return 0

        async def close_input() -> None:
            # Half-close: the service sees EOF but can still answer.
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.send_eof()

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
