"""Hypothesis strategies for valid protocol values, shared by the protocol tests.

The alphabets are written out here from the wire specification rather than taken
from the implementation, so that a wrong character set in the code shows up as a
failing test instead of being mirrored by the test.
"""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st

from qrexec_trio.protocol import TriggerRequest

#: For every property test here: the suite asserts nothing about time, and a
#: loaded CI machine must not turn a slow example into a failure.
relaxed = settings(deadline=None)

U32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
I32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)

IDENT_ALPHABET = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_.- "
DOMAIN_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-@:"
SERVICE_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-+"


def bytes_from(alphabet: bytes, *, min_size: int = 0, max_size: int) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map(bytes)


idents = bytes_from(IDENT_ALPHABET, max_size=31)


def domain_names(max_size: int = 63) -> st.SearchStrategy[bytes]:
    return bytes_from(DOMAIN_ALPHABET, max_size=max_size)


def service_names(max_size: int = 200) -> st.SearchStrategy[bytes]:
    # A service name may contain "+" (the argument separator) but not start with it.
    return st.tuples(
        bytes_from(SERVICE_ALPHABET.replace(b"+", b""), min_size=1, max_size=1),
        bytes_from(SERVICE_ALPHABET, max_size=max_size - 1),
    ).map(b"".join)


@st.composite
def trigger_requests(draw: st.DrawFn, version: int | None = None) -> TriggerRequest:
    if version is None:
        version = draw(st.sampled_from([2, 3, 4]))
    return TriggerRequest(
        version=version,
        source=draw(domain_names()) if version == 4 else b"",
        target=draw(domain_names(31 if version == 2 else 63)),
        request_id=draw(idents),
        service_name=draw(service_names(63 if version == 2 else 300)),
    )


# Command lines: bytes without NUL, as EXEC_CMDLINE carries them.
cmdline_bytes = st.binary(max_size=300).map(lambda b: b.replace(b"\0", b"x"))


def split_points(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """``data`` cut into consecutive pieces at random places (some possibly empty)."""
    return st.lists(st.integers(0, len(data)), max_size=12).map(
        lambda cuts: _cut(data, sorted(cuts))
    )


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]
