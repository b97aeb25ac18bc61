"""qrexec-client: dom0's client (wire-protocol.md §7.1, §7.3, §7.4, §13.1).

Four ways to use it, as the reference's:

* ``-d VM CMDLINE``: run a command in a VM. Ask the VM's daemon for a data
  port, offer the data vchan on it, and once the agent connected stream
  stdin/stdout/stderr both ways; exit with the remote exit code as soon as it
  arrives (stdin may still be open), closing our stdout at the remote's
  stdout EOF. ``-k`` kills the VM afterwards (qubesd ``admin.vm.Kill``).
* ``-d dom0 -c REQ,SRC,SRCID CMDLINE``: answer a VM's pending request with a
  dom0 command: a ``QUBESRPC`` service line (run with the same service code
  as a VM's agent) or any plain command (run with bash); what cannot run is
  reported to the VM on the data vchan (exit code 125 or 127), never left
  hanging.
* ``-d VM -c REQ,SRC,SRCID USER:CMDLINE``: connect a VM's pending request to
  a service in another VM, directly between the two VMs as the reference
  does; ``-W`` waits for the connection's end.
* ``-d dom0 DEFAULT:QUBESRPC SVC[+ARG] SRC``: a dom0 to dom0 service call,
  run in place (we become the service).
"""

from __future__ import annotations

import math
import sys

from .._config import Timeouts
from .._defaults import DAEMON_SOCKET_DIR, QUBESD_SOCKET, QUBESD_SOCKET_ENV
from .._errors import QrexecError
from .._logging import get_logger
from .._options import Namespace, Operand, Option, Parser, logging_options, setup_logging
from .._unix import ensure_standard_fds
from ..blocking import Stopped, client_problem, run_client_call, stop_on_signals
from ..blocking._daemon_client import DOM0_NAMES
from ..protocol import ExitStatus

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_SOCKET_DIR = DAEMON_SOCKET_DIR

log = get_logger(__name__)


def build_parser() -> Parser:
    return Parser(
        "qrexec-client",
        (
            Option("-d", None, dest="target", metavar="TARGET", required=True,
                   help="the VM (name, domid or uuid:UUID), or dom0 / @adminvm"),
            Option("-l", None, dest="local_command", metavar="CMD",
                   help="connect the remote command to this local program instead of stdio"),
            Option("-c", None, dest="connect_existing", metavar="ID,SRCNAME,SRCID",
                   help="answer a VM's pending request ID from SRCNAME (domid SRCID): "
                   "connect it to CMDLINE in TARGET (dom0: a service line or a command)"),
            Option("-e", None, dest="just_exec", action="true",
                   help="just start the command (MSG_JUST_EXEC); no data, exit 0 if started"),
            Option("-E", "--no-exit-code", action="true",
                   help="exit 0 after a completed call, whatever the remote status"),
            Option("-t", None, dest="filter_stdout", action="true",
                   help="replace escape characters in remote stdout"),
            Option("-T", None, dest="filter_stderr", action="true",
                   help="replace escape characters in remote stderr"),
            Option("-w", None, dest="connect_timeout", convert=float, metavar="SEC",
                   help="wait at most SEC for the data vchan (default 10; 0 = forever)"),
            Option("-W", None, dest="wait_connection_end", action="true",
                   help="with -c to a VM: wait for the connection's end"),
            Option("-k", None, dest="kill", action="true",
                   help="kill the target VM right before exiting (qubesd admin.vm.Kill; "
                   f"socket: ${QUBESD_SOCKET_ENV} or {QUBESD_SOCKET})"),
            Option("-p", "--prefix-data", default="", metavar="DATA",
                   help="send DATA before stdin"),
            Option(None, "--use-stdin-socket", action="true",
                   help="fd 0 is a stream socket: use it for both stdin and stdout"),
            Option(None, "--socket-dir", default=DEFAULT_SOCKET_DIR,
                   help=f"qrexec-daemon socket directory (default {DEFAULT_SOCKET_DIR})"),
            *logging_options(default="warning"),
        ),
        (Operand("cmdline", "CMDLINE", "USER:COMMAND or USER:QUBESRPC SERVICE[+ARG] SOURCE"),),
        description="Run a command in a VM through its qrexec-daemon, answer a VM's request, "
        "or call a dom0 service from dom0.",
        epilog="examples:\n"
        "  qrexec-client -d work user:'ls -l'                      # a command in VM work\n"
        "  qrexec-client -d work DEFAULT:QUBESRPC qubes.VMShell dom0  # a service, from dom0",
        # As the reference's: usage errors exit 1.
        usage_status=1, version=True,
        exclusive=[("local_command", "connect_existing", "just_exec")],
    )


def _connect_timeout(value: float | None, timeouts: Timeouts) -> float:
    if value is None:
        return timeouts.data_vchan_accept
    return math.inf if value <= 0 else value


def _run(args: Namespace, timeouts: Timeouts) -> int:
    """The call, by the blocking driver where it can (a trivial dom0 -> VM call then
    loads neither trio nor structlog), else by trio."""
    problem = client_problem(args)
    if problem is None:
        try:
            return run_client_call(args, timeouts)
        except (QrexecError, TimeoutError) as exc:
            print(f"qrexec-client: {exc or type(exc).__name__}", file=sys.stderr)
            return int(ExitStatus.PROBLEM)
    log.debug("the trio driver runs this call", why=problem)
    from . import _client_trio  # noqa: PLC0415 (loaded only for the calls that need it)

    return _client_trio.run(args, timeouts)


def main(argv: Sequence[str] | None = None) -> int:
    ensure_standard_fds()
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.use_stdin_socket:
        if args.local_command is not None:
            parser.error("at most one of -l and --use-stdin-socket can be specified")
        from ._local_io import stdin_socket_problem  # noqa: PLC0415 (rare: on demand)

        problem = stdin_socket_problem()
        if problem is not None:
            print(f"qrexec-client: {problem}", file=sys.stderr)
            return 2
    dom0 = args.target in DOM0_NAMES
    if dom0 and args.connect_existing is None:
        if args.just_exec or args.local_command is not None:
            parser.error("a dom0 to dom0 call takes neither -e nor -l")
        from ._client_trio import run_dom0_service  # noqa: PLC0415 (as above)

        return run_dom0_service(args)
    setup_logging(args, "qrexec-client")
    timeouts = Timeouts.from_env()
    args.connect_timeout = _connect_timeout(args.connect_timeout, timeouts)
    stop_on_signals()
    try:
        return _run(args, timeouts)
    except Stopped as stop:
        return stop.exit_status
    except KeyboardInterrupt:
        return 128 + 2


if __name__ == "__main__":
    sys.exit(main())
