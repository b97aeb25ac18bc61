"""Field codecs (wire-protocol.md §1, §2, §4): the pieces the events are built of.

Whole messages are tested as events in test_events.py; here, the header, the
frame, version negotiation and each field's own rules, with the error class
(peer's fault or ours) and the field each error names.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrexec_trio.protocol import (
    LocalProtocolError,
    Message,
    MsgType,
    ProtocolError,
    RemoteProtocolError,
    decode_header,
    encode_frame,
    encode_header,
    max_data_chunk,
    negotiate_version,
)
from qrexec_trio.protocol._structs import (
    decode_domain,
    decode_ident,
    decode_padded_service_name,
    decode_service_name,
    decode_status,
    encode_domain,
    encode_ident,
    encode_status,
    service_name_problem,
)

from .strategies import (
    DOMAIN_ALPHABET,
    I32,
    IDENT_ALPHABET,
    SERVICE_ALPHABET,
    U32,
    domain_names,
    idents,
    relaxed,
    service_names,
)

# -- header and frame -------------------------------------------------------------------


@relaxed
@given(U32, U32)
def test_header_round_trip(msg_type: int, length: int) -> None:
    raw = encode_header(msg_type, length)
    assert raw == struct.pack("<II", msg_type, length)
    assert decode_header(raw) == (msg_type, length)


@pytest.mark.parametrize("size", [0, 1, 4, 7, 9, 16])
def test_header_of_wrong_size_rejected(size: int) -> None:
    with pytest.raises(RemoteProtocolError) as error:
        decode_header(bytes(size))
    assert error.value.field == "header"


@pytest.mark.parametrize(
    ("msg_type", "length", "field"),
    [(-1, 0, "header.type"), (0, -1, "header.len"), (2**32, 0, "header.type"),
     (0, 2**32, "header.len")],
)
def test_header_fields_outside_u32_are_a_local_error(msg_type: int, length: int,
                                                     field: str) -> None:
    with pytest.raises(LocalProtocolError) as error:
        encode_header(msg_type, length)
    assert error.value.field == field


@relaxed
@given(U32, st.binary(max_size=64))
def test_encode_frame_is_header_then_payload(msg_type: int, payload: bytes) -> None:
    raw = encode_frame(msg_type, payload)
    assert raw[:8] == struct.pack("<II", msg_type, len(payload))
    assert raw[8:] == payload


def test_encode_frame_takes_any_buffer() -> None:
    assert encode_frame(MsgType.DATA_STDOUT, bytearray(b"ab")) == encode_frame(
        MsgType.DATA_STDOUT, memoryview(b"ab"))
    assert encode_frame(MsgType.DATA_STDOUT) == struct.pack("<II", 0x191, 0)


def test_message_name() -> None:
    assert Message(MsgType.HELLO, b"").name == "HELLO"
    assert Message(0x1234, b"").name == "0x1234"


# -- version negotiation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("own", "peer", "expected"),
    [(4, 4, 4), (4, 2, 2), (2, 4, 2), (4, 3, 3), (4, 0xFFFFFFFF, 4), (3, 7, 3)],
)
def test_negotiate_version_takes_the_lower(own: int, peer: int, expected: int) -> None:
    assert negotiate_version(own, peer) == expected


@pytest.mark.parametrize("peer", [0, 1])
def test_negotiate_version_below_two_is_the_peers_fault(peer: int) -> None:
    with pytest.raises(RemoteProtocolError) as error:
        negotiate_version(4, peer)
    assert error.value.field == "hello.version"


def test_negotiate_version_with_a_higher_minimum() -> None:
    # The client <-> daemon socket demands version 3.
    assert negotiate_version(3, 3, minimum=3) == 3
    with pytest.raises(RemoteProtocolError):
        negotiate_version(3, 2, minimum=3)


@relaxed
@given(st.integers(2, 100), U32)
def test_negotiate_version_property(own: int, peer: int) -> None:
    if min(own, peer) < 2:
        with pytest.raises(RemoteProtocolError):
            negotiate_version(own, peer)
    else:
        assert negotiate_version(own, peer) == min(own, peer)


@pytest.mark.parametrize(("version", "chunk"), [(2, 4096), (3, 65536), (4, 65536), (5, 65536)])
def test_max_data_chunk(version: int, chunk: int) -> None:
    assert max_data_chunk(version) == chunk


# -- request ids (service_params) -------------------------------------------------------


@relaxed
@given(idents)
def test_ident_round_trip(ident: bytes) -> None:
    raw = encode_ident(ident)
    assert raw == ident + bytes(32 - len(ident))
    assert decode_ident(raw) == ident


@pytest.mark.parametrize("size", [32, 33, 100])
def test_ident_too_long_to_encode(size: int) -> None:
    with pytest.raises(LocalProtocolError) as error:
        encode_ident(b"a" * size)
    assert error.value.field == "request_id"


@pytest.mark.parametrize("ident", [b"SOCK/13", b"a\0b", b"x\xff", b"\n"])
def test_ident_outside_its_alphabet_cannot_be_encoded(ident: bytes) -> None:
    with pytest.raises(LocalProtocolError) as error:
        encode_ident(ident)
    assert error.value.field == "request_id"


BAD_IDENTS = [
    pytest.param(b"a" * 32, "not NUL-terminated", id="no-nul"),
    pytest.param(b"SOCKET13\0x" + bytes(22), "after the terminating NUL", id="garbage-after-nul"),
    pytest.param(b"SOCKET13" + bytes(23) + b"\x01", "after the terminating NUL", id="last-byte"),
    pytest.param(b"SOCK/13".ljust(32, b"\0"), "outside", id="slash"),
    pytest.param(b"SOCK$13".ljust(32, b"\0"), "outside", id="dollar"),
    pytest.param(b"SOCK\xff".ljust(32, b"\0"), "outside", id="high-byte"),
    pytest.param(bytes(31), "32 bytes", id="truncated"),
    pytest.param(bytes(33), "32 bytes", id="over-long"),
]


@pytest.mark.parametrize(("raw", "rule"), BAD_IDENTS)
def test_bad_ident_rejected(raw: bytes, rule: str) -> None:
    with pytest.raises(RemoteProtocolError) as error:
        decode_ident(raw)
    assert error.value.field == "request_id"
    assert rule in error.value.rule
    with pytest.raises(RemoteProtocolError) as error:
        decode_ident(raw, field="cid")
    assert error.value.field == "cid"


def test_empty_ident_passes_as_in_the_reference() -> None:
    assert decode_ident(bytes(32)) == b""


@pytest.mark.parametrize("byte", range(1, 256))
def test_ident_byte_alphabet(byte: int) -> None:
    raw = (b"id" + bytes([byte])).ljust(32, b"\0")
    if byte in IDENT_ALPHABET:
        assert decode_ident(raw) == b"id" + bytes([byte])
        assert encode_ident(b"id" + bytes([byte])) == raw
    else:
        with pytest.raises(RemoteProtocolError):
            decode_ident(raw)
        with pytest.raises(LocalProtocolError):
            encode_ident(b"id" + bytes([byte]))


# -- domain names -------------------------------------------------------------------------


@relaxed
@given(domain_names(), st.sampled_from([32, 64]))
def test_domain_round_trip(name: bytes, size: int) -> None:
    name = name[: size - 1]
    raw = encode_domain("trigger.target", name, size)
    assert raw == name.ljust(size, b"\0")
    assert decode_domain("trigger.target", raw) == name


@pytest.mark.parametrize("byte", range(1, 256))
def test_domain_byte_alphabet(byte: int) -> None:
    name = b"vm" + bytes([byte])
    if byte in DOMAIN_ALPHABET:
        assert decode_domain("trigger.target", name.ljust(64, b"\0")) == name
        encode_domain("trigger.target", name, 64)
    else:
        with pytest.raises(RemoteProtocolError) as error:
            decode_domain("trigger.target", name.ljust(64, b"\0"))
        assert error.value.field == "trigger.target"
        with pytest.raises(LocalProtocolError):
            encode_domain("trigger.target", name, 64)


@pytest.mark.parametrize(
    ("raw", "rule"),
    [(b"a" * 64, "not NUL-terminated"), (b"dom0\0x".ljust(64, b"\0"), "after the terminating"),
     (b"dom0".ljust(63, b"\0") + b"\x01", "after the terminating")],
)
def test_domain_padding_rules(raw: bytes, rule: str) -> None:
    with pytest.raises(RemoteProtocolError) as error:
        decode_domain("trigger.source", raw)
    assert error.value.field == "trigger.source"
    assert rule in error.value.rule


def test_domain_longer_than_its_field_cannot_be_encoded() -> None:
    assert encode_domain("trigger.target", b"a" * 31, 32) == b"a" * 31 + b"\0"
    with pytest.raises(LocalProtocolError) as error:
        encode_domain("trigger.target", b"a" * 32, 32)
    assert error.value.field == "trigger.target"


# -- service names ------------------------------------------------------------------------


@pytest.mark.parametrize("byte", range(1, 256))
def test_service_byte_alphabet(byte: int) -> None:
    name = b"svc" + bytes([byte])
    if byte in SERVICE_ALPHABET:
        assert service_name_problem(name) is None
        assert decode_service_name(name + b"\0") == name
        assert decode_padded_service_name(name.ljust(64, b"\0")) == name
    else:
        assert service_name_problem(name) is not None
        with pytest.raises(RemoteProtocolError):
            decode_service_name(name + b"\0")


@relaxed
@given(service_names())
def test_valid_service_names_pass(name: bytes) -> None:
    assert service_name_problem(name) is None
    assert decode_service_name(name + b"\0") == name


@pytest.mark.parametrize(
    ("raw", "rule"),
    [(b"", "not NUL-terminated"), (b"svc", "not NUL-terminated"), (b"\0", "empty"),
     (b"s\0vc\0", "contains a NUL"), (b"+arg\0", "starts with '+'"),
     (b"s" * 65000 + b"\0", "longer than 64999")],
)
def test_service_name_rules(raw: bytes, rule: str) -> None:
    with pytest.raises(RemoteProtocolError) as error:
        decode_service_name(raw)
    assert error.value.field == "trigger.service_name"
    assert rule in error.value.rule


def test_service_name_of_64999_bytes_is_the_longest() -> None:
    assert decode_service_name(b"s" * 64999 + b"\0") == b"s" * 64999


@pytest.mark.parametrize(
    ("raw", "rule"),
    [(b"s" * 64, "not NUL-terminated"), (b"svc\0junk".ljust(64, b"\0"), "after the terminating"),
     (bytes(64), "empty")],
)
def test_padded_service_name_rules(raw: bytes, rule: str) -> None:
    with pytest.raises(RemoteProtocolError) as error:
        decode_padded_service_name(raw)
    assert error.value.field == "trigger.service_name"
    assert rule in error.value.rule


# -- exit status ---------------------------------------------------------------------------


@relaxed
@given(I32)
def test_status_round_trip(status: int) -> None:
    raw = encode_status(status)
    assert raw == struct.pack("<i", status)
    assert decode_status(raw) == status


@pytest.mark.parametrize("size", [0, 1, 2, 3])
def test_short_status_is_255(size: int) -> None:
    assert decode_status(b"\x01" * size) == 255


@relaxed
@given(I32, st.binary(min_size=1, max_size=16))
def test_long_status_uses_the_first_four_bytes(status: int, tail: bytes) -> None:
    assert decode_status(encode_status(status) + tail) == status


@pytest.mark.parametrize("status", [-(1 << 31) - 1, 1 << 31])
def test_status_outside_int32_cannot_be_encoded(status: int) -> None:
    with pytest.raises(LocalProtocolError) as error:
        encode_status(status)
    assert error.value.field == "exit_code"


def test_error_classes() -> None:
    # One catch-all for callers that only want "did the protocol fail".
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    error = RemoteProtocolError("header.len", "too long")
    assert (error.field, error.rule) == ("header.len", "too long")
    assert str(error) == "header.len: too long"
