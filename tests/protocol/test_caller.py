"""The caller's side of a call's data phase, sans-IO (CallerSession): the rules both
drivers (the trio pump and the clients' blocking driver) follow."""

from __future__ import annotations

import pytest

from qrexec_trio.protocol import (
    CLOSE_OUTPUT,
    FINISHED,
    WRITE_ERRORS,
    WRITE_OUTPUT,
    CallerSession,
    Data,
    Direction,
    ExitCode,
    Hello,
    MessageReader,
    Stream,
    caller_exit_code,
    max_data_chunk,
)


def test_stdout_is_written_until_its_end_which_closes_the_output_once() -> None:
    session = CallerSession(3)
    assert session.handle(Data(Stream.STDOUT, b"out")) == (WRITE_OUTPUT, b"out")
    assert session.handle(Data(Stream.STDOUT, b"")) == (CLOSE_OUTPUT, b"")
    # Anything after the end (a misbehaving peer) goes nowhere, and nothing closes twice.
    assert session.handle(Data(Stream.STDOUT, b"late")) is None
    assert session.handle(Data(Stream.STDOUT, b"")) is None


def test_stderr_is_written_and_its_empty_message_is_only_a_marker() -> None:
    session = CallerSession(3)
    assert session.handle(Data(Stream.STDERR, b"err")) == (WRITE_ERRORS, b"err")
    assert session.handle(Data(Stream.STDERR, b"")) is None
    assert not session.finished


def test_a_reader_that_went_away_gets_nothing_more_but_the_call_goes_on() -> None:
    session = CallerSession(3)
    session.output_gone()
    session.errors_gone()
    assert session.handle(Data(Stream.STDOUT, b"x")) is None
    assert session.handle(Data(Stream.STDERR, b"x")) is None
    assert session.handle(ExitCode(3)) == (FINISHED, b"")
    assert (session.finished, session.status) == (True, 3)


@pytest.mark.parametrize(("filtered", "expected"), [(False, b"\x1b[2Jok"), (True, b"_[2Jok")])
def test_escape_filtering_applies_to_each_stream_on_its_own(
        filtered: bool, expected: bytes) -> None:
    session = CallerSession(3, filter_output=filtered, filter_errors=not filtered)
    assert session.handle(Data(Stream.STDOUT, b"\x1b[2Jok")) == (WRITE_OUTPUT, expected)
    other = b"_[2Jok" if not filtered else b"\x1b[2Jok"
    assert session.handle(Data(Stream.STDERR, b"\x1b[2Jok")) == (WRITE_ERRORS, other)


def test_nothing_but_data_and_the_exit_code_is_accepted() -> None:
    with pytest.raises(TypeError):
        CallerSession(3).handle(Hello(3))


@pytest.mark.parametrize("version", [2, 3])
def test_input_is_framed_within_the_version_chunk_limit_and_ends_once(version: int) -> None:
    session = CallerSession(version)
    limit = max_data_chunk(version)
    data = bytes(range(256)) * ((2 * limit + 100) // 256 + 1)
    frames = session.frame_input(data) + session.frame_input(b"")
    assert not session.input_done
    frames += session.frame_input_end()
    assert session.input_done
    reader = MessageReader(Direction.CALLER_TO_SERVICE, version)
    reader.feed(frames)
    received = []
    while (event := reader.next_event()) is not None:
        assert isinstance(event, Data) and event.stream == Stream.STDIN
        assert len(event.data) <= limit
        received.append(event.data)
    assert received[-1] == b"" and b"".join(received) == data
    assert len(received) == -(-len(data) // limit) + 1


@pytest.mark.parametrize(("remote", "local", "code"), [
    (None, None, 255), (-1, 0, 255), (0, None, 0), (0, 7, 7), (3, 7, 3), (256 + 5, 0, 5),
])
def test_the_exit_code_rule(remote: int | None, local: int | None, code: int) -> None:
    assert caller_exit_code(remote, local) == code
