"""Who decides a VM's request: the policy engine in-process, or an external program.

Each decider turns (source, requested target, SERVICE[+ARG]) into a
:class:`~qrexec_trio.policy.Verdict`. The in-process one formats the engine's
decision as the policy daemon's response and parses it back, so both kinds
go through exactly the same reader and fail closed the same way.

The engine decides on the domains' facts (types, tags, DispVM templates), from
one of three sources:

* :class:`QubesdSystemInfo`: qubesd's ``internal.GetSystemInfo``, as the
  reference's policy daemon asks it; the default of ``qrexec-daemon``.
* :class:`SystemInfoFile`: a ``--system-info`` JSON file, read for each decision.
* :class:`RequestNamesOnly`: no registry, only the request's names (dom0 the
  AdminVM, the others AppVMs without tags); chosen explicitly, for test rigs.

An ``ask`` is put to the policy agent (:class:`~.policy_agent.PolicyAgentCaller`:
``policy.Ask`` in the source's guivm, else in the configured default domain),
unless ``--ask-program`` is given (it wins) or ``--assume-yes-for-ask``. A
decision whose rule notifies (a deny unless ``notify=no``, an allow or an
answered ask with ``notify=yes``) is sent to the same agent's ``policy.Notify``
in the background; so is an allowed call that could not be connected
(:meth:`EngineDecider.call_failed`, resolution ``fail``). Without a caller, ask
denies (no prompt) and nobody is notified.

When the facts cannot be had (no qubesd, an error, a malformed answer or file),
the decision is a deny, logged as ``system info unavailable`` with the socket
(or file) and the error. Every call, not only those whose rule needs a tag or a
type: even ``* @anyvm @anyvm allow`` must know that both domains exist, and a
policy that allows on what it cannot check is not failing closed.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import trio

from .._config import Timeouts
from .._errors import QrexecError
from .._logging import get_logger
from ..domains import DEFAULT_QUBESD_INTERNAL_SOCKET, DomainsError, QubesdDomains
from ..policy import (
    Action,
    Decision,
    MalformedResponse,
    PolicyCache,
    Request,
    SystemInfo,
    SystemInfoError,
    Verdict,
    failure_notice,
    format_response,
    load_system_info,
    minimal_system_info,
    notify_request,
    parse_response,
    program_prompt,
    resolve_ask,
    system_info_from_json,
)
from .policy_agent import PolicyAgentCaller

log = get_logger(__name__)

#: How long qubesd's answer serves decisions before it is asked again (seconds).
SYSTEM_INFO_TTL: Final = 1.0


class SystemInfoUnavailable(QrexecError):
    """The domains' facts could not be had from ``path`` (a ``socket`` or a ``file``)."""

    def __init__(self, origin: str, path: str, error: str) -> None:
        super().__init__(f"system info unavailable from {origin} {path}: {error}")
        self.origin = origin
        self.path = path
        self.error = error


class SystemInfoSource(Protocol):
    async def get(self, source: str, target: str) -> SystemInfo:
        """The facts for deciding a call from ``source`` to ``target``;
        raises :class:`SystemInfoUnavailable`."""
        ...


class RequestNamesOnly:
    """No domain registry: only the request's names (``minimal_system_info``).

    ``@tag:`` rules never match, ``@type:`` sees only AdminVM and AppVMs, and
    ``@dispvm`` calls are denied. For test rigs that have no qubesd.
    """

    async def get(self, source: str, target: str, also: Iterable[str] = ()) -> SystemInfo:
        """``also``: more names it must know (the policy's redirect targets)."""
        await trio.lowlevel.checkpoint()
        return minimal_system_info([source, target, *also])


