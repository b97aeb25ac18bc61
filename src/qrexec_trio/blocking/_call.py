"""A call's data phase with our own stdio, on a data vchan we serve: what both clients
do on the paths where the caller serves the vchan (qrexec-client-vm's trigger socket,
qrexec-client -d). Its own module, so that the R2 path does not load the vchan server.
"""

from __future__ import annotations

from ..protocol import DATA_RING_SIZE, CallerSession
from ._io import CallerLoop, close_stdout, exchange_hello
from ._vchan import serve_one

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .._config import Timeouts

def call_with_stdio(domain: int, port: int, *, accept_timeout: float, timeouts: Timeouts,
                    prefix: bytes, filter_output: bool, filter_errors: bool,
                    ring: int = DATA_RING_SIZE) -> int | None:
    """Serve a call's data vchan to ``domain`` on ``port`` and run the caller's side with
    our own stdin, stdout and stderr: the remote exit status (None: the vchan ended first).
    """
    vchan = serve_one(domain, port, timeout=accept_timeout, read_min=ring, write_min=ring)
    try:
        reader = exchange_hello(vchan, timeout=timeouts.handshake)
        assert reader.version is not None
        session = CallerSession(reader.version, filter_output=filter_output,
                                filter_errors=filter_errors)
        loop = CallerLoop(vchan, reader, session, input_fd=0, output_fd=1, errors_fd=2,
                          close_output=close_stdout, prefix=prefix)
        status = loop.run()
        loop.finish_input(timeouts.send_finish)
    finally:
        vchan.close()
    return status
