"""The name and id rules, checked with str/bytes methods, accept exactly what the regexes did.

The short-lived clients do not import ``re``, so the protocol checks request
ids, domain names, service names, qube names and R2 connection ids with
string methods. Here each check is compared, on arbitrary input and on
near-misses built from the allowed characters, with the regular expression
it replaced.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from qrexec_trio.protocol import LocalProtocolError, ProtocolError, is_qube_name
from qrexec_trio.protocol._structs import (
    check_ident_text,
    decode_domain,
    encode_domain,
    encode_ident,
    service_name_problem,
)
from qrexec_trio.protocol._vm_local import parse_cid

from .strategies import DOMAIN_ALPHABET, IDENT_ALPHABET, SERVICE_ALPHABET, relaxed

IDENT = re.compile(rb"[0-9A-Za-z_.\- ]*")
DOMAIN = re.compile(rb"[A-Za-z0-9_.\-@:]*")
SERVICE = re.compile(rb"[A-Za-z0-9_.\-+]+")
QUBE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
CID = re.compile(rb"(0|[1-9][0-9]{0,9}) (0|[1-9][0-9]{0,9}) (0|[1-9][0-9]{0,9})")

#: Bytes that sit next to the allowed ones or that a careless check might let through.
NEAR_MISSES = b"\0\t\n /:;@[\\]^`{|}~+-.\x7f\x80\xb2\xff"


def near(alphabet: bytes, max_size: int = 40) -> st.SearchStrategy[bytes]:
    """Allowed bytes, or allowed bytes around one near miss: where a wrong rule would show."""
    allowed = st.lists(st.sampled_from(alphabet), max_size=max_size // 2).map(bytes)
    one_miss = st.sampled_from(NEAR_MISSES).map(lambda byte: bytes([byte]))
    return st.one_of(allowed, st.tuples(allowed, one_miss, allowed).map(b"".join))


def accepts(check: object, *args: object) -> bool:
    try:
        check(*args)  # type: ignore[operator]
    except ProtocolError:
        return False
    return True


@relaxed
@given(st.one_of(st.binary(max_size=40), near(IDENT_ALPHABET)))
def test_request_ids(text: bytes) -> None:
    expected = len(text) < 32 and IDENT.fullmatch(text) is not None
    assert accepts(check_ident_text, text) == expected
    assert accepts(encode_ident, text) == expected


@relaxed
@given(st.one_of(st.binary(max_size=70), near(DOMAIN_ALPHABET, 70)))
def test_domain_names(text: bytes) -> None:
    expected = len(text) < 64 and DOMAIN.fullmatch(text) is not None
    assert accepts(encode_domain, "f", text, 64) == expected
    if b"\0" not in text and len(text) < 64:
        padded = text.ljust(64, b"\0")
        assert accepts(decode_domain, "f", padded) == (DOMAIN.fullmatch(text) is not None)


@relaxed
@given(st.one_of(st.binary(max_size=40), near(SERVICE_ALPHABET)))
@example(b"")
@example(b"+")
def test_service_names(text: bytes) -> None:
    allowed = SERVICE.fullmatch(text) is not None and not text.startswith(b"+")
    assert (service_name_problem(text) is None) == allowed


@relaxed
@given(st.one_of(st.text(max_size=40),
                 near(DOMAIN_ALPHABET).map(lambda b: b.decode("latin-1"))))
@example("")
@example("a" * 31)
@example("a" * 32)
@example("1abc")
@example("a\u00e9")
@example("a\n")
def test_qube_names(text: str) -> None:
    expected = len(text) <= 31 and QUBE_NAME.fullmatch(text) is not None
    assert is_qube_name(text) == expected


CID_PARTS = st.one_of(
    st.integers(0, 2**36).map(lambda n: str(n).encode()),
    st.sampled_from([b"", b"00", b"01", b"-1", b"+1", b"\xb2", b"1\n", b" ", b"1 "]),
)


@relaxed
@given(st.one_of(st.binary(max_size=35),
                 st.lists(CID_PARTS, min_size=1, max_size=4).map(b" ".join)))
@example(b"0 1 2")
@example(b"0 1 2\n")
@example(b"1 2  3")
@example(b"1234567890 1 2")
@example(b"12345678901 1 2")
@example(b"01 2 3")
@example(b"1 2 00")
def test_connection_ids(text: bytes) -> None:
    match = CID.fullmatch(text)
    expected = (len(text) < 32 and match is not None
                and len({int(match[1]), int(match[2]), int(match[3])}) == 3)
    assert accepts(parse_cid, text) == expected
    if expected:
        assert match is not None
        assert parse_cid(text) == (int(match[1]), int(match[2]), int(match[3]))


@pytest.mark.parametrize("byte", list(range(256)))
def test_every_byte_inside_a_name(byte: int) -> None:
    # Each rule, on each byte between two allowed ones (property tests may
    # miss one byte; this may not).
    text = b"a" + bytes([byte]) + b"1"
    assert accepts(check_ident_text, text) == (IDENT.fullmatch(text) is not None)
    assert accepts(encode_domain, "f", text, 64) == (DOMAIN.fullmatch(text) is not None)
    assert (service_name_problem(text) is None) == (SERVICE.fullmatch(text) is not None)
    name = text.decode("latin-1")
    assert is_qube_name(name) == (QUBE_NAME.fullmatch(name) is not None)
    cid = b"1" + bytes([byte]) + b"2 3"
    assert accepts(parse_cid, cid) == (CID.fullmatch(cid) is not None)


def test_an_encoder_refuses_with_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_ident(b"a/b")
