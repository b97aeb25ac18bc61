"""qrexec-client's dom0 -> VM calls through the blocking driver.

``-d VM [-e] [-t] [-T] [-E] [-p DATA] [-w SEC] USER:CMDLINE`` with our own
stdio: ask the VM's daemon for a data port, serve the data vchan on it, run
the caller's side of the call. What this driver does not run (``-l``,
``-c``, ``-k``, ``--use-stdin-socket``, dom0 targets, a vchan backend whose
extension is not built)
is named by :func:`fast_path_problem` and goes to the trio implementation.
"""

from __future__ import annotations

from _socket import socket as raw_socket

from .._ids import call_id
from .._logging import bind_context, get_logger
from ..protocol import ExecCmdline, JustExec, caller_exit_code
from ._call import call_with_stdio
from ._daemon_client import DOM0_NAMES, request_port_blocking
from ._vchan import backend_problem

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .._config import Timeouts
    from .._options import Namespace

log = get_logger(__name__)


def fast_path_problem(args: Namespace) -> str | None:
    """Why this call needs the trio implementation (None: this driver runs it)."""
    for given, what in ((args.local_command is not None, "-l"),
                        (args.connect_existing is not None, "-c"),
                        (args.kill, "-k"), (args.use_stdin_socket, "--use-stdin-socket"),
                        (args.target in DOM0_NAMES, "a dom0 target")):
        if given:
            return what
    return backend_problem()


def run(args: Namespace, timeouts: Timeouts) -> int:
    """Run a dom0 -> VM call; its exit status (the reference's rules, as the trio path)."""
    cmdline = args.cmdline.encode("utf-8", "surrogateescape")
    request = JustExec(0, 0, cmdline) if args.just_exec else ExecCmdline(0, 0, cmdline)
    daemon, domid, port = request_port_blocking(args.socket_dir, args.target, request,
                                                timeouts, raw_socket)
    # The call's id, as the daemon and the agent name it too (nursery.call_id).
    bind_context(call=call_id(domid, port))
    # The socket stays open for the whole call: the daemon closes it at the call's end.
    try:
        log.debug("got data port", domid=domid, port=port)
        status = call_with_stdio(domid, port, accept_timeout=args.connect_timeout,
                                 timeouts=timeouts,
                                 prefix=args.prefix_data.encode("utf-8", "surrogateescape"),
                                 filter_output=args.filter_stdout,
                                 filter_errors=args.filter_stderr)
    finally:
        daemon.close()
    return final_status(args, status, None)


def final_status(args: Namespace, remote: int | None, local: int | None) -> int:
    """qrexec-client's exit status, either driver: the call's (``-E``: 0 once the remote
    status came), from the remote status (None or negative: it never came)."""
    if remote is None or remote < 0:
        log.warning("data vchan closed before the exit code")
    elif args.no_exit_code:
        return 0
    return caller_exit_code(remote, local)
