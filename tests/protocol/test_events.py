"""Typed events: every message's layout, encode and decode_event, link by link.

Decoding a payload that breaks a rule raises UndecodableMessage (the peer's
fault, the stream still in step) naming the field; encoding something no
receiver would take raises LocalProtocolError. The layouts are rebuilt here
with struct from wire-protocol.md §1-§4, independently of the encoders.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrexec_trio.protocol import (
    MAX_QREXEC_CMD_LEN,
    ConnectionTerminated,
    Data,
    Direction,
    Event,
    ExecCmdline,
    ExitCode,
    ExitStatus,
    Hello,
    JustExec,
    LocalProtocolError,
    MessageReader,
    MsgType,
    PortAssigned,
    RemoteProtocolError,
    ServiceConnect,
    ServiceRefused,
    Stream,
    TriggerAnswer,
    TriggerService,
    UndecodableMessage,
    decode_event,
    payload_bounds,
)

from .strategies import (
    I32,
    U32,
    canonical_payload,
    cmdline_bytes,
    decodable_events,
    domain_names,
    idents,
    relaxed,
    service_names,
    triggers,
)

D = Direction
T = MsgType
TRIGGER_TYPES = {2: T.TRIGGER_SERVICE, 3: T.TRIGGER_SERVICE3, 4: T.TRIGGER_SERVICE4}
#: Where each trigger version keeps its 32-byte request id (wire-protocol.md §4.4-4.6).
ID_FIELD = {T.TRIGGER_SERVICE: slice(96, 128), T.TRIGGER_SERVICE3: slice(64, 96),
            T.TRIGGER_SERVICE4: slice(128, 160)}

# What each link carries, from the specification: direction -> type -> event class.
_HELLO = {T.HELLO: Hello}
CARRIES: dict[Direction, dict[int, type]] = {
    D.DAEMON_TO_AGENT: {**_HELLO, T.EXEC_CMDLINE: ExecCmdline, T.JUST_EXEC: JustExec,
                        T.SERVICE_CONNECT: ServiceConnect, T.SERVICE_REFUSED: ServiceRefused},
    D.AGENT_TO_DAEMON: {**_HELLO, T.CONNECTION_TERMINATED: ConnectionTerminated,
                        T.TRIGGER_SERVICE: TriggerService, T.TRIGGER_SERVICE3: TriggerService,
                        T.TRIGGER_SERVICE4: TriggerService},
    D.CLIENT_TO_DAEMON: {**_HELLO, T.EXEC_CMDLINE: ExecCmdline, T.JUST_EXEC: JustExec,
                         T.SERVICE_CONNECT: ServiceConnect},
    D.DAEMON_TO_CLIENT: {**_HELLO, T.EXEC_CMDLINE: PortAssigned, T.JUST_EXEC: PortAssigned,
                         T.SERVICE_CONNECT: PortAssigned},
    D.CALLER_TO_SERVICE: {**_HELLO, T.DATA_STDIN: Data},
    D.SERVICE_TO_CALLER: {**_HELLO, T.DATA_STDOUT: Data, T.DATA_STDERR: Data,
                          T.DATA_EXIT_CODE: ExitCode},
    D.CLIENT_VM_TO_AGENT: {T.TRIGGER_SERVICE4: TriggerService},
    D.AGENT_TO_CLIENT_VM: {T.DATA_STDERR: Data, T.DATA_EXIT_CODE: ExitCode,
                           T.SERVICE_REFUSED: ServiceRefused},
}
ALL_TYPES = sorted(set(T) | {0, 0x18F, 0x194, 0x1FF, 0x204, 0x20F, 0x214, 0x2FF, 0x301,
                             0xFFFFFFFF})


def split(frame: bytes) -> tuple[int, bytes]:
    """A frame's (type, payload), checking that its header's length is right."""
    msg_type, length = struct.unpack_from("<II", frame)
    assert len(frame) == 8 + length
    return msg_type, frame[8:]


def refused(direction: Direction, msg_type: int, payload: bytes) -> UndecodableMessage:
    with pytest.raises(UndecodableMessage) as error:
        decode_event(direction, msg_type, payload)
    assert error.value.msg_type == msg_type
    return error.value


def reference_frame(event: Event) -> bytes:
    """``event``'s frame, built from the specification with struct."""
    def frame(msg_type: int, payload: bytes) -> bytes:
        return struct.pack("<II", msg_type, len(payload)) + payload

    match event:
        case Hello(version):
            return frame(0x300, struct.pack("<I", version))
        case ExecCmdline(domain, port, cmdline):
            return frame(0x200, struct.pack("<II", domain, port) + cmdline + b"\0")
        case JustExec(domain, port, cmdline):
            return frame(0x201, struct.pack("<II", domain, port) + cmdline + b"\0")
        case PortAssigned(request_type, domain, port):
            return frame(request_type, struct.pack("<II", domain, port))
        case ServiceConnect(domain, port, request_id):
            return frame(0x202, struct.pack("<II32s", domain, port, request_id))
        case ServiceRefused(request_id, None):
            return frame(0x203, struct.pack("<32s", request_id))
        case TriggerService(2, b"", target, request_id, name):
            return frame(0x210, struct.pack("<64s32s32s", name, target, request_id))
        case TriggerService(3, b"", target, request_id, name):
            return frame(0x212, struct.pack("<64s32s", target, request_id) + name + b"\0")
        case TriggerService(4, source, target, request_id, name):
            return frame(0x213, struct.pack("<64s64s32s", source, target, request_id)
                         + name + b"\0")
        case ConnectionTerminated(domain, port):
            return frame(0x211, struct.pack("<II", domain, port))
        case Data(stream, data):
            return frame({Stream.STDIN: 0x190, Stream.STDOUT: 0x191,
                          Stream.STDERR: 0x192}[stream], data)
        case ExitCode(status):
            return frame(0x193, struct.pack("<i", status))
    raise AssertionError(f"no reference layout for {event!r}")


