"""qrexec-client-vm's calls through the blocking driver.

Either way of asking the agent (:mod:`qrexec_trio.blocking._vm_call`), with our
own stdin, stdout and stderr; what this driver does not run (a local PROG,
``--use-stdin-socket``, a vchan backend it cannot drive on the trigger-socket
path) is named by :func:`fast_path_problem` and goes to the trio implementation.
"""

from __future__ import annotations

from _socket import socket as raw_socket

from .._logging import get_logger
from ..protocol import caller_exit_code
from ._io import close_stdout
from ._relay import RefusedByAgent, r2_relay
from ._vm_call import (
    R2,
    TRIGGER,
    Refused,
    ask_agent,
    choose_path,
    prefix_data,
    r2_request,
    request_frame,
    ring_size,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .._config import Timeouts
    from .._options import Namespace

log = get_logger(__name__)


def fast_path_problem(args: Namespace) -> str | None:
    """Why this call needs the trio implementation (None: this driver runs it)."""
    if args.prog:
        return "a local program (PROG)"
    if args.use_stdin_socket:
        return "--use-stdin-socket"
    return None


def run(args: Namespace, timeouts: Timeouts) -> int | None:
    """Run the call; its exit status, or None if it must go to the trio implementation
    (decided before anything is asked of the agent)."""
    target, service, frame = request_frame(args)
    path = choose_path(args, target, service)
    log.debug("request path chosen", path=path)
    if path == R2:
        return _r2_call(args, target, service, timeouts)
    assert path == TRIGGER
    # Only this path serves a vchan: R2 calls (our agent's default) do not load it.
    from ._vchan import backend_problem  # noqa: PLC0415

    if (problem := backend_problem()) is not None:
        log.debug("the trio driver runs this call", why=problem)
        return None
    return _trigger_call(args, frame, timeouts)


def _r2_call(args: Namespace, target: bytes, service: bytes, timeouts: Timeouts) -> int:
    sockets = r2_request(args.agent_socket, service, target, timeouts, raw_socket)
    try:
        status = r2_relay(sockets, prefix=prefix_data(args), filter_errors=args.filter_stderr,
                          close_output=close_stdout, filter_output=args.filter_stdout)
    except RefusedByAgent:
        raise Refused from None
    finally:
        for sock in sockets:
            sock.close()
    if status is None:
        log.warning("the call ended without an exit status")
    return caller_exit_code(status, None)


def _trigger_call(args: Namespace, frame: bytes, timeouts: Timeouts) -> int:
    from ._call import call_with_stdio  # noqa: PLC0415 (as in run: the vchan server)

    trigger, domain, port = ask_agent(args.agent_socket, frame, timeouts, raw_socket)
    # The socket stays open for the whole call: closing it tells the agent we are done.
    try:
        log.debug("serving the data vchan", domain=domain, port=port)
        status = call_with_stdio(domain, port, accept_timeout=timeouts.data_vchan_connect,
                                 timeouts=timeouts, prefix=prefix_data(args),
                                 filter_output=args.filter_stdout,
                                 filter_errors=args.filter_stderr,
                                 # --buffer-size, as the trio path sizes the rings
                                 ring=ring_size(args.buffer_size))
    finally:
        trigger.close()
    return caller_exit_code(status, None)
