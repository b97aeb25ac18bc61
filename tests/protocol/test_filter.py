"""Escape-character filtering of remote output (wire-protocol.md §11, ``-t``/``-T``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrexec_trio.protocol import filter_escape_chars

from .strategies import relaxed

KEPT_CONTROLS = {0x07: "BEL", 0x08: "BS", 0x09: "TAB", 0x0A: "LF", 0x0D: "CR"}


@pytest.mark.parametrize("byte", range(256))
def test_every_byte(byte: int) -> None:
    kept = 0x20 <= byte <= 0x7E or byte in KEPT_CONTROLS
    assert filter_escape_chars(bytes([byte])) == (bytes([byte]) if kept else b"_")


@pytest.mark.parametrize(
    ("raw", "filtered"),
    [
        (b"", b""),
        (b"plain text\n", b"plain text\n"),
        (b"\x1b[2J\x1b]0;pwned\x07", b"_[2J_]0;pwned\x07"),  # clear screen, set title
        (b"tab\there\r\n", b"tab\there\r\n"),
        (b"caf\xc3\xa9", b"caf__"),  # UTF-8 is not passed through either
        (b"\x00\x7f\x80\xff", b"____"),
        (b"\x0b\x0c", b"__"),  # VT and FF are not among the kept controls
    ],
)
def test_examples(raw: bytes, filtered: bytes) -> None:
    assert filter_escape_chars(raw) == filtered


@relaxed
@given(st.binary(max_size=500))
def test_property(data: bytes) -> None:
    out = filter_escape_chars(data)
    assert len(out) == len(data)
    assert filter_escape_chars(out) == out
    for before, after in zip(data, out, strict=True):
        assert after == before or after == ord("_")
        assert 0x20 <= after <= 0x7E or after in KEPT_CONTROLS
