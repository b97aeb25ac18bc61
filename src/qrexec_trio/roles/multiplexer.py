"""qubes-rpc-multiplexer SERVICE[+ARG] SOURCE [name|keyword TARGET]: find and run a service.

The one place dom0 services are started from, with the same lookup and
environment rules as the agent (``SVC+ARG`` then ``SVC`` across the service
directories; executables get ARG as argv[1]; as in R2, a handler file without
the x bit is run with ``/bin/sh``). The multiplexer replaces itself with the
service, so whoever started it sees the service's own exit status; its stdin,
stdout and stderr are the service's. Exit 127 if there is no such service,
125 if it cannot be run.

Its arguments are positional only, as the reference's. A lone ``--version``
or ``--help`` cannot be a call (a call has 2 or 4 arguments), so only then
are they read as options.
"""

from __future__ import annotations

import errno
import os
import sys

from .._options import version_line
from ..protocol import ExitStatus, ProtocolError, RpcCall, parse_cmdline
from ..services import LaunchError, ProgramPlan, Runner, service_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

USAGE = "usage: qubes-rpc-multiplexer SERVICE[+ARG] SOURCE [name|keyword TARGET]"
HELP = f"""{USAGE}

Find SERVICE[+ARG] in the service directories ($QREXEC_SERVICE_PATH) and become it.
Exit status: the service's; 127 if there is no such service, 125 if it cannot be run.

options (only as the sole argument):
  -h, --help   show this help and exit
  --version    print the version and exit

examples:
  qubes-rpc-multiplexer qubes.GetDate work
  qubes-rpc-multiplexer admin.vm.List+ work keyword adminvm
"""


def _call(args: Sequence[str]) -> RpcCall:
    line = "QUBESRPC " + " ".join(args)
    command = parse_cmdline(line.encode("utf-8", "surrogateescape"), with_user=False).command
    assert isinstance(command, RpcCall)  # the line starts with QUBESRPC
    return command


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["--version"], ["--help"], ["-h"]):
        version = version_line("qubes-rpc-multiplexer") + "\n"
        sys.stdout.write(version if args == ["--version"] else HELP)
        return 0
    if len(args) not in (2, 4) or any(not arg or " " in arg for arg in args):
        print(USAGE, file=sys.stderr)
        return int(ExitStatus.PROBLEM)
    runner = Runner(service_path(), allow_scripts=True)
    try:
        call = _call(args)
        identity = runner.identity_for(None)
        plan = runner.plan_rpc(call, identity)
        if not isinstance(plan, ProgramPlan):
            raise LaunchError(ExitStatus.PROBLEM, f"{call.descriptor} is a socket service; "
                              "the multiplexer runs programs only")
    except (LaunchError, ProtocolError) as exc:
        status = exc.status if isinstance(exc, LaunchError) else int(ExitStatus.PROBLEM)
        print(f"qubes-rpc-multiplexer: {exc}", file=sys.stderr)
        return status
    sys.stdout.flush()
    try:
        os.execve(plan.argv[0], plan.argv, plan.env)
    except OSError as exc:
        print(f"qubes-rpc-multiplexer: cannot run {plan.argv[0]}: {exc.strerror}",
              file=sys.stderr)
        missing = exc.errno == errno.ENOENT
        return int(ExitStatus.SERVICE_NOT_FOUND if missing else ExitStatus.PROBLEM)


if __name__ == "__main__":
    sys.exit(main())
