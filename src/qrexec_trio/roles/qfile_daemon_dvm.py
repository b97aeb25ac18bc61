"""qfile-daemon-dvm SERVICE SRC USER: run one call in a new DispVM, then destroy it.

As in R2: the DispVM is made from SRC's default DispVM template, the call
``USER:QUBESRPC SERVICE SRC`` runs in it with this program's stdin and
stdout, and when that call ends (or this program is stopped) the DispVM is
destroyed. Exit status: the call's, or 125 if the DispVM could not be had.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import trio

from .._config import Timeouts
from .._defaults import QUBESD_SOCKET, QUBESD_SOCKET_ENV
from .._help import finish_parser
from .._logging import get_logger
from .._programs import program
from ..domains import DomainsError, QubesdDomains, disposable
from ..nursery import child_process, exit_status
from ..protocol import ExitStatus
from ._cli import add_logging_options, run_until_signal, setup_logging
from .daemon import DEFAULT_SOCKET_DIR

log = get_logger(__name__)


async def run_in_dispvm(args: argparse.Namespace, timeouts: Timeouts) -> int:
    domains = QubesdDomains(args.qubesd_socket, call_timeout=timeouts.admin_call)
    by_name = {d.name: d for d in await domains.list()}
    source = by_name.get(args.source)
    template = args.template or (source.default_dispvm if source else None)
    if template is None:
        raise DomainsError("QubesVMError", f"{args.source} has no default DispVM template")
    async with disposable(domains, template, timeouts) as name:
        argv = [program("qrexec-client"), "--socket-dir", args.socket_dir, "-d", name,
                f"{args.user}:QUBESRPC {args.service} {args.source}"]
        # The call uses our own stdin and stdout; its end ends the DispVM.
        async with child_process(argv, timeouts=timeouts, stdin=None, stdout=None,
                                 stderr=None) as call:
            return exit_status(await call.wait())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qfile-daemon-dvm", description=__doc__)
    parser.add_argument("service", metavar="SERVICE[+ARG]", help="the service to call")
    parser.add_argument("source", metavar="SRC", help="the calling domain")
    parser.add_argument("user", metavar="USER", help="the user the service runs as")
    parser.add_argument("--template", help="the DispVM template (default: SRC's default)")
    qubesd_socket = os.environ.get(QUBESD_SOCKET_ENV, QUBESD_SOCKET)
    parser.add_argument("--qubesd-socket", default=qubesd_socket, metavar="PATH",
                        help=f"the domain manager's admin socket (default {qubesd_socket})")
    parser.add_argument("--socket-dir", default=DEFAULT_SOCKET_DIR, metavar="DIR",
                        help=f"where the qrexec-daemon sockets are (default {DEFAULT_SOCKET_DIR})")
    add_logging_options(parser, default="warning")
    finish_parser(parser, "qfile-daemon-dvm qubes.OpenInVM work user < document.pdf",
                  "qfile-daemon-dvm --template dvm-offline qubes.OpenURL work user")
    args = parser.parse_args(argv)
    setup_logging(args, "qfile-daemon-dvm")
    timeouts = Timeouts.from_env()
    try:
        return run_until_signal(lambda: run_in_dispvm(args, timeouts))
    except (DomainsError, trio.TooSlowError, OSError) as exc:
        print(f"qfile-daemon-dvm: {exc or type(exc).__name__}", file=sys.stderr)
        return int(ExitStatus.PROBLEM)


if __name__ == "__main__":
    sys.exit(main())
