"""``wait-for-session``: hold a service until the VM's user session is up.

As the reference agent does (golden transcript ``l``): before the data vchan
is connected, run the VM's ``qubes.WaitForSession`` service with no argument,
the calling domain as ``QREXEC_REMOTE_DOMAIN`` and the user's name and a
newline on its stdin, and wait until it exits. Its output is not part of the
call. A VM without that service has nothing to wait for. The wait is bounded
(``Timeouts.session_wait``); past it the service starts anyway, logged.
"""

from __future__ import annotations

import subprocess

import trio

from .._config import Timeouts
from .._logging import get_logger
from ..nursery import GroupLedger, child_process
from ..protocol import ExitStatus, RpcCall
from ..services import LaunchError, ProgramPlan, Runner

log = get_logger(__name__)

SESSION_SERVICE = "qubes.WaitForSession"


async def wait_for_session(runner: Runner, call: RpcCall, user: str | None, *,
                           timeouts: Timeouts, ledger: GroupLedger | None) -> None:
    """Run ``qubes.WaitForSession`` for ``user`` and wait for it (bounded)."""
    waiter = RpcCall(SESSION_SERVICE, SESSION_SERVICE, None, call.source)
    try:
        plan = runner.plan_rpc(waiter, runner.identity_for(None))
    except LaunchError as exc:
        if exc.status == ExitStatus.SERVICE_NOT_FOUND:
            log.debug("no qubes.WaitForSession here: nothing to wait for")
        else:
            log.warning("cannot wait for the session", reason=exc.reason)
        return
    if not isinstance(plan, ProgramPlan):
        log.warning("qubes.WaitForSession is not a program; not waiting")
        return
    log.info("waiting for the user session", user=user)
    try:
        async with child_process(plan.argv, timeouts=timeouts, env=plan.env, cwd=plan.cwd,
                                 executable=plan.executable, ledger=ledger,
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL) as proc:
            assert proc.stdin is not None
            with trio.move_on_after(timeouts.session_wait) as bounded:
                try:
                    await proc.stdin.send_all(f"{user or ''}\n".encode())
                    await proc.stdin.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # it did not read the user name: its exit is what counts
                status = await proc.wait()
    except OSError as exc:
        log.warning("cannot run qubes.WaitForSession", error=exc.strerror or str(exc))
        return
    if bounded.cancelled_caught:
        log.warning("the user session did not come up in time; starting anyway",
                    waited=timeouts.session_wait)
    else:
        log.info("user session ready", status=status)
