"""qrexec-trio torture: a fault-injection run against a local world.

It starts the torture world (three VMs and a DispVM template, each with the
``torture.Echo`` service; ``--print-config`` shows it) or uses a running one
(``--world``), and makes ``--calls`` calls, ``--concurrency`` at a time, on the
paths dom0 -> VM, VM -> VM and VM -> DispVM, with the real client programs.
Every call sends a random payload (from ``--seed``) and checks what comes back
and the service's checksum of what it got. A share of the calls
(``--fault-rate``) get a fault from ``--faults``: SIGKILL or SIGSTOP of the
caller, the service, the source or target agent, a daemon or a DispVM's agent,
a peer closing, a cancel through the connection registry, a stalled reader, a
slow writer. Then it reports, as a table (and ``--json``): calls completed,
faulted, failed unexpectedly, hung; teardown latency of faulted pipelines; and
leaks at rest (processes, fds, vchan files, ports, connections, DispVMs,
ledger entries). Exit 0 only with no leak, no hang and no unexpected failure;
1 otherwise; 2 for a usage error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .._logging import configure_logging
from ..roles._cli import run_until_signal
from ._options import parse_options
from ._report import Results
from ._run import torture
from ._world import WorldUnusable, config_text


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(sys.argv[1:] if argv is None else argv)
    if options.print_config:
        print(config_text(), end="")
        return 0
    # The torture's own log is for its programs' helpers' errors only.
    configure_logging("error", program="qrexec-trio torture")

    found: list[Results] = []

    async def run() -> int:
        found.append(await torture(options))
        return 0

    try:
        status = run_until_signal(run)
    except WorldUnusable as exc:
        print(f"qrexec-trio torture: {exc}", file=sys.stderr)
        return 1
    if not found:
        return status
    results = found[0]
    print(results.table(), flush=True)
    if options.json is not None:
        results.write_json(options.json)
    return 1 if results.failures() else 0