# -- every event, every link -------------------------------------------------------------


@pytest.mark.parametrize("direction", list(Direction))
@relaxed
@given(data=st.data())
def test_every_event_round_trips_on_its_link(direction: Direction, data: st.DataObject) -> None:
    event = data.draw(decodable_events(direction))
    frame = event.encode()
    assert frame == reference_frame(event)
    msg_type, payload = split(frame)
    assert msg_type == event.msg_type
    assert type(event) is CARRIES[direction][msg_type]
    assert decode_event(direction, msg_type, payload) == event


@pytest.mark.parametrize("direction", list(Direction))
def test_decode_event_refuses_types_the_link_does_not_carry(direction: Direction) -> None:
    samples = [b"", bytes(8), bytes(40), Hello(4).encode()[8:],
               TriggerService(4, b"", b"dom0", b"", b"svc").encode()[8:]]
    for msg_type in ALL_TYPES:
        if msg_type in CARRIES[direction] or (msg_type == T.HELLO and not direction.has_hello):
            continue  # HELLO on the local links: see test_decode_event_hello_on_local_links
        for payload in samples:
            error = refused(direction, msg_type, payload)
            assert error.field == "header.type", hex(msg_type)
            assert error.raw_request_id is None


@pytest.mark.parametrize("direction", [D.CLIENT_VM_TO_AGENT, D.AGENT_TO_CLIENT_VM])
def test_decode_event_hello_on_local_links(direction: Direction) -> None:
    refused(direction, T.HELLO, struct.pack("<I", 4))


@pytest.mark.parametrize("direction", list(Direction))
@relaxed
@given(data=st.data())
def test_mutated_payloads_decode_to_what_they_say_or_are_refused(
    direction: Direction, data: st.DataObject
) -> None:
    """A few bytes of a valid payload overwritten: either refused, or decoded without loss.

    Catches a decoder that sanitises or skips a check (padding, alphabet, NUL):
    the event it returns would not encode back to the bytes it was given.
    """
    msg_type, payload = split(data.draw(decodable_events(direction)).encode())
    mutated = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 3))):
        if mutated:
            where = data.draw(st.integers(0, len(mutated) - 1))
            mutated[where] = data.draw(st.sampled_from(b"\0\x01a+/:@ .\xff"))
    payload = bytes(mutated)
    try:
        event = decode_event(direction, msg_type, payload)
    except UndecodableMessage as error:
        assert error.msg_type == msg_type
        assert error.field
        return
    assert event.msg_type == msg_type
    assert split(event.encode())[1] == canonical_payload(direction, msg_type, payload)


ARBITRARY_PAYLOADS = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([0, 3, 4, 5, 8, 9, 31, 32, 33, 40, 96, 97, 128, 160, 161]).flatmap(
        lambda n: st.lists(st.sampled_from(b"\0\0\0a+/$@ \xff"), min_size=n, max_size=n)
        .map(bytes)
    ),
)


@relaxed
@given(st.sampled_from(list(Direction)), st.one_of(st.sampled_from(ALL_TYPES), U32),
       ARBITRARY_PAYLOADS)
def test_decode_event_raises_only_undecodable_message(
    direction: Direction, msg_type: int, payload: bytes
) -> None:
    try:
        event = decode_event(direction, msg_type, payload)
    except UndecodableMessage as error:
        assert error.msg_type == msg_type
        assert error.field
        return
    assert event.msg_type == msg_type
    assert type(event) is {**_HELLO, **CARRIES[direction]}[msg_type]


@pytest.mark.parametrize(
    ("direction", "msg_type", "payload"),
    [
        pytest.param(D.AGENT_TO_DAEMON, T.CONNECTION_TERMINATED, bytes(9), id="terminated-9"),
        pytest.param(D.DAEMON_TO_CLIENT, T.EXEC_CMDLINE, bytes(40), id="port-reply-40"),
        pytest.param(D.AGENT_TO_DAEMON, T.TRIGGER_SERVICE,
                     TriggerService(2, b"", b"dom0", b"id", b"svc").encode()[8:] + b"xx",
                     id="trigger2-130"),
        pytest.param(D.CLIENT_TO_DAEMON, T.EXEC_CMDLINE,
                     bytes(8) + b"u:" + b"x" * MAX_QREXEC_CMD_LEN + b"\0", id="exec-over-limit"),
    ],
)
def test_decode_event_alone_refuses_lengths_it_cannot_re_encode(
    direction: Direction, msg_type: int, payload: bytes
) -> None:
    refused(direction, msg_type, payload)


# -- HELLO --------------------------------------------------------------------------------


def test_hello_bytes_match_the_reference() -> None:
    assert Hello(4).encode() == bytes.fromhex("00030000" "04000000" "04000000")


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 8])
def test_hello_of_wrong_size_rejected(size: int) -> None:
    error = refused(D.SERVICE_TO_CALLER, T.HELLO, bytes(size))
    assert error.field == "payload"


@pytest.mark.parametrize("version", [-1, 2**32])
def test_hello_version_outside_u32_cannot_be_encoded(version: int) -> None:
    with pytest.raises(LocalProtocolError) as error:
        Hello(version).encode()
    assert error.value.field == "hello.version"


# -- exec requests and port replies -------------------------------------------------------


@pytest.mark.parametrize("cls", [ExecCmdline, JustExec])
@pytest.mark.parametrize("direction", [D.DAEMON_TO_AGENT, D.CLIENT_TO_DAEMON])
@relaxed
@given(domain=U32, port=U32, cmdline=cmdline_bytes)
def test_every_truncated_exec_request_rejected(
    cls: type[ExecCmdline | JustExec], direction: Direction, domain: int, port: int,
    cmdline: bytes
) -> None:
    msg_type, payload = split(cls(domain, port, cmdline).encode())
    for cut in range(len(payload)):
        error = refused(direction, msg_type, payload[:cut])
        assert error.field == "exec_params.cmdline"
        assert error.rule == ("missing" if cut <= 8 else "not NUL-terminated")


