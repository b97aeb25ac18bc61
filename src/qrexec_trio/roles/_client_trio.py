"""qrexec-client through trio: every mode of dom0's client (see :mod:`.client`) that
the blocking driver does not run: ``-l``, ``-c`` (answering a VM's pending request in
dom0 or with a service in another VM), ``-k``, ``--use-stdin-socket``, dom0 to dom0,
and data vchans on a backend the blocking driver cannot serve.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import Final

import structlog
import trio

from .._config import Timeouts
from .._defaults import QUBESD_SOCKET, QUBESD_SOCKET_ENV
from .._errors import QrexecError
from .._logging import get_logger
from .._options import Namespace
from ..blocking._client import final_status
from ..domains import DomainsError, QubesdDomains
from ..nursery import (
    CONNECTIONS,
    CallerEnd,
    ConnectionRegistry,
    FramedLink,
    call_data,
    call_id,
    child_process,
    control_socket_path,
    open_caller_link,
    parse_connections,
)
from ..nursery import exit_status as process_exit_status
from ..protocol import (
    ExecCmdline,
    ExitStatus,
    JustExec,
    ProtocolError,
    RpcCall,
    ServiceConnect,
    ShellCommand,
    parse_cmdline,
)
from ..services import LaunchError, ProgramPlan, Runner, service_path
from ..xen import VchanBackend, get_backend
from ._cli import run_until_signal
from ._connect import (
    DOM0_NAMES,
    Connector,
    RequestRefused,
    accept_via_daemon_socket,
    dom0_runner,
    open_daemon_request,
    request_port,
)
from ._local_io import local_ends

log = get_logger(__name__)

#: The reference's exit status when ``-c`` cannot connect a VM-to-VM call.
VM_CONNECT_FAILED: Final = 137


class ClientError(QrexecError):
    """The call could not be made; the message says why."""


class UnknownRequest(QrexecError):
    """``-c`` named a request its source's daemon is not waiting on. Exit status 1."""


def _local_program_plan(command: str, target: str) -> ProgramPlan:
    """``-l CMD``: a dom0-side program, parsed like a cmdline without a user."""
    runner = Runner(service_path(), base_env=dict(os.environ, QREXEC_REMOTE_DOMAIN=target))
    cmdline = parse_cmdline(command.encode("utf-8", "surrogateescape"), with_user=False)
    if isinstance(cmdline.command, ShellCommand):
        env = runner.environment(runner.identity_for(None), {"QREXEC_REMOTE_DOMAIN": target})
        return ProgramPlan(["/bin/sh", "-c", cmdline.command.command], env,
                           runner.identity_for(None), what="local program")
    plan = runner.plan(cmdline)
    if not isinstance(plan, ProgramPlan):
        raise ClientError("-l cannot run a socket service")
    return plan


# -- dom0 -> VM ------------------------------------------------------------------


async def run_call(
    args: Namespace, backend: VchanBackend, timeouts: Timeouts
) -> int:
    try:
        return await _run_call(args, backend, timeouts)
    finally:
        if args.kill:
            # As the reference: right before exiting, however the call went.
            with trio.CancelScope(shield=True):
                await _kill_target(args.target, timeouts)


async def _run_call(args: Namespace, backend: VchanBackend, timeouts: Timeouts) -> int:
    cmdline = args.cmdline.encode("utf-8", "surrogateescape")
    request = JustExec(0, 0, cmdline) if args.just_exec else ExecCmdline(0, 0, cmdline)
    daemon_socket, domid, port = await request_port(
        args.socket_dir, args.target, request, timeouts)
    # The call's id, as the daemon and the agent name it too (nursery.call_id).
    structlog.contextvars.bind_contextvars(call=call_id(domid, port))
    async with daemon_socket:
        log.debug("got data port", domid=domid, port=port)
        link = await open_caller_link(backend, domid, port, accept_timeout=args.connect_timeout,
                                      handshake_timeout=timeouts.handshake)
        async with link.stream:
            if args.local_command is not None:
                return await _call_with_local_program(link, args, timeouts)
            async with local_ends(args.use_stdin_socket) as (source, output, stderr):
                end = CallerEnd(
                    input=source, output=output, errors=stderr, close_output=output.close,
                    prefix=args.prefix_data.encode("utf-8", "surrogateescape"),
                    filter_stdout=args.filter_stdout, filter_stderr=args.filter_stderr,
                )
                status = await call_data(link, end, finish_timeout=timeouts.send_finish)
    return final_status(args, status, None)


