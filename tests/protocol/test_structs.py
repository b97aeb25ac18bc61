"""Payload encoders and decoders (wire-protocol.md §1, §2, §4)."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrexec_trio.protocol import (
    MAX_QREXEC_CMD_LEN,
    ExecParams,
    Message,
    MsgType,
    ProtocolError,
    ServiceConnect,
    TriggerRequest,
    decode_exec_params,
    decode_exec_request,
    decode_exit_code,
    decode_header,
    decode_hello,
    decode_ident,
    decode_service_connect,
    decode_service_refused,
    decode_trigger,
    encode_exit_code,
    encode_header,
    encode_hello,
    encode_ident,
    encode_message,
    max_data_chunk,
    negotiate_version,
)

from .strategies import I32, U32, cmdline_bytes, domain_names, idents, relaxed, trigger_requests

TRIGGER_TYPES = {2: MsgType.TRIGGER_SERVICE, 3: MsgType.TRIGGER_SERVICE3,
                 4: MsgType.TRIGGER_SERVICE4}


def prefixes(data: bytes) -> list[bytes]:
    """Every proper prefix (every truncation) of ``data``."""
    return [data[:n] for n in range(len(data))]


# -- header -----------------------------------------------------------------------


@relaxed
@given(U32, U32)
def test_header_round_trip(msg_type: int, length: int) -> None:
    raw = encode_header(msg_type, length)
    assert raw == struct.pack("<II", msg_type, length)
    assert decode_header(raw) == (msg_type, length)


@pytest.mark.parametrize("size", [0, 1, 4, 7, 9, 16])
def test_header_of_wrong_size_rejected(size: int) -> None:
    with pytest.raises(ProtocolError):
        decode_header(bytes(size))


@pytest.mark.parametrize(("msg_type", "length"), [(-1, 0), (0, -1), (2**32, 0), (0, 2**32)])
def test_header_fields_outside_u32_rejected(msg_type: int, length: int) -> None:
    with pytest.raises(ProtocolError):
        encode_header(msg_type, length)


@relaxed
@given(U32, st.binary(max_size=64))
def test_encode_message_is_header_then_payload(msg_type: int, payload: bytes) -> None:
    raw = encode_message(msg_type, payload)
    assert decode_header(raw[:8]) == (msg_type, len(payload))
    assert raw[8:] == payload


def test_message_name() -> None:
    assert Message(MsgType.HELLO, b"").name == "HELLO"
    assert Message(0x1234, b"").name == "0x1234"


# -- HELLO and version negotiation ----------------------------------------------------


@relaxed
@given(U32)
def test_hello_round_trip(version: int) -> None:
    assert decode_hello(encode_hello(version)) == version


def test_hello_bytes_match_the_reference() -> None:
    wire = bytes.fromhex("00030000" "04000000" "04000000")  # type, len, version
    assert encode_message(MsgType.HELLO, encode_hello(4)) == wire


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 8])
def test_hello_of_wrong_size_rejected(size: int) -> None:
    with pytest.raises(ProtocolError):
        decode_hello(bytes(size))


@pytest.mark.parametrize("version", [-1, 2**32])
def test_hello_version_outside_u32_rejected(version: int) -> None:
    with pytest.raises(ProtocolError):
        encode_hello(version)


@pytest.mark.parametrize(
    ("own", "peer", "expected"),
    [(4, 4, 4), (4, 2, 2), (2, 4, 2), (4, 3, 3), (4, 0xFFFFFFFF, 4), (3, 7, 3)],
)
def test_negotiate_version_takes_the_lower(own: int, peer: int, expected: int) -> None:
    assert negotiate_version(own, peer) == expected


@pytest.mark.parametrize("peer", [0, 1])
def test_negotiate_version_below_two_rejected(peer: int) -> None:
    with pytest.raises(ProtocolError):
        negotiate_version(4, peer)


def test_negotiate_version_with_a_higher_minimum() -> None:
    # The client <-> daemon socket demands version 3.
    assert negotiate_version(3, 3, minimum=3) == 3
    with pytest.raises(ProtocolError):
        negotiate_version(3, 2, minimum=3)


@relaxed
@given(st.integers(2, 100), U32)
def test_negotiate_version_property(own: int, peer: int) -> None:
    if min(own, peer) < 2:
        with pytest.raises(ProtocolError):
            negotiate_version(own, peer)
    else:
        assert negotiate_version(own, peer) == min(own, peer)


@pytest.mark.parametrize(("version", "chunk"), [(2, 4096), (3, 65536), (4, 65536), (5, 65536)])
def test_max_data_chunk(version: int, chunk: int) -> None:
    assert max_data_chunk(version) == chunk


# -- exec_params ---------------------------------------------------------------------


@relaxed
@given(U32, U32)
def test_exec_params_round_trip(domain: int, port: int) -> None:
    raw = ExecParams(domain, port).encode()
    assert raw == struct.pack("<II", domain, port)
    assert decode_exec_params(raw) == ExecParams(domain, port, None)


@pytest.mark.parametrize("size", [0, 4, 7, 9, 40])
def test_exec_params_of_wrong_size_rejected(size: int) -> None:
    with pytest.raises(ProtocolError):
        decode_exec_params(bytes(size))


@pytest.mark.parametrize(("domain", "port"), [(-1, 0), (0, -1), (2**32, 0), (0, 2**32)])
def test_exec_params_outside_u32_rejected(domain: int, port: int) -> None:
    with pytest.raises(ProtocolError):
        ExecParams(domain, port).encode()


@relaxed
@given(U32, U32, cmdline_bytes)
def test_exec_request_round_trip(domain: int, port: int, cmdline: bytes) -> None:
    raw = ExecParams(domain, port, cmdline).encode()
    assert raw == struct.pack("<II", domain, port) + cmdline + b"\0"
    assert decode_exec_request(raw) == ExecParams(domain, port, cmdline)


@relaxed
@given(U32, U32, cmdline_bytes)
def test_every_truncated_exec_request_rejected(domain: int, port: int, cmdline: bytes) -> None:
    for cut in prefixes(ExecParams(domain, port, cmdline).encode()):
        with pytest.raises(ProtocolError):
            decode_exec_request(cut)


def test_exec_request_at_the_length_limit() -> None:
    longest = b"u:" + b"x" * (MAX_QREXEC_CMD_LEN - 8 - 1 - 2)
    raw = ExecParams(0, 0, longest).encode()
    assert len(raw) == MAX_QREXEC_CMD_LEN == 65535
    assert decode_exec_request(raw).cmdline == longest
    with pytest.raises(ProtocolError):
        ExecParams(0, 0, longest + b"x").encode()
    with pytest.raises(ProtocolError):
        decode_exec_request(raw[:-1] + b"x\0")


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        bytes(8),  # exec_params without any cmdline
        bytes(8) + b"user:cmd",  # no terminating NUL
        bytes(8) + b"user\0:cmd\0",  # NUL inside the cmdline
    ],
)
def test_malformed_exec_request_rejected(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_exec_request(payload)


def test_exec_request_with_empty_cmdline_is_just_the_nul() -> None:
    # The reference only checks 8 < len and the final NUL; the cmdline parser
    # refuses the empty string later.
    assert decode_exec_request(bytes(8) + b"\0").cmdline == b""


def test_cmdline_with_nul_cannot_be_encoded() -> None:
    with pytest.raises(ProtocolError):
        ExecParams(0, 0, b"user:a\0b").encode()


# -- idents, SERVICE_CONNECT, SERVICE_REFUSED -------------------------------------------


@relaxed
@given(idents)
def test_ident_round_trip(ident: bytes) -> None:
    raw = encode_ident(ident)
    assert len(raw) == 32
    assert raw == ident + bytes(32 - len(ident))
    assert decode_ident(raw) == ident
    assert decode_service_refused(raw) == ident


@pytest.mark.parametrize("size", [32, 33, 100])
def test_ident_too_long_to_encode(size: int) -> None:
    with pytest.raises(ProtocolError):
        encode_ident(b"a" * size)


@pytest.mark.parametrize(
    "raw",
    [
        b"a" * 32,  # no NUL at all
        b"SOCKET13\0x" + bytes(22),  # garbage after the terminating NUL
        b"SOCKET13" + bytes(23) + b"\x01",  # garbage in the last byte
        b"SOCK/13".ljust(32, b"\0"),  # "/" is not an ident character
        b"SOCK$13".ljust(32, b"\0"),
        b"SOCK\xff".ljust(32, b"\0"),
        bytes(31),  # truncated
        bytes(33),  # over-long
    ],
)
def test_bad_ident_rejected(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_ident(raw)
    with pytest.raises(ProtocolError):
        decode_service_refused(raw)


def test_empty_ident_passes_as_in_the_reference() -> None:
    assert decode_ident(bytes(32)) == b""


@relaxed
@given(U32, U32, idents)
def test_service_connect_round_trip(domain: int, port: int, ident: bytes) -> None:
    raw = ServiceConnect(domain, port, ident).encode()
    assert raw == struct.pack("<II", domain, port) + ident.ljust(32, b"\0")
    assert decode_service_connect(raw) == ServiceConnect(domain, port, ident)


@relaxed
@given(U32, U32, idents)
def test_every_truncated_service_connect_rejected(domain: int, port: int, ident: bytes) -> None:
    raw = ServiceConnect(domain, port, ident).encode()
    for cut in [*prefixes(raw), raw + b"\0"]:
        with pytest.raises(ProtocolError):
            decode_service_connect(cut)


def test_service_connect_with_bad_ident_rejected() -> None:
    with pytest.raises(ProtocolError):
        decode_service_connect(bytes(8) + b"x" * 32)


# -- trigger_service_params (v2, v3, v4) ----------------------------------------------


def trigger_v2(name: bytes, target: bytes, ident: bytes) -> bytes:
    return struct.pack("<64s32s32s", name, target, ident)


def trigger_v3(target: bytes, ident: bytes, name: bytes) -> bytes:
    return struct.pack("<64s32s", target, ident) + name


def trigger_v4(source: bytes, target: bytes, ident: bytes, name: bytes) -> bytes:
    return struct.pack("<64s64s32s", source, target, ident) + name


@relaxed
@given(trigger_requests())
def test_trigger_round_trip(request: TriggerRequest) -> None:
    raw = request.encode()
    assert request.msg_type == TRIGGER_TYPES[request.version]
    assert decode_trigger(request.msg_type, raw) == request


@relaxed
@given(trigger_requests())
def test_trigger_layout_matches_the_reference(request: TriggerRequest) -> None:
    # Built here with struct, independently of the encoder (wire-protocol.md §4.4-4.6).
    expected = {
        2: lambda r: trigger_v2(r.service_name, r.target, r.request_id),
        3: lambda r: trigger_v3(r.target, r.request_id, r.service_name + b"\0"),
        4: lambda r: trigger_v4(r.source, r.target, r.request_id, r.service_name + b"\0"),
    }[request.version](request)
    assert request.encode() == expected


@relaxed
@given(trigger_requests())
def test_every_truncated_trigger_rejected(request: TriggerRequest) -> None:
    raw = request.encode()
    for cut in prefixes(raw):
        with pytest.raises(ProtocolError):
            decode_trigger(request.msg_type, cut)


def test_v2_trigger_longer_than_128_rejected() -> None:
    raw = trigger_v2(b"svc", b"dom0", b"SOCKET1") + b"\0"
    with pytest.raises(ProtocolError):
        decode_trigger(MsgType.TRIGGER_SERVICE, raw)


def test_golden_trigger4_from_the_reference_agent() -> None:
    # The agent's MSG_TRIGGER_SERVICE4 payload from vectors/e1 (client-vm -> agent).
    raw = bytes(64) + b"dom0".ljust(64, b"\0") + b"SOCKET".ljust(32, b"\0") + b"test.Echo+arg\0"
    request = decode_trigger(MsgType.TRIGGER_SERVICE4, raw)
    assert request == TriggerRequest(4, b"", b"dom0", b"SOCKET", b"test.Echo+arg")


@pytest.mark.parametrize("version", [3, 4])
def test_trigger_service_name_length_limit(version: int) -> None:
    # 65000 bytes including the NUL is the most the reference accepts.
    def payload(name: bytes) -> bytes:
        fixed = b"dom0".ljust(64, b"\0") + b"id".ljust(32, b"\0")
        return (bytes(64) if version == 4 else b"") + fixed + name + b"\0"

    longest = b"s" * 64999
    request = decode_trigger(TRIGGER_TYPES[version], payload(longest))
    assert request.service_name == longest
    assert request.encode() == payload(longest)
    with pytest.raises(ProtocolError):
        decode_trigger(TRIGGER_TYPES[version], payload(longest + b"s"))
    with pytest.raises(ProtocolError):
        TriggerRequest(version, b"", b"dom0", b"id", longest + b"s").encode()


@pytest.mark.parametrize(
    ("version", "field", "size"),
    [(2, "target", 32), (3, "target", 64), (4, "target", 64), (4, "source", 64),
     (2, "service_name", 64)],
)
def test_trigger_encode_rejects_overlong_fixed_fields(version: int, field: str, size: int) -> None:
    values = {"source": b"", "target": b"dom0", "service_name": b"svc"}
    values[field] = b"a" * size
    request = TriggerRequest(version, values["source"], values["target"], b"id",
                             values["service_name"])
    with pytest.raises(ProtocolError):
        request.encode()
    # One byte shorter fits (with its NUL) in the field.
    values[field] = b"a" * (size - 1)
    request = TriggerRequest(version, values["source"], values["target"], b"id",
                             values["service_name"])
    assert decode_trigger(request.msg_type, request.encode()) == request


def test_trigger_encode_rejects_overlong_ident() -> None:
    with pytest.raises(ProtocolError):
        TriggerRequest(3, b"", b"dom0", b"i" * 32, b"svc").encode()


@pytest.mark.parametrize("version", [2, 3, 4])
def test_trigger_domain_field_without_nul_rejected(version: int) -> None:
    # A full field with no room for the NUL: the reference silently truncates, we refuse.
    if version == 2:
        raw = trigger_v2(b"svc", b"a" * 32, b"id")
    elif version == 3:
        raw = trigger_v3(b"a" * 64, b"id", b"svc\0")
    else:
        raw = trigger_v4(b"", b"a" * 64, b"id", b"svc\0")
    with pytest.raises(ProtocolError, match="target"):
        decode_trigger(TRIGGER_TYPES[version], raw)


def test_trigger_v4_source_without_nul_rejected() -> None:
    with pytest.raises(ProtocolError, match="source"):
        decode_trigger(MsgType.TRIGGER_SERVICE4, trigger_v4(b"a" * 64, b"dom0", b"id", b"s\0"))


def test_trigger_v2_service_name_without_nul_rejected() -> None:
    with pytest.raises(ProtocolError, match="service_name"):
        decode_trigger(MsgType.TRIGGER_SERVICE, trigger_v2(b"s" * 64, b"dom0", b"id"))


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
    if version == 2:
        raw = trigger_v2(name, b"dom0", b"id")
    elif version == 3:
        raw = trigger_v3(b"dom0", b"id", name + b"\0")
    else:
        raw = trigger_v4(b"", b"dom0", b"id", name + b"\0")
    with pytest.raises(ProtocolError, match="service_name"):
        decode_trigger(TRIGGER_TYPES[version], raw)


@pytest.mark.parametrize(
    "name", [b"dom/0", b"$dispvm", b"vm 1", b"vm\n", b"vm\xc3\xa9", b"vm+1", b"vm*"]
)
@pytest.mark.parametrize("field", ["source", "target"])
def test_trigger_bad_domain_name_rejected(field: str, name: bytes) -> None:
    source, target = (name, b"dom0") if field == "source" else (b"", name)
    with pytest.raises(ProtocolError, match=field):
        decode_trigger(MsgType.TRIGGER_SERVICE4, trigger_v4(source, target, b"id", b"svc\0"))


@relaxed
@given(st.integers(0, 255))
def test_trigger_domain_byte_alphabet(byte: int) -> None:
    # Exactly [A-Za-z0-9_.-@:] is allowed; NUL ends the field instead.
    allowed = (
        chr(byte).isascii() and chr(byte).isalnum()
    ) or bytes([byte]) in (b"_", b".", b"-", b"@", b":")
    raw = trigger_v3(b"vm" + bytes([byte]), b"id", b"svc\0")
    if byte == 0:
        assert decode_trigger(MsgType.TRIGGER_SERVICE3, raw).target == b"vm"
    elif allowed:
        assert decode_trigger(MsgType.TRIGGER_SERVICE3, raw).target == b"vm" + bytes([byte])
    else:
        with pytest.raises(ProtocolError):
            decode_trigger(MsgType.TRIGGER_SERVICE3, raw)


@relaxed
@given(st.integers(0, 255))
def test_trigger_service_byte_alphabet(byte: int) -> None:
    allowed = (
        chr(byte).isascii() and chr(byte).isalnum()
    ) or bytes([byte]) in (b"_", b".", b"-", b"+")
    raw = trigger_v3(b"dom0", b"id", b"svc" + bytes([byte]) + b"\0")
    if allowed:
        assert decode_trigger(MsgType.TRIGGER_SERVICE3, raw).service_name == b"svc" + bytes([byte])
    else:
        with pytest.raises(ProtocolError):
            decode_trigger(MsgType.TRIGGER_SERVICE3, raw)


@pytest.mark.parametrize(
    "raw",
    [
        trigger_v3(b"dom0\0x", b"id", b"svc\0"),  # garbage after the target's NUL
        trigger_v4(b"vm\0\x01", b"dom0", b"id", b"svc\0"),  # ... after the source's NUL
        trigger_v3(b"dom0", b"id\0\0z", b"svc\0"),  # ... after the ident's NUL
        trigger_v3(b"dom0", b"", b"svc\0"[:3]),  # service name not NUL-terminated
    ],
)
def test_trigger_garbage_after_nul_rejected(raw: bytes) -> None:
    msg_type = MsgType.TRIGGER_SERVICE4 if len(raw) > 160 else MsgType.TRIGGER_SERVICE3
    with pytest.raises(ProtocolError):
        decode_trigger(msg_type, raw)


def test_trigger_v2_garbage_after_service_name_nul_rejected() -> None:
    with pytest.raises(ProtocolError, match="service_name"):
        decode_trigger(MsgType.TRIGGER_SERVICE, trigger_v2(b"svc\0junk", b"dom0", b"id"))


def test_trigger_empty_target_means_default() -> None:
    # qrexec-client-vm sends "" for "the default target"; it is not an error.
    request = decode_trigger(MsgType.TRIGGER_SERVICE3, trigger_v3(b"", b"SOCKET7", b"svc\0"))
    assert request.target == b""
    assert request.request_id == b"SOCKET7"


@pytest.mark.parametrize(
    "msg_type", [MsgType.HELLO, MsgType.DATA_STDIN, MsgType.EXEC_CMDLINE, 0, 0x214]
)
def test_decode_trigger_refuses_other_types(msg_type: int) -> None:
    with pytest.raises(ProtocolError):
        decode_trigger(msg_type, trigger_v3(b"dom0", b"id", b"svc\0"))


@relaxed
@given(domain_names(), domain_names())
def test_trigger_v4_source_round_trip(source: bytes, target: bytes) -> None:
    raw = trigger_v4(source, target, b"SOCKET9", b"qubes.Filecopy\0")
    request = decode_trigger(MsgType.TRIGGER_SERVICE4, raw)
    assert (request.source, request.target) == (source, target)


# -- exit code ---------------------------------------------------------------------------


@relaxed
@given(I32)
def test_exit_code_round_trip(status: int) -> None:
    raw = encode_exit_code(status)
    assert raw == struct.pack("<i", status)
    assert decode_exit_code(raw) == status


@pytest.mark.parametrize(("raw", "status"), [
    (bytes.fromhex("7f000000"), 127),
    (bytes.fromhex("8f000000"), 143),
    (bytes.fromhex("ffffffff"), -1),
    (bytes.fromhex("00000080"), -(2**31)),
])
def test_exit_code_bytes(raw: bytes, status: int) -> None:
    assert decode_exit_code(raw) == status


@pytest.mark.parametrize("size", [0, 1, 2, 3])
def test_short_exit_code_is_255(size: int) -> None:
    assert decode_exit_code(b"\x01" * size) == 255


@relaxed
@given(I32, st.binary(min_size=1, max_size=16))
def test_long_exit_code_uses_the_first_four_bytes(status: int, tail: bytes) -> None:
    assert decode_exit_code(encode_exit_code(status) + tail) == status


# -- decoders on arbitrary bytes ------------------------------------------------------------

DECODERS: dict[str, Callable[[bytes], object]] = {
    "decode_header": decode_header,
    "decode_hello": decode_hello,
    "decode_exec_params": decode_exec_params,
    "decode_exec_request": decode_exec_request,
    "decode_ident": decode_ident,
    "decode_service_connect": decode_service_connect,
    "decode_service_refused": decode_service_refused,
    "decode_exit_code": decode_exit_code,
    "decode_trigger(v2)": lambda b: decode_trigger(MsgType.TRIGGER_SERVICE, b),
    "decode_trigger(v3)": lambda b: decode_trigger(MsgType.TRIGGER_SERVICE3, b),
    "decode_trigger(v4)": lambda b: decode_trigger(MsgType.TRIGGER_SERVICE4, b),
}

# Inputs of the sizes the decoders care about, so that the search reaches past
# the length checks into the field validation.
_INTERESTING_SIZES = st.sampled_from([0, 3, 4, 5, 8, 9, 31, 32, 33, 40, 96, 97, 128, 160, 161])
arbitrary_payloads = st.one_of(
    st.binary(max_size=300),
    _INTERESTING_SIZES.flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    _INTERESTING_SIZES.flatmap(
        lambda n: st.lists(st.sampled_from(b"\0\0\0a+/$@ \xff"), min_size=n, max_size=n).map(bytes)
    ),
)


@pytest.mark.parametrize("decoder", DECODERS.values(), ids=DECODERS.keys())
@relaxed
@given(payload=arbitrary_payloads)
def test_decoders_raise_only_protocol_error(
    decoder: Callable[[bytes], object], payload: bytes
) -> None:
    with contextlib.suppress(ProtocolError):
        decoder(payload)


@relaxed
@given(U32, st.binary(max_size=200))
def test_decode_trigger_any_type_raises_only_protocol_error(msg_type: int, payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_trigger(msg_type, payload)


@pytest.mark.parametrize("status", [-(1 << 31) - 1, 1 << 31])
def test_exit_code_outside_int32_is_a_protocol_error(status: int) -> None:
    with pytest.raises(ProtocolError, match="exit_code"):
        encode_exit_code(status)


def test_trigger_of_an_unknown_version_is_refused() -> None:
    request = TriggerRequest(5, b"", b"vm", b"id", b"svc")
    with pytest.raises(ProtocolError, match=r"trigger\.version"):
        request.encode()
    with pytest.raises(ProtocolError, match=r"trigger\.version"):
        _ = request.msg_type