class SystemInfoFile:
    """A ``--system-info`` file, read again for each decision (edits apply at once)."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def get(self, source: str, target: str) -> SystemInfo:
        await trio.lowlevel.checkpoint()
        try:
            return load_system_info(self.path)
        except SystemInfoError as exc:
            raise SystemInfoUnavailable("file", self.path, str(exc)) from exc


@dataclass(eq=False)
class _Fetch:
    """One ``internal.GetSystemInfo`` call in flight, and how it ended."""

    done: trio.Event = field(default_factory=trio.Event)
    result: SystemInfo | None = None
    error: SystemInfoUnavailable | None = None


class QubesdSystemInfo:
    """qubesd's ``internal.GetSystemInfo`` answer, cached for ``ttl`` seconds.

    Why a TTL and not qubesd's events (``admin.Events``): there is one daemon
    per VM, and each would hold an event stream to qubesd, parse it and
    reconnect it, to save a call that qubesd answers from its own cache (it
    invalidates that cache on the same events). With a TTL the call is made
    lazily, only while calls are being decided, at most once per ``ttl`` per
    daemon, and the staleness has a plain bound: a decision uses facts from a
    call that began at most ``ttl`` (1 s) before the decision asked, or that was
    still in flight when it asked. So a tag removed, a domain created or deleted,
    a ``default_dispvm`` changed is seen by every decision that starts 1 s later.

    Concurrent decisions share one call in flight: the first one to find the
    cache stale makes it, the others wait for its outcome. A failure is not
    cached: it denies the decisions that waited for it, and the next decision
    asks again at once. If the task making the call is cancelled (its own
    decision timed out), the waiters do not inherit that: one of them asks again.
    """

    def __init__(self, socket_path: str = DEFAULT_QUBESD_INTERNAL_SOCKET, *,
                 call_timeout: float | None = None, ttl: float = SYSTEM_INFO_TTL) -> None:
        self.socket_path = socket_path
        self.ttl = ttl
        self._client = QubesdDomains(socket_path, call_timeout=call_timeout)
        self._cached: SystemInfo | None = None
        self._fetched_at = 0.0
        self._in_flight: _Fetch | None = None
        self._left_out: frozenset[str] = frozenset()

    async def get(self, source: str, target: str) -> SystemInfo:
        return await self.current()

    async def current(self) -> SystemInfo:
        """Facts at most ``ttl`` old; raises :class:`SystemInfoUnavailable`."""
        while True:
            if self._cached is not None and trio.current_time() - self._fetched_at < self.ttl:
                await trio.lowlevel.checkpoint()
                return self._cached
            fetch = self._in_flight
            if fetch is None:
                fetch = self._in_flight = _Fetch()
                try:
                    await self._fetch(fetch)
                finally:
                    self._in_flight = None
                    fetch.done.set()
            else:
                await fetch.done.wait()
            if fetch.result is not None:
                return fetch.result
            if fetch.error is not None:
                raise fetch.error
            # The task that made the call was cancelled: ask again.

    async def _fetch(self, fetch: _Fetch) -> None:
        started = trio.current_time()
        try:
            data = await self._client.get_system_info()
            info = system_info_from_json(data, strict=False)
        except (DomainsError, SystemInfoError) as exc:
            fetch.error = SystemInfoUnavailable("socket", self.socket_path, str(exc))
            return
        self._note_left_out(data, info)
        self._cached, self._fetched_at = info, started
        fetch.result = info

    def _note_left_out(self, data: dict[str, object], info: SystemInfo) -> None:
        raw = data.get("domains")
        left_out = frozenset(raw) - set(info.domains) if isinstance(raw, dict) else frozenset()
        if left_out != self._left_out and left_out:
            log.warning("domains of unknown types left out of the policy's view; "
                        "calls from or to them are denied", domains=sorted(left_out))
        self._left_out = left_out


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
        system_info: SystemInfoSource | None = None,
        ask_program: Sequence[str] | None = None,
        assume_yes_for_ask: bool = False,
        policy_agent: PolicyAgentCaller | None = None,
    ) -> None:
        """The domains' facts come from ``system_info_path`` if given, else from
        ``system_info``, else from the request's names only (RequestNamesOnly).

        ``policy_agent``: who is asked and notified (None: nobody)."""
        self._cache = PolicyCache(r2_dir, policy_d)
        self._system_info: SystemInfoSource
        if system_info_path is not None:
            self._system_info = SystemInfoFile(system_info_path)
        elif system_info is not None:
            self._system_info = system_info
        else:
            self._system_info = RequestNamesOnly()
        self._ask_program = list(ask_program) if ask_program else None
        self._assume_yes = assume_yes_for_ask
        self._agent = policy_agent

    def attach(self, nursery: trio.Nursery) -> None:
        """Send notifications in the background, in ``nursery`` (the program's)."""
        if self._agent is not None:
            self._agent.attach(nursery)

    def reload(self) -> int:
        """Read the policy files again now, whatever the cache believes (a
        program's SIGHUP); how many rules the policy has. Decisions already
        made keep the policy they were made with."""
        previous = self._cache
        self._cache = PolicyCache(previous.r2_dir, previous.policy_d)
        previous.close()
        return len(self._cache.policy().rules)

    async def _facts(self, source: str, target: str) -> SystemInfo:
        """The domains' facts; raises :class:`SystemInfoUnavailable`."""
        if isinstance(self._system_info, RequestNamesOnly):
            # A registry guessed from the request must know the rules'
            # redirect targets, or every redirect is denied.
            return await self._system_info.get(
                source, target, also=self._cache.policy().redirect_names())
        return await self._system_info.get(source, target)

    async def decide(self, source: str, target: str, call_name: str) -> Verdict:
        await trio.lowlevel.checkpoint()
        request = Request.from_call(source, target, call_name)
        try:
            system_info = await self._facts(source, target)
        except SystemInfoUnavailable as exc:
            log.error("system info unavailable", **{exc.origin: exc.path}, error=exc.error,
                      result="deny")
            return Verdict(allowed=False)
        decision = self._cache.evaluate(request, system_info)
        if decision.action is Action.ASK:
            decision = await self._resolve_ask(decision, system_info)
        log.info("policy decision", result=decision.action.value, target=decision.target,
                 reason=decision.reason, rule=str(decision.rule or ""))
        notice = notify_request(decision)
        if notice is not None and self._agent is not None:
            await self._agent.notify(notice, source, system_info)
        return parse_response(format_response(decision).encode())

    async def _resolve_ask(self, decision: Decision, system_info: SystemInfo) -> Decision:
        if self._assume_yes or self._ask_program is not None or self._agent is None:
            # A prompt program may take minutes: not on the event loop.
            prompt = None if self._ask_program is None else program_prompt(
                self._ask_program, timeout=Timeouts.from_env().policy_ask)
            return await trio.to_thread.run_sync(
                lambda: resolve_ask(decision, assume_yes=self._assume_yes, prompt=prompt),
                abandon_on_cancel=True,
            )
        return await self._agent.ask(decision, system_info)

    async def call_failed(self, source: str, target: str, call_name: str) -> None:
        """Tell the policy agent that an allowed call to ``target`` could not be made
        (``policy.Notify``, resolution ``fail``); in the background, never raises."""
        if self._agent is None:
            return
        request = Request.from_call(source, target, call_name)
        # The facts are fetched in the background too: the refusal must not wait.
        await self._agent.notify(
            failure_notice(source, target, request.service, request.argument), source,
            facts=functools.partial(self._facts, source, target))


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


def system_info_from_args(args: argparse.Namespace, timeouts: Timeouts) -> SystemInfoSource:
    """Where the domains' facts come from, for every program with the policy options:
    ``--system-info`` (then qubesd is not asked), else ``--qubesd-internal-socket``,
    else (``''``) the request's names only."""
    if args.system_info is not None:
        return SystemInfoFile(args.system_info)
    if args.qubesd_internal_socket:
        return QubesdSystemInfo(args.qubesd_internal_socket, call_timeout=timeouts.admin_call)
    return RequestNamesOnly()
