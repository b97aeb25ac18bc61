"""The data pump against an in-memory peer (one layer, mocked neighbours)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from qrexec_trio.nursery import (
    CallerEnd,
    FramedLink,
    PeerGone,
    ServiceEnd,
    call_data,
    caller_exit_code,
    serve_data,
)
from qrexec_trio.protocol import (
    Data,
    Direction,
    Event,
    ExitCode,
    MessageReader,
    MsgType,
    RemoteProtocolError,
    Stream,
    UndecodableMessage,
    encode_frame,
)

#: How long the caller side waits to send its final STDIN EOF (nothing here waits that long).
FINISH = 5.0


class Wire:
    """The test's end of the data vchan: events out, validated events in."""

    def __init__(self, stream: trio.abc.Stream, receives: Direction) -> None:
        self.stream = stream
        self.reader = MessageReader(receives, version=4)

    async def send(self, event: Event) -> None:
        await self.stream.send_all(event.encode())

    async def events(self) -> list[Event]:
        got = []
        while data := await self.stream.receive_some(65536):
            self.reader.feed(data)
            while (event := self.reader.next_event()) is not None:
                got.append(event)
        self.reader.feed_eof()
        assert self.reader.at_clean_eof
        return got


def _pipe() -> tuple[trio.abc.SendStream, trio.abc.ReceiveStream]:
    return trio.testing.memory_stream_one_way_pair()


async def call_output_only(link: FramedLink, output: trio.abc.SendStream) -> int:
    """The caller side with no local input and no local stderr."""
    return await call_data(link, CallerEnd(input=None, output=output, errors=None),
                           finish_timeout=FINISH)


async def test_caller_side_writes_output_and_returns_the_remote_status() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    link = FramedLink(ours, Direction.SERVICE_TO_CALLER, version=4)
    wire = Wire(theirs, Direction.CALLER_TO_SERVICE)
    in_send, in_recv = _pipe()
    out_send, out_recv = _pipe()
    err_send, err_recv = _pipe()
    closed = []

    async def close_output() -> None:
        closed.append(True)

    end = CallerEnd(input=in_recv, output=out_send, errors=err_send, close_output=close_output,
                    prefix=b"pre:")
    async with trio.open_nursery() as nursery:
        async def service() -> None:
            await in_send.send_all(b"input")
            await in_send.aclose()
            for event in [Data(Stream.STDOUT, b"abc"), Data(Stream.STDERR, b"e"),
                          Data(Stream.STDOUT, b""), Data(Stream.STDERR, b""), ExitCode(3)]:
                await wire.send(event)

        nursery.start_soon(service)
        assert await call_data(link, end, finish_timeout=FINISH) == 3
        await ours.aclose()
    assert await out_recv.receive_some(100) == b"abc"
    assert await err_recv.receive_some(100) == b"e"
    assert closed == [True]
    sent = await wire.events()
    assert all(isinstance(e, Data) and e.stream is Stream.STDIN for e in sent)
    assert b"".join(e.data for e in sent if isinstance(e, Data)) == b"pre:input"
    assert sent[-1] == Data(Stream.STDIN, b"")


async def test_caller_side_vchan_closed_before_exit_code_is_minus_one() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    link = FramedLink(ours, Direction.SERVICE_TO_CALLER, version=4)
    out_send, _ = _pipe()
    await Wire(theirs, Direction.CALLER_TO_SERVICE).send(Data(Stream.STDOUT, b"partial"))
    await theirs.aclose()
    assert await call_output_only(link, out_send) == -1


async def test_caller_side_rejects_a_message_from_the_wrong_direction() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    link = FramedLink(ours, Direction.SERVICE_TO_CALLER, version=4)
    out_send, _ = _pipe()
    await theirs.send_all(Data(Stream.STDIN, b"x").encode())
    with pytest.raises(RemoteProtocolError, match="DATA_STDIN") as error:
        await call_output_only(link, out_send)
    assert error.value.field == "header.type"
    assert not isinstance(error.value, UndecodableMessage)


async def test_caller_side_rejects_a_chunk_above_the_v2_limit() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    link = FramedLink(ours, Direction.SERVICE_TO_CALLER, version=2)
    out_send, _ = _pipe()
    await theirs.send_all(Data(Stream.STDOUT, bytes(4097)).encode())
    with pytest.raises(RemoteProtocolError, match="4097") as error:
        await call_output_only(link, out_send)
    assert error.value.field == "header.len"


@pytest.mark.parametrize(
    ("payload", "status"),
    [(b"", 255), (b"\x07\0", 255), (b"\x07\0\0\0", 7), (b"\xfe\xff\xff\xff\x01\x02", -2)],
)
async def test_caller_side_reads_the_exit_code_as_the_reference_does(
    payload: bytes, status: int
) -> None:
    # Short: 255; longer than four bytes: the first four.
    ours, theirs = trio.testing.memory_stream_pair()
    link = FramedLink(ours, Direction.SERVICE_TO_CALLER, version=4)
    out_send, _ = _pipe()
    await theirs.send_all(encode_frame(MsgType.DATA_EXIT_CODE, payload))
    assert await call_output_only(link, out_send) == status


def _service_end(output: trio.abc.ReceiveStream, status: trio.Event, errors=None) -> ServiceEnd:
    async def wait() -> int:
        await status.wait()
        return 7

    return ServiceEnd(input=None, output=output, errors=errors, wait=wait)


async def test_service_without_stderr_sends_empty_stderr_first_and_exit_code_last() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    link = FramedLink(ours, Direction.CALLER_TO_SERVICE, version=4)
    wire = Wire(theirs, Direction.SERVICE_TO_CALLER)
    out_send, out_recv = _pipe()
    exited = trio.Event()
    async with trio.open_nursery() as nursery:
        async def service() -> None:
            await out_send.send_all(b"result")
            await out_send.aclose()
            exited.set()

        nursery.start_soon(service)
        assert await serve_data(link, _service_end(out_recv, exited)) == 7
        await ours.aclose()
    got = await wire.events()
    assert got[0] == Data(Stream.STDERR, b"")
    assert got[-1] == ExitCode(7)
    assert ExitCode(7).encode() == encode_frame(MsgType.DATA_EXIT_CODE, b"\x07\0\0\0")
    assert Data(Stream.STDOUT, b"") in got
    stdout = [e.data for e in got if isinstance(e, Data) and e.stream is Stream.STDOUT]
    assert b"".join(stdout) == b"result"
    assert stdout[-1] == b"", "stdout EOF comes after the output"


async def test_service_side_raises_peer_gone_when_the_caller_vanishes() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    link = FramedLink(ours, Direction.CALLER_TO_SERVICE, version=4)
    _, out_recv = _pipe()
    await theirs.send_stream.aclose()  # the caller hangs up without an exit code
    with pytest.raises(PeerGone):
        await serve_data(link, _service_end(out_recv, trio.Event()))


def test_caller_exit_code_rules() -> None:
    assert caller_exit_code(-1, None) == 255
    assert caller_exit_code(3, 5) == 3
    assert caller_exit_code(0, 5) == 5
    assert caller_exit_code(0, None) == 0
    assert caller_exit_code(256 + 7, None) == 7