@pytest.mark.parametrize(
    ("payload", "rule"),
    [
        (b"", "missing"),
        (bytes(8), "missing"),  # exec_params without any cmdline
        (bytes(8) + b"user:cmd", "not NUL-terminated"),
        (bytes(8) + b"user\0:cmd\0", "contains a NUL byte"),
    ],
)
@pytest.mark.parametrize("msg_type", [T.EXEC_CMDLINE, T.JUST_EXEC])
def test_malformed_exec_request_rejected(msg_type: int, payload: bytes, rule: str) -> None:
    error = refused(D.DAEMON_TO_AGENT, msg_type, payload)
    assert (error.field, error.rule.startswith(rule)) == ("exec_params.cmdline", True)


def test_exec_request_with_empty_cmdline_is_just_the_nul() -> None:
    # The reference only checks 8 < len and the final NUL; the cmdline parser
    # refuses the empty string later.
    assert decode_event(D.DAEMON_TO_AGENT, T.EXEC_CMDLINE, bytes(8) + b"\0") == ExecCmdline(
        0, 0, b"")


def test_exec_request_at_the_length_limit() -> None:
    longest = b"u:" + b"x" * (MAX_QREXEC_CMD_LEN - 8 - 1 - 2)
    frame = ExecCmdline(1, 2, longest).encode()
    msg_type, payload = split(frame)
    assert len(payload) == MAX_QREXEC_CMD_LEN == 65535
    reader = MessageReader(D.CLIENT_TO_DAEMON, version=3)
    reader.feed(frame)
    assert reader.next_event() == ExecCmdline(1, 2, longest)
    with pytest.raises(LocalProtocolError) as local:
        ExecCmdline(1, 2, longest + b"x").encode()
    assert local.value.field == "exec_params.cmdline"
    # One more byte on the wire: refused from the header, before the payload.
    reader = MessageReader(D.CLIENT_TO_DAEMON, version=3)
    reader.feed(struct.pack("<II", msg_type, len(payload) + 1))
    with pytest.raises(RemoteProtocolError) as remote:
        reader.next_event()
    assert remote.value.field == "header.len"


@pytest.mark.parametrize("cls", [ExecCmdline, JustExec])
def test_cmdline_with_nul_cannot_be_encoded(cls: type[ExecCmdline | JustExec]) -> None:
    with pytest.raises(LocalProtocolError) as error:
        cls(0, 0, b"user:a\0b").encode()
    assert error.value.field == "exec_params.cmdline"


@pytest.mark.parametrize(
    "make",
    [lambda d, p: ExecCmdline(d, p, b"u:x"), lambda d, p: JustExec(d, p, b"u:x"),
     lambda d, p: ServiceConnect(d, p, b"id"), lambda d, p: ConnectionTerminated(d, p),
     lambda d, p: PortAssigned(T.SERVICE_CONNECT, d, p), lambda d, p: TriggerAnswer(d, p)],
    ids=["exec", "just-exec", "connect", "terminated", "reply", "trigger-answer"],
)
@pytest.mark.parametrize(
    ("domain", "port", "field"),
    [(-1, 0, "connect_domain"), (2**32, 0, "connect_domain"), (0, -1, "connect_port"),
     (0, 2**32, "connect_port")],
)
def test_ports_outside_u32_cannot_be_encoded(make, domain: int, port: int, field: str) -> None:
    with pytest.raises(LocalProtocolError) as error:
        make(domain, port).encode()
    assert error.value.field == f"exec_params.{field}"


@pytest.mark.parametrize("request_type", [T.HELLO, T.DATA_STDOUT, T.SERVICE_REFUSED,
                                          T.TRIGGER_SERVICE4])
def test_port_reply_only_answers_a_request(request_type: MsgType) -> None:
    with pytest.raises(LocalProtocolError) as error:
        PortAssigned(request_type, 0, 513).encode()
    assert error.value.field == "reply.type"


@pytest.mark.parametrize("request_type", [T.EXEC_CMDLINE, T.JUST_EXEC, T.SERVICE_CONNECT])
def test_port_reply_travels_as_its_request_type(request_type: MsgType) -> None:
    reply = PortAssigned(request_type, 42, 513)
    assert reply.msg_type == request_type
    assert reply.encode() == struct.pack("<IIII", request_type, 8, 42, 513)
    assert decode_event(D.DAEMON_TO_CLIENT, request_type, struct.pack("<II", 42, 513)) == reply


@pytest.mark.parametrize("size", [0, 4, 7])
def test_short_port_reply_rejected(size: int) -> None:
    assert refused(D.DAEMON_TO_CLIENT, T.JUST_EXEC, bytes(size)).field == "payload"


# -- SERVICE_CONNECT, SERVICE_REFUSED --------------------------------------------------------


@relaxed
@given(domain=U32, port=U32, ident=idents)
def test_every_truncated_or_extended_service_connect_to_the_agent_rejected(
    domain: int, port: int, ident: bytes
) -> None:
    # The agent takes the 32-byte form only (a client's forms: below).
    msg_type, payload = split(ServiceConnect(domain, port, ident).encode())
    for cut in [*(payload[:n] for n in range(len(payload))), payload + b"\0"]:
        error = refused(D.DAEMON_TO_AGENT, msg_type, cut)
        assert error.field == ("payload" if len(cut) < 8 else "request_id")


@pytest.mark.parametrize(
    "raw",
    [b"a" * 32, b"SOCKET13" + bytes(23) + b"\x01", b"SOCK/13".ljust(32, b"\0"),
     b"SOCK\xff".ljust(32, b"\0")],
    ids=["no-nul", "last-byte", "slash", "high-byte"],
)
def test_bad_request_id_rejected(raw: bytes) -> None:
    assert refused(D.DAEMON_TO_AGENT, T.SERVICE_CONNECT, bytes(8) + raw).field == "request_id"
    # From a client, the id is the C string: the payload's last byte must be its NUL.
    error = refused(D.CLIENT_TO_DAEMON, T.SERVICE_CONNECT, bytes(8) + raw)
    assert error.field == ("service_params" if raw[-1] else "request_id")
    for direction in (D.DAEMON_TO_AGENT, D.AGENT_TO_CLIENT_VM):
        assert refused(direction, T.SERVICE_REFUSED, raw).field == "request_id"


