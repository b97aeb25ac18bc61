"""A parsed rule, its action, and the action's parameters."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from ._lines import LineError
from ._names import describe_qube_problem, is_user_name, quoted
from ._tokens import (
    AdminVMToken,
    Dialect,
    DispVMTarget,
    NamedTarget,
    Position,
    Token,
    parse_token,
)


class Action(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"


#: Where a redirect or default target points: a domain, the admin VM (named at
#: evaluation time), or a new DispVM.
TargetValue = NamedTarget | DispVMTarget | AdminVMToken


@dataclass(frozen=True)
class Params:
    target: TargetValue | None = None
    default_target: TargetValue | None = None
    user: str | None = None
    autostart: bool = True
    #: None: the action's own default (deny notifies, allow and ask do not).
    notify: bool | None = None


@dataclass(frozen=True)
class Location:
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Rule:
    #: None: any service / any argument (``*``). An argument of "" is ``+``.
    service: str | None
    argument: str | None
    source: Token
    target: Token
    action: Action
    params: Params
    location: Location


_ALLOWED_PARAMS: Final[dict[Dialect, dict[Action, frozenset[str]]]] = {
    Dialect.R2: {
        Action.ALLOW: frozenset({"target", "user"}),
        Action.ASK: frozenset({"target", "user"}),
        Action.DENY: frozenset(),
    },
    Dialect.MULTIFILE: {
        Action.ALLOW: frozenset({"target", "user", "autostart", "notify"}),
        Action.ASK: frozenset({"target", "user", "default_target", "autostart", "notify"}),
        Action.DENY: frozenset({"notify"}),
    },
}
_YES_NO: Final = {"yes": True, "no": False}


class ParamError(LineError):
    """A parameter is malformed; the caller turns it into a PolicySyntaxError."""


def parse_action(text: str) -> Action:
    try:
        return Action(text)
    except ValueError:
        raise ParamError(f"unknown action {quoted(text)} (expected allow, deny or ask)") from None


def parse_params(action: Action, items: Iterable[str], dialect: Dialect) -> Params:
    """Parse ``key=value`` items for ``action``; unknown, repeated or misplaced
    keys are errors rather than being ignored, so a typo cannot widen a rule."""
    allowed = _ALLOWED_PARAMS[dialect][action]
    seen: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamError(f"expected key=value, got {quoted(item)}")
        if key in seen:
            raise ParamError(f"parameter {quoted(key)} given twice")
        if key not in allowed:
            valid = ", ".join(sorted(allowed)) or "none"
            raise ParamError(
                f"parameter {quoted(key)} not valid for {action.value} (valid: {valid})"
            )
        if not value:
            raise ParamError(f"parameter {quoted(key)} has an empty value")
        seen[key] = value

    user = seen.get("user")
    if user is not None and not is_user_name(user):
        raise ParamError(f"invalid user name {quoted(user)}")
    target = seen.get("target")
    default_target = seen.get("default_target")
    autostart = seen.get("autostart")
    notify = seen.get("notify")
    return Params(
        target=None if target is None else parse_target_value(target, dialect),
        default_target=(
            None if default_target is None else parse_target_value(default_target, dialect)
        ),
        user=user,
        autostart=True if autostart is None else _parse_yes_no("autostart", autostart),
        notify=None if notify is None else _parse_yes_no("notify", notify),
    )


def parse_target_value(text: str, dialect: Dialect) -> TargetValue:
    """A redirect target: a qube name, ``@adminvm``, ``@dispvm`` or ``@dispvm:VM``."""
    if text.startswith("$"):
        if dialect is Dialect.R2 and text != "$dispvm":
            raise ParamError(f"unknown keyword {quoted(text)} in target")
        text = text.replace("$", "@")
    if text == "@adminvm":
        return AdminVMToken()
    if text == "@dispvm":
        return DispVMTarget(None)
    if text.startswith("@dispvm:"):
        template = text.removeprefix("@dispvm:")
        problem = describe_qube_problem(template)
        if problem is not None:
            raise ParamError(f"target {quoted(text)}: {problem}")
        return DispVMTarget(template)
    if text.startswith("@"):
        raise ParamError(
            f"invalid target {quoted(text)} (a qube name, @adminvm, @dispvm or @dispvm:VM)"
        )
    problem = describe_qube_problem(text)
    if problem is not None:
        raise ParamError(f"target: {problem}")
    return NamedTarget(text)


def _parse_yes_no(key: str, value: str) -> bool:
    try:
        return _YES_NO[value]
    except KeyError:
        raise ParamError(
            f"parameter {quoted(key)} must be yes or no, got {quoted(value)}"
        ) from None


def build_rule(
    service: str | None,
    argument: str | None,
    source_text: str,
    target_text: str,
    action_text: str,
    *,
    params: Iterable[str],
    dialect: Dialect,
    location: Location,
) -> Rule:
    """One rule from its fields, as either policy format spells them."""
    action = parse_action(action_text)
    return Rule(
        service=service,
        argument=argument,
        source=parse_token(source_text, Position.SOURCE, dialect),
        target=parse_token(target_text, Position.TARGET, dialect),
        action=action,
        params=parse_params(action, params, dialect),
        location=location,
    )
