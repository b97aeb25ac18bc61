from __future__ import annotations

import trio
import trio.testing

from qrexec_trio.nursery import glue


async def test_glue_relays_both_ways_and_ends_when_one_side_ends() -> None:
    left_ours, left_theirs = trio.testing.memory_stream_pair()
    right_ours, right_theirs = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: glue(left_ours, right_ours, first_pending=b"early:"))
        await left_theirs.send_all(b"to the right")
        await right_theirs.send_all(b"to the left")
        assert await left_theirs.receive_some(100) == b"to the left"
        got = b""
        while len(got) < len(b"early:to the right"):
            got += await right_theirs.receive_some(100)
        assert got == b"early:to the right"
        await right_theirs.send_all(b"last words")
        await right_theirs.aclose()  # one side ends: the glue returns
    assert await left_theirs.receive_some(100) == b"last words"


async def test_a_broken_sink_stops_only_its_direction() -> None:
    """A service that stopped reading still gets its last words to the caller."""
    caller_ours, caller_theirs = trio.testing.memory_stream_pair()
    service_ours, service_theirs = trio.testing.memory_stream_pair()
    await service_theirs.receive_stream.aclose()  # the service reads no more input
    async with trio.open_nursery() as nursery:
        nursery.start_soon(glue, caller_ours, service_ours)
        await caller_theirs.send_all(b"late input")  # cannot be delivered
        await trio.testing.wait_all_tasks_blocked()  # the glue hit the broken sink
        await service_theirs.send_all(b"exit code")
        with trio.fail_after(5):
            assert await caller_theirs.receive_some(100) == b"exit code"
        await service_theirs.send_stream.aclose()  # now the service side ends
    await caller_ours.aclose()
