"""The data pump against an in-memory peer (one layer, mocked neighbours)."""

from __future__ import annotations

import struct

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
from qrexec_trio.protocol import Direction, MessageReader, MsgType, ProtocolError, encode_message


class Wire:
    """The test's end of the data vchan: frames out, validated messages in."""

    def __init__(self, stream: trio.abc.Stream, receives: Direction) -> None:
        self.stream = stream
        self.reader = MessageReader(receives, version=4)

    async def send(self, msg_type: MsgType, payload: bytes = b"") -> None:
        await self.stream.send_all(encode_message(msg_type, payload))

    async def messages(self) -> list[tuple[int, bytes]]:
        got = []
        while data := await self.stream.receive_some(65536):
            self.reader.feed(data)
            while (message := self.reader.next_message()) is not None:
                got.append((message.type, message.payload))
        return got


def _pipe() -> tuple[trio.abc.SendStream, trio.abc.ReceiveStream]:
    return trio.testing.memory_stream_one_way_pair()


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
            for msg_type, payload in [(MsgType.DATA_STDOUT, b"abc"), (MsgType.DATA_STDERR, b"e"),
                                      (MsgType.DATA_STDOUT, b""), (MsgType.DATA_STDERR, b""),
                                      (MsgType.DATA_EXIT_CODE, struct.pack("<i", 3))]:
                await wire.send(msg_type, payload)

        nursery.start_soon(service)
        assert await call_data(link, end) == 3
        await ours.aclose()
    assert await out_recv.receive_some(100) == b"abc"
    assert await err_recv.receive_some(100) == b"e"
    assert closed == [True]
    sent = await wire.messages()
    assert b"".join(p for _, p in sent) == b"pre:input"
    assert sent[-1] == (MsgType.DATA_STDIN, b"")


async def test_caller_side_vchan_closed_before_exit_code_is_minus_one() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    link = FramedLink(ours, Direction.SERVICE_TO_CALLER, version=4)
    out_send, _ = _pipe()
    await Wire(theirs, Direction.CALLER_TO_SERVICE).send(MsgType.DATA_STDOUT, b"partial")
    await theirs.aclose()
    assert await call_data(link, CallerEnd(input=None, output=out_send, errors=None)) == -1


async def test_caller_side_rejects_a_message_from_the_wrong_direction() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    link = FramedLink(ours, Direction.SERVICE_TO_CALLER, version=4)
    out_send, _ = _pipe()
    await theirs.send_all(encode_message(MsgType.DATA_STDIN, b"x"))
    with pytest.raises(ProtocolError, match="DATA_STDIN"):
        await call_data(link, CallerEnd(input=None, output=out_send, errors=None))


async def test_caller_side_rejects_a_chunk_above_the_v2_limit() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    link = FramedLink(ours, Direction.SERVICE_TO_CALLER, version=2)
    out_send, _ = _pipe()
    await theirs.send_all(encode_message(MsgType.DATA_STDOUT, bytes(4097)))
    with pytest.raises(ProtocolError, match="4097"):
        await call_data(link, CallerEnd(input=None, output=out_send, errors=None))


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
    got = await wire.messages()
    assert got[0] == (MsgType.DATA_STDERR, b"")
    assert got[-1] == (MsgType.DATA_EXIT_CODE, struct.pack("<i", 7))
    assert (MsgType.DATA_STDOUT, b"") in got
    assert b"".join(p for t, p in got if t == MsgType.DATA_STDOUT) == b"result"


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
