"""The data pump: one data vchan <-> the local end of a call (wire-protocol.md §11).

Two roles, one module:

* :func:`serve_data` is the **service side**: it feeds MSG_DATA_STDIN to the
  service, sends its stdout and stderr, both EOF markers, and the exit code
  once both outputs ended *and* the service exited.
* :func:`call_data` is the **caller side**: it sends local input as
  MSG_DATA_STDIN (then an empty one as EOF), writes remote stdout and stderr
  locally, and returns the remote exit status.

Backpressure is end to end: we read the next message only after the previous
one was written locally, and read local data only after the previous chunk
went into the vchan, so memory per connection stays bounded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from .. import protocol
from .._errors import QrexecError
from .._logging import get_logger
from ..protocol import NO_STATUS, CallerSession, Data, ExitCode, Stream
from ._connection import Meter
from ._errors import one_error
from ._link import FramedLink

log = get_logger(__name__)


class PeerGone(QrexecError):
    """The other end of the data vchan closed before the call was complete."""


async def _noop() -> None:
    await trio.lowlevel.checkpoint()


@dataclass
class ServiceEnd:
    """What runs the service locally, as the pump sees it."""

    #: Where MSG_DATA_STDIN goes (a pipe or a socket); ``None`` drops it.
    input: trio.abc.SendStream | None
    #: The service's output, sent as MSG_DATA_STDOUT.
    output: trio.abc.ReceiveStream
    #: The service's stderr, sent as MSG_DATA_STDERR; ``None`` for services
    #: without one (socket services, dom0 services): they send an empty
    #: MSG_DATA_STDERR first, as the reference does.
    errors: trio.abc.ReceiveStream | None
    #: Waits for the service to finish and returns its exit status.
    wait: Callable[[], Awaitable[int]]
    #: Ends the service's input (close the pipe, or shut down a socket's write side).
    close_input: Callable[[], Awaitable[None]] = _noop


async def _send_output(
    source: trio.abc.ReceiveStream, link: FramedLink, stream: Stream, meter: Meter
) -> None:
    while True:
        try:
            data = await source.receive_some(link.data_chunk_size())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        meter.to_caller += len(data)
        await link.send(Data(stream, bytes(data)))
        if not data:
            return


async def _feed_input(link: FramedLink, end: ServiceEnd, meter: Meter) -> None:
    """Caller's MSG_DATA_STDIN -> the service, until the service is done with it."""
    input_open = end.input is not None
    while True:
        event = await link.receive()
        if event is None:
            raise PeerGone("caller closed the data vchan before the exit code")
        # The reader lets only Data(STDIN) through on this link.
        assert isinstance(event, Data)
        meter.to_service += len(event.data)
        if not input_open:
            continue  # after STDIN EOF, or once the service exited, data is dropped
        if not event.data:
            input_open = False
            await end.close_input()
            continue
        assert end.input is not None
        try:
            await end.input.send_all(event.data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The service stopped reading (or exited): drop the rest, as the reference does.
            input_open = False


async def serve_data(link: FramedLink, end: ServiceEnd, meter: Meter | None = None) -> int:
    """Run the service side of the data phase; return the exit status it reported.

    Raises :class:`PeerGone` if the caller vanished before the exit code, so
    that the connection scope kills the service.
    """
    if end.errors is None:
        await link.send(Data(Stream.STDERR, b""))
    with one_error():
        return await _serve_data(link, end, meter or Meter())


async def _serve_data(link: FramedLink, end: ServiceEnd, meter: Meter) -> int:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_feed_input, link, end, meter)
        status = 0
        async with trio.open_nursery() as outputs:
            outputs.start_soon(_send_output, end.output, link, Stream.STDOUT, meter)
            if end.errors is not None:
                outputs.start_soon(_send_output, end.errors, link, Stream.STDERR, meter)
            status = await end.wait()
            # The service exited: its input is closed at once, pending data dropped.
            await end.close_input()
        await link.send(ExitCode(status))
        nursery.cancel_scope.cancel()
    return status


async def send_spawn_failure(link: FramedLink, status: int) -> None:
    """The agent's answer when the service cannot start: both EOFs, then the status."""
    await link.send(Data(Stream.STDOUT, b""))
    await link.send(Data(Stream.STDERR, b""))
    await link.send(ExitCode(status))


@dataclass
class CallerEnd:
    """The caller's local side: where input comes from and output goes."""

    #: Local data to send as MSG_DATA_STDIN; ``None`` sends EOF at once.
    input: trio.abc.ReceiveStream | None
    #: Where remote stdout goes.
    output: trio.abc.SendStream
    #: Where remote stderr goes; ``None`` drops it.
    errors: trio.abc.SendStream | None
    #: Called at remote stdout EOF (closes the local program's stdin, ...).
    close_output: Callable[[], Awaitable[None]] = _noop
    #: Sent before any local input (``--prefix-data``).
    prefix: bytes = b""
    filter_stdout: bool = False
    filter_stderr: bool = False
    #: Set once sending input is over (its end sent, or the link refused it).
    _input_done: bool = field(default=False, init=False)


async def _send_input(link: FramedLink, end: CallerEnd, session: CallerSession,
                      meter: Meter) -> None:
    # The service side may finish (and close) without reading our input, as a
    # service that does not exist does. Its messages are still buffered for the
    # receiving loop, which decides how the call ended.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await _send_input_until_eof(link, end, session, meter)
    end._input_done = True


async def _send_input_until_eof(link: FramedLink, end: CallerEnd, session: CallerSession,
                                meter: Meter) -> None:
    meter.to_service += len(end.prefix)
    if end.prefix:
        await link.send_frames(session.frame_input(end.prefix))
    if end.input is not None:
        while True:
            try:
                data = await end.input.receive_some(link.data_chunk_size())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                break
            meter.to_service += len(data)
            await link.send_frames(session.frame_input(bytes(data)))
    await link.send_frames(session.frame_input_end())


async def _write_local(stream: trio.abc.SendStream | None, data: bytes) -> bool:
    """Write to a local stream; False if its reader went away (it gets no more data)."""
    if stream is None:
        return False
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


async def call_data(link: FramedLink, end: CallerEnd, *, finish_timeout: float,
                    meter: Meter | None = None) -> int:
    """Run the caller side of the data phase (the rules: :class:`CallerSession`).

    Returns the remote exit status, or -1 if the vchan closed before one came.
    """
    session = CallerSession(link.version or 2, filter_output=end.filter_stdout,
                            filter_errors=end.filter_stderr)
    with one_error():
        await _call_data(link, end, session, meter or Meter())
    if session.status is None:
        return NO_STATUS
    if not (end._input_done or session.input_done):
        # Best effort, as the reference: the service side may already have closed.
        with trio.move_on_after(finish_timeout):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await link.send_frames(session.frame_input_end())
    return session.status


async def _call_data(link: FramedLink, end: CallerEnd, session: CallerSession,
                     meter: Meter) -> None:
    if end.errors is None:
        session.errors_gone()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_input, link, end, session, meter)
        while not session.finished:
            event = await link.receive()
            if event is None:
                break
            if isinstance(event, Data):
                meter.to_caller += len(event.data)
            action = session.handle(event)
            if action is None:
                continue
            match action:
                case (protocol.WRITE_OUTPUT, data):
                    if not await _write_local(end.output, data):
                        session.output_gone()
                case (protocol.WRITE_ERRORS, data):
                    if not await _write_local(end.errors, data):
                        session.errors_gone()
                case (protocol.CLOSE_OUTPUT, _):
                    await end.close_output()
        # The call is over: stop reading local input.
        nursery.cancel_scope.cancel()
