"""Escape-character filtering of remote output (``-t`` / ``-T``)."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

# Printable ASCII plus TAB, LF, CR, BS and BEL pass; every other byte becomes "_",
# so a hostile service cannot drive the caller's terminal.
_ALLOWED: Final = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D, 0x08, 0x07}
_TABLE: Final = bytes(b if b in _ALLOWED else ord("_") for b in range(256))


def filter_escape_chars(data: bytes) -> bytes:
    return data.translate(_TABLE)
