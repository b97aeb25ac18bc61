"""Who decides a VM's request: the policy engine in-process, or an external program.

Each decider turns (source, requested target, SERVICE[+ARG]) into a
:class:`~qrexec_trio.policy.Verdict`. The in-process one formats the engine's
decision as the policy daemon's response and parses it back, so both kinds
go through exactly the same reader and fail closed the same way.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Protocol

import trio

from .._logging import get_logger
from ..policy import (
    DEFAULT_ASK_TIMEOUT,
    Action,
    MalformedResponse,
    PolicyCache,
    Request,
    SystemInfo,
    Verdict,
    format_response,
    load_system_info,
    minimal_system_info,
    parse_response,
    program_prompt,
    resolve_ask,
)

log = get_logger(__name__)


class Decider(Protocol):
    async def decide(self, source: str, target: str, call_name: str) -> Verdict: ...


class EngineDecider:
    """The policy engine, in this process, with its cache."""

    def __init__(
        self,
        r2_dir: str | None,
        policy_d: str | None,
        *,
        system_info_path: str | None = None,
        ask_program: Sequence[str] | None = None,
        assume_yes_for_ask: bool = False,
    ) -> None:
        self._cache = PolicyCache(r2_dir, policy_d)
        self._system_info_path = system_info_path
        self._ask_program = list(ask_program) if ask_program else None
        self._assume_yes = assume_yes_for_ask

    def _system_info(self, source: str, target: str) -> SystemInfo:
        if self._system_info_path is not None:
            return load_system_info(self._system_info_path)
        return minimal_system_info([source, target])

    async def decide(self, source: str, target: str, call_name: str) -> Verdict:
        await trio.lowlevel.checkpoint()
        request = Request.from_call(source, target, call_name)
        decision = self._cache.evaluate(request, self._system_info(source, target))
        if decision.action is Action.ASK:
            # The prompt is a program that may take minutes: not on the event loop.
            prompt = None if self._ask_program is None else program_prompt(
                self._ask_program, timeout=DEFAULT_ASK_TIMEOUT)
            decision = await trio.to_thread.run_sync(
                lambda: resolve_ask(decision, assume_yes=self._assume_yes, prompt=prompt),
                abandon_on_cancel=True,
            )
        log.info("policy decision", result=decision.action.value, target=decision.target,
                 reason=decision.reason, rule=str(decision.rule or ""))
        return parse_response(format_response(decision).encode())


class ProgramDecider:
    """An external evaluator, run as ``PROGRAM -- SOURCE TARGET SERVICE[+ARG]``.

    The reference's fallback form: it must exit 0 and print a policy response.
    Anything else (non-zero exit, malformed answer) is a deny.
    """

    def __init__(self, program: str) -> None:
        self._program = program

    async def decide(self, source: str, target: str, call_name: str) -> Verdict:
        argv = [self._program, "--", source, target, call_name]
        # run_process kills the evaluator if the decision is cancelled (timeout).
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                        stdin=subprocess.DEVNULL, check=False)
        if result.returncode != 0:
            log.info("policy program denied", status=result.returncode,
                     stderr=result.stderr[-200:].decode(errors="replace"))
            return Verdict(allowed=False)
        try:
            return parse_response(result.stdout)
        except MalformedResponse as exc:
            log.error("policy program answered malformed response; denying", error=str(exc))
            return Verdict(allowed=False)
