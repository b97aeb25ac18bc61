"""The qubesd admin-call codec (wire-protocol.md §9), sans-IO."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrexec_trio.domains import (
    PROTOCOL_ERROR,
    AdminProtocolError,
    AdminRequest,
    DomainsError,
    ListEntry,
    PropertyValue,
    decode_property,
    decode_reply,
    decode_request,
    decode_tags,
    decode_vm_list,
    encode_property,
    encode_reply_error,
    encode_reply_ok,
    encode_request,
    encode_tags,
    encode_vm_list,
)
from qrexec_trio.domains._admin import MAX_REPLY_SIZE, MAX_REQUEST_SIZE

UUID = "uuid:12345678-9abc-def0-1234-56789abcdef0"

# -- requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "wire"),
    [
        pytest.param(dict(method="admin.vm.CreateDisposable", dest="tmpl"),
                     b"admin.vm.CreateDisposable dom0 name tmpl\0", id="no-arg"),
        pytest.param(dict(method="admin.vm.property.Get", dest="work", arg="xid"),
                     b"admin.vm.property.Get+xid dom0 name work\0", id="arg"),
        pytest.param(dict(method="admin.vm.List", dest="@adminvm"),
                     b"admin.vm.List dom0 keyword adminvm\0", id="keyword-without-at"),
        pytest.param(dict(method="admin.vm.CreateDisposable", dest="tmpl", payload=b"uuid"),
                     b"admin.vm.CreateDisposable dom0 name tmpl\0uuid", id="payload"),
        pytest.param(dict(method="admin.vm.Start", dest=UUID),
                     b"admin.vm.Start dom0 name " + UUID.encode() + b"\0", id="uuid-dest"),
        pytest.param(dict(method="x.Y", dest="@dispvm:@tag:t", arg="a+b@c:d-e"),
                     b"x.Y+a+b@c:d-e dom0 keyword dispvm:@tag:t\0", id="wide-arg-and-keyword"),
    ],
)
def test_requests_are_written_as_the_reference_writes_them(kwargs, wire) -> None:
    assert encode_request(**kwargs) == wire
    request = decode_request(wire)
    assert request == AdminRequest(kwargs["method"], kwargs.get("arg", ""), "dom0",
                                   kwargs["dest"], kwargs.get("payload", b""))
    assert request.dest_is_keyword == kwargs["dest"].startswith("@")


def test_an_empty_arg_after_plus_is_read_as_no_arg() -> None:
    request = decode_request(b"admin.vm.Start+ dom0 name work\0")
    assert (request.method, request.arg, request.call) == ("admin.vm.Start", "", "admin.vm.Start")


def test_the_argument_keeps_later_plus_signs() -> None:
    request = decode_request(b"m+a+b dom0 name work\0")
    assert (request.method, request.arg, request.call) == ("m", "a+b", "m+a+b")


MALFORMED_REQUESTS = [
    pytest.param(b"admin.vm.Start dom0 name work", "request", id="no-nul"),
    pytest.param(b"", "request", id="empty"),
    pytest.param(b"\0", "request.header", id="empty-header"),
    pytest.param(b"admin.vm.Start dom0 name\0", "request.header", id="three-words"),
    pytest.param(b"admin.vm.Start dom0 name work x\0", "request.header", id="five-words"),
    pytest.param(b"admin.vm.Start  dom0 name work\0", "request.header", id="double-space"),
    pytest.param(b"admin.vm.Start dom0 name work \0", "request.header", id="trailing-space"),
    pytest.param(b"admin.vm.Start\tdom0 name work\0", "request.header", id="tab"),
    pytest.param("admin.vm.Stärt dom0 name work\0".encode(), "request.header", id="non-ascii"),
    pytest.param(b"admin/vm dom0 name work\0", "request.method", id="slash-in-method"),
    pytest.param(b"+arg dom0 name work\0", "request.method", id="empty-method"),
    pytest.param(b"m" * 256 + b" dom0 name work\0", "request.method", id="long-method"),
    pytest.param(b"m+a/b dom0 name work\0", "request.arg", id="slash-in-arg"),
    pytest.param(b"m+a$b dom0 name work\0", "request.arg", id="dollar-in-arg"),
    pytest.param(b"m 1dom0 name work\0", "request.source", id="bad-source"),
    pytest.param(b"m dom0 uuid work\0", "request.dest_type", id="bad-dest-type"),
    pytest.param(b"m dom0 name ../etc\0", "request.dest", id="dotdot-dest"),
    pytest.param(b"m dom0 name .hidden\0", "request.dest", id="dot-first"),
    pytest.param(b"m dom0 name -rf\0", "request.dest", id="dash-first"),
    pytest.param(b"m dom0 name @adminvm\0", "request.dest", id="at-in-name"),
    pytest.param(b"m dom0 name " + b"a" * 32 + b"\0", "request.dest", id="long-name"),
    pytest.param(b"m dom0 name uuid:1234\0", "request.dest", id="short-uuid"),
    pytest.param(b"m dom0 keyword @adminvm\0", "request.dest", id="keyword-with-at"),
    pytest.param(b"m dom0 keyword a/b\0", "request.dest", id="slash-in-keyword"),
    pytest.param(b"m dom0 name work\0" + b"x" * MAX_REQUEST_SIZE, "request", id="too-long"),
]


@pytest.mark.parametrize(("data", "field"), MALFORMED_REQUESTS)
def test_malformed_requests_name_the_field(data: bytes, field: str) -> None:
    with pytest.raises(AdminProtocolError) as caught:
        decode_request(data)
    assert caught.value.field == field
    assert caught.value.kind == PROTOCOL_ERROR


def test_a_request_of_exactly_the_limit_is_accepted() -> None:
    header = b"m dom0 name work\0"
    request = decode_request(header + b"x" * (MAX_REQUEST_SIZE - len(header)))
    assert len(request.payload) == MAX_REQUEST_SIZE - len(header)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        pytest.param(dict(method="a b", dest="work"), "request.method", id="space-in-method"),
        pytest.param(dict(method="m", dest="work", arg="a b"), "request.arg", id="space-in-arg"),
        pytest.param(dict(method="m", dest="work dom0"), "request.dest", id="space-in-dest"),
        pytest.param(dict(method="m", dest="@"), "request.dest", id="bare-at"),
        pytest.param(dict(method="m", dest="work", source="x y"), "request.source",
                     id="bad-source"),
        pytest.param(dict(method="m", dest="wörk"), "request.dest", id="non-ascii-dest"),
        pytest.param(dict(method="m", dest="work", payload=b"x" * MAX_REQUEST_SIZE), "request",
                     id="too-long"),
    ],
)
def test_encoding_refuses_what_the_decoder_would(kwargs, field: str) -> None:
    with pytest.raises(AdminProtocolError) as caught:
        encode_request(**kwargs)
    assert caught.value.field == field


_method = st.from_regex(r"[A-Za-z0-9._]{1,40}", fullmatch=True)
_arg = st.from_regex(r"[A-Za-z0-9._+@:-]{0,40}", fullmatch=True)
_name = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,30}", fullmatch=True)
_keyword = st.from_regex(r"@[A-Za-z][A-Za-z0-9_.:@-]{0,40}", fullmatch=True)


@given(_method, _arg, _name, st.one_of(_name, _keyword), st.binary(max_size=200))
def test_requests_round_trip(method: str, arg: str, source: str, dest: str,
                             payload: bytes) -> None:
    wire = encode_request(method, dest, arg=arg, payload=payload, source=source)
    assert decode_request(wire) == AdminRequest(method, arg, source, dest, payload)


@given(st.binary(max_size=300))
def test_decode_request_raises_only_its_error(data: bytes) -> None:
    with contextlib.suppress(AdminProtocolError):
        decode_request(data)


@given(_method, _arg, st.one_of(_name, _keyword), st.binary(max_size=50), st.data())
def test_decode_request_survives_mutated_requests(method, arg, dest, payload, data) -> None:
    wire = bytearray(encode_request(method, dest, arg=arg, payload=payload))
    index = data.draw(st.integers(0, len(wire) - 1))
    wire[index] = data.draw(st.integers(0, 255))
    try:
        request = decode_request(bytes(wire))
    except AdminProtocolError:
        return
    # Whatever is accepted is a request the encoder would write, too.
    again = encode_request(request.method, request.dest, arg=request.arg,
                           payload=request.payload, source=request.source)
    assert decode_request(again) == request


# -- replies -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"", b"disp12", b"a\0b\nc", bytes(range(256))])
def test_success_replies_round_trip(value: bytes) -> None:
    assert encode_reply_ok(value) == b"0\0" + value
    assert decode_reply(encode_reply_ok(value)) == value


def test_error_replies_are_written_as_qubesd_writes_them() -> None:
    wire = encode_reply_error("QubesVMNotFoundError", "no such VM")
    assert wire == b"2\0QubesVMNotFoundError\0\0no such VM\0"
    with pytest.raises(DomainsError) as caught:
        decode_reply(wire)
    assert (caught.value.kind, caught.value.message) == ("QubesVMNotFoundError", "no such VM")
    assert not isinstance(caught.value, AdminProtocolError)


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        pytest.param(b"2\0QubesVMError", "(no message)", id="type-only"),
        pytest.param(b"2\0QubesVMError\0", "(no message)", id="type-and-nul"),
        pytest.param(b"2\0QubesVMError\0Traceback...\0", "(no message)", id="no-message"),
        pytest.param(b"2\0QubesVMError\0Traceback...\0it broke\0", "it broke",
                     id="with-traceback"),
        pytest.param(b"2\0QubesVMError\0\0it broke", "it broke", id="no-final-nul"),
        pytest.param(b"2\0QubesVMError\0\0it broke\0extra\0", "it broke", id="extra-fields"),
        pytest.param(b"2\0QubesVMError\0\0caf\xc3\xa9 \xff\0", "caf\u00e9 \ufffd",
                     id="bad-utf8-replaced"),
    ],
)
def test_error_replies_are_read_leniently_after_the_type(wire: bytes, message: str) -> None:
    with pytest.raises(DomainsError) as caught:
        decode_reply(wire)
    assert (caught.value.kind, caught.value.message) == ("QubesVMError", message)


MALFORMED_REPLIES = [
    pytest.param(b"", "reply.status", id="empty"),
    pytest.param(b"0", "reply.status", id="status-without-nul"),
    pytest.param(b"2", "reply.status", id="error-without-nul"),
    pytest.param(b"1\0event\0", "reply.status", id="event-status"),
    pytest.param(b"3\0x", "reply.status", id="unknown-status"),
    pytest.param(b"00\0", "reply.status", id="two-digits"),
    pytest.param(b"garbage", "reply.status", id="garbage"),
    pytest.param(b"2\0\0\0message\0", "reply.type", id="empty-type"),
    pytest.param(b"2\0Bad Type\0\0m\0", "reply.type", id="space-in-type"),
    pytest.param(b"2\0Typ\xc3\xa9\0\0m\0", "reply.type", id="non-ascii-type"),
    pytest.param(b"2\0" + b"E" * 256 + b"\0\0m\0", "reply.type", id="long-type"),
    pytest.param(b"0\0" + b"x" * MAX_REPLY_SIZE, "reply", id="too-long"),
]


@pytest.mark.parametrize(("wire", "field"), MALFORMED_REPLIES)
def test_malformed_replies_are_protocol_errors(wire: bytes, field: str) -> None:
    with pytest.raises(AdminProtocolError) as caught:
        decode_reply(wire)
    assert caught.value.kind == PROTOCOL_ERROR
    assert caught.value.field == field


def test_error_reply_encoding_keeps_fields_apart_and_fits() -> None:
    wire = encode_reply_error("QubesException", "a\0b")
    assert wire == b"2\0QubesException\0\0a b\0"
    long = encode_reply_error("QubesException", "x" * 100_000)
    assert len(long) == MAX_REPLY_SIZE
    with pytest.raises(DomainsError) as caught:
        decode_reply(long)
    assert caught.value.message == "x" * (MAX_REPLY_SIZE - len(b"2\0QubesException\0\0\0"))


@pytest.mark.parametrize("kind", ["", "Bad Kind", "a\0b", "K" * 256, "Käse"])
def test_error_reply_encoding_refuses_bad_types(kind: str) -> None:
    with pytest.raises(AdminProtocolError):
        encode_reply_error(kind, "m")


def test_success_reply_encoding_refuses_oversized_values() -> None:
    encode_reply_ok(b"x" * (MAX_REPLY_SIZE - 2))
    with pytest.raises(AdminProtocolError):
        encode_reply_ok(b"x" * (MAX_REPLY_SIZE - 1))


@given(st.binary(max_size=300))
def test_decode_reply_raises_only_domains_errors(data: bytes) -> None:
    with contextlib.suppress(DomainsError):
        decode_reply(data)


@given(st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,60}", fullmatch=True), st.text(max_size=100))
def test_error_replies_round_trip(kind: str, message: str) -> None:
    with pytest.raises(DomainsError) as caught:
        decode_reply(encode_reply_error(kind, message))
    assert caught.value.kind == kind
    assert caught.value.message == (message.replace("\0", " ").strip() or "(no message)")


# -- admin.vm.List -------------------------------------------------------------------


def test_vm_list_round_trips() -> None:
    entries = [ListEntry("dom0", "AdminVM", "Running"), ListEntry("work", "AppVM", "Halted"),
               ListEntry("disp7", "DispVM", "Paused")]
    wire = encode_vm_list(entries)
    assert wire == (b"dom0 class=AdminVM state=Running\nwork class=AppVM state=Halted\n"
                    b"disp7 class=DispVM state=Paused\n")
    assert decode_vm_list(wire) == entries
    assert decode_vm_list(b"") == []
    # qubesd always ends the last line; a missing newline is forgiven.
    assert decode_vm_list(wire[:-1]) == entries


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"\n", id="blank-line"),
        pytest.param(b"work class=AppVM state=Halted\n\n", id="trailing-blank-line"),
        pytest.param(b"work class=AppVM\n", id="no-state"),
        pytest.param(b"work state=Halted class=AppVM\n", id="swapped"),
        pytest.param(b"work class=AppVM state=Halted x=y\n", id="extra-word"),
        pytest.param(b"work  class=AppVM state=Halted\n", id="double-space"),
        pytest.param(b"../w class=AppVM state=Halted\n", id="bad-name"),
        pytest.param(b"work class= state=Halted\n", id="empty-class"),
        pytest.param(b"work class=App-VM state=Halted\n", id="bad-class"),
        pytest.param(b"work class=AppVM state=\n", id="empty-state"),
        pytest.param(b"work class=AppVM state=Run1\n", id="bad-state"),
        pytest.param(b"w class=AppVM state=Halted\nw class=AppVM state=Running\n",
                     id="duplicate"),
        pytest.param("w\u00e9 class=AppVM state=Halted\n".encode(), id="non-ascii"),
    ],
)
def test_malformed_vm_lists_are_refused(wire: bytes) -> None:
    with pytest.raises(AdminProtocolError):
        decode_vm_list(wire)


@pytest.mark.parametrize(
    "entry",
    [ListEntry("../x", "AppVM", "Halted"), ListEntry("w", "App VM", "Halted"),
     ListEntry("w", "AppVM", "Halted\n")],
)
def test_vm_list_encoding_refuses_bad_entries(entry: ListEntry) -> None:
    with pytest.raises(AdminProtocolError):
        encode_vm_list([entry])


# -- admin.vm.property.Get and admin.vm.tag.List ------------------------------------------


@pytest.mark.parametrize(
    ("prop", "wire"),
    [
        (PropertyValue("vm", "work"), b"default=False type=vm work"),
        (PropertyValue("vm", "", is_default=True), b"default=True type=vm "),
        (PropertyValue("int", "-1"), b"default=False type=int -1"),
        (PropertyValue("str", "two words"), b"default=False type=str two words"),
        (PropertyValue("bool", "True", is_default=True), b"default=True type=bool True"),
    ],
)
def test_properties_round_trip(prop: PropertyValue, wire: bytes) -> None:
    assert encode_property(prop) == wire
    assert decode_property(wire) == prop


@pytest.mark.parametrize(
    "wire",
    [b"", b"default=False type=vm", b"default=false type=vm x", b"type=vm default=False x",
     b"default=False type= x", b"default=False type=v-m x", b"default=False  type=vm x",
     b"default=False type=vm x\xff", b"default=True"],
)
def test_malformed_properties_are_refused(wire: bytes) -> None:
    with pytest.raises(AdminProtocolError):
        decode_property(wire)


def test_property_encoding_refuses_bad_types() -> None:
    with pytest.raises(AdminProtocolError):
        encode_property(PropertyValue("a b", "x"))


def test_tags_round_trip_sorted() -> None:
    assert encode_tags(["work", "created-by-dom0", "a.b_c"]) == b"a.b_c\ncreated-by-dom0\nwork\n"
    assert decode_tags(b"a.b_c\ncreated-by-dom0\nwork\n") == ("a.b_c", "created-by-dom0", "work")
    assert decode_tags(b"") == ()
    assert encode_tags([]) == b""


@pytest.mark.parametrize("wire", [b"\n", b"a\n\nb\n", b"a b\n", b"a:b\n", b"t\xc3\xa9\n",
                                  b"x" * 256 + b"\n"])
def test_malformed_tag_lists_are_refused(wire: bytes) -> None:
    with pytest.raises(AdminProtocolError):
        decode_tags(wire)


@pytest.mark.parametrize("tag", ["", "a b", "a\nb", "@tag"])
def test_tag_encoding_refuses_bad_tags(tag: str) -> None:
    with pytest.raises(AdminProtocolError):
        encode_tags([tag])


@given(st.binary(max_size=200))
def test_value_decoders_raise_only_their_error(data: bytes) -> None:
    for decode in (decode_vm_list, decode_property, decode_tags):
        with contextlib.suppress(AdminProtocolError):
            decode(data)
