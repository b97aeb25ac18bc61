"""Running the service end of a call: one implementation for a VM and for dom0.

The agent (a call from dom0 or another VM) and dom0 (a VM's call to a dom0
service, from the daemon, ``qrexec-policy`` or ``qrexec-client -c``) do the
same things in the same order, as the reference does on both sides:

1. decide what to run (:func:`prepare`): parse the command line, load the
   service's rpc-config with the one parser (``force-user``,
   ``skip-service-descriptor``, the ``exit-on-*-eof`` options,
   ``wait-for-session``), plan a program, socket or TCP service; a command
   that cannot run becomes a :class:`LaunchError` with 125 or 127;
2. hold the call for the user session if its configuration says so
   (:func:`hold_for_session`), before the data vchan connects;
3. once the data vchan is up, run it and pump its data, or report the
   failure on the data vchan (:func:`serve_prepared`).

The only difference is stderr: a VM's services send it to the caller, dom0
services keep it in dom0's log (``forward_stderr``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .._config import Timeouts
from .._logging import get_logger
from ..nursery import (
    Connection,
    FramedLink,
    GroupLedger,
    open_service,
    send_spawn_failure,
    serve_data,
)
from ..protocol import ExitStatus, ProtocolError, RpcCall, parse_cmdline
from ..services import (
    DEFAULT_CONFIG,
    LaunchError,
    Plan,
    ProgramPlan,
    RpcConfigError,
    Runner,
    load_service_config,
    socket_option_conflict,
    with_call_id,
)
from ._session import wait_for_session

log = get_logger(__name__)


@dataclass(frozen=True)
class Launch:
    """A command ready to run."""

    plan: Plan
    #: The call to hold until the user session is up (wait-for-session), if any.
    wait_for_session: RpcCall | None
    user: str | None


def _warn_config(message: str) -> None:
    log.warning("service configuration", warning=message)


def prepare(runner: Runner, config_dirs: Sequence[str], conn: Connection,
            raw_cmdline: bytes, *, with_user: bool = True,
            extra_env: Mapping[str, str] | None = None) -> Launch | LaunchError:
    """The plan for a command line, with its service's configuration applied.

    ``with_user`` is False for dom0's form (no ``USER:`` part). ``extra_env``
    is added to a program's environment (dom0 sets ``QREXEC_REMOTE_DOMAIN``
    for plain commands, as the reference's client does).
    """
    try:
        cmdline = parse_cmdline(raw_cmdline, with_user=with_user)
    except ProtocolError as exc:
        return LaunchError(ExitStatus.PROBLEM, f"bad cmdline: {exc}")
    call = cmdline.command if isinstance(cmdline.command, RpcCall) else None
    config = DEFAULT_CONFIG
    if call is not None:
        conn.describe(source=call.source, service=call.descriptor)
        try:
            config = load_service_config(call.lookup_names, config_dirs, warn=_warn_config)
        except RpcConfigError as exc:
            log.error("could not load the service's configuration", error=str(exc))
            return LaunchError(ExitStatus.PROBLEM, f"invalid configuration: {exc}")
        if config.force_user is not None:
            cmdline = dataclasses.replace(cmdline, user=config.force_user)
    try:
        plan = with_call_id(runner.plan(cmdline, config), conn.id)
    except LaunchError as exc:
        return exc
    conflict = socket_option_conflict(config)
    if conflict is not None and not isinstance(plan, ProgramPlan):
        return LaunchError(ExitStatus.PROBLEM, conflict)
    if extra_env and isinstance(plan, ProgramPlan):
        plan = dataclasses.replace(plan, env={**plan.env, **extra_env})
    conn.describe(service=plan.what)
    waits = call is not None and config.wait_for_session and isinstance(plan, ProgramPlan)
    return Launch(plan, call if waits else None, cmdline.user)


async def hold_for_session(prepared: Launch | LaunchError, runner: Runner, *,
                           timeouts: Timeouts, ledger: GroupLedger | None) -> None:
    """wait-for-session: run ``qubes.WaitForSession`` first, if the service asks for it."""
    if isinstance(prepared, Launch) and prepared.wait_for_session is not None:
        await wait_for_session(runner, prepared.wait_for_session, prepared.user,
                               timeouts=timeouts, ledger=ledger)


async def serve_prepared(conn: Connection, link: FramedLink, prepared: Launch | LaunchError,
                         *, timeouts: Timeouts, ledger: GroupLedger | None,
                         forward_stderr: bool = True) -> int:
    """Run a prepared command on an open data link; returns its exit status.

    A command that cannot run is reported on the data vchan with its status
    (both EOFs, then the exit code), as the reference does.
    """
    try:
        if isinstance(prepared, LaunchError):
            raise prepared
        log.info("running", what=prepared.plan.what)
        # Starting can fail too (a socket service that refuses the connection).
        end = await conn.enter(open_service(prepared.plan, timeouts, ledger,
                                            forward_stderr=forward_stderr))
    except LaunchError as exc:
        log.warning("cannot run command", status=exc.status, reason=exc.reason)
        await send_spawn_failure(link, exc.status)
        return exc.status
    conn.running()
    status = await serve_data(link, end, conn.metered())
    log.info("finished", status=status)
    return status