def test_request_id_with_garbage_after_its_nul() -> None:
    raw = b"SOCKET13\0x" + bytes(22)
    # Refused on the agent's link, where every byte after the NUL must be NUL...
    assert refused(D.DAEMON_TO_AGENT, T.SERVICE_CONNECT, bytes(8) + raw).field == "request_id"
    assert refused(D.DAEMON_TO_AGENT, T.SERVICE_REFUSED, raw).field == "request_id"
    # ...but from a client the reference daemon never looks past the NUL.
    event = decode_event(D.CLIENT_TO_DAEMON, T.SERVICE_CONNECT, bytes(8) + raw)
    assert event == ServiceConnect(0, 0, b"SOCKET13", raw)


@pytest.mark.parametrize("size", [0, 31, 33])
def test_service_refused_of_wrong_size_rejected(size: int) -> None:
    assert refused(D.DAEMON_TO_AGENT, T.SERVICE_REFUSED, bytes(size)).field == "request_id"


def test_service_connect_with_bad_id_cannot_be_encoded() -> None:
    for bad in (b"x" * 32, b"a/b"):
        with pytest.raises(LocalProtocolError) as error:
            ServiceConnect(0, 0, bad).encode()
        assert error.value.field == "request_id"
        with pytest.raises(LocalProtocolError):
            ServiceRefused(bad).encode()


def test_refusal_by_a_raw_request_id_sends_it_unchanged() -> None:
    raw = b"\xffnot even an id\0\x01".ljust(32, b"z")
    assert ServiceRefused(b"", raw_request_id=raw).encode() == struct.pack("<II", 0x203, 32) + raw
    assert ServiceRefused(b"ignored", raw_request_id=raw).encode()[8:] == raw
    for size in (0, 31, 33):
        with pytest.raises(LocalProtocolError) as error:
            ServiceRefused(b"", raw_request_id=bytes(size)).encode()
        assert error.value.field == "request_id"


# -- what a client may send its daemon (wire-protocol.md §7.1, §7.3, §7.4) ---------------------
#
# The reference daemon (handle_cmdline_body_from_client) has one length rule for all three
# requests, 8 < len <= 65535 with the last byte a NUL, and compares a SERVICE_CONNECT's bytes
# after exec_params with its pending ids by strncmp: the id is the C string there.

CLIENT_REQUESTS = [T.EXEC_CMDLINE, T.JUST_EXEC, T.SERVICE_CONNECT]


def read_one(direction: Direction, frame: bytes) -> Event | None:
    """``frame`` through a reader past its HELLO, as the role reads it."""
    reader = MessageReader(direction, version=3)
    reader.feed(frame)
    return reader.next_event()


def test_client_service_connect_long_form() -> None:
    payload = struct.pack("<II", 0, 0) + b"SOCKET13".ljust(32, b"\0")
    frame = struct.pack("<II", 0x202, 40) + payload
    event = read_one(D.CLIENT_TO_DAEMON, frame)
    assert event == ServiceConnect(0, 0, b"SOCKET13")
    assert event.raw_request_id is None
    assert event.encode() == frame


def test_client_service_connect_short_form() -> None:
    # What a client that sends only the id and its NUL puts on the wire: 8 + 9 bytes.
    payload = struct.pack("<II", 0, 0) + b"SOCKET13\0"
    frame = struct.pack("<II", 0x202, 17) + payload
    event = read_one(D.CLIENT_TO_DAEMON, frame)
    assert isinstance(event, ServiceConnect)
    assert (event.connect_domain, event.connect_port, event.request_id) == (0, 0, b"SOCKET13")
    # It encodes back to exactly what was read...
    assert event.raw_request_id == b"SOCKET13\0"
    assert event.encode() == frame
    # ...and what the daemon forwards, built from request_id, is the 40-byte form.
    forward = ServiceConnect(event.connect_domain, 513, event.request_id)
    assert forward.encode() == struct.pack("<IIII", 0x202, 40, 0, 513) + b"SOCKET13".ljust(
        32, b"\0")
    assert decode_event(D.DAEMON_TO_AGENT, T.SERVICE_CONNECT, forward.encode()[8:]) == forward


@relaxed
@given(domain=U32, port=U32, ident=idents,
       tail=st.binary(max_size=80).map(lambda b: b + b"\0"), pad=st.integers(0, 40))
def test_client_service_connect_id_is_the_c_string(
    domain: int, port: int, ident: bytes, tail: bytes, pad: int
) -> None:
    """Whatever follows the id's first NUL (padding, garbage, nothing) is not the id."""
    raw = ident + b"\0" * (1 + pad) + (tail if pad % 2 else b"")
    payload = struct.pack("<II", domain, port) + raw
    event = decode_event(D.CLIENT_TO_DAEMON, T.SERVICE_CONNECT, payload)
    assert isinstance(event, ServiceConnect)
    assert (event.connect_domain, event.connect_port, event.request_id) == (domain, port, ident)
    assert event.encode()[8:] == payload
    assert event.raw_request_id == (None if raw == ident.ljust(32, b"\0") else raw)


