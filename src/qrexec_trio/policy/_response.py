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

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Verdict:
    """A policy response as the connection builder needs it."""

    allowed: bool
    target: str | None = None
    user: str | None = None
    autostart: bool = False
    requested_target: str | None = None


class MalformedResponse(ValueError):
    """A policy response that breaks the format: treated as a deny by callers."""


_ALLOW_KEYS: Final = ("user", "target", "requested_target", "autostart")


def parse_response(data: bytes) -> Verdict:
    """Read a policy response by the policy daemon client's rules (§9).

    At most 4,095 bytes, no NUL, one trailing newline dropped, ``key=value``
    lines, no duplicate keys, unknown keys ignored; ``result=allow`` needs
    user, target, requested_target and autostart, ``result=deny`` forbids them.
    """
    if len(data) > MAX_RESPONSE_BYTES:
        raise MalformedResponse(f"longer than {MAX_RESPONSE_BYTES} bytes")
    if b"\0" in data:
        raise MalformedResponse("contains a NUL byte")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedResponse("not ASCII") from None
    text = text.removesuffix("\n")
    fields: dict[str, str] = {}
    for line in text.split("\n"):
        key, equals, value = line.partition("=")
        if not equals:
            raise MalformedResponse(f"line without '=': {line[:60]!r}")
        if key in fields:
            raise MalformedResponse(f"duplicate key {key!r}")
        fields[key] = value
    result = fields.get("result")
    present = [key for key in _ALLOW_KEYS if key in fields]
    if result == "deny":
        if present:
            raise MalformedResponse(f"deny with {', '.join(present)}")
        return Verdict(allowed=False)
    if result != "allow":
        raise MalformedResponse(f"result must be allow or deny, not {result!r}")
    missing = [key for key in _ALLOW_KEYS if key not in fields]
    if missing:
        raise MalformedResponse(f"allow without {', '.join(missing)}")
    if fields["autostart"] not in ("True", "False"):
        raise MalformedResponse("autostart must be True or False")
    return Verdict(
        allowed=True, target=fields["target"], user=fields["user"],
        autostart=fields["autostart"] == "True", requested_target=fields["requested_target"],
    )
