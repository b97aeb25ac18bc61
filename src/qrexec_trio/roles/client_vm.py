"""qrexec-client-vm: call a service from inside a VM (wire-protocol.md §7.2, §13.2;
r2-design.md §4). A drop-in for the reference's program.

``qrexec-client-vm [options] TARGET SERVICE[+ARG] [PROG [ARGS...]]``

Options stop at the first operand, so PROG's own options pass through. TARGET
may use ``@default``, ``@dispvm[:X]`` or the legacy ``$`` spelling (rewritten
to ``@``); an empty TARGET means ``@default``.

Two ways to ask the agent (paths and layouts in :mod:`..protocol._vm_local`); the
program picks one by itself:

* **R2**, when the agent offers it (its fdpass socket ``PATH-fdpass`` and its
  FIFO ``PATH-fifo`` exist beside the trigger socket; ``--use-r2-fdpass``
  insists on it). Three connections to the fdpass socket give three sockets
  and their connection id; one record in the FIFO asks for the call. The
  agent runs the data vchan itself and relays it to the sockets: socket 0
  carries the remote stdout, socket 1 our input, socket 2 the status channel
  (remote stderr, then the exit status or a refusal). With PROG, PROG runs as
  our child on sockets 0 and 1 (its stderr is ours) while we read the status
  channel. The FIFO record has no source field and fixed-size fields, so
  ``--source-qube`` and names too long for the record use the trigger socket;
  ``--buffer-size`` does not apply (the agent's data vchan uses the default
  rings).
* **The trigger socket** ``PATH`` (today's reference agent has only this one;
  ``--use-trigger-socket`` insists on it). We send one MSG_TRIGGER_SERVICE4,
  read the 8-byte answer (EOF: refused), serve the data vchan ourselves and
  run the caller side of the call, with PROG as a child on socket pairs, or
  with our own stdio.

Either way, as the reference does: without PROG our stdout is closed as soon
as the remote stdout ends, and we exit once the remote exit status came, even
if our stdin is still open (it is not read further). If whoever reads our
stdout goes away, its data is dropped from then on, our stdin is still sent,
and the exit status is still the remote one. With PROG, PROG's stdin and
stdout are connected to the service, its stderr is ours; ``SAVED_FD_0`` and
``SAVED_FD_1`` name duplicates of our own stdin and stdout, and
``SAVED_FD_2`` of our stderr only if ``PASS_LOCAL_STDERR`` is set.

Exit status: the remote status if non-zero, else PROG's (0 without PROG); 128+N
for a local PROG killed by signal N; 126 refused ("Request refused"); 255 if
the call died before an exit status; 2 usage; 1 local error (no agent, bad
name or buffer size, PROG not found).
"""

from __future__ import annotations

import os
import sys

from .._config import Timeouts
from .._errors import QrexecError
from .._logging import get_logger
from .._options import Namespace, Operand, Option, Parser, logging_options, setup_logging
from .._unix import ensure_standard_fds
from ..blocking import Stopped, client_vm_problem, run_client_vm_call, stop_on_signals
from ..blocking._vm_call import (
    EXIT_LOCAL_ERROR,
    EXIT_USAGE,
    RING_MAX,
    RING_MIN,
    Refused,
    parse_buffer_size,
)
from ..protocol import DATA_RING_SIZE, ExitStatus
from ..protocol._vm_local import DEFAULT_AGENT_SOCKET

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

log = get_logger(__name__)


