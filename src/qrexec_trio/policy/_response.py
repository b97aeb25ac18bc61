"""A decision as ``key=value`` lines, in the policy daemon's response format
(wire-protocol.md §9), so a connection builder can consume it unchanged.

Allow::

    user=DEFAULT
    result=allow
    target=work
    autostart=True
    requested_target=@default

Deny is the single line ``result=deny``: the format forbids the other keys then.
"""

from __future__ import annotations

from typing import Final

from ._engine import Decision
from ._rules import Action

#: The reader stops at 4,095 bytes (4,096 with its terminator).
MAX_RESPONSE_BYTES: Final = 4095
DENY_RESPONSE: Final = "result=deny\n"


def format_response(decision: Decision) -> str:
    """The response text, newline-terminated. Anything but a complete allow (an
    unanswered ask included) is a deny: the response can only ever fail closed."""
    if decision.action is not Action.ALLOW or decision.target is None:
        return DENY_RESPONSE
    fields = {
        "user": decision.user or "DEFAULT",
        "result": "allow",
        "target": decision.target,
        "autostart": "True" if decision.autostart else "False",
        "requested_target": decision.request.target,
    }
    # Names are validated long before, but a newline, "=" in a key, or an
    # oversized answer would corrupt the reader's view: refuse to write one.
    if any("\n" in value or "\0" in value for value in fields.values()):
        return DENY_RESPONSE
    text = "".join(f"{key}={value}\n" for key, value in fields.items())
    if len(text.encode()) > MAX_RESPONSE_BYTES:
        return DENY_RESPONSE
    return text
