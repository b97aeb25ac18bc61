#!/usr/bin/env python3
"""Fuzz the data vchan reader both ways, and the status channel (bytes a remote end sends).

Input: byte 0 sets up the reader (bits 0-1: our version, 2 or 3; bit 2: HELLO
already done; bits 3-7: feeding piece size 1..32), the rest is the stream. The
same stream is read as service->caller, as caller->service and as the
agent->qrexec-client-vm status channel, each in small pieces and in one
piece, with ``MessageReader.next_event()``. RemoteProtocolError is the
expected way to refuse input; any other exception, or a broken invariant
(:class:`Finding`), is a bug.

Run: ``.venv/bin/python fuzz/fuzz_data_stream.py [libFuzzer options] [corpus dirs]``
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

if __name__ == "__main__":
    import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

    with atheris.instrument_imports():
        from stream_support import Finding, OnEvent, read_both_ways, require, setup_from

        from qrexec_trio import protocol
else:
    from stream_support import Finding, OnEvent, read_both_ways, require, setup_from

    from qrexec_trio import protocol

D = protocol.Direction
S = protocol.Stream
# What may come out of each link, written out again here (not imported).
_STREAMS = {
    D.SERVICE_TO_CALLER: {S.STDOUT, S.STDERR},
    D.CALLER_TO_SERVICE: {S.STDIN},
    D.AGENT_TO_CLIENT_VM: {S.STDERR},
}
_EXIT_CODE = {D.SERVICE_TO_CALLER, D.AGENT_TO_CLIENT_VM}
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_CID = re.compile(rb"[A-Za-z0-9_. -]{0,31}")


def _checker(direction: protocol.Direction) -> OnEvent:
    """The checks of one read of one link (the status channel's grammar has state)."""
    finished = False

    def check(event: protocol.Event, frame: bytes, version: int | None) -> None:
        nonlocal finished
        status_channel = direction is D.AGENT_TO_CLIENT_VM
        require(not finished, f"{event!r} got through after the final status message")
        if not status_channel:
            require(version in (2, 3), f"negotiated version {version} on a v2/v3 link")
        match event:
            case protocol.Data(stream, data):
                require(stream in _STREAMS[direction], f"{stream.name} got through {direction}")
                limit = protocol.max_data_chunk(4 if status_channel else version or 2)
                require(len(data) <= limit,
                        f"{len(data)}-byte chunk got through at version {version}")
                require(not status_channel or bool(data), "empty stderr on the status channel")
                require(len(protocol.filter_escape_chars(data)) == len(data),
                        "filtering changed the length")
            case protocol.ExitCode(status):
                require(direction in _EXIT_CODE, f"exit code got through {direction}")
                require(_I32_MIN <= status <= _I32_MAX, f"exit status {status} is not an int32")
                payload = frame[8:]
                if len(payload) < 4:
                    require(status == protocol.ExitStatus.CONNECTION_LOST,
                            "short exit code is not 255")
                else:
                    require(int.from_bytes(payload[:4], "little", signed=True) == status,
                            "exit code is not the first four bytes")
                require(not status_channel or len(payload) == 4, "status exit code not 4 bytes")
                finished = status_channel
            case protocol.ServiceRefused(request_id):
                require(status_channel, f"refusal got through {direction}")
                require(_CID.fullmatch(request_id) is not None, "bad id in a refusal")
                finished = True
            case _:
                raise Finding(f"{event!r} got through {direction}")

    return check


def exercise(data: bytes) -> int:
    """Run one input; return how many events got through (for corpus checks)."""
    if not data:
        return 0
    setup = setup_from(data[0], versions=(2, 3))
    got_through = 0
    for direction in _STREAMS:
        outcome = read_both_ways(direction, data[1:], setup, _checker(direction))
        got_through += sum(not isinstance(e, protocol.Hello) for e in outcome.events)
    return got_through


def test_one_input(data: bytes) -> None:
    exercise(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
