"""qrexec-client: run a command in a VM from dom0 (wire-protocol.md §7.1, §13.1).

It asks the VM's qrexec-daemon for a data port, offers the data vchan on it,
and once the VM's agent connected, streams stdin/stdout/stderr both ways and
exits with the remote exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Final

import structlog
import trio

from .._config import Timeouts
from .._errors import QrexecError
from .._logging import get_logger
from ..nursery import (
    CallerEnd,
    FramedLink,
    call_data,
    call_id,
    caller_exit_code,
    child_process,
    open_caller_link,
)
from ..nursery import exit_status as process_exit_status
from ..protocol import (
    ExecCmdline,
    ExitStatus,
    JustExec,
    RpcCall,
    ShellCommand,
    parse_cmdline,
)
from ..services import ProgramPlan, Runner, service_path
from ..xen import VchanBackend, get_backend
from ._cli import (
    UsageExit1Parser,
    add_logging_options,
    local_stdio,
    run_until_signal,
    setup_logging,
)
from ._connect import (
    DOM0_NAMES,
    Target,
    connect_pending,
    request_port,
)

log = get_logger(__name__)

DEFAULT_SOCKET_DIR: Final = "/var/run/qubes"


class ClientError(QrexecError):
    """The call could not be made; the message says why. Exit status 125."""


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


async def run_call(
    args: argparse.Namespace, backend: VchanBackend, timeouts: Timeouts
) -> int:
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
            async with local_stdio() as (stdin, stdout, stderr):
                end = CallerEnd(
                    input=stdin, output=stdout, errors=stderr,
                    prefix=args.prefix_data.encode("utf-8", "surrogateescape"),
                    filter_stdout=args.filter_stdout, filter_stderr=args.filter_stderr,
                )
                status = await call_data(link, end, finish_timeout=timeouts.send_finish)
    return _final_status(args, status, None)


async def _call_with_local_program(
    link: FramedLink, args: argparse.Namespace, timeouts: Timeouts
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
    return _final_status(args, status, local)


def _final_status(args: argparse.Namespace, remote: int, local: int | None) -> int:
    if remote < 0:
        log.warning("data vchan closed before the exit code")
    if args.no_exit_code and remote >= 0:
        return 0
    return caller_exit_code(remote, local)


def build_parser() -> argparse.ArgumentParser:
    parser = UsageExit1Parser(
        prog="qrexec-client",
        description="Run a command in a VM through its qrexec-daemon.",
    )
    parser.add_argument("-d", dest="target", required=True, metavar="TARGET",
                        help="the VM (name, domid or uuid:UUID)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-l", dest="local_command", metavar="CMD",
                      help="connect the remote command to this local program instead of stdio")
    mode.add_argument("-c", dest="connect_existing", metavar="ID,SRCNAME,SRCID",
                      help="answer a VM's pending request ID from SRCNAME (domid SRCID): "
                      "connect it to the service CMDLINE in TARGET")
    mode.add_argument("-e", dest="just_exec", action="store_true",
                      help="just start the command (MSG_JUST_EXEC); no data, exit 0 if started")
    parser.add_argument("-E", "--no-exit-code", action="store_true",
                        help="exit 0 after a completed call, whatever the remote status")
    parser.add_argument("-t", dest="filter_stdout", action="store_true",
                        help="replace escape characters in remote stdout")
    parser.add_argument("-T", dest="filter_stderr", action="store_true",
                        help="replace escape characters in remote stderr")
    parser.add_argument("-w", dest="connect_timeout", type=float, default=None, metavar="SEC",
                        help="wait at most SEC for the VM to connect (default 10; 0 = forever)")
    parser.add_argument("-p", "--prefix-data", default="", metavar="DATA",
                        help="send DATA before stdin")
    parser.add_argument("--socket-dir", default=DEFAULT_SOCKET_DIR,
                        help=f"qrexec-daemon socket directory (default {DEFAULT_SOCKET_DIR})")
    parser.add_argument("cmdline", help="USER:COMMAND or USER:QUBESRPC SERVICE[+ARG] SOURCE")
    add_logging_options(parser, default="warning")
    return parser


def _parse_existing(text: str) -> tuple[bytes, str, int]:
    parts = text.split(",")
    if len(parts) != 3:
        raise ClientError("-c takes ID,SRCNAME,SRCID")
    ident, source, source_id = parts
    if not ident or len(ident) >= 32:
        raise ClientError("-c: ID must be 1 to 31 characters")
    try:
        domid = int(source_id, 0)
    except ValueError:
        raise ClientError(f"-c: SRCID {source_id!r} is not a domain id") from None
    if domid == 0:
        raise ClientError("-c: the source cannot be dom0")
    return ident.encode(), source, domid


async def connect_existing(args: argparse.Namespace, backend: VchanBackend,
                           timeouts: Timeouts) -> int:
    """``-c``: build the connection for a VM's pending request (as qrexec-policy does)."""
    ident, source, source_id = _parse_existing(args.connect_existing)
    command = parse_cmdline(args.cmdline.encode("utf-8", "surrogateescape"),
                            with_user=args.target not in DOM0_NAMES).command
    if not isinstance(command, RpcCall):
        raise ClientError("-c needs a QUBESRPC command line")
    user = args.cmdline.partition(":")[0] if args.target not in DOM0_NAMES else "DEFAULT"
    status = await connect_pending(
        backend, timeouts, args.socket_dir, source=source, source_domain=source_id,
        ident=ident, target=Target(args.target, user, args.target),
        descriptor=command.descriptor)
    return 0 if status is None else status


def _main_connect_existing(args: argparse.Namespace, timeouts: Timeouts) -> int:
    try:
        backend = get_backend(send_finish=timeouts.send_finish)
        return run_until_signal(lambda: connect_existing(args, backend, timeouts))
    except (QrexecError, trio.TooSlowError) as exc:
        print(f"qrexec-client: {exc or type(exc).__name__}", file=sys.stderr)
        return int(ExitStatus.CLIENT_CONNECT_FAILED if args.target not in DOM0_NAMES
                   else ExitStatus.PROBLEM)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args, "qrexec-client")
    timeouts = Timeouts.from_env()
    if args.connect_timeout is None:
        args.connect_timeout = timeouts.data_vchan_accept
    if args.connect_existing is not None:
        return _main_connect_existing(args, timeouts)
    if args.target in DOM0_NAMES:
        print("qrexec-client: dom0 as a target needs -c (a VM's request to answer)",
              file=sys.stderr)
        return int(ExitStatus.PROBLEM)
    try:
        backend = get_backend(send_finish=timeouts.send_finish)
        return run_until_signal(lambda: run_call(args, backend, timeouts))
    except (QrexecError, trio.TooSlowError) as exc:
        print(f"qrexec-client: {exc or type(exc).__name__}", file=sys.stderr)
        return int(ExitStatus.PROBLEM)


if __name__ == "__main__":
    sys.exit(main())