@pytest.mark.parametrize("msg_type", CLIENT_REQUESTS)
def test_client_request_length_rules(msg_type: int) -> None:
    def frame(length: int, last: bytes = b"\0") -> bytes:
        return struct.pack("<II", msg_type, length) + bytes(8) + b"x" * (length - 9) + last

    def reads(data: bytes) -> Event | None:
        return read_one(D.CLIENT_TO_DAEMON, data)

    assert payload_bounds(D.CLIENT_TO_DAEMON, msg_type, 3) == (9, MAX_QREXEC_CMD_LEN)
    # len 8: exec_params alone, refused from the header.
    with pytest.raises(RemoteProtocolError) as error:
        reads(struct.pack("<II", msg_type, 8) + bytes(8))
    assert error.value.field == "header.len"
    # len 9: exec_params and the NUL.
    nine = reads(frame(9))
    assert nine is not None and nine.msg_type == msg_type
    assert nine.encode() == frame(9)
    # 65535, the whole payload at MAX_QREXEC_CMD_LEN: accepted.
    longest = reads(frame(MAX_QREXEC_CMD_LEN)) if msg_type != T.SERVICE_CONNECT else reads(
        struct.pack("<II", msg_type, MAX_QREXEC_CMD_LEN) + bytes(8) + b"SOCKET1"
        + bytes(MAX_QREXEC_CMD_LEN - 15))
    assert longest is not None and len(longest.encode()) == 8 + MAX_QREXEC_CMD_LEN
    # 65536: refused from the header, before the payload is buffered.
    with pytest.raises(RemoteProtocolError) as error:
        reads(struct.pack("<II", msg_type, MAX_QREXEC_CMD_LEN + 1))
    assert error.value.field == "header.len"
    # The last byte not a NUL: that message refused, the stream still in step.
    reader = MessageReader(D.CLIENT_TO_DAEMON, version=3)
    reader.feed(frame(20, last=b"x") + frame(9))
    with pytest.raises(UndecodableMessage) as bad:
        reader.next_event()
    assert bad.value.msg_type == msg_type and bad.value.rule == "not NUL-terminated"
    assert bad.value.field == ("service_params" if msg_type == T.SERVICE_CONNECT
                               else "exec_params.cmdline")
    assert bad.value.raw_request_id is None
    assert reader.next_event() == nine


def test_client_service_connect_at_the_limits() -> None:
    # The empty id (len 9): as valid as in the reference, which would match it with
    # an empty pending id; an agent never makes one.
    assert decode_event(D.CLIENT_TO_DAEMON, T.SERVICE_CONNECT, bytes(9)) == ServiceConnect(
        0, 0, b"", b"\0")
    longest = bytes(8) + b"SOCKET1".ljust(MAX_QREXEC_CMD_LEN - 8, b"\0")
    event = decode_event(D.CLIENT_TO_DAEMON, T.SERVICE_CONNECT, longest)
    assert isinstance(event, ServiceConnect) and event.request_id == b"SOCKET1"
    assert event.encode()[8:] == longest
    # Decoded alone (no reader), one byte more is refused too.
    assert refused(D.CLIENT_TO_DAEMON, T.SERVICE_CONNECT, longest + b"\0").field == "header.len"
    for short in (b"", bytes(4), bytes(8)):
        assert refused(D.CLIENT_TO_DAEMON, T.SERVICE_CONNECT, short).field == "service_params"


@pytest.mark.parametrize(
    "raw",
    [b"A" * 32 + b"\0", b"A" * 100 + b"\0", b"SOCK/13\0", b"SOCK\xff\0"],
    ids=["32-bytes", "100-bytes", "slash", "high-byte"],
)
def test_client_service_connect_for_an_id_no_request_can_have(raw: bytes) -> None:
    """Longer than 31 bytes or outside the id alphabet: never pending, so refused here,
    one message only (the daemon logs it as not pending)."""
    reader = MessageReader(D.CLIENT_TO_DAEMON, version=3)
    good = ServiceConnect(0, 0, b"SOCKET1")
    reader.feed(struct.pack("<II", 0x202, 8 + len(raw)) + bytes(8) + raw + good.encode())
    with pytest.raises(UndecodableMessage) as error:
        reader.next_event()
    assert (error.value.field, error.value.msg_type) == ("request_id", T.SERVICE_CONNECT)
    assert error.value.raw_request_id is None  # not a trigger: nothing to refuse by
    assert reader.next_event() == good


@pytest.mark.parametrize(
    "raw",
    [b"SOCKET13\0", b"SOCKET13".ljust(31, b"\0"), b"SOCKET13".ljust(33, b"\0"),
     b"SOCKET13\0x".ljust(32, b"\0")],
    ids=["short", "31", "33", "garbage-after-nul"],
)
def test_service_connect_to_the_agent_is_still_40_bytes(raw: bytes) -> None:
    assert payload_bounds(D.DAEMON_TO_AGENT, T.SERVICE_CONNECT, 4) == (40, 40)
    payload = struct.pack("<II", 0, 513) + raw
    assert decode_event(D.CLIENT_TO_DAEMON, T.SERVICE_CONNECT, payload).request_id == b"SOCKET13"
    assert refused(D.DAEMON_TO_AGENT, T.SERVICE_CONNECT, payload).field == "request_id"
    reader = MessageReader(D.DAEMON_TO_AGENT, version=4)
    reader.feed(struct.pack("<II", 0x202, len(payload)) + payload)
    if len(payload) == 40:
        with pytest.raises(UndecodableMessage):
            reader.next_event()
    else:
        with pytest.raises(RemoteProtocolError) as error:
            reader.next_event()
        assert error.value.field == "header.len"


@pytest.mark.parametrize(
    "raw",
    [b"", b"SOCKET13", b"SOCKET1\0", b"OTHER\0", b"SOCKET13" + bytes(65530)],
    ids=["empty", "no-nul", "other-id", "other-id-2", "too-long"],
)
def test_raw_request_id_must_say_the_request_id(raw: bytes) -> None:
    with pytest.raises(LocalProtocolError) as error:
        ServiceConnect(0, 0, b"SOCKET13", raw).encode()
    assert error.value.field == "request_id"
    with pytest.raises(LocalProtocolError):
        ServiceConnect(0, 0, b"a/b", b"a/b\0").encode()


