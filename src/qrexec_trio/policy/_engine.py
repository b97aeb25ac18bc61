"""Evaluation: one request against parsed rules, first match wins.

Pure: no I/O, no clock, no logging on the hot path. The request is validated
against the reference's character sets and the domain registry first; a request
that fails is denied as it stands, never rewritten into something that passes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from ..protocol import is_qube_name
from ._errors import PolicySyntaxError
from ._names import (
    MAX_CALL_NAME_LEN,
    describe_argument_problem,
    describe_qube_problem,
    describe_service_problem,
    split_call_name,
)
from ._rules import Action, Location, Rule, TargetValue
from ._system_info import DomainInfo, SystemInfo
from ._tokens import (
    DISPVM_KEYWORD,
    AdminVMToken,
    DefaultTarget,
    DispVMTarget,
    NamedTarget,
    RequestTarget,
    dispvm_choice,
    effective_dispvm_template,
)

#: Request target keywords, in their "@" spelling. The R2 "$" spelling of exactly
#: these is accepted as an alias (the R2 daemon passes "$dispvm" on unchanged).
_TARGET_KEYWORDS: Final = ("@default", "@adminvm", "@dispvm")


@dataclass(frozen=True)
class Request:
    """A call as the daemon reports it: nothing here is trusted yet."""

    source: str
    target: str
    service: str
    argument: str = ""

    @classmethod
    def from_call(cls, source: str, target: str, call_name: str) -> Request:
        """From ``SERVICE[+ARG]`` as it travels on the wire."""
        service, argument = split_call_name(call_name)
        return cls(source, target, service, argument)

    @property
    def call_name(self) -> str:
        return f"{self.service}+{self.argument}" if self.argument else self.service


@dataclass(frozen=True)
class Decision:
    action: Action
    request: Request
    #: allow: where to connect, after any ``target=`` redirect. A new DispVM is
    #: ``@dispvm:TEMPLATE``.
    target: str | None = None
    #: allow/ask: None means the target's default user.
    user: str | None = None
    autostart: bool = True
    notify: bool = False
    #: ask: the targets the user may choose from (never the caller), and the one
    #: pre-selected: only ever the rule's ``default_target=``, when it is offered.
    ask_targets: tuple[str, ...] = ()
    default_target: str | None = None
    #: The rule that decided, if one did.
    rule: Location | None = None
    #: Why, in words, for the log (never sent to the caller).
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW

    def allow(self, target: str, reason: str) -> Decision:
        """This (ask) decision, answered with ``target``."""
        return dataclasses.replace(
            self, action=Action.ALLOW, target=target, notify=False, reason=reason
        )

    def deny(self, reason: str) -> Decision:
        return dataclasses.replace(
            self, action=Action.DENY, target=None, user=None, ask_targets=(),
            default_target=None, notify=True, reason=reason,
        )


def deny(request: Request, reason: str, rule: Location | None = None) -> Decision:
    return Decision(Action.DENY, request, notify=True, rule=rule, reason=reason)


class _Invalid(Exception):
    """The request cannot be evaluated; the message says why."""


class Policy:
    """Parsed rules in evaluation order, indexed by service.

    Immutable once built. If any file had a syntax error, ``errors`` is non-empty
    and every evaluation is denied: a policy that is partly unreadable may be
    missing exactly the deny rule that mattered.
    """

    def __init__(self, rules: Iterable[Rule], errors: Iterable[PolicySyntaxError] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.errors: tuple[PolicySyntaxError, ...] = tuple(errors)
        # For each service named by some rule, the rules that can apply to it (its
        # own and the "*" ones) in policy order; any other service sees only the
        # "*" rules. Keys come from policy files only, never from requests, so the
        # index cannot be grown by callers.
        self._wildcard_rules = tuple(r for r in self.rules if r.service is None)
        named = {r.service for r in self.rules if r.service is not None}
        self._rules_by_service = {
            service: tuple(r for r in self.rules if r.service in (service, None))
            for service in named
        }

    def rules_for(self, service: str) -> tuple[Rule, ...]:
        return self._rules_by_service.get(service, self._wildcard_rules)

    def redirect_names(self) -> frozenset[str]:
        """The qubes that ``target=`` and ``default_target=`` name.

        A redirect to a qube the registry does not know is denied. A registry
        that is only a guess (built from the names of one request, when nothing
        better is at hand) should know these too, or every redirect fails.
        """
        return frozenset(
            value.name
            for rule in self.rules
            for value in (rule.params.target, rule.params.default_target)
            if isinstance(value, NamedTarget)
        )

    def evaluate(self, request: Request, system_info: SystemInfo) -> Decision:
        return evaluate(self, request, system_info)


@dataclass(frozen=True)
class _Call:
    """A request that passed validation, with what the registry says about it."""

    request: Request
    source: DomainInfo
    target: RequestTarget
    system_info: SystemInfo


def evaluate(policy: Policy, request: Request, system_info: SystemInfo) -> Decision:
    """The decision for ``request``: allow, deny, or ask (to be put to a prompt)."""
    try:
        call = _validate(request, system_info)
    except _Invalid as exc:
        return deny(request, f"invalid request: {exc}")
    if policy.errors:
        first = policy.errors[0]
        return deny(
            call.request, f"policy has {len(policy.errors)} syntax error(s), first: {first}"
        )
    rules = policy.rules_for(request.service)
    rule = _first_match(rules, call, call.target)
    if rule is None:
        return deny(call.request, "no matching rule")
    if rule.action is Action.DENY:
        notify = True if rule.params.notify is None else rule.params.notify
        return Decision(Action.DENY, call.request, notify=notify, rule=rule.location,
                        reason="denied by rule")
    if rule.action is Action.ALLOW:
        return _allow(rule, call)
    return _ask(rules, rule, call)


def _first_match(rules: Sequence[Rule], call: _Call, target: RequestTarget) -> Rule | None:
    """The first rule for ``call``'s caller, service and argument that matches
    the requested ``target``."""
    for rule in rules:
        if _matches_but_target(rule, call) and rule.target.matches_target(
            target, call.source, call.system_info
        ):
            return rule
    return None


def _allow(rule: Rule, call: _Call) -> Decision:
    # The redirect is applied after the match and is not matched again: the
    # policy author who wrote target= decided where the call goes. It must still
    # exist, though: a redirect to a qube that is gone denies (as the reference).
    redirect = rule.params.target
    destination = _resolve(call.target if redirect is None else redirect, call)
    if destination is None:
        return deny(call.request, _unresolvable(rule, call), rule.location)
    return Decision(
        Action.ALLOW, call.request, target=destination, user=rule.params.user,
        autostart=rule.params.autostart, notify=bool(rule.params.notify),
        rule=rule.location, reason="allowed by rule",
    )


def _ask(rules: Sequence[Rule], rule: Rule, call: _Call) -> Decision:
    choices = _ask_choices(rules, rule, call)
    if not choices:
        return deny(call.request, "ask rule, but no target is left to offer", rule.location)
    # Only the rule's default_target= is pre-selected, never what the caller
    # named: the caller must not be able to choose what the user confirms by
    # pressing Enter. One that cannot be offered is dropped (the reference asserts).
    wanted = rule.params.default_target
    default = None if wanted is None else _resolve(wanted, call)
    return Decision(
        Action.ASK, call.request, user=rule.params.user, autostart=rule.params.autostart,
        notify=bool(rule.params.notify), ask_targets=choices,
        default_target=default if default in choices else None,
        rule=rule.location, reason="ask rule",
    )


def _ask_choices(rules: Sequence[Rule], rule: Rule, call: _Call) -> tuple[str, ...]:
    """What the user may choose from, as the reference's ``collect_targets_for_ask``.

    With ``target=`` on the ask rule, only that target. Otherwise every rule for
    this caller, service and argument is applied from the last to the first
    (whatever its target column says): allow and ask rules add what their target
    (or their ``target=``) stands for, deny rules take theirs away, so an earlier
    rule wins over a later one, as in evaluation. Then ``@dispvm`` becomes the
    caller's default template, and the caller itself is removed: a qube never
    calls itself (the reference refuses loopback calls, QubesOS/qubes-issues#951).
    """
    if rule.params.target is not None:
        only = _resolve(rule.params.target, call)
        offered = set() if only is None else {only}
    else:
        offered = set()
        for candidate in reversed(rules):
            if not _matches_but_target(candidate, call):
                continue
            redirect = candidate.params.target
            if candidate.action is Action.DENY:
                offered -= candidate.target.expand(call.system_info)
            elif redirect is not None:
                offered |= _expand_value(redirect, call)
            else:
                offered |= candidate.target.expand(call.system_info)
        if DISPVM_KEYWORD in offered:
            offered.discard(DISPVM_KEYWORD)
            default = _resolve(DispVMTarget(None), call)
            if default is not None:
                offered.add(default)
    offered.discard(call.source.name)
    # Qubes by name, then new DispVMs: a stable order for the prompt.
    return tuple(sorted(offered, key=lambda choice: (choice.startswith("@"), choice)))


def _matches_but_target(rule: Rule, call: _Call) -> bool:
    if rule.argument is not None and rule.argument != call.request.argument:
        return False
    return rule.source.matches_source(call.source)


def _expand_value(value: TargetValue, call: _Call) -> frozenset[str]:
    """What a ``target=`` redirect adds to an ask: itself, if it can be a target
    (a bare ``@dispvm`` stays a keyword until the end, as a rule's does)."""
    if isinstance(value, DispVMTarget) and value.template is None:
        return frozenset({DISPVM_KEYWORD})
    resolved = _resolve(value, call)
    return frozenset() if resolved is None else frozenset({resolved})


def _resolve(value: TargetValue | RequestTarget, call: _Call) -> str | None:
    """Where a connection would go, as the policy response names it; None when
    it cannot go there: no target named, a qube that does not exist, no usable
    DispVM template."""
    system_info = call.system_info
    if isinstance(value, NamedTarget):
        return value.name if value.name in system_info.domains else None
    if isinstance(value, AdminVMToken):
        return system_info.admin_vm
    if isinstance(value, DefaultTarget):
        return None
    template = effective_dispvm_template(value, call.source, system_info)
    return None if template is None else dispvm_choice(template.name)


def _unresolvable(rule: Rule, call: _Call) -> str:
    """Why an allow rule (named by file:line) leads nowhere."""
    redirect = rule.params.target
    value = call.target if redirect is None else redirect
    if isinstance(value, DefaultTarget):
        why = "the caller named no target and the rule has no target="
    elif isinstance(value, NamedTarget):
        why = f"its target= names {value.name!r}, which does not exist"
    elif isinstance(value, AdminVMToken):
        why = "its target= names @adminvm, but no domain is the AdminVM"
    else:
        why = "it names a new DispVM, and there is no usable DispVM template for it"
    return f"rule {rule.location} allows, but {why}"


# --- validation -----------------------------------------------------------------


def _validate(request: Request, system_info: SystemInfo) -> _Call:
    problem = describe_service_problem(request.service) or describe_argument_problem(
        request.argument
    )
    if problem is not None:
        raise _Invalid(problem)
    if len(request.service) + 1 + len(request.argument) > MAX_CALL_NAME_LEN:
        raise _Invalid(f"SERVICE+ARGUMENT longer than {MAX_CALL_NAME_LEN} characters")
    source = _known_domain(request.source, system_info, "source")
    target, spelled = _validate_target(request.target, system_info)
    if spelled != request.target:
        # Decisions carry the "@" spelling: a "$" must never reach a command line.
        request = dataclasses.replace(request, target=spelled)
    return _Call(request, source, target, system_info)


def _known_domain(name: str, system_info: SystemInfo, role: str) -> DomainInfo:
    problem = describe_qube_problem(name)
    if problem is not None:
        raise _Invalid(f"{role}: {problem}")
    domain = system_info.domains.get(name)
    if domain is None:
        raise _Invalid(f"{role} {name!r} is not a known domain")
    return domain


def _validate_target(text: str, system_info: SystemInfo) -> tuple[RequestTarget, str]:
    """The requested target, checked against the registry.

    A name that is no known domain is an invalid request, denied before any rule
    is looked at. This is stricter than the reference, which logs a warning and
    evaluates the call as if the caller had named no target (``@default``): a
    typo or a qube that was removed would then be redirected wherever the
    ``@default`` rules send calls, a destination the caller did not ask for.
    ``@dispvm:VM`` with VM no usable DispVM template is refused the same way (as
    there).
    """
    if text.startswith("$") and (
        text[1:] in {k[1:] for k in _TARGET_KEYWORDS} or text.startswith("$dispvm:")
    ):
        text = "@" + text[1:]
    if text == "@default":
        return DefaultTarget(), text
    if text == "@adminvm":
        admin = system_info.admin_vm
        if admin is None:
            raise _Invalid("target @adminvm, but no domain is the AdminVM")
        return NamedTarget(admin), text
    if text == "@dispvm":
        return DispVMTarget(None), text
    if text.startswith("@dispvm:"):
        template = text.removeprefix("@dispvm:")
        if not is_qube_name(template) or system_info.dispvm_template(template) is None:
            raise _Invalid(f"target {text[:80]!r}: not a known DispVM template")
        return DispVMTarget(template), text
    return NamedTarget(_known_domain(text, system_info, "target").name), text
