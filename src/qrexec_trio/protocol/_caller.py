"""The caller's side of a call's data phase, sans-IO (wire-protocol.md §11).

Both drivers of a call's caller side use this one state machine: the trio
pump (:func:`qrexec_trio.nursery.call_data`, in the daemon-side tools and the
in-process API) and the blocking driver of the short-lived clients
(:mod:`qrexec_trio.blocking`). It decides, for each message the service side
sends, what happens locally, and frames local input; the drivers only move
bytes and wait.

The rules, as the reference client keeps them:

* remote stdout goes to the local output until its EOF (an empty
  MSG_DATA_STDOUT), which closes the local output; a local reader that went
  away (:meth:`CallerSession.output_gone`) makes later stdout be dropped, the
  call goes on;
* remote stderr goes to the local error output; its empty message is only a
  marker;
* MSG_DATA_EXIT_CODE ends the call at once, whatever is still open;
* local input is sent as MSG_DATA_STDIN in chunks no larger than the
  negotiated limit, after the ``--prefix-data`` bytes, and ends with an empty
  MSG_DATA_STDIN.

Imports stay light: the short-lived clients load this module on every call.
"""

from __future__ import annotations

from ._constants import ExitStatus, max_data_chunk
from ._events import Data, ExitCode, Stream
from ._filter import filter_escape_chars

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

    from ._events import Event

#: What :meth:`CallerSession.handle` asks the driver to do.
#: ``(WRITE_OUTPUT, data)``: write ``data`` to the local output.
WRITE_OUTPUT: Final = "write-output"
#: ``(WRITE_ERRORS, data)``: write ``data`` to the local error output.
WRITE_ERRORS: Final = "write-errors"
#: ``(CLOSE_OUTPUT, b"")``: the remote stdout ended: close the local output.
CLOSE_OUTPUT: Final = "close-output"
#: ``(FINISHED, b"")``: the exit status came (:attr:`CallerSession.status`); the call is over.
FINISHED: Final = "finished"

#: The remote status a call has when its vchan closed before the exit status came.
NO_STATUS: Final = -1


class CallerSession:
    """One call's caller side: messages in, local actions out; local input in, frames out."""

    __slots__ = ("_errors_open", "_output_open", "filter_errors", "filter_output",
                 "input_done", "status", "version")

    def __init__(self, version: int, *, filter_output: bool = False,
                 filter_errors: bool = False) -> None:
        #: The negotiated data-vchan version (it bounds the chunk size).
        self.version = version
        self.filter_output = filter_output
        self.filter_errors = filter_errors
        #: The remote exit status once it came; ``None`` until then.
        self.status: int | None = None
        #: Whether the empty MSG_DATA_STDIN (our input's end) has been framed.
        self.input_done = False
        self._output_open = True
        self._errors_open = True

    # -- what the service side sends ------------------------------------------------

    def handle(self, event: Event) -> tuple[str, bytes] | None:
        """What to do locally for one message from the service side (``None``: nothing).

        The message reader of the link (direction service to caller) lets only
        data and exit-code messages through, so nothing else can arrive here.
        """
        if isinstance(event, ExitCode):
            self.status = event.status
            return FINISHED, b""
        if not isinstance(event, Data):
            raise TypeError(f"unexpected {event!r} on a caller's data vchan")
        data = event.data
        if event.stream == Stream.STDOUT:
            if not data:
                if not self._output_open:
                    return None
                self._output_open = False
                return CLOSE_OUTPUT, b""
            if not self._output_open:
                return None
            return WRITE_OUTPUT, filter_escape_chars(data) if self.filter_output else data
        if event.stream == Stream.STDERR:
            if not data or not self._errors_open:
                return None  # an empty one is the stderr EOF marker: nothing to do
            return WRITE_ERRORS, filter_escape_chars(data) if self.filter_errors else data
        raise TypeError(f"unexpected {event!r} on a caller's data vchan")

    def output_gone(self) -> None:
        """The local output's reader went away: drop remote stdout from now on."""
        self._output_open = False

    def errors_gone(self) -> None:
        """The local error output went away: drop remote stderr from now on."""
        self._errors_open = False

    @property
    def finished(self) -> bool:
        return self.status is not None

    # -- what we send -----------------------------------------------------------------

    def chunk_limit(self) -> int:
        """The largest data payload one MSG_DATA_STDIN may carry on this link."""
        return max_data_chunk(self.version)

    def frame_input(self, data: bytes) -> bytes:
        """``data`` as MSG_DATA_STDIN frames (empty ``data`` frames nothing)."""
        limit = self.chunk_limit()
        return b"".join(Data(Stream.STDIN, data[start:start + limit]).encode()
                        for start in range(0, len(data), limit))

    def frame_input_end(self) -> bytes:
        """The empty MSG_DATA_STDIN that ends our input (once)."""
        self.input_done = True
        return Data(Stream.STDIN, b"").encode()


def caller_exit_code(remote_status: int | None, local_status: int | None) -> int:
    """qrexec's rule: the remote status if non-zero, else the local program's, else 0.

    ``None`` (or :data:`NO_STATUS`): the call died before an exit status came.
    """
    if remote_status is None or remote_status < 0:
        return int(ExitStatus.CONNECTION_LOST)
    if remote_status != 0:
        return remote_status & 0xFF
    return local_status or 0
