"""MessageReader and per-direction validation (wire-protocol.md §1, §3, §5, §11)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrexec_trio.protocol import (
    Direction,
    ExecParams,
    Message,
    MessageReader,
    MsgType,
    ProtocolError,
    ServiceConnect,
    check_header,
    decode_exec_params,
    decode_exec_request,
    decode_exit_code,
    decode_hello,
    decode_service_connect,
    decode_service_refused,
    decode_trigger,
    encode_exit_code,
    encode_hello,
    encode_ident,
    encode_message,
    negotiate_version,
    payload_bounds,
)

from .strategies import U32, relaxed, split_points, trigger_requests

D = Direction
T = MsgType
INF = 1 << 32  # "any version from here on"

# Who may send what, and with which payload length, written out from the
# specification (not from the implementation's tables): direction ->
# type -> (lowest version, highest version + 1, min len, max len).
# The data chunk limit is version-dependent and handled separately.
ALLOWED: dict[Direction, dict[int, tuple[int, int, int, int]]] = {
    D.DAEMON_TO_AGENT: {
        T.EXEC_CMDLINE: (2, INF, 9, 65535),
        T.JUST_EXEC: (2, INF, 9, 65535),
        T.SERVICE_CONNECT: (2, INF, 40, 40),
        T.SERVICE_REFUSED: (2, INF, 32, 32),
    },
    D.AGENT_TO_DAEMON: {
        T.CONNECTION_TERMINATED: (2, INF, 8, 8),
        T.TRIGGER_SERVICE: (2, 3, 128, 128),
        T.TRIGGER_SERVICE3: (3, INF, 97, 96 + 65000),
        T.TRIGGER_SERVICE4: (4, INF, 161, 160 + 65000),
    },
    D.CLIENT_TO_DAEMON: {
        T.EXEC_CMDLINE: (2, INF, 9, 65535),
        T.JUST_EXEC: (2, INF, 9, 65535),
        T.SERVICE_CONNECT: (2, INF, 40, 40),
    },
    D.DAEMON_TO_CLIENT: {
        T.EXEC_CMDLINE: (2, INF, 8, 8),
        T.JUST_EXEC: (2, INF, 8, 8),
        T.SERVICE_CONNECT: (2, INF, 8, 8),
    },
    D.CALLER_TO_SERVICE: {T.DATA_STDIN: (2, INF, 0, -1)},
    D.SERVICE_TO_CALLER: {
        T.DATA_STDOUT: (2, INF, 0, -1),
        T.DATA_STDERR: (2, INF, 0, -1),
        T.DATA_EXIT_CODE: (2, INF, 0, -1),
    },
    D.CLIENT_VM_TO_AGENT: {T.TRIGGER_SERVICE4: (2, INF, 161, 160 + 65000)},
}
CHUNK_LIMIT = {2: 4096, 3: 65536, 4: 65536}
HELLO_DIRECTIONS = [d for d in Direction if d is not D.CLIENT_VM_TO_AGENT]


def expected_bounds(direction: Direction, msg_type: int, version: int) -> tuple[int, int] | None:
    rule = ALLOWED[direction].get(msg_type)
    if rule is None:
        return None
    low_version, end_version, low, high = rule
    if not low_version <= version < end_version:
        return None
    return (low, CHUNK_LIMIT[version] if high == -1 else high)


def hello(version: int = 4) -> bytes:
    return encode_message(T.HELLO, encode_hello(version))


def read_all(reader: MessageReader, data: bytes) -> list[Message]:
    reader.feed(data)
    messages = []
    while (message := reader.next_message()) is not None:
        messages.append(message)
    return messages


def negotiated(direction: Direction, version: int) -> MessageReader:
    """A reader past the HELLO exchange, driven as a role would drive it."""
    reader = MessageReader(direction)
    if direction.has_hello:
        [message] = read_all(reader, hello(version))
        reader.version = negotiate_version(4, decode_hello(message.payload))
    return reader


# -- the per-direction table ---------------------------------------------------------------


ALL_TYPES = sorted(set(T) | {0, 0x18F, 0x194, 0x1FF, 0x204, 0x20F, 0x214, 0x2FF, 0x301})


@pytest.mark.parametrize("version", [2, 3, 4])
@pytest.mark.parametrize("direction", list(Direction))
def test_payload_bounds_match_the_specification(direction: Direction, version: int) -> None:
    for msg_type in ALL_TYPES:
        want = None if msg_type == T.HELLO else expected_bounds(direction, msg_type, version)
        assert payload_bounds(direction, msg_type, version) == want, hex(msg_type)


@pytest.mark.parametrize("version", [2, 3, 4])
@pytest.mark.parametrize("direction", list(Direction))
def test_check_header_enforces_types_and_lengths(direction: Direction, version: int) -> None:
    for msg_type in ALL_TYPES:
        bounds = None if msg_type == T.HELLO else expected_bounds(direction, msg_type, version)
        if bounds is None:
            for length in (0, 4, 8, 40):
                with pytest.raises(ProtocolError) as error:
                    check_header(direction, msg_type, length, version)
                assert error.value.field == "header.type"
            continue
        low, high = bounds
        check_header(direction, msg_type, low, version)
        check_header(direction, msg_type, high, version)
        for length in (low - 1, high + 1, 0xFFFFFFFF):
            if length < 0:
                continue
            with pytest.raises(ProtocolError) as error:
                check_header(direction, msg_type, length, version)
            assert error.value.field == "header.len"


@relaxed
@given(st.sampled_from(list(Direction)), st.sampled_from([2, 3, 4]), U32, U32)
def test_unknown_types_always_rejected(
    direction: Direction, version: int, msg_type: int, length: int
) -> None:
    if msg_type in set(T):
        msg_type = 0x1000 + msg_type
    with pytest.raises(ProtocolError):
        check_header(direction, msg_type, length, version)


@pytest.mark.parametrize(
    ("direction", "version", "msg_type", "length"),
    [
        pytest.param(D.CALLER_TO_SERVICE, 4, T.DATA_STDOUT, 5, id="stdout-from-caller"),
        pytest.param(D.CALLER_TO_SERVICE, 4, T.DATA_EXIT_CODE, 4, id="exit-from-caller"),
        pytest.param(D.SERVICE_TO_CALLER, 4, T.DATA_STDIN, 5, id="stdin-from-service"),
        pytest.param(D.AGENT_TO_DAEMON, 4, T.EXEC_CMDLINE, 20, id="exec-from-agent"),
        pytest.param(D.AGENT_TO_DAEMON, 4, T.SERVICE_CONNECT, 40, id="connect-from-agent"),
        pytest.param(D.AGENT_TO_DAEMON, 4, T.SERVICE_REFUSED, 32, id="refused-from-agent"),
        pytest.param(D.AGENT_TO_DAEMON, 2, T.TRIGGER_SERVICE3, 100, id="trigger3-on-v2"),
        pytest.param(D.AGENT_TO_DAEMON, 3, T.TRIGGER_SERVICE4, 170, id="trigger4-on-v3"),
        pytest.param(D.AGENT_TO_DAEMON, 3, T.TRIGGER_SERVICE, 128, id="trigger2-on-v3"),
        pytest.param(D.AGENT_TO_DAEMON, 4, T.TRIGGER_SERVICE, 128, id="trigger2-on-v4"),
        pytest.param(D.AGENT_TO_DAEMON, 4, T.DATA_STDOUT, 1, id="data-on-control"),
        pytest.param(D.DAEMON_TO_AGENT, 4, T.TRIGGER_SERVICE4, 170, id="trigger-from-daemon"),
        pytest.param(D.DAEMON_TO_AGENT, 4, T.CONNECTION_TERMINATED, 8, id="terminated-to-agent"),
        pytest.param(D.CLIENT_TO_DAEMON, 3, T.SERVICE_REFUSED, 32, id="refused-from-client"),
        pytest.param(D.CLIENT_TO_DAEMON, 3, T.TRIGGER_SERVICE3, 100, id="trigger-from-client"),
        pytest.param(D.DAEMON_TO_CLIENT, 3, T.DATA_STDOUT, 1, id="data-to-client"),
        pytest.param(D.CLIENT_VM_TO_AGENT, 4, T.TRIGGER_SERVICE3, 100, id="old-client-vm"),
        pytest.param(D.CLIENT_VM_TO_AGENT, 4, T.EXEC_CMDLINE, 20, id="exec-from-client-vm"),
    ],
)
def test_type_in_the_wrong_direction_rejected(
    direction: Direction, version: int, msg_type: int, length: int
) -> None:
    reader = negotiated(direction, version)
    reader.feed(encode_message(msg_type, bytes(length)))
    with pytest.raises(ProtocolError, match="may not be sent"):
        reader.next_message()


# -- HELLO rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("direction", HELLO_DIRECTIONS)
def test_hello_must_come_first(direction: Direction) -> None:
    some_allowed = next(iter(ALLOWED[direction]))
    low = ALLOWED[direction][some_allowed][2]
    reader = MessageReader(direction)
    reader.feed(encode_message(some_allowed, bytes(low)))
    with pytest.raises(ProtocolError, match="HELLO first"):
        reader.next_message()


@pytest.mark.parametrize("direction", HELLO_DIRECTIONS)
@pytest.mark.parametrize("length", [0, 3, 5, 8, 0xFFFFFFFF])
def test_hello_length_must_be_four(direction: Direction, length: int) -> None:
    reader = MessageReader(direction)
    reader.feed(struct.pack("<II", T.HELLO, length))
    with pytest.raises(ProtocolError, match="4 bytes"):
        reader.next_message()


@pytest.mark.parametrize("direction", HELLO_DIRECTIONS)
def test_hello_only_first(direction: Direction) -> None:
    reader = negotiated(direction, 4)
    reader.feed(hello(4))
    with pytest.raises(ProtocolError, match="HELLO not allowed"):
        reader.next_message()


@pytest.mark.parametrize("direction", HELLO_DIRECTIONS)
@pytest.mark.parametrize("version", [0, 1, 2, 3, 4, 5, 0xFFFFFFFF])
def test_hello_payload_is_handed_out_whatever_the_version(
    direction: Direction, version: int
) -> None:
    # The reader frames; rejecting old peers is negotiate_version's job.
    reader = MessageReader(direction)
    [message] = read_all(reader, hello(version))
    assert message == Message(T.HELLO, encode_hello(version))


@pytest.mark.parametrize("version", [None, 2, 4])
def test_trigger_socket_has_no_hello(version: int | None) -> None:
    request = encode_message(T.TRIGGER_SERVICE4, bytes(64) + b"dom0".ljust(64, b"\0")
                             + encode_ident(b"SOCKET") + b"svc\0")
    reader = MessageReader(D.CLIENT_VM_TO_AGENT, version)
    [message] = read_all(reader, request)
    assert message.type == T.TRIGGER_SERVICE4
    reader = MessageReader(D.CLIENT_VM_TO_AGENT, version)
    reader.feed(hello())
    with pytest.raises(ProtocolError):
        reader.next_message()


# -- buffering rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("direction", "msg_type"),
    [
        (D.SERVICE_TO_CALLER, T.DATA_STDOUT),
        (D.CALLER_TO_SERVICE, T.DATA_STDIN),
        (D.CLIENT_TO_DAEMON, T.EXEC_CMDLINE),
        (D.AGENT_TO_DAEMON, T.TRIGGER_SERVICE4),
        (D.DAEMON_TO_AGENT, T.EXEC_CMDLINE),
        (D.CLIENT_VM_TO_AGENT, T.TRIGGER_SERVICE4),
    ],
)
def test_oversized_header_rejected_before_its_payload(
    direction: Direction, msg_type: int
) -> None:
    reader = negotiated(direction, 4)
    reader.feed(struct.pack("<II", msg_type, 1 << 30))  # 1 GiB announced, nothing sent
    with pytest.raises(ProtocolError, match="length"):
        reader.next_message()


@pytest.mark.parametrize("version", [2, 3, 4])
@pytest.mark.parametrize("direction", [D.CALLER_TO_SERVICE, D.SERVICE_TO_CALLER])
def test_data_chunk_limit_follows_the_version(direction: Direction, version: int) -> None:
    msg_type = T.DATA_STDIN if direction is D.CALLER_TO_SERVICE else T.DATA_STDOUT
    limit = CHUNK_LIMIT[version]
    reader = negotiated(direction, version)
    [message] = read_all(reader, encode_message(msg_type, bytes(limit)))
    assert len(message.payload) == limit
    reader.feed(struct.pack("<II", msg_type, limit + 1))
    with pytest.raises(ProtocolError):
        reader.next_message()


def test_version_negotiated_down_to_two_limits_chunks_to_4096() -> None:
    reader = MessageReader(D.SERVICE_TO_CALLER)
    [message] = read_all(reader, hello(2))
    reader.version = negotiate_version(4, decode_hello(message.payload))
    reader.feed(struct.pack("<II", T.DATA_STDOUT, 4097))
    with pytest.raises(ProtocolError):
        reader.next_message()


def test_bytes_wanted_tracks_the_message_in_progress() -> None:
    reader = negotiated(D.SERVICE_TO_CALLER, 4)
    assert reader.bytes_wanted() == 8
    reader.feed(struct.pack("<II", T.DATA_STDOUT, 100)[:3])
    assert reader.bytes_wanted() == 5
    reader.feed(struct.pack("<II", T.DATA_STDOUT, 100)[3:])
    assert reader.next_message() is None
    assert reader.bytes_wanted() == 100
    reader.feed(b"x" * 60)
    assert reader.next_message() is None
    assert reader.bytes_wanted() == 40
    reader.feed(b"x" * 40)
    assert reader.next_message() == Message(T.DATA_STDOUT, b"x" * 100)
    assert reader.buffered == 0


def test_data_after_eof_rejected() -> None:
    reader = MessageReader(D.SERVICE_TO_CALLER, 4)
    reader.feed_eof()
    with pytest.raises(ProtocolError):
        reader.feed(b"x")


def test_clean_eof_between_messages() -> None:
    reader = MessageReader(D.SERVICE_TO_CALLER, 4)
    messages = read_all(reader, encode_message(T.DATA_STDOUT, b""))
    assert messages == [Message(T.DATA_STDOUT, b"")]
    assert not reader.at_clean_eof
    reader.feed_eof()
    assert reader.next_message() is None
    assert reader.at_clean_eof


# -- streams: truncation and arbitrary splitting ------------------------------------------------


@st.composite
def data_streams(draw: st.DrawFn) -> tuple[Direction, int, bytes, list[Message]]:
    """A valid service->caller or caller->service stream: HELLO, then data."""
    direction = draw(st.sampled_from([D.SERVICE_TO_CALLER, D.CALLER_TO_SERVICE]))
    version = draw(st.sampled_from([2, 3, 4]))
    types = (
        [T.DATA_STDIN]
        if direction is D.CALLER_TO_SERVICE
        else [T.DATA_STDOUT, T.DATA_STDERR]
    )
    body = draw(
        st.lists(st.tuples(st.sampled_from(types), st.binary(max_size=40)), max_size=6)
    )
    messages = [Message(T.HELLO, encode_hello(version))]
    messages += [Message(t, p) for t, p in body]
    if direction is D.SERVICE_TO_CALLER and draw(st.booleans()):
        messages.append(Message(T.DATA_EXIT_CODE, encode_exit_code(draw(st.integers(-5, 300)))))
    wire = b"".join(encode_message(m.type, m.payload) for m in messages)
    return direction, version, wire, messages


@st.composite
def control_streams(draw: st.DrawFn) -> tuple[Direction, int, bytes, list[Message]]:
    """A valid agent->daemon stream at one version: HELLO, triggers, terminations."""
    version = draw(st.sampled_from([2, 3, 4]))
    messages = [Message(T.HELLO, encode_hello(version))]
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            domain, port = draw(U32), draw(st.integers(513, 768))
            messages.append(Message(T.CONNECTION_TERMINATED, ExecParams(domain, port).encode()))
        else:
            request = draw(trigger_requests(version))
            messages.append(Message(request.msg_type, request.encode()))
    wire = b"".join(encode_message(m.type, m.payload) for m in messages)
    return D.AGENT_TO_DAEMON, version, wire, messages


streams = st.one_of(data_streams(), control_streams())


def drive(direction: Direction, pieces: list[bytes]) -> list[Message]:
    """Feed ``pieces`` one by one, negotiating after HELLO as a role does."""
    reader = MessageReader(direction)
    messages: list[Message] = []
    for piece in pieces:
        reader.feed(piece)
        while (message := reader.next_message()) is not None:
            if message.type == T.HELLO:
                reader.version = negotiate_version(4, decode_hello(message.payload))
            messages.append(message)
    reader.feed_eof()
    assert reader.next_message() is None
    assert reader.at_clean_eof
    return messages


@relaxed
@given(streams)
def test_stream_in_one_piece(stream: tuple[Direction, int, bytes, list[Message]]) -> None:
    direction, _, wire, messages = stream
    assert drive(direction, [wire]) == messages


@relaxed
@given(streams)
def test_stream_byte_by_byte(stream: tuple[Direction, int, bytes, list[Message]]) -> None:
    direction, _, wire, messages = stream
    assert drive(direction, [wire[i : i + 1] for i in range(len(wire))]) == messages


@relaxed
@given(streams.flatmap(lambda s: st.tuples(st.just(s), split_points(s[2]))))
def test_stream_in_random_pieces(
    case: tuple[tuple[Direction, int, bytes, list[Message]], list[bytes]],
) -> None:
    (direction, _, wire, messages), pieces = case
    assert b"".join(pieces) == wire
    assert drive(direction, pieces) == messages


@relaxed
@given(streams.flatmap(lambda s: st.tuples(st.just(s), st.integers(0, len(s[2])))))
def test_truncated_stream_rejected_at_eof(
    case: tuple[tuple[Direction, int, bytes, list[Message]], int],
) -> None:
    (direction, _, wire, messages), cut = case
    boundaries = [0]
    for sent in messages:
        boundaries.append(boundaries[-1] + 8 + len(sent.payload))
    whole = boundaries.index(cut) if cut in boundaries else None
    reader = MessageReader(direction)
    got: list[Message] = []
    reader.feed(wire[:cut])
    reader.feed_eof()
    if whole is not None:
        while (message := reader.next_message()) is not None:
            if message.type == T.HELLO:
                reader.version = negotiate_version(4, decode_hello(message.payload))
            got.append(message)
        assert got == messages[:whole]
        assert reader.at_clean_eof
    else:
        with pytest.raises(ProtocolError, match="stream ended"):
            while (message := reader.next_message()) is not None:
                if message.type == T.HELLO:
                    reader.version = negotiate_version(4, decode_hello(message.payload))
                got.append(message)
        assert got == [m for i, m in enumerate(messages) if boundaries[i + 1] <= cut]


@relaxed
@given(st.sampled_from(list(Direction)), st.sampled_from([None, 2, 3, 4]), st.binary(max_size=400))
def test_reader_raises_only_protocol_error(
    direction: Direction, version: int | None, data: bytes
) -> None:
    reader = MessageReader(direction, version)
    try:
        reader.feed(data)
        reader.feed_eof()
        while reader.next_message() is not None:
            pass
    except ProtocolError:
        return
    assert reader.at_clean_eof


# -- golden transcripts of the reference implementation ------------------------------------------

# Where the project's other vector tests look (tests/vectors.py): $QREXEC_VECTORS,
# else the copy in the repository, tests/data/vectors. A missing folder fails, never skips.
VECTORS = Path(
    os.environ.get("QREXEC_VECTORS")
    or Path(__file__).resolve().parents[1] / "data" / "vectors"
)
TRANSCRIPTS = ["a-dom0-to-vm-command", "b-dom0-to-vm-rpc", "c-just-exec",
               "d1-service-not-found", "d2-service-not-executable", "e1-vm-to-dom0-allow",
               "e2-vm-to-dom0-deny", "f-vm-to-vm", "g-killed-by-signal",
               "h-stdin-closed-early", "h2-stdin-open-at-exit"]

_DECODERS = {
    T.HELLO: decode_hello,
    T.EXEC_CMDLINE: lambda p: decode_exec_params(p) if len(p) == 8 else decode_exec_request(p),
    T.JUST_EXEC: lambda p: decode_exec_params(p) if len(p) == 8 else decode_exec_request(p),
    T.SERVICE_CONNECT: lambda p: decode_exec_params(p) if len(p) == 8
    else decode_service_connect(p),
    T.SERVICE_REFUSED: decode_service_refused,
    T.CONNECTION_TERMINATED: decode_exec_params,
    T.DATA_EXIT_CODE: decode_exit_code,
}


def _direction(link: str, sender: str, types: set[int]) -> Direction:
    if link == "control":
        return D.AGENT_TO_DAEMON if sender.startswith("agent") else D.DAEMON_TO_AGENT
    if link == "client-socket":
        return D.DAEMON_TO_CLIENT if sender.startswith("daemon:") and "/" not in sender \
            else D.CLIENT_TO_DAEMON
    if link == "client-vm-socket":
        return D.CLIENT_VM_TO_AGENT
    return D.CALLER_TO_SERVICE if T.DATA_STDIN in types else D.SERVICE_TO_CALLER


def _transcript_streams(path: Path) -> dict[tuple[str, str, str], list[dict[str, object]]]:
    streams: dict[tuple[str, str, str], list[dict[str, object]]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["type"] in ("event", "raw"):
            continue
        where = record.get("vchan") or f"{record.get('socket')}#{record.get('conn')}"
        key = (record["link"], str(where), record["from"])
        streams.setdefault(key, []).append(record)
    return streams


@pytest.mark.parametrize("transcript", TRANSCRIPTS)
def test_reference_transcripts_pass_validation(transcript: str) -> None:
    """Every stream the C programs sent each other is accepted and decodes."""
    path = VECTORS / f"{transcript}.jsonl"
    assert path.is_file(), f"golden vector {path} missing; set QREXEC_VECTORS to its folder"
    checked = 0
    for (link, _, sender), records in _transcript_streams(path).items():
        types = {int(str(r["type"]), 16) for r in records}
        direction = _direction(link, sender, types)
        # Large data payloads are stored abbreviated; their length is what matters here.
        wire = b"".join(
            encode_message(int(str(r["type"]), 16),
                           bytes.fromhex(str(r["payload_hex"])).ljust(int(str(r["len"])), b"x"))
            for r in records
        )
        reader = MessageReader(direction)
        reader.feed(wire)
        while (message := reader.next_message()) is not None:
            checked += 1
            if message.type == T.HELLO:
                ours = 3 if "socket" in link else 4
                reader.version = negotiate_version(ours, decode_hello(message.payload))
            elif message.type in (T.TRIGGER_SERVICE, T.TRIGGER_SERVICE3, T.TRIGGER_SERVICE4):
                decode_trigger(message.type, message.payload)
            elif message.type in _DECODERS:
                _DECODERS[T(message.type)](message.payload)
        reader.feed_eof()
        assert reader.next_message() is None
        assert reader.at_clean_eof, (transcript, link, sender)
    assert checked >= 5  # at least the control HELLOs, a request and its answer


def test_service_connect_stream_round_trip() -> None:
    reader = negotiated(D.CLIENT_TO_DAEMON, 3)
    payload = ServiceConnect(0, 0, b"SOCKET13").encode()
    [message] = read_all(reader, encode_message(T.SERVICE_CONNECT, payload))
    assert decode_service_connect(message.payload) == ServiceConnect(0, 0, b"SOCKET13")


def test_reader_stays_failed_after_an_error() -> None:
    reader = MessageReader(Direction.CLIENT_TO_DAEMON, version=3)
    reader.feed(encode_message(0x777, b"payload that must not be read as a header"))
    with pytest.raises(ProtocolError) as first:
        reader.next_message()
    with pytest.raises(ProtocolError) as again:
        reader.next_message()
    assert again.value is first.value


def test_nothing_passes_after_hello_until_the_version_is_set() -> None:
    reader = MessageReader(Direction.CLIENT_TO_DAEMON)
    reader.feed(encode_message(MsgType.HELLO, b"\x03\0\0\0") * 2)
    assert reader.next_message() is not None
    with pytest.raises(ProtocolError, match="before a version was agreed"):
        reader.next_message()
