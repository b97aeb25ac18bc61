#!/usr/bin/env python3
"""Fuzz the data vchan reader, both ways (the bytes a remote service or caller sends).

Input: byte 0 sets up the reader (bits 0-1: our version, 2 or 3; bit 2: HELLO
already done; bits 3-7: feeding piece size 1..32), the rest is the stream. The
same stream is read as service->caller and as caller->service, each in small
pieces and in one piece. ProtocolError is the expected way to refuse input;
any other exception, or a broken invariant (:class:`Finding`), is a bug.

Run: ``.venv/bin/python fuzz/fuzz_data_stream.py [libFuzzer options] [corpus dirs]``
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

if __name__ == "__main__":
    import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

    with atheris.instrument_imports():
        from stream_support import read_both_ways, require, setup_from

        from qrexec_trio import protocol
else:
    from stream_support import read_both_ways, require, setup_from

    from qrexec_trio import protocol

_ALLOWED = {
    protocol.Direction.SERVICE_TO_CALLER: {
        protocol.MsgType.DATA_STDOUT,
        protocol.MsgType.DATA_STDERR,
        protocol.MsgType.DATA_EXIT_CODE,
    },
    protocol.Direction.CALLER_TO_SERVICE: {protocol.MsgType.DATA_STDIN},
}
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1


def _check_data_message(direction: protocol.Direction, message: protocol.Message,
                        version: int) -> None:
    require(message.type in _ALLOWED[direction], f"{message.name} got through {direction}")
    require(version in (2, 3), f"negotiated version {version} on a v2/v3 link")
    require(len(message.payload) <= protocol.max_data_chunk(version),
            f"{len(message.payload)}-byte chunk got through at version {version}")
    if message.type == protocol.MsgType.DATA_EXIT_CODE:
        status = protocol.decode_exit_code(message.payload)
        require(_I32_MIN <= status <= _I32_MAX, f"exit status {status} is not an int32")
        if len(message.payload) < 4:
            require(status == protocol.ExitCode.CONNECTION_LOST, "short exit code is not 255")
        else:
            require(protocol.encode_exit_code(status) == message.payload[:4],
                    "exit code does not round-trip")
    else:
        filtered = protocol.filter_escape_chars(message.payload)
        require(len(filtered) == len(message.payload), "filtering changed the length")


def exercise(data: bytes) -> int:
    """Run one input; return how many data messages got through (for corpus checks)."""
    if not data:
        return 0
    setup = setup_from(data[0], versions=(2, 3))
    got_through = 0
    for direction in _ALLOWED:
        outcome = read_both_ways(
            direction,
            data[1:],
            setup,
            functools.partial(_check_data_message, direction),
        )
        got_through += sum(m.type != protocol.MsgType.HELLO for m in outcome.messages)
    return got_through


def test_one_input(data: bytes) -> None:
    exercise(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
