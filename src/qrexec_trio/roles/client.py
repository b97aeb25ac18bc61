"""qrexec-client: run a command in a VM from dom0 (wire-protocol.md §7.1, §13.1).

It asks the VM's qrexec-daemon for a data port, offers the data vchan on it,
and once the VM's agent connected, streams stdin/stdout/stderr both ways and
exits with the remote exit code.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence
from typing import Final

import trio

from .._config import Timeouts
from .._logging import get_logger
from ..nursery import CallerEnd, FramedLink, call_data, caller_exit_code, child_process
from ..nursery import exit_status as process_exit_status
from ..protocol import (
    CLIENT_PROTOCOL_VERSION,
    DATA_RING_SIZE,
    PROTOCOL_VERSION,
    Direction,
    ExecParams,
    ExitCode,
    MsgType,
    ProtocolError,
    ShellCommand,
    decode_exec_params,
    negotiate_version,
    parse_cmdline,
)
from ..services import LaunchError, ProgramPlan, Runner, service_path
from ..xen import VchanBackend, VchanError, get_backend
from ._cli import (
    UsageExit1Parser,
    add_logging_options,
    local_stdio,
    run_until_signal,
    setup_logging,
)

log = get_logger(__name__)

DEFAULT_SOCKET_DIR: Final = "/var/run/qubes"
_DOM0_NAMES: Final = ("dom0", "@adminvm", "uuid:00000000-0000-0000-0000-000000000000")


class ClientError(Exception):
    """The call could not be made; the message says why. Exit status 125."""


async def request_port(
    socket_dir: str, target: str, msg_type: MsgType, params: ExecParams, timeouts: Timeouts
) -> tuple[trio.SocketStream, int, int]:
    """Ask ``target``'s daemon to forward a request; returns (socket, domid, port).

    The socket stays open for the whole call: the daemon closes it when the
    agent reports the connection terminated.
    """
    path = os.path.join(socket_dir, f"qrexec.{target}")
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            raise ClientError(f"qrexec-daemon for {target!r} is not running ({path})") from exc
        raise ClientError(f"cannot connect to {path}: {exc.strerror}") from exc
    try:
        link = FramedLink(stream, Direction.DAEMON_TO_CLIENT)
        with trio.fail_after(timeouts.handshake):
            version = negotiate_version(
                CLIENT_PROTOCOL_VERSION, await link.receive_hello(), CLIENT_PROTOCOL_VERSION
            )
            await link.send_hello(CLIENT_PROTOCOL_VERSION)
            link.version = version
            await link.send(msg_type, params.encode())
            reply = await link.receive()
        if reply is None:
            raise ClientError(f"qrexec-daemon for {target!r} closed the connection")
        if reply.type != msg_type:
            raise ProtocolError("reply.type", f"expected {msg_type.name}, got {reply.name}")
        answer = decode_exec_params(reply.payload)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise
    return stream, answer.connect_domain, answer.connect_port


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
    msg_type = MsgType.JUST_EXEC if args.just_exec else MsgType.EXEC_CMDLINE
    cmdline = args.cmdline.encode("utf-8", "surrogateescape")
    daemon_socket, domid, port = await request_port(
        args.socket_dir, args.target, msg_type, ExecParams(0, 0, cmdline), timeouts
    )
    async with daemon_socket:
        log.debug("got data port", domid=domid, port=port)
        async with backend.listen(domid, port, read_min=DATA_RING_SIZE,
                                  write_min=DATA_RING_SIZE) as listener:
            vchan = await listener.accept(args.connect_timeout)
        link = FramedLink(vchan, Direction.SERVICE_TO_CALLER)
        async with vchan:
            with trio.fail_after(timeouts.handshake):
                await link.exchange_hello(PROTOCOL_VERSION, send_first=True)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args, "qrexec-client")
    timeouts = Timeouts.from_env()
    if args.connect_timeout is None:
        args.connect_timeout = timeouts.data_vchan_accept
    if args.target in _DOM0_NAMES:
        print("qrexec-client: dom0 as target is not supported yet", file=sys.stderr)
        return int(ExitCode.PROBLEM)
    try:
        backend = get_backend(send_finish=timeouts.send_finish)
        return run_until_signal(lambda: run_call(args, backend, timeouts))
    except (ClientError, VchanError, ProtocolError, LaunchError, trio.TooSlowError) as exc:
        print(f"qrexec-client: {exc or type(exc).__name__}", file=sys.stderr)
        return int(ExitCode.PROBLEM)


if __name__ == "__main__":
    sys.exit(main())
