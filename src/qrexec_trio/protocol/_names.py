"""Qube names: one rule for the policy, the domain manager and the world config."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

#: The longest qube name (the 32-byte name fields of the older triggers, with NUL).
MAX_QUBE_NAME_LEN: Final = 31
_LETTERS: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_NAME_CHARS: Final = _LETTERS + "0123456789_.-"


def is_qube_name(text: str) -> bool:
    """A letter, then letters, digits, ``_``, ``.`` or ``-``; at most 31 characters."""
    # str methods, not a regex: this runs in the short-lived clients, which
    # do not import re. strip() leaves nothing iff every character is allowed.
    return (0 < len(text) <= MAX_QUBE_NAME_LEN and text[0] in _LETTERS
            and not text.strip(_NAME_CHARS))