async def _kill_target(target: str, timeouts: Timeouts) -> None:
    qubesd = os.environ.get(QUBESD_SOCKET_ENV, QUBESD_SOCKET)
    try:
        with trio.fail_after(timeouts.admin_call):
            await QubesdDomains(qubesd, call_timeout=timeouts.admin_call).kill(target)
    except (DomainsError, trio.TooSlowError) as exc:
        print(f"qrexec-client: could not kill {target} through {qubesd}: "
              f"{getattr(exc, 'message', None) or type(exc).__name__}", file=sys.stderr)
    else:
        log.info("target killed", target=target)


async def _call_with_local_program(
    link: FramedLink, args: Namespace, timeouts: Timeouts
) -> int:
    plan = _local_program_plan(args.local_command, args.target)
    async with child_process(plan.argv, timeouts=timeouts, env=plan.env, cwd=plan.cwd,
                             stderr=None) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        program_stdin = proc.stdin

        async def close_program_input() -> None:
            await trio.aclose_forcefully(program_stdin)

        end = CallerEnd(
            input=proc.stdout, output=proc.stdin, errors=None, close_output=close_program_input,
            prefix=args.prefix_data.encode("utf-8", "surrogateescape"),
            filter_stdout=args.filter_stdout, filter_stderr=args.filter_stderr,
        )
        status = await call_data(link, end, finish_timeout=timeouts.send_finish)
        await close_program_input()
        local = process_exit_status(await proc.wait())
    return final_status(args, status, local)


# -- -c: answering a VM's pending request ----------------------------------------


def _parse_existing(text: str) -> tuple[bytes, str, int]:
    parts = text.split(",")
    if len(parts) != 3 or not parts[1]:
        raise ClientError('Invalid -c parameter (should be: "-c request_id,src_domain_name,'
                          'src_domain_id")')
    ident, source, source_id = parts
    if not ident or len(ident) >= 32:
        raise ClientError("Invalid -c parameter (request_id must be 1 to 31 characters)")
    try:
        domid = int(source_id, 0)
    except ValueError:
        raise ClientError(f"Invalid -c parameter (source domain ID {source_id!r} is not a "
                          "number)") from None
    if domid <= 0:
        raise ClientError("Invalid -c parameter (the source cannot be dom0)")
    return ident.encode(), source, domid


async def answer_with_dom0_command(args: Namespace, backend: VchanBackend,
                                   timeouts: Timeouts) -> int:
    """``-d dom0 -c``: serve a VM's pending request with a dom0 command (§7.3)."""
    ident, source, source_id = _parse_existing(args.connect_existing)
    cmdline = args.cmdline.encode("utf-8", "surrogateescape")
    registry = ConnectionRegistry(cleanup_timeout=timeouts.cleanup)
    # -w bounds the wait for the VM's data vchan, as in the reference.
    call_timeouts = replace(timeouts, data_vchan_connect=args.connect_timeout)
    async with registry.open(call_id(source_id, ident), kind="vm-request", source=source,
                             target="dom0", service=_what(cmdline)) as conn:
        accept = accept_via_daemon_socket(args.socket_dir, source, ident, call_timeouts, conn)
        try:
            status = await Connector(backend, call_timeouts, args.socket_dir).dom0_service(
                conn, accept, cmdline, source)
        except RequestRefused:
            raise UnknownRequest(_not_pending(ident, source)) from None
    return 0 if args.no_exit_code else status


async def answer_with_vm_service(args: Namespace, timeouts: Timeouts) -> int:
    """``-d VM -c``: connect a VM's pending request to a service in another VM (§7.4).

    As the reference: the target's daemon gets the command line with the
    source's domain id (the target's agent connects straight to the source),
    then the source's daemon gets MSG_SERVICE_CONNECT with the target's
    (domain, port). ``-W`` then waits until the target's daemon reports the
    connection's end by closing our socket.
    """
    ident, source, source_id = _parse_existing(args.connect_existing)
    cmdline = args.cmdline.encode("utf-8", "surrogateescape")
    await _check_pending(args.socket_dir, source_id, ident, source, timeouts)
    request = ExecCmdline(source_id, 0, cmdline)
    target_socket, domid, port = await request_port(args.socket_dir, args.target, request,
                                                    timeouts)
    async with target_socket:
        log.info("target leg open", target=args.target, target_call=call_id(domid, port))
        answer = await open_daemon_request(args.socket_dir, str(source_id),
                                           ServiceConnect(domid, port, ident), timeouts)
        # No reply comes when the port is given; the daemon forwarded it.
        await answer.stream.aclose()
        if args.wait_connection_end:
            await _wait_closed(target_socket)
            log.info("connection ended", target=args.target)
    return 0