def build_parser() -> Parser:
    return Parser(
        "qrexec-client-vm",
        (
            Option("-a", "--agent-socket", default=DEFAULT_AGENT_SOCKET, metavar="PATH",
                   help=f"the agent's trigger socket (default {DEFAULT_AGENT_SOCKET}); "
                   "its R2 fdpass socket and FIFO, if it has them, are PATH-fdpass "
                   "and PATH-fifo"),
            Option(None, "--buffer-size", default="0", metavar="N",
                   help="minimum data vchan ring size, trigger-socket path only "
                   f"(default and 0: {DATA_RING_SIZE}; rounded up to a power of two "
                   f"from {RING_MIN} to {RING_MAX})"),
            Option("-t", "--filter-escape-chars-stdout", dest="filter_stdout", action="true",
                   default=None, help="replace escape characters in remote stdout "
                   "(default: when stdout is a terminal and there is no PROG)"),
            Option(None, "--no-filter-escape-chars-stdout", dest="filter_stdout",
                   action="false", help="opposite of -t"),
            Option("-T", "--filter-escape-chars-stderr", dest="filter_stderr", action="true",
                   default=None, help="replace escape characters in remote stderr "
                   "(default: when stderr is a terminal)"),
            Option(None, "--no-filter-escape-chars-stderr", dest="filter_stderr",
                   action="false", help="opposite of -T"),
            Option("-p", "--prefix-data", action="once", metavar="DATA",
                   help="send DATA before stdin (once)"),
            # Counted: main refuses it twice, with the reference's message.
            Option(None, "--use-stdin-socket", action="count",
                   help="stdin is a stream socket carrying both directions "
                   "(remote stdout goes back into it); not with PROG"),
            Option("-s", "--source-qube", metavar="NAME",
                   help="ask for the call on behalf of qube NAME (trigger socket only; "
                   "not in the reference)"),
            Option(None, "--use-trigger-socket", action="true",
                   help="always use the agent's trigger socket PATH, as today's "
                   "reference does (default: when the agent has no R2 fdpass socket)"),
            Option(None, "--use-r2-fdpass", action="true",
                   help="always use the R2 fdpass socket and FIFO (default: when the "
                   "agent has them and the request fits the R2 record)"),
            *logging_options(default="warning"),
        ),
        (
            Operand("target", "TARGET", "the qube to call ('' = @default)"),
            Operand("service", "SERVICE[+ARG]", "the service to call"),
            Operand("prog", "PROG [ARGS...]",
                    "a program to connect to the service instead of stdin/stdout", rest=True),
        ),
        description="Call a qrexec service in another qube.",
        epilog="Exit status: the remote service's if non-zero, else PROG's; 126 if "
        "refused, 255 if the call died, 2 on usage errors, 1 on other local errors. "
        "PASS_LOCAL_STDERR: PROG also gets SAVED_FD_2.\n\n"
        "examples:\n"
        "  qrexec-client-vm vault qubes.GetDate               # stdin/stdout are the call's\n"
        "  qrexec-client-vm @dispvm qubes.OpenURL /bin/echo https://example.org/\n"
        "  qrexec-client-vm '' qubes.Filecopy /usr/lib/qubes/qfile-agent FILE",
        usage_status=EXIT_USAGE, version=True,
        # Options end at the first operand (getopt's "+"): PROG's own options pass through.
        stop_at_operand=True,
        exclusive=[("use_trigger_socket", "use_r2_fdpass")],
    )


def _default_filters(args: Namespace) -> None:
    if args.filter_stdout is None:
        args.filter_stdout = not args.prog and os.isatty(1)
    if args.filter_stderr is None:
        args.filter_stderr = os.isatty(2)


def run(args: Namespace, timeouts: Timeouts) -> int:
    """The call, by the blocking driver where it can (a trivial call then loads neither
    trio nor structlog), else by trio."""
    problem = client_vm_problem(args)
    if problem is None:
        status = run_client_vm_call(args, timeouts)
        if status is not None:
            return status
        problem = "its data vchan's backend"
    log.debug("the trio driver runs this call", why=problem)
    from . import _client_vm_trio  # noqa: PLC0415 (loaded only for the calls that need it)

    return _client_vm_trio.run(args, timeouts)


def _stdin_socket_problem() -> str | None:
    from ._local_io import stdin_socket_problem  # noqa: PLC0415 (rare: load on demand)

    return stdin_socket_problem()


def main(argv: Sequence[str] | None = None, *,
         refused_message: str = "Request refused") -> int:
    """The program; ``qrexec-trio call`` runs it in-process with its own wording for a
    refusal (the reference's is ``Request refused``)."""
    ensure_standard_fds()
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args, "qrexec-client-vm")
    if args.use_stdin_socket > 1:
        parser.error("--use-stdin-socket passed twice")
    if args.use_stdin_socket and args.prog:
        parser.error("cannot spawn a local process with --use-stdin-socket")
    if args.use_stdin_socket and (problem := _stdin_socket_problem()) is not None:
        parser.error(problem)
    _default_filters(args)
    stop_on_signals()
    try:
        args.buffer_size = parse_buffer_size(args.buffer_size)
        return run(args, Timeouts.from_env())
    except Refused:
        print(refused_message, file=sys.stderr)
        return int(ExitStatus.REFUSED)
    except (QrexecError, TimeoutError) as exc:
        print(f"qrexec-client-vm: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_LOCAL_ERROR
    except Stopped as stop:
        return stop.exit_status
    except KeyboardInterrupt:
        return 128 + 2


if __name__ == "__main__":
    sys.exit(main())