# -- triggers (v2, v3, v4) -------------------------------------------------------------------


def trigger_v2(name: bytes, target: bytes, ident: bytes) -> bytes:
    return struct.pack("<64s32s32s", name, target, ident)


def trigger_v3(target: bytes, ident: bytes, name: bytes) -> bytes:
    return struct.pack("<64s32s", target, ident) + name


def trigger_v4(source: bytes, target: bytes, ident: bytes, name: bytes) -> bytes:
    return struct.pack("<64s64s32s", source, target, ident) + name


def trigger_payload(version: int, *, name: bytes = b"svc", target: bytes = b"dom0",
                    source: bytes = b"", ident: bytes = b"id") -> bytes:
    """A trigger payload built by hand; ``name`` as it goes in its field (v3/v4: add the NUL)."""
    if version == 2:
        return trigger_v2(name, target, ident)
    if version == 3:
        return trigger_v3(target, ident, name + b"\0")
    return trigger_v4(source, target, ident, name + b"\0")


def decode_trigger(version: int, payload: bytes) -> TriggerService:
    event = decode_event(D.AGENT_TO_DAEMON, TRIGGER_TYPES[version], payload)
    assert isinstance(event, TriggerService)
    return event


def refused_trigger(version: int, payload: bytes) -> UndecodableMessage:
    error = refused(D.AGENT_TO_DAEMON, TRIGGER_TYPES[version], payload)
    # The daemon refuses an unreadable request by its id exactly as sent.
    assert error.raw_request_id == payload[ID_FIELD[TRIGGER_TYPES[version]]].ljust(32, b"\0")
    return error


@relaxed
@given(triggers())
def test_every_truncated_trigger_rejected(request: TriggerService) -> None:
    msg_type, payload = split(request.encode())
    id_end = ID_FIELD[msg_type].stop
    for cut in range(len(payload)):
        error = refused_trigger(request.version, payload[:cut])
        assert error.field == ("request_id" if cut < id_end else "trigger.service_name")


def test_golden_trigger4_from_the_reference_client() -> None:
    # MSG_TRIGGER_SERVICE4 from vectors/e1: qrexec-client-vm -> agent, then agent -> daemon.
    raw = bytes(64) + b"dom0".ljust(64, b"\0") + b"SOCKET".ljust(32, b"\0") + b"test.Echo+arg\0"
    assert decode_trigger(4, raw) == TriggerService(4, b"", b"dom0", b"SOCKET", b"test.Echo+arg")
    # The agent gives the request its own id: the client's field is not read at all.
    assert decode_event(D.CLIENT_VM_TO_AGENT, T.TRIGGER_SERVICE4, raw) == TriggerService(
        4, b"", b"dom0", b"", b"test.Echo+arg")


@pytest.mark.parametrize("ident", [b"SOCKET".ljust(32, b"\0"), b"\xff" * 32, bytes(32),
                                   b"no-nul-at-all-in-these-32-bytes!"])
def test_client_vm_trigger_ignores_the_request_id_field(ident: bytes) -> None:
    raw = trigger_v4(b"", b"dom0", ident, b"svc\0")
    event = decode_event(D.CLIENT_VM_TO_AGENT, T.TRIGGER_SERVICE4, raw)
    assert event == TriggerService(4, b"", b"dom0", b"", b"svc")
    assert split(event.encode())[1] == trigger_v4(b"", b"dom0", b"", b"svc\0")


def test_client_vm_trigger_checks_every_other_field() -> None:
    for raw, field in [
        (trigger_v4(b"", b"dom/0", b"SOCKET", b"svc\0"), "trigger.target"),
        (trigger_v4(b"a" * 64, b"dom0", b"SOCKET", b"svc\0"), "trigger.source"),
        (trigger_v4(b"", b"dom0", b"SOCKET", b"../svc\0"), "trigger.service_name"),
        (trigger_v4(b"", b"dom0", b"SOCKET", b"svc"), "trigger.service_name"),
    ]:
        assert refused(D.CLIENT_VM_TO_AGENT, T.TRIGGER_SERVICE4, raw).field == field


@pytest.mark.parametrize("version", [2, 3])
def test_client_vm_sends_only_v4_triggers(version: int) -> None:
    error = refused(D.CLIENT_VM_TO_AGENT, TRIGGER_TYPES[version], trigger_payload(version))
    assert error.field == "header.type"


@pytest.mark.parametrize("version", [3, 4])
def test_trigger_service_name_length_limit(version: int) -> None:
    # 65000 bytes including the NUL is the most the reference accepts.
    longest = b"s" * 64999
    request = decode_trigger(version, trigger_payload(version, name=longest))
    assert request.service_name == longest
    assert split(request.encode())[1] == trigger_payload(version, name=longest)
    error = refused_trigger(version, trigger_payload(version, name=longest + b"s"))
    assert error.field == "trigger.service_name"
    with pytest.raises(LocalProtocolError) as local:
        TriggerService(version, b"", b"dom0", b"id", longest + b"s").encode()
    assert local.value.field == "trigger.service_name"


@pytest.mark.parametrize(
    ("version", "field", "size"),
    [(2, "target", 32), (3, "target", 64), (4, "target", 64), (4, "source", 64),
     (2, "service_name", 64)],
)
def test_trigger_encode_rejects_overlong_fixed_fields(version: int, field: str, size: int) -> None:
    values = {"source": b"", "target": b"dom0", "service_name": b"svc"}
    values[field] = b"a" * size
    request = TriggerService(version, values["source"], values["target"], b"id",
                             values["service_name"])
    with pytest.raises(LocalProtocolError) as error:
        request.encode()
    assert error.value.field == f"trigger.{field}"
    # One byte shorter fits (with its NUL) in the field.
    values[field] = b"a" * (size - 1)
    request = TriggerService(version, values["source"], values["target"], b"id",
                             values["service_name"])
    assert decode_trigger(version, split(request.encode())[1]) == request


