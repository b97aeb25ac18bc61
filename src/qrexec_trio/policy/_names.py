"""Character sets and length limits for everything a policy talks about.

The sets are the reference's (wire-protocol.md §7.2 and r2-design.md §11), minus
the characters that history showed to be dangerous: no ``$`` (QSB-038: a shell
expanded it after the policy check), no ``/`` (a service name is a file name),
no space or ``:`` (both are separators in the command lines built later).

Every check here *rejects*; nothing is ever rewritten into a "clean" name,
because a rewritten name is a different name than the one the policy judged.
"""

from __future__ import annotations

import re
from typing import Final

from ..protocol import MAX_QUBE_NAME_LEN, is_qube_name

#: Qube names as the domain registry allows them: a letter, then letters,
#: Linux NAME_MAX: a handler is a file named after the service.
MAX_SERVICE_NAME_LEN: Final = 255
#: ``SERVICE+ARG`` must fit the wire's 65,000-byte name field with its NUL.
MAX_CALL_NAME_LEN: Final = 64_999
#: The longest argument that can still fit beside the shortest service name.
MAX_ARGUMENT_LEN: Final = MAX_CALL_NAME_LEN - len("s+")
#: A request identifier (CID) is 31 characters plus a NUL on the wire.
MAX_REQUEST_ID_LEN: Final = 31
MAX_USER_NAME_LEN: Final = 32
MAX_TAG_LEN: Final = 255

_SERVICE_NAME: Final = re.compile(r"[A-Za-z0-9_.-]+")
_ARGUMENT: Final = re.compile(r"[A-Za-z0-9_.+-]*")
_USER_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_TAG: Final = re.compile(r"[A-Za-z0-9_.-]+")
# The R2 daemon passes its CID on as "%d %d %d", so a space is part of the set.
_REQUEST_ID: Final = re.compile(r"[0-9A-Za-z_. -]+")

#: Domain classes known to the domain registry, as ``@type:`` names them.
DOMAIN_TYPES: Final = frozenset(
    {"AdminVM", "AppVM", "DispVM", "StandaloneVM", "TemplateVM"}
)


def is_service_name(text: str) -> bool:
    # "." and ".." pass the character set but name directories, not handlers.
    return (
        len(text) <= MAX_SERVICE_NAME_LEN
        and text not in {".", ".."}
        and _SERVICE_NAME.fullmatch(text) is not None
    )


def is_argument(text: str) -> bool:
    """An argument may be empty and may start with ``-``: handlers must cope."""
    return len(text) <= MAX_ARGUMENT_LEN and _ARGUMENT.fullmatch(text) is not None


def is_user_name(text: str) -> bool:
    return len(text) <= MAX_USER_NAME_LEN and _USER_NAME.fullmatch(text) is not None


def is_tag(text: str) -> bool:
    return len(text) <= MAX_TAG_LEN and _TAG.fullmatch(text) is not None


def is_request_id(text: str) -> bool:
    return len(text) <= MAX_REQUEST_ID_LEN and _REQUEST_ID.fullmatch(text) is not None


def describe_service_problem(text: str) -> str | None:
    """Why ``text`` is not a service name, or None when it is one."""
    if not text:
        return "empty service name"
    if len(text) > MAX_SERVICE_NAME_LEN:
        return f"service name longer than {MAX_SERVICE_NAME_LEN} characters"
    if not is_service_name(text):
        return f"invalid service name {quoted(text)} (allowed: A-Z a-z 0-9 _ . -)"
    return None


def describe_argument_problem(text: str) -> str | None:
    """Why ``text`` is not a service argument, or None when it is one."""
    if len(text) > MAX_ARGUMENT_LEN:
        return f"argument longer than {MAX_ARGUMENT_LEN} characters"
    if not is_argument(text):
        return f"invalid argument {quoted(text)} (allowed: A-Z a-z 0-9 _ . + -)"
    return None


def describe_qube_problem(text: str) -> str | None:
    if len(text) > MAX_QUBE_NAME_LEN:
        return f"qube name longer than {MAX_QUBE_NAME_LEN} characters"
    if not is_qube_name(text):
        return f"invalid qube name {quoted(text)}"
    return None


def split_call_name(text: str) -> tuple[str, str]:
    """``SERVICE[+ARG]`` -> (service, argument); no ``+`` means an empty argument."""
    service, _, argument = text.partition("+")
    return service, argument


def quoted(text: str, limit: int = 60) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters: messages
    quote the offending text, but never a whole megabyte of one line."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