async def _wait_closed(stream: trio.SocketStream) -> None:
    """Until the daemon closes our socket (it does when the port is released)."""
    while True:
        try:
            data = await stream.receive_some(1)
        except trio.BrokenResourceError:
            return
        if not data:
            return


async def _check_pending(socket_dir: str, source_id: int, ident: bytes, source: str,
                         timeouts: Timeouts) -> None:
    """Refuse an id the source's daemon does not track, before starting the target.

    MSG_SERVICE_CONNECT with a port gets no reply, so the wire cannot tell
    us; our daemon's control socket can (a reference daemon has none: then
    the check is skipped and the daemon drops an unknown id, as the
    reference's client lets it).
    """
    path = control_socket_path(socket_dir, source_id)
    try:
        reply = await QubesdDomains(path, call_timeout=timeouts.admin_call).call(
            CONNECTIONS, "dom0")
    except DomainsError as exc:
        log.debug("could not list the source's requests", error=exc.message)
        return
    wanted = call_id(source_id, ident)
    if not any(entry.get("id") == wanted for entry in parse_connections(reply)):
        raise UnknownRequest(_not_pending(ident, source))


def _not_pending(ident: bytes, source: str) -> str:
    return (f"request {ident.decode()!r} of {source} is not pending "
            "(unknown, already answered or given up)")


def _what(cmdline: bytes) -> str:
    try:
        command = parse_cmdline(cmdline, with_user=False).command
    except ProtocolError:
        return "(malformed command line)"
    return command.descriptor if isinstance(command, RpcCall) else command.command


# -- dom0 -> dom0 ----------------------------------------------------------------


def run_dom0_service(args: Namespace) -> int:
    """``-d dom0 DEFAULT:QUBESRPC SVC[+ARG] SRC``: become the dom0 service (exec).

    As the reference: only a service call, as dom0's own user (DEFAULT), and
    only a program (a socket or TCP service is refused, 125); not found: 127.
    """
    try:
        cmdline = parse_cmdline(args.cmdline.encode("utf-8", "surrogateescape"))
    except ProtocolError as exc:
        return _fail(ExitStatus.PROBLEM, f"bad command line: {exc}")
    if not isinstance(cmdline.command, RpcCall):
        return _fail(ExitStatus.PROBLEM, "dom0 to dom0 runs services only: expected "
                     "'DEFAULT:QUBESRPC SERVICE[+ARG] SOURCE'")
    if cmdline.user != "DEFAULT":
        return _fail(ExitStatus.PROBLEM, f"dom0 services run as dom0's own user: the user "
                     f"must be DEFAULT, not {cmdline.user!r}")
    runner = dom0_runner()
    try:
        plan = runner.plan_rpc(cmdline.command, runner.identity_for(None))
    except LaunchError as exc:
        return _fail(exc.status, exc.reason)
    if not isinstance(plan, ProgramPlan):
        return _fail(ExitStatus.PROBLEM, f"{cmdline.command.descriptor} is a socket service; "
                     "dom0 to dom0 calls run programs only")
    sys.stdout.flush()
    try:
        os.execve(plan.executable or plan.argv[0], plan.argv, plan.env)
    except OSError as exc:
        return _fail(ExitStatus.PROBLEM, f"cannot run {plan.argv[0]}: {exc.strerror}")


def _fail(status: int, message: str) -> int:
    print(f"qrexec-client: {message}", file=sys.stderr)
    return int(status)


def run(args: Namespace, timeouts: Timeouts) -> int:
    """Run what ``args`` ask for under trio; the exit status."""
    dom0 = args.target in DOM0_NAMES
    if args.connect_existing is not None and not dom0:
        try:
            return run_until_signal(lambda: answer_with_vm_service(args, timeouts))
        except UnknownRequest as exc:
            return _fail(1, str(exc))
        except (QrexecError, trio.TooSlowError) as exc:
            return _fail(VM_CONNECT_FAILED, str(exc) or type(exc).__name__)
    try:
        backend = get_backend(send_finish=timeouts.send_finish)
        if args.connect_existing is not None:
            return run_until_signal(lambda: answer_with_dom0_command(args, backend, timeouts))
        return run_until_signal(lambda: run_call(args, backend, timeouts))
    except UnknownRequest as exc:
        return _fail(1, str(exc))
    except (QrexecError, trio.TooSlowError) as exc:
        return _fail(ExitStatus.PROBLEM, str(exc) or type(exc).__name__)