@pytest.mark.parametrize("version", [2, 3, 4])
def test_trigger_encode_rejects_overlong_request_id(version: int) -> None:
    with pytest.raises(LocalProtocolError) as error:
        TriggerService(version, b"", b"dom0", b"i" * 32, b"svc").encode()
    assert error.value.field == "request_id"


@pytest.mark.parametrize("version", [3, 2])
def test_trigger_source_outside_v4_cannot_be_encoded(version: int) -> None:
    with pytest.raises(LocalProtocolError):
        TriggerService(version, b"work", b"dom0", b"id", b"svc").encode()


@pytest.mark.parametrize("version", [2, 3, 4])
def test_trigger_domain_field_without_nul_rejected(version: int) -> None:
    # A full field with no room for the NUL: the reference silently truncates, we refuse.
    size = 32 if version == 2 else 64
    error = refused_trigger(version, trigger_payload(version, target=b"a" * size))
    assert (error.field, error.rule) == ("trigger.target", "not NUL-terminated")


def test_trigger_v4_source_without_nul_rejected() -> None:
    error = refused_trigger(4, trigger_payload(4, source=b"a" * 64))
    assert (error.field, error.rule) == ("trigger.source", "not NUL-terminated")


def test_trigger_v2_service_name_without_nul_rejected() -> None:
    error = refused_trigger(2, trigger_payload(2, name=b"s" * 64))
    assert (error.field, error.rule) == ("trigger.service_name", "not NUL-terminated")


BAD_SERVICE_NAMES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"+arg", id="leading-plus"),
    pytest.param(b"+", id="only-plus"),
    pytest.param(b"qubes/Foo", id="slash"),
    pytest.param(b"../../bin/sh", id="traversal"),
    pytest.param(b"qubes.Foo$x", id="dollar"),
    pytest.param(b"qubes.Foo\0x", id="interior-nul"),
    pytest.param(b"qubes Foo", id="space"),
    pytest.param(b"qubes.Foo\n", id="newline"),
    pytest.param(b"qubes.Foo\xff", id="high-byte"),
    pytest.param(b"a@b", id="at"),
    pytest.param(b"a:b", id="colon"),
]


@pytest.mark.parametrize("name", BAD_SERVICE_NAMES)
@pytest.mark.parametrize("version", [2, 3, 4])
def test_trigger_bad_service_name_rejected_not_sanitised(version: int, name: bytes) -> None:
    error = refused_trigger(version, trigger_payload(version, name=name))
    assert error.field == "trigger.service_name"
    with pytest.raises(LocalProtocolError) as local:
        TriggerService(version, b"", b"dom0", b"id", name).encode()
    assert local.value.field == "trigger.service_name"


@pytest.mark.parametrize(
    "name", [b"dom/0", b"$dispvm", b"vm 1", b"vm\n", b"vm\xc3\xa9", b"vm+1", b"vm*"]
)
@pytest.mark.parametrize("field", ["source", "target"])
def test_trigger_bad_domain_name_rejected(field: str, name: bytes) -> None:
    source, target = (name, b"dom0") if field == "source" else (b"", name)
    error = refused_trigger(4, trigger_payload(4, source=source, target=target))
    assert error.field == f"trigger.{field}"
    with pytest.raises(LocalProtocolError) as local:
        TriggerService(4, source, target, b"id", b"svc").encode()
    assert local.value.field == f"trigger.{field}"


@pytest.mark.parametrize("version", [2, 3, 4])
@pytest.mark.parametrize("byte", [0x01, 0x20, 0x2B, 0x2F, 0x40, 0x3A, 0x5F, 0x7F, 0x80, 0xFF])
def test_trigger_name_fields_take_exactly_their_alphabets(version: int, byte: int) -> None:
    # The alphabets in full are in test_structs; here, that every trigger version uses them.
    target_ok = chr(byte) in "_.-@:" or (chr(byte).isalnum() and byte < 0x80)
    service_ok = chr(byte) in "_.-+" or (chr(byte).isalnum() and byte < 0x80)
    for field, ok, payload in [
        ("trigger.target", target_ok, trigger_payload(version, target=b"vm" + bytes([byte]))),
        ("trigger.service_name", service_ok,
         trigger_payload(version, name=b"svc" + bytes([byte]))),
    ]:
        if ok:
            decode_trigger(version, payload)
        else:
            assert refused_trigger(version, payload).field == field


@pytest.mark.parametrize(
    ("version", "payload", "field"),
    [
        (3, trigger_v3(b"dom0\0x", b"id", b"svc\0"), "trigger.target"),
        (4, trigger_v4(b"vm\0\x01", b"dom0", b"id", b"svc\0"), "trigger.source"),
        (4, trigger_v4(b"", b"dom0\0\0\0\0a", b"id", b"svc\0"), "trigger.target"),
        (3, trigger_v3(b"dom0", b"id\0\0z", b"svc\0"), "request_id"),
        (2, trigger_v2(b"svc", b"dom0\0a", b"id"), "trigger.target"),
        (2, trigger_v2(b"svc", b"dom0", b"id\0a"), "request_id"),
        (2, trigger_v2(b"svc\0junk", b"dom0", b"id"), "trigger.service_name"),
        (3, trigger_v3(b"dom0", b"id", b"svc\0\0"), "trigger.service_name"),
        (3, trigger_v3(b"dom0", b"id", b"svc"), "trigger.service_name"),
    ],
    ids=["v3-target", "v4-source", "v4-target", "v3-id", "v2-target", "v2-id", "v2-name",
         "v3-name-two-nuls", "v3-name-no-nul"],
)
def test_trigger_padding_must_be_nul(version: int, payload: bytes, field: str) -> None:
    assert refused_trigger(version, payload).field == field


def test_trigger_empty_target_means_default() -> None:
    # qrexec-client-vm sends "" for "the default target"; it is not an error.
    request = decode_trigger(3, trigger_v3(b"", b"SOCKET7", b"svc\0"))
    assert (request.target, request.request_id) == (b"", b"SOCKET7")


