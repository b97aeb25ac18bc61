"""One line per call, from the JSON log records of a world's programs.

A world's daemons and agents each log about ten records per call; a person
watching the world wants one: who called what, what the policy said (and
which line of the world's config said it), and how it ended. The records of
one call carry its id (``call``) in every program it passes through, so
:class:`CallLines` gathers them by id and says a call's line once it is
complete:

* a VM's call (its daemon logged ``policy decision``): when denied (the
  daemon's ``request denied``), or once allowed and ended: the exit status the
  caller got (its agent's ``call finished``), or the daemon's ``call failed`` /
  ``call cancelled``;
* dom0's call into a VM (``qrexec-trio run``): the VM's agent's ``finished``,
  unless the id is the target leg of a VM's call (its daemon logs ``target leg
  open`` naming it), which is part of that call's line.

Records come through separate pipes, so their order across programs is not
the order they were written in: what might still be completed by a record of
another program (a leg's status, a status before its decision) waits
:data:`HOLD` seconds before its line is said without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

#: How long a call that another program's records may still complete waits (seconds).
HOLD: Final = 1.0
#: Calls and leg ids remembered at most; the oldest are forgotten beyond.
_REMEMBERED: Final = 4096
#: After how many HOLDs an undecided fragment of a call or a leg id is forgotten.
_FORGET: Final = 600
_DAEMON: Final = "qrexec-daemon"
_AGENT: Final = "qrexec-agent"

#: Maps a generated policy file's ``PATH:LINE`` to where the user wrote the rule.
CiteRule = Callable[[str], str]


@dataclass(frozen=True)
class CallLine:
    """What to say about one call: ``text`` for people, ``fields`` for machines."""

    text: str
    fields: dict[str, Any]


@dataclass
class _Call:
    since: float
    source: str | None = None
    target: str | None = None
    service: str | None = None
    result: str | None = None
    reason: str | None = None
    rule: str | None = None
    #: Where an allowed call went, if not where it asked (a DispVM...).
    went_to: str | None = None
    status: int | None = None
    #: Why it ended without a status (failed: ..., cancelled).
    ending: str | None = None
    #: The daemon refused it (after a deny, or without a decision).
    refused: bool = False
    #: A call from dom0, seen only at its target's agent.
    from_dom0: bool = False
    what: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class CallLines:
    """Gathers a world's records by call id; :meth:`feed` and :meth:`due` say the lines."""

    def __init__(self, cite_rule: CiteRule) -> None:
        self._cite_rule = cite_rule
        self._calls: dict[str, _Call] = {}
        #: Ids of target legs (the daemon named them): never calls of their own.
        self._legs: dict[str, float] = {}

    def feed(self, vm: str, record: dict[str, Any], now: float) -> list[CallLine]:
        """Take one record of a program of ``vm``; the lines it completes."""
        call_id = record.get("call")
        program = record.get("program")
        event = record.get("event")
        if not isinstance(call_id, str) or not isinstance(event, str):
            return []
        # Ids are reused (a port, the caller's fds): a record that starts a
        # call ends what is left under its id.
        lines = self._start(call_id, program, event, now)
        if program == _DAEMON:
            self._daemon_record(call_id, event, record, now)
        elif program == _AGENT:
            self._agent_record(vm, call_id, event, record, now)
        else:
            return lines
        return lines + self._say_if_complete(call_id)

    def due(self, now: float) -> list[CallLine]:
        """The lines of calls that waited :data:`HOLD` for records that did not come."""
        lines = []
        for call_id, call in list(self._calls.items()):
            if now - call.since >= HOLD and self._complete(call, waiting=False):
                lines.append(self._say(call_id))
            elif (call.result is None and not call.from_dom0
                  and now - call.since >= _FORGET * HOLD):
                # Records that never make a line (a late record of a call said
                # already); a live call (decided, or run from dom0) stays.
                del self._calls[call_id]
        for leg, since in list(self._legs.items()):
            if now - since >= _FORGET * HOLD:
                del self._legs[leg]
        return lines

    def cite(self, rule: str) -> str:
        """``rule`` (a policy file's ``PATH:LINE``) as the world's config names it."""
        return self._cite_rule(rule) if rule else rule

    # -- gathering -------------------------------------------------------------------

    def _start(self, call_id: str, program: object, event: str, now: float) -> list[CallLine]:
        old = self._calls.get(call_id)
        if old is None or program != _AGENT:
            return []
        if event == "running" and old.from_dom0 and self._complete(old, waiting=False):
            return [self._say(call_id)]
        if event == "request forwarded" and (old.result is None or now - old.since >= HOLD):
            # A fragment of an earlier call (its daemon's last records came late),
            # not this call's decision come early through the other pipe.
            del self._calls[call_id]
        return []

    def _call(self, call_id: str, now: float) -> _Call:
        call = self._calls.get(call_id)
        if call is None:
            if len(self._calls) >= _REMEMBERED:
                del self._calls[next(iter(self._calls))]
            call = self._calls[call_id] = _Call(since=now)
        return call

    def _daemon_record(self, call_id: str, event: str, record: dict[str, Any],
                       now: float) -> None:
        if event == "target leg open":
            went_to = _text(record.get("target"))
            if went_to is not None and call_id in self._calls:
                self._calls[call_id].went_to = went_to
            leg = record.get("target_call")
            if isinstance(leg, str) and self._calls.pop(leg, None) is None:
                # Its agent's records are still to come: they are not a call.
                if len(self._legs) >= _REMEMBERED:
                    del self._legs[next(iter(self._legs))]
                self._legs[leg] = now
            return
        if event not in ("policy decision", "request denied", "call finished", "call failed",
                         "call cancelled"):
            return
        call = self._call(call_id, now)
        call.source = _text(record.get("source")) or call.source
        call.service = _text(record.get("service")) or call.service
        if event == "policy decision":
            call.result = _text(record.get("result"))
            call.reason = _text(record.get("reason"))
            call.rule = self.cite(_text(record.get("rule")) or "") or None
            return
        # The other records carry the target the caller asked for (bound to the call).
        call.target = _text(record.get("target")) or call.target
        if event == "request denied":
            call.result, call.refused = call.result or "deny", True
        elif event == "call failed":
            call.ending = f"failed: {record.get('error', 'unknown error')}"
        elif event == "call cancelled":
            call.ending = "cancelled"

    def _agent_record(self, vm: str, call_id: str, event: str, record: dict[str, Any],
                      now: float) -> None:
        if event in ("request forwarded", "call finished", "data vchan failed"):
            # The caller's agent: the caller's side of a VM's call.
            call = self._call(call_id, now)
            call.source = call.source or vm
            call.target = call.target or _text(record.get("target"))
            call.service = call.service or _text(record.get("service"))
            if event == "call finished":
                status = record.get("status")
                call.status = status if isinstance(status, int) else -1
            elif event == "data vchan failed":
                call.ending = f"failed: {record.get('error', 'data vchan failed')}"
            return
        if record.get("domain") != 0:
            return
        # A command from dom0 (or a target leg: a "target leg open" marks
        # it before, or drops it after, its start).
        if event in ("running", "cannot run command"):
            if self._legs.pop(call_id, None) is not None:
                return
            if event == "running" or call_id not in self._calls:
                call = self._call(call_id, now)
                call.from_dom0, call.source, call.target = True, "dom0", vm
                call.what = _text(record.get("what")) or call.what
        if event in ("finished", "cannot run command") and call_id in self._calls:
            call = self._calls[call_id]
            status = record.get("status")
            call.status = status if isinstance(status, int) else -1

    # -- saying ----------------------------------------------------------------------

    def _say_if_complete(self, call_id: str) -> list[CallLine]:
        call = self._calls.get(call_id)
        if call is not None and self._complete(call, waiting=True):
            return [self._say(call_id)]
        return []

    @staticmethod
    def _complete(call: _Call, *, waiting: bool) -> bool:
        """Whether ``call``'s line can be said (``waiting``: without waiting for more)."""
        if call.refused:
            return True
        ended = call.status is not None or call.ending is not None
        if call.from_dom0:
            # Its id may yet turn out to be a VM's call's target leg.
            return ended and not waiting
        if call.result is None:
            # A status before its decision (or no decision: a policy program's call).
            return ended and not waiting
        return ended

    def _say(self, call_id: str) -> CallLine:
        call = self._calls.pop(call_id)
        fields: dict[str, Any] = {"call": call_id, "source": call.source, "target": call.target}
        if call.from_dom0:
            text = f"dom0 -> {call.target} ({call.what or 'command'})"
            fields["what"] = call.what
        else:
            text = f"{call.source} -> {call.target} {call.service}"
            fields["service"] = call.service
        verdict = _verdict(call)
        if verdict:
            text += f": {verdict}"
            fields.update(result=call.result, rule=call.rule, reason=call.reason)
        outcome = _outcome(call)
        if outcome:
            text += f", {outcome}" if verdict else f": {outcome}"
            fields.update(status=call.status, ending=call.ending)
        return CallLine(text, {k: v for k, v in fields.items() if v is not None})


def _verdict(call: _Call) -> str:
    if call.result is None:
        return ""
    word = {"allow": "allowed", "deny": "denied"}.get(call.result, call.result)
    if call.rule:
        word += f" by {call.rule}"
    elif call.reason:
        word += f" ({call.reason})"
    if call.result == "allow" and call.went_to and call.went_to != call.target:
        word += f" (to {call.went_to})"
    return word


def _outcome(call: _Call) -> str:
    if call.result == "deny":
        return ""
    if call.ending is not None:
        return call.ending
    if call.status is None:
        return ""
    return "no exit status (the data vchan failed)" if call.status < 0 \
        else f"exit {call.status}"


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def policy_file_citer(policy_d: str, locate: Callable[[str, int], str]) -> CiteRule:
    """A :data:`CiteRule` for the files of ``policy_d`` (the world's generated
    policy.d): ``locate(FILE_NAME, LINE)`` says where the user wrote that line."""

    def cite(rule: str) -> str:
        path, sep, line = rule.rpartition(":")
        if not sep or not line.isdigit() or os.path.dirname(path) != policy_d:
            return rule
        return locate(os.path.basename(path), int(line))

    return cite
