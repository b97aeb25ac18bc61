"""Qube names: one rule for the policy, the domain manager and the world config."""

from __future__ import annotations

import re
from typing import Final

#: The longest qube name (the 32-byte name fields of the older triggers, with NUL).
MAX_QUBE_NAME_LEN: Final = 31
_QUBE_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def is_qube_name(text: str) -> bool:
    """A letter, then letters, digits, ``_``, ``.`` or ``-``; at most 31 characters."""
    return len(text) <= MAX_QUBE_NAME_LEN and _QUBE_NAME.fullmatch(text) is not None
