"""Putting an ``ask`` decision to someone, or not.

The prompt is pluggable: any callable taking a Question and returning the chosen
target name or None. ``program_prompt`` runs a configured program (an argv, never
a shell string) that gets the question as one JSON object on stdin::

    {"source": "work", "service": "qubes.Filecopy", "argument": "",
     "requested_target": "@default", "targets": ["personal", "vault"],
     "default_target": null}

and answers on stdout with one of ``targets`` (allow, to that target) or nothing
(deny). Anything else, a non-zero exit, or no answer within the timeout denies.
There is no "yes to all" and no answer that counts as yes by default.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import structlog

from .._config import Timeouts
from ._engine import Decision
from ._rules import Action

log = structlog.get_logger(__name__)

#: How long a user has to answer an ask prompt (Timeouts.policy).
DEFAULT_ASK_TIMEOUT: Final = Timeouts().policy
#: An answer is one target name; a prompt that writes more is broken.
_MAX_ANSWER_BYTES: Final = 256


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


def resolve_ask(decision: Decision, *, assume_yes: bool, prompt: Prompt | None) -> Decision:
    """Turn an ``ask`` decision into allow or deny; other decisions pass through."""
    if decision.action is not Action.ASK:
        return decision
    if assume_yes:
        # As the reference: the target the caller asked for, if it is on offer;
        # else the rule's default_target= (ours: the reference denies then).
        requested = decision.request.target
        if requested in decision.ask_targets:
            return decision.allow(requested, "ask: assumed yes for the requested target")
        if decision.default_target is None:
            return decision.deny(
                "ask: --assume-yes-for-ask, but no target to assume (the requested one is"
                " not on offer and the rule has no default_target=)"
            )
        return decision.allow(decision.default_target, "ask: assumed yes")
    if prompt is None:
        log.warning(
            "ask denied: no prompt program",
            source=decision.request.source, service=decision.request.call_name,
            target=decision.request.target,
        )
        return decision.deny("ask: no prompt configured")
    answer = prompt(Question.of(decision))
    if answer is None:
        return decision.deny("ask: the user declined")
    if answer not in decision.ask_targets:
        log.warning("ask answer is not a choice", answer=answer[:64], offered=decision.ask_targets)
        return decision.deny("ask: the answer was not one of the offered targets")
    return decision.allow(answer, "ask: the user chose a target")


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
