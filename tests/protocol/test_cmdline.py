"""The cmdline grammar (wire-protocol.md §10)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrexec_trio.protocol import (
    Cmdline,
    RemoteProtocolError,
    RpcCall,
    ShellCommand,
    build_rpc_cmdline,
    parse_cmdline,
    substitute_default_user,
)

from .strategies import relaxed


def rpc(descriptor: str, source: str, target_type: str | None = None,
        target: str | None = None) -> RpcCall:
    name, plus, argument = descriptor.partition("+")
    return RpcCall(descriptor, name, argument if plus else None, source, target_type, target)


GRAMMAR = [
    pytest.param(b"user:cmd", True, Cmdline("user", False, ShellCommand("cmd")), id="shell"),
    pytest.param(b"user:nogui:cmd", True, Cmdline("user", True, ShellCommand("cmd")),
                 id="nogui-shell"),
    pytest.param(b"root:echo a:b; ls", True, Cmdline("root", False, ShellCommand("echo a:b; ls")),
                 id="only-the-first-colon-ends-the-user"),
    pytest.param(b"user:nogui:nogui:x", True, Cmdline("user", True, ShellCommand("nogui:x")),
                 id="nogui-stripped-once"),
    pytest.param(b"user:QUBESRPC svc+arg src", True,
                 Cmdline("user", False, rpc("svc+arg", "src")), id="rpc"),
    pytest.param(b"user:nogui:QUBESRPC qubes.Foo dom0", True,
                 Cmdline("user", True, rpc("qubes.Foo", "dom0")), id="nogui-rpc-no-plus"),
    pytest.param(b"user:QUBESRPC svc+ src", True, Cmdline("user", False, rpc("svc+", "src")),
                 id="rpc-empty-argument"),
    pytest.param(b"user:QUBESRPC svc+a+b src", True,
                 Cmdline("user", False, rpc("svc+a+b", "src")), id="argument-keeps-plus"),
    pytest.param(b"DEFAULT:QUBESRPC test.Echo+arg vm1", True,
                 Cmdline("DEFAULT", False, rpc("test.Echo+arg", "vm1")), id="default-user"),
    pytest.param(b"user:QUBESRPC svc+arg src name tgt", True,
                 Cmdline("user", False, rpc("svc+arg", "src", "name", "tgt")),
                 id="four-tokens-in-a-vm"),
    pytest.param(b"user:QUBESRPCsvc", True, None, id="QUBESRPC-glued"),
    pytest.param(b"QUBESRPC svc+arg src name tgt", False,
                 Cmdline(None, False, rpc("svc+arg", "src", "name", "tgt")), id="dom0-name"),
    pytest.param(b"QUBESRPC svc+ src keyword default", False,
                 Cmdline(None, False, rpc("svc+", "src", "keyword", "default")),
                 id="dom0-keyword"),
    pytest.param(b"nogui:QUBESRPC svc src name dom0", False,
                 Cmdline(None, True, rpc("svc", "src", "name", "dom0")), id="dom0-nogui"),
    pytest.param(b"echo hi", False, Cmdline(None, False, ShellCommand("echo hi")),
                 id="dom0-shell"),
    pytest.param(b"user:qubesrpc svc src", True,
                 Cmdline("user", False, ShellCommand("qubesrpc svc src")),
                 id="keyword-is-case-sensitive"),
]


@pytest.mark.parametrize(("raw", "with_user", "expected"), GRAMMAR)
def test_grammar(raw: bytes, with_user: bool, expected: Cmdline | None) -> None:
    if expected is None:
        with pytest.raises(RemoteProtocolError):
            parse_cmdline(raw, with_user=with_user)
    else:
        assert parse_cmdline(raw, with_user=with_user) == expected


@pytest.mark.parametrize(
    ("raw", "lookup", "argument"),
    [
        (b"u:QUBESRPC svc src", ("svc+", "svc"), None),
        (b"u:QUBESRPC svc+ src", ("svc+", "svc"), ""),
        (b"u:QUBESRPC svc+arg src", ("svc+arg", "svc"), "arg"),
    ],
)
def test_lookup_names(raw: bytes, lookup: tuple[str, str], argument: str | None) -> None:
    call = parse_cmdline(raw).command
    assert isinstance(call, RpcCall)
    assert call.lookup_names == lookup
    assert call.argument == argument


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"u:QUBESRPC svc+arg src", "svc+arg src"),
        (b"u:QUBESRPC svc src name dom0", "svc src name dom0"),
    ],
)
def test_descriptor_line(raw: bytes, text: str) -> None:
    call = parse_cmdline(raw).command
    assert isinstance(call, RpcCall)
    assert call.text == text


ERRORS = [
    pytest.param(b"cmd", True, "cmdline.user", id="no-colon"),
    pytest.param(b"", True, "cmdline.user", id="empty"),
    pytest.param(b":cmd", True, "cmdline.user", id="empty-user"),
    pytest.param(b"user:", True, "cmdline.command", id="empty-command"),
    pytest.param(b"user:nogui:", True, "cmdline.command", id="empty-command-after-nogui"),
    pytest.param(b"", False, "cmdline.command", id="dom0-empty"),
    pytest.param(b"user:QUBESRPCx svc src", True, "cmdline.rpc", id="QUBESRPCx"),
    pytest.param(b"user:QUBESRPC", True, "cmdline.rpc", id="QUBESRPC-alone"),
    pytest.param(b"user:QUBESRPC svc", True, "cmdline.rpc", id="one-token"),
    pytest.param(b"user:QUBESRPC svc src extra", True, "cmdline.rpc", id="three-tokens"),
    pytest.param(b"user:QUBESRPC svc src name tgt x", True, "cmdline.rpc", id="five-tokens"),
    pytest.param(b"user:QUBESRPC  svc src", True, "cmdline.rpc", id="double-space"),
    pytest.param(b"QUBESRPC svc src name", False, "cmdline.rpc", id="dom0-three-tokens"),
    pytest.param(b"user:QUBESRPC  src", True, "cmdline.rpc.descriptor", id="empty-descriptor"),
    pytest.param(b"user:QUBESRPC +arg src", True, "cmdline.rpc.service", id="only-argument"),
    pytest.param(b"user:QUBESRPC + src", True, "cmdline.rpc.service", id="only-plus"),
    pytest.param(b"user:QUBESRPC svc+arg ", True, "cmdline.rpc.source", id="empty-source"),
    pytest.param(b"user:QUBESRPC svc src bogus tgt", True, "cmdline.rpc.target_type",
                 id="bad-target-type"),
    pytest.param(b"QUBESRPC svc src Name tgt", False, "cmdline.rpc.target_type",
                 id="target-type-case"),
    pytest.param(b"QUBESRPC svc src name ", False, "cmdline.rpc.target", id="empty-target"),
]


@pytest.mark.parametrize(("raw", "with_user", "field"), ERRORS)
def test_grammar_errors(raw: bytes, with_user: bool, field: str) -> None:
    with pytest.raises(RemoteProtocolError) as error:
        parse_cmdline(raw, with_user=with_user)
    assert error.value.field == field


def test_service_name_length_limit() -> None:
    # NAME_MAX (255 bytes) for the part before "+", counted in bytes.
    call = parse_cmdline(b"u:QUBESRPC " + b"s" * 255 + b"+arg src").command
    assert isinstance(call, RpcCall)
    assert len(call.service_name) == 255
    for too_long in (b"s" * 256, "é".encode() * 128):
        with pytest.raises(RemoteProtocolError, match="255"):
            parse_cmdline(b"u:QUBESRPC " + too_long + b"+arg src")


def test_long_argument_is_fine_but_descriptor_is_bounded() -> None:
    long_descriptor = b"svc+" + b"a" * (64999 - 4)
    call = parse_cmdline(b"u:QUBESRPC " + long_descriptor + b" src").command
    assert isinstance(call, RpcCall)
    assert len(call.descriptor) == 64999
    with pytest.raises(RemoteProtocolError) as error:
        parse_cmdline(b"u:QUBESRPC " + long_descriptor + b"aa src")
    assert error.value.field == "cmdline.rpc.descriptor"


def test_non_utf8_bytes_survive() -> None:
    raw = b"u:printf '\xff\xfe' \xc3\xa9"
    parsed = parse_cmdline(raw)
    assert isinstance(parsed.command, ShellCommand)
    assert parsed.command.command.encode("utf-8", "surrogateescape") == raw[2:]


# -- DEFAULT: substitution --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"DEFAULT:QUBESRPC test.Echo+arg vm1", b"qtest:QUBESRPC test.Echo+arg vm1"),
        (b"DEFAULT:nogui:cmd", b"qtest:nogui:cmd"),
        (b"DEFAULT:echo DEFAULT:", b"qtest:echo DEFAULT:"),
        (b"DEFAULT:", b"qtest:"),
        (b"user:DEFAULT:cmd", b"user:DEFAULT:cmd"),
        (b"DEFAULTX:cmd", b"DEFAULTX:cmd"),
        (b"default:cmd", b"default:cmd"),
        (b" DEFAULT:cmd", b" DEFAULT:cmd"),
        (b"DEFAULT", b"DEFAULT"),
        (b"", b""),
    ],
)
def test_substitute_default_user(raw: bytes, expected: bytes) -> None:
    assert substitute_default_user(raw, "qtest") == expected


@relaxed
@given(st.binary(max_size=50), st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                                     exclude_characters=":"), min_size=1))
def test_substitute_default_user_property(rest: bytes, user: str) -> None:
    assert substitute_default_user(b"DEFAULT:" + rest, user) == user.encode() + b":" + rest
    if not rest.startswith(b"DEFAULT:"):
        assert substitute_default_user(rest, user) == rest


# -- building ----------------------------------------------------------------------------------


def test_build_rpc_cmdline() -> None:
    assert build_rpc_cmdline("DEFAULT", "test.Echo+arg", "vm1") == (
        b"DEFAULT:QUBESRPC test.Echo+arg vm1"
    )
    assert build_rpc_cmdline("u", "svc", "dom0", nogui=True) == b"u:nogui:QUBESRPC svc dom0"


_TEXT = st.characters(exclude_categories=["Cs"], exclude_characters=" \0")
users = st.text(st.characters(exclude_categories=["Cs"], exclude_characters=":\0"),
                min_size=1, max_size=20)
service_names = st.text(st.characters(exclude_categories=["Cs"],
                                      exclude_characters=" \0+"), min_size=1, max_size=60)
arguments = st.none() | st.text(_TEXT, max_size=60)
sources = st.text(_TEXT, min_size=1, max_size=30)


@relaxed
@given(users, service_names, arguments, sources, st.booleans())
def test_build_then_parse_round_trip(
    user: str, name: str, argument: str | None, source: str, nogui: bool
) -> None:
    descriptor = name if argument is None else f"{name}+{argument}"
    raw = build_rpc_cmdline(user, descriptor, source, nogui=nogui)
    assert parse_cmdline(raw) == Cmdline(user, nogui, RpcCall(descriptor, name, argument, source))


# -- arbitrary input ----------------------------------------------------------------------------


def _reassemble(parsed: Cmdline) -> bytes:
    """The bytes a Cmdline came from: nothing may be lost or invented by parsing."""
    text = "" if parsed.user is None else parsed.user + ":"
    text += "nogui:" if parsed.nogui else ""
    if isinstance(parsed.command, RpcCall):
        text += "QUBESRPC " + parsed.command.text
    else:
        text += parsed.command.command
    return text.encode("utf-8", "surrogateescape")


# Biased towards the grammar's own tokens so that the RPC branch is reached often.
grammar_soup = st.lists(
    st.sampled_from([b"u:", b":", b"nogui:", b"QUBESRPC", b" ", b"svc", b"+", b"arg", b"src",
                     b"name", b"keyword", b"\xff", b"\0", b"DEFAULT:"]),
    max_size=12,
).map(b"".join)


@relaxed
@given(st.one_of(st.binary(max_size=200), grammar_soup), st.booleans())
def test_any_bytes_parse_or_raise_protocol_error(raw: bytes, with_user: bool) -> None:
    try:
        parsed = parse_cmdline(raw, with_user=with_user)
    except RemoteProtocolError:
        return
    assert (parsed.user is not None) == with_user
    assert _reassemble(parsed) == raw
    if isinstance(parsed.command, RpcCall):
        call = parsed.command
        assert call.service_name and "+" not in call.service_name
        assert call.source and " " not in call.source
        assert (call.target_type is None) == (call.target is None)
        assert call.target_type in (None, "name", "keyword")
    else:
        assert parsed.command.command
        assert not parsed.command.command.startswith("QUBESRPC")


def test_descriptor_of_exactly_65000_bytes_is_accepted_and_one_more_is_not() -> None:
    name = "s" * 255
    fits = name + "+" + "a" * (65000 - 256)
    assert len(fits) == 65000
    parsed = parse_cmdline(f"u:QUBESRPC {fits} src".encode())
    assert isinstance(parsed.command, RpcCall) and parsed.command.descriptor == fits
    with pytest.raises(RemoteProtocolError, match="descriptor"):
        parse_cmdline(f"u:QUBESRPC {fits}a src".encode())


def test_short_rpc_form_without_user_for_local_programs() -> None:
    parsed = parse_cmdline(b"QUBESRPC svc+ src", with_user=False)
    assert parsed.user is None
    assert isinstance(parsed.command, RpcCall)
    assert (parsed.command.argument, parsed.command.target) == ("", None)
