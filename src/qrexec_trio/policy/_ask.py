"""Putting an ``ask`` decision to someone, and telling them what was decided.

Two ways to ask. The one of today's dom0: the **policy agent**, a qrexec service
``policy.Ask`` in the domain that shows the source qube's GUI (its ``guivm``),
called with the question as one JSON object (see :func:`ask_request`)::

    {"source": "work", "service": "qubes.Filecopy", "argument": "+",
     "targets": ["personal", "vault", "@dispvm:dvm"], "default_target": "",
     "icons": {"work": "appvm-red", ...}}

which answers, in ASCII, ``allow:TARGET`` (TARGET one of ``targets``) or
``deny``; anything else denies (:func:`parse_agent_answer`). The same agent
gets ``policy.Notify`` with ``{"resolution": "allow"|"deny"|"fail", "source",
"service", "argument", "target"}`` (:func:`notify_request`) and answers nothing.
The calls themselves (qrexec-client to a VM, or dom0's own service) are made by
the roles (``roles/policy_agent.py``); what is here is pure.

The other way is ours: a configured program (an argv, never a shell string),
``program_prompt``, that gets the question as one JSON object on stdin::

    {"source": "work", "service": "qubes.Filecopy", "argument": "",
     "requested_target": "@default", "targets": ["personal", "vault"],
     "default_target": null}

and answers on stdout with one of ``targets`` (allow, to that target) or nothing
(deny). Anything else, a non-zero exit, or no answer within the timeout denies.
There is no "yes to all" and no answer that counts as yes by default.

Notifications follow the reference: a deny notifies unless its rule says
``notify=no``; an allow (and an ask, once answered) only with ``notify=yes``. An
ask the user declined, or that nobody could be asked, notifies as its rule
says; an answer that is not one (garbage, a target that was not offered)
notifies as any other deny.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import structlog

from .._config import Timeouts
from ..protocol import is_qube_name
from ._engine import Decision
from ._rules import Action
from ._system_info import SystemInfo

log = structlog.get_logger(__name__)

#: How long a user has to answer an ask prompt (Timeouts.policy_ask).
DEFAULT_ASK_TIMEOUT: Final = Timeouts().policy_ask
#: An answer is one target name; a prompt that writes more is broken.
_MAX_ANSWER_BYTES: Final = 256

#: The policy agent's qrexec services, as the reference names them.
ASK_SERVICE: Final = "policy.Ask"
NOTIFY_SERVICE: Final = "policy.Notify"
#: The longest ``policy.Ask`` answer read (``allow:`` and a target name fit many
#: times over); a longer one is garbage.
MAX_AGENT_ANSWER: Final = _MAX_ANSWER_BYTES
ALLOW_PREFIX: Final = "allow:"
DENY_ANSWER: Final = "deny"


@dataclass(frozen=True)
class Question:
    source: str
    service: str
    argument: str
    requested_target: str
    targets: tuple[str, ...]
    default_target: str | None

    @classmethod
    def of(cls, decision: Decision) -> Question:
        request = decision.request
        return cls(
            source=request.source,
            service=request.service,
            argument=request.argument,
            requested_target=request.target,
            targets=decision.ask_targets,
            default_target=decision.default_target,
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "source": self.source,
                "service": self.service,
                "argument": self.argument,
                "requested_target": self.requested_target,
                "targets": list(self.targets),
                "default_target": self.default_target,
            }
        )


Prompt = Callable[[Question], str | None]


def _chosen(decision: Decision, target: str, reason: str) -> Decision:
    """The ask answered with ``target``: an allow that notifies as the ask rule says
    (the reference's allow resolution made from an ask keeps the rule's notify=)."""
    return dataclasses.replace(decision.allow(target, reason), notify=decision.notify)


def _declined(decision: Decision, reason: str) -> Decision:
    """The ask answered no (or unanswerable): a deny notifying as the ask rule says."""
    return dataclasses.replace(decision.deny(reason), notify=decision.notify)


def resolve_ask(decision: Decision, *, assume_yes: bool, prompt: Prompt | None) -> Decision:
    """Turn an ``ask`` decision into allow or deny; other decisions pass through."""
    if decision.action is not Action.ASK:
        return decision
    if assume_yes:
        # As the reference: the target the caller asked for, if it is on offer;
        # else the rule's default_target= (ours: the reference denies then).
        requested = decision.request.target
        if requested in decision.ask_targets:
            return _chosen(decision, requested, "ask: assumed yes for the requested target")
        if decision.default_target is None:
            return decision.deny(
                "ask: --assume-yes-for-ask, but no target to assume (the requested one is"
                " not on offer and the rule has no default_target=)"
            )
        return _chosen(decision, decision.default_target, "ask: assumed yes")
    if prompt is None:
        log.warning(
            "ask denied: no prompt program",
            source=decision.request.source, service=decision.request.call_name,
            target=decision.request.target,
        )
        return _declined(decision, "ask: no prompt configured")
    answer = prompt(Question.of(decision))
    if answer is None:
        return _declined(decision, "ask: the user declined")
    if answer not in decision.ask_targets:
        log.warning("ask answer is not a choice", answer=answer[:64], offered=decision.ask_targets)
        return decision.deny("ask: the answer was not one of the offered targets")
    return _chosen(decision, answer, "ask: the user chose a target")


def ask_program(argv: Sequence[str], question: Question, *, timeout: float) -> str | None:
    """Run ``argv`` with ``question`` as JSON on stdin; its answer, or None."""
    try:
        # An argv list from dom0's own configuration: no shell ever sees it.
        completed = subprocess.run(
            list(argv),
            input=question.to_json().encode(),
            stdout=subprocess.PIPE,
            timeout=timeout,
            check=False,
            close_fds=True,
        )
    except subprocess.TimeoutExpired:
        log.warning("ask timed out", program=argv[0], timeout=timeout)
        return None
    except OSError as exc:
        log.error("ask failed", program=argv[0], error=str(exc))
        return None
    if completed.returncode != 0:
        log.warning("ask program failed", program=argv[0], status=completed.returncode)
        return None
    output = completed.stdout
    if len(output) > _MAX_ANSWER_BYTES:
        log.warning("ask answer too long", program=argv[0], length=len(output))
        return None
    try:
        answer = output.decode("ascii").strip()
    except UnicodeDecodeError:
        log.warning("ask answer not ASCII", program=argv[0])
        return None
    return answer or None


def program_prompt(argv: Sequence[str], *, timeout: float = DEFAULT_ASK_TIMEOUT) -> Prompt:
    """A Prompt that asks by running ``argv``."""
    fixed = tuple(argv)

    def prompt(question: Question) -> str | None:
        return ask_program(fixed, question, timeout=timeout)

    return prompt


# --- the policy agent (policy.Ask, policy.Notify): requests and answers, pure ----------


def agent_domain(source: str, system_info: SystemInfo, default: str | None) -> str | None:
    """Where ``source``'s policy agent runs: its ``guivm`` when the domains' facts
    name one (a valid qube name), else ``default``; None: nobody to ask.

    The reference denies an ask (and sends no notification) for a source without
    a guivm; a ``default`` of None does the same here.
    """
    domain = system_info.domains.get(source)
    guivm = None if domain is None else domain.guivm
    if guivm and is_qube_name(guivm):
        return guivm
    return default or None


def _fallback_icon(domain_type: str) -> str:
    # The icon theme of a Qubes GUI domain names its icons so; a name it lacks
    # is shown as a generic icon by the reference's agent.
    return f"{domain_type.lower()}-black"


def agent_icons(system_info: SystemInfo) -> dict[str, str]:
    """An icon name for every domain, and for ``@dispvm:T`` of every DispVM template
    (the template's icon, ``app`` changed to ``disp``), as the reference sends them."""
    icons: dict[str, str] = {}
    for name, domain in system_info.domains.items():
        icons[name] = domain.icon or _fallback_icon(domain.type)
    for name, domain in system_info.domains.items():
        if domain.template_for_dispvms:
            icons[f"@dispvm:{name}"] = icons[name].replace("app", "disp")
    return icons


def ask_request(decision: Decision, system_info: SystemInfo) -> dict[str, object]:
    """The ``policy.Ask`` request for an ``ask`` decision: the reference's JSON object.

    ``argument`` always starts with ``+`` (``+`` alone for none); ``default_target``
    is ``""`` when there is none.
    """
    request = decision.request
    return {
        "source": request.source,
        "service": request.service,
        "argument": f"+{request.argument}",
        "targets": list(decision.ask_targets),
        "default_target": decision.default_target or "",
        "icons": agent_icons(system_info),
    }


def encode_request(request: dict[str, object]) -> bytes:
    """JSON, ASCII only (as the reference sends it: non-ASCII escaped)."""
    return json.dumps(request).encode("ascii")


@dataclass(frozen=True)
class AgentAnswer:
    """What a ``policy.Ask`` answer means."""

    #: Allowed, to this (offered) target.
    target: str | None = None
    #: Not an answer at all: why (the raw answer is never trusted further).
    problem: str | None = None

    @property
    def declined(self) -> bool:
        return self.target is None and self.problem is None


def parse_agent_answer(raw: bytes, offered: Iterable[str]) -> AgentAnswer:
    """``allow:TARGET`` (TARGET one of ``offered``) or ``deny``; else a problem.

    One trailing newline is tolerated (a hand-written agent's ``echo``); nothing
    else is stripped or guessed at.
    """
    if len(raw) > MAX_AGENT_ANSWER:
        return AgentAnswer(problem=f"answer longer than {MAX_AGENT_ANSWER} bytes")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return AgentAnswer(problem=f"answer is not ASCII: {raw[:64]!r}")
    text = text.removesuffix("\n")
    if text == DENY_ANSWER:
        return AgentAnswer()
    if text.startswith(ALLOW_PREFIX):
        target = text[len(ALLOW_PREFIX):]
        if target in set(offered):
            return AgentAnswer(target=target)
        return AgentAnswer(problem=f"the agent chose {target[:64]!r}, which was not offered")
    if not text:
        return AgentAnswer(problem="empty answer")
    return AgentAnswer(problem=f"invalid answer {text[:64]!r} (expected allow:TARGET or deny)")


def apply_agent_answer(decision: Decision, answer: AgentAnswer) -> Decision:
    """The ``ask`` decision, resolved by the policy agent's answer."""
    if answer.target is not None:
        return _chosen(decision, answer.target, "ask: the user chose a target")
    if answer.problem is None:
        return _declined(decision, "ask: the user declined")
    return decision.deny(f"ask: {answer.problem}")


def unanswered(decision: Decision, why: str) -> Decision:
    """The ``ask`` decision when nobody answered (no agent, a failed call, a timeout)."""
    return _declined(decision, f"ask: {why}")


def notify_request(decision: Decision) -> dict[str, str] | None:
    """The ``policy.Notify`` request for a final decision, or None when it notifies
    nobody (``notify`` unset, or an ask still unanswered). A deny names the target
    as the caller asked for it, an allow where the call goes."""
    if not decision.notify or decision.action is Action.ASK:
        return None
    request = decision.request
    if decision.action is Action.ALLOW:
        resolution, target = "allow", decision.target or request.target
    else:
        resolution, target = "deny", request.target
    return {
        "resolution": resolution,
        "service": request.service,
        "argument": f"+{request.argument}",
        "source": request.source,
        "target": target,
    }


def failure_notice(source: str, target: str, service: str, argument: str) -> dict[str, str]:
    """The ``policy.Notify`` request for an allowed call that could not be connected."""
    return {
        "resolution": "fail",
        "service": service,
        "argument": f"+{argument}",
        "source": source,
        "target": target,
    }