@relaxed
@given(domain_names(), domain_names(), service_names(300))
def test_trigger_v4_fields_land_where_they_belong(source: bytes, target: bytes,
                                                  name: bytes) -> None:
    request = decode_trigger(4, trigger_v4(source, target, b"SOCKET9", name + b"\0"))
    assert request == TriggerService(4, source, target, b"SOCKET9", name)


def test_trigger_of_an_unknown_version_is_refused() -> None:
    request = TriggerService(5, b"", b"vm", b"id", b"svc")
    with pytest.raises(LocalProtocolError) as error:
        request.encode()
    assert error.value.field == "trigger.version"
    with pytest.raises(LocalProtocolError):
        _ = request.msg_type


@pytest.mark.parametrize("version", [2, 3, 4])
def test_trigger_msg_type_follows_the_version(version: int) -> None:
    assert TriggerService(version, b"", b"", b"", b"s").msg_type == TRIGGER_TYPES[version]


# -- data and exit codes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("direction", "stream"),
    [(D.CALLER_TO_SERVICE, Stream.STDIN), (D.SERVICE_TO_CALLER, Stream.STDOUT),
     (D.SERVICE_TO_CALLER, Stream.STDERR), (D.AGENT_TO_CLIENT_VM, Stream.STDERR)],
)
def test_data_carries_its_bytes_unchanged(direction: Direction, stream: Stream) -> None:
    every_byte = bytes(range(256))
    event = decode_event(direction, stream, every_byte)
    assert event == Data(stream, every_byte)
    assert event.msg_type == T(stream)
    if direction is D.AGENT_TO_CLIENT_VM:
        # The status channel carries stderr chunks only: it has no EOF marker.
        with pytest.raises(UndecodableMessage):
            decode_event(direction, stream, b"")
        return
    # The empty chunk is the stream's EOF, an event like any other.
    assert decode_event(direction, stream, b"") == Data(stream, b"")


@pytest.mark.parametrize(
    ("direction", "stream"),
    [(D.CALLER_TO_SERVICE, Stream.STDOUT), (D.CALLER_TO_SERVICE, Stream.STDERR),
     (D.SERVICE_TO_CALLER, Stream.STDIN), (D.AGENT_TO_CLIENT_VM, Stream.STDOUT),
     (D.AGENT_TO_CLIENT_VM, Stream.STDIN)],
)
def test_data_of_the_wrong_stream_refused(direction: Direction, stream: Stream) -> None:
    assert refused(direction, stream, b"x").field == "header.type"


@pytest.mark.parametrize(("raw", "status"), [
    (bytes.fromhex("7f000000"), 127),
    (bytes.fromhex("8f000000"), 143),
    (bytes.fromhex("ffffffff"), -1),
    (bytes.fromhex("00000080"), -(2**31)),
])
@pytest.mark.parametrize("direction", [D.SERVICE_TO_CALLER, D.AGENT_TO_CLIENT_VM])
def test_exit_code_bytes(direction: Direction, raw: bytes, status: int) -> None:
    assert decode_event(direction, T.DATA_EXIT_CODE, raw) == ExitCode(status)


@pytest.mark.parametrize("size", [0, 1, 2, 3])
def test_short_exit_code_is_255(size: int) -> None:
    event = decode_event(D.SERVICE_TO_CALLER, T.DATA_EXIT_CODE, b"\x01" * size)
    assert event == ExitCode(ExitStatus.CONNECTION_LOST) == ExitCode(255)
    # And through the reader, which lets a short one through on the data vchan.
    reader = MessageReader(D.SERVICE_TO_CALLER, version=4)
    reader.feed(struct.pack("<II", T.DATA_EXIT_CODE, size) + b"\x01" * size)
    assert reader.next_event() == ExitCode(255)


@relaxed
@given(I32, st.binary(min_size=1, max_size=16))
def test_long_exit_code_uses_the_first_four_bytes(status: int, tail: bytes) -> None:
    payload = struct.pack("<i", status) + tail
    assert decode_event(D.SERVICE_TO_CALLER, T.DATA_EXIT_CODE, payload) == ExitCode(status)


@pytest.mark.parametrize("status", [-(1 << 31) - 1, 1 << 31])
def test_exit_code_outside_int32_cannot_be_encoded(status: int) -> None:
    with pytest.raises(LocalProtocolError) as error:
        ExitCode(status).encode()
    assert error.value.field == "exit_code"


# -- the trigger socket's unframed answer ------------------------------------------------------


@relaxed
@given(U32, U32)
def test_trigger_answer_is_the_bare_exec_params(domain: int, port: int) -> None:
    raw = TriggerAnswer(domain, port).encode()
    assert raw == struct.pack("<II", domain, port)
    assert TriggerAnswer.decode(raw) == TriggerAnswer(domain, port)


@pytest.mark.parametrize("size", [0, 7, 9, 16])
def test_trigger_answer_of_wrong_size_rejected(size: int) -> None:
    with pytest.raises(RemoteProtocolError) as error:
        TriggerAnswer.decode(bytes(size))
    assert error.value.field == "trigger_answer"


# -- the reader's bounds and the events agree --------------------------------------------------


@pytest.mark.parametrize("direction", list(Direction))
@relaxed
@given(data=st.data())
def test_every_valid_event_fits_the_readers_bounds(direction: Direction,
                                                   data: st.DataObject) -> None:
    event = data.draw(decodable_events(direction))
    msg_type, payload = split(event.encode())
    if msg_type == T.HELLO or (direction is D.AGENT_TO_CLIENT_VM and not payload):
        return  # checked by the reader tests: HELLO comes first; no empty status stderr
    version = 2 if msg_type == T.TRIGGER_SERVICE else 4
    bounds = payload_bounds(direction, msg_type, version)
    assert bounds is not None
    assert bounds[0] <= len(payload) <= bounds[1]
