"""The policy agent: dom0 asking it (``policy.Ask``) and telling it (``policy.Notify``),
and ``qrexec-trio policy-agent``, an agent that asks on a terminal.

**dom0's side** (:class:`PolicyAgentCaller`), as the reference's policy engine
calls its agent: the agent lives in the source qube's GUI domain (its
``guivm`` in the domains' facts), else in a configured default domain
(``--policy-agent``, default ``dom0``; ``''``: none, and an ``ask`` is then
denied, as the reference does for a qube without a guivm).

* In a VM: ``qrexec-client -d AGENT 'DEFAULT:QUBESRPC policy.Ask dom0'`` (the
  service without ``+`` or argument, dom0 the caller, exactly the reference's
  command line), the request as JSON on its stdin, the answer on its stdout; a
  non-zero exit is a failed call.
* In dom0: dom0's own service, looked up in ``QREXEC_SERVICE_PATH`` as any dom0
  service. A socket service gets the descriptor ``policy.Ask dom0 name dom0``
  and a NUL (what today's reference sends; older ones sent ``policy.Ask dom0``),
  then the JSON; the write side is shut down and the answer read to EOF. A
  program service gets the JSON on stdin and answers on stdout (the reference
  only knows the socket form).

An ask must be answered within ``Timeouts.policy_ask`` (``QREXEC_TIMEOUT_POLICY_ASK``);
no answer, a failed call, a garbage answer or a target that was not offered
deny, each logged with why. A notification is fire and forget: it runs in the
background nursery the program attaches (:meth:`PolicyAgentCaller.attach`;
without one it is awaited), at most ``Timeouts.policy_notify`` each and
:data:`MAX_PENDING_NOTIFICATIONS` at once (more are dropped, logged); it never
changes or delays a decision, and its failure is only logged.

**The terminal agent** (:func:`main`, ``qrexec-trio policy-agent [SERVICE]``) is
a program service for both names: install it as ``policy.Ask`` and
``policy.Notify`` in the agent's domain. SERVICE defaults to the service it was
called as (``QREXEC_SERVICE_FULL_NAME``). It reads the request (JSON) on stdin.
For ``policy.Ask`` it asks on the controlling terminal (``/dev/tty``; never
stdin or stdout, which are the call): the source, the service and argument,
the allowed targets numbered with the default marked; Enter takes the default,
a number or a name picks a target, ``n`` denies. It writes ``allow:TARGET`` or
``deny`` on stdout. Without a terminal, or with no answer in time, it denies
and says why on stderr. While it asks it takes the terminal's foreground (and
gives it back), so that it can read even when started in the background, as a
local world's services are; keys typed before the question are discarded, and
one question is on a terminal at a time. For ``policy.Notify`` it writes one
line to the terminal (or to stderr without one) and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import functools
import json
import os
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Final

import trio

from .._config import Timeouts
from .._errors import QrexecError
from .._help import finish_parser
from .._logging import get_logger
from .._programs import program
from .._sockets import connect_unix
from ..nursery import child_process, exit_status
from ..policy import (
    ASK_SERVICE,
    MAX_AGENT_ANSWER,
    NOTIFY_SERVICE,
    Decision,
    SystemInfo,
    agent_domain,
    apply_agent_answer,
    ask_request,
    encode_request,
    parse_agent_answer,
    unanswered,
)
from ..protocol import ExitStatus, RpcCall, is_qube_name
from ..services import LaunchError, ProgramPlan, SocketPlan
from ._connect import DOM0_NAMES, dom0_runner

log = get_logger(__name__)

#: The domain whose agent is asked when the source has no known guivm.
DEFAULT_POLICY_AGENT: Final = "dom0"
#: Notifications in flight at once, per program; more are dropped (logged).
MAX_PENDING_NOTIFICATIONS: Final = 16
_CHUNK: Final = 4096


# --- dom0's side ----------------------------------------------------------------------


class AgentCallError(QrexecError):
    """A call to the policy agent failed; ``missing``: the service does not exist."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def valid_agent_name(name: str) -> bool:
    """What ``--policy-agent`` accepts: a qube name (``dom0`` included), or '' for none."""
    return name == "" or is_qube_name(name)


async def _facts_or_none(facts: Callable[[], Awaitable[SystemInfo]] | None) -> SystemInfo:
    """The domains' facts, or none at all (then only the default agent is known)."""
    if facts is None:
        return SystemInfo()
    try:
        return await facts()
    except Exception as exc:  # unavailable facts only mean "ask the default agent"
        log.info("no domains' facts for the notification; telling the default agent",
                 error=str(exc) or type(exc).__name__)
        return SystemInfo()


async def _read_to_eof(stream: trio.abc.ReceiveStream, limit: int) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(_CHUNK):
        data += chunk
        if len(data) > limit:
            raise AgentCallError(f"answer longer than {limit} bytes")
    return bytes(data)


async def _feed(stream: trio.abc.SendStream, payload: bytes) -> None:
    """Write ``payload`` and close; a reader that does not want it is its own business."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async with stream:
            await stream.send_all(payload)


class PolicyAgentCaller:
    """Asks and notifies the policy agent (see the module's docstring)."""

    def __init__(self, default_agent: str | None = DEFAULT_POLICY_AGENT, *,
                 socket_dir: str, timeouts: Timeouts,
                 max_pending: int = MAX_PENDING_NOTIFICATIONS) -> None:
        self.default_agent = default_agent or None
        self.socket_dir = socket_dir
        self.timeouts = timeouts
        self.max_pending = max_pending
        self._nursery: trio.Nursery | None = None
        self._pending = 0

    def attach(self, nursery: trio.Nursery) -> None:
        """Run notifications in ``nursery`` from now on (the program's own)."""
        self._nursery = nursery

    def agent_for(self, source: str, system_info: SystemInfo) -> str | None:
        return agent_domain(source, system_info, self.default_agent)

    # -- policy.Ask --

    async def ask(self, decision: Decision, system_info: SystemInfo) -> Decision:
        """Put ``decision`` (an ask) to the agent; the allow or deny it comes to."""
        agent = self.agent_for(decision.request.source, system_info)
        if agent is None:
            log.warning("ask denied: no policy agent for the source (no guivm, no default)")
            return unanswered(decision, "no policy agent to ask")
        payload = encode_request(ask_request(decision, system_info))
        raw: bytes | None = None
        timeout = self.timeouts.policy_ask
        with trio.move_on_after(timeout):
            try:
                raw = await self.call(agent, ASK_SERVICE, payload, limit=MAX_AGENT_ANSWER)
            except AgentCallError as exc:
                log.warning("ask denied: the policy agent could not be asked", agent=agent,
                            error=str(exc))
                return unanswered(decision, f"the policy agent in {agent} could not be asked")
        if raw is None:
            log.warning("ask denied: the policy agent did not answer in time", agent=agent,
                        timeout=timeout)
            return unanswered(decision, f"no answer from the policy agent in {timeout:g}s")
        answer = parse_agent_answer(raw, decision.ask_targets)
        if answer.problem is not None:
            log.warning("ask denied: the policy agent's answer is not one", agent=agent,
                        problem=answer.problem)
        resolved = apply_agent_answer(decision, answer)
        log.info("ask answered", agent=agent, result=resolved.action.value,
                 target=resolved.target)
        return resolved

    # -- policy.Notify --

    async def notify(self, params: Mapping[str, str], source: str,
                     system_info: SystemInfo | None = None, *,
                     facts: Callable[[], Awaitable[SystemInfo]] | None = None) -> None:
        """Send ``params`` to ``source``'s agent, in the background when a nursery is
        attached; never raises, never waits longer than the notification timeout.

        Without ``system_info``, ``facts`` fetches it in the background (within the
        same timeout; when they cannot be had, the default agent is told).
        """
        resolution = params.get("resolution")
        if self._pending >= self.max_pending:
            log.warning("notification dropped: too many in flight", limit=self.max_pending,
                        resolution=resolution)
            return
        self._pending += 1
        deliver = functools.partial(self._deliver, dict(params), source, system_info, facts)
        nursery = self._nursery
        if nursery is None:
            await deliver()
            return
        try:
            nursery.start_soon(deliver)
        except RuntimeError:  # the program's nursery is closing: it is shutting down
            self._pending -= 1
            log.info("notification dropped: shutting down", resolution=resolution)

    async def _deliver(self, params: dict[str, str], source: str,
                       system_info: SystemInfo | None,
                       facts: Callable[[], Awaitable[SystemInfo]] | None) -> None:
        resolution = params.get("resolution")
        agent: str | None = None
        try:
            with trio.move_on_after(self.timeouts.policy_notify) as scope:
                if system_info is None:
                    system_info = await _facts_or_none(facts)
                agent = self.agent_for(source, system_info)
                if agent is None:
                    log.debug("no policy agent to notify", resolution=resolution)
                    return
                await self.call(agent, NOTIFY_SERVICE, encode_request(dict(params)),
                                limit=MAX_AGENT_ANSWER)
            if scope.cancelled_caught:
                log.warning("notification not delivered in time", agent=agent,
                            resolution=resolution, timeout=self.timeouts.policy_notify)
            else:
                log.info("policy notification sent", agent=agent, resolution=resolution)
        except AgentCallError as exc:
            # No policy.Notify where the agent should be: nobody listens, which
            # is how a dom0 without an agent is set up. Anything else is a fault.
            report = log.debug if exc.missing else log.warning
            report("notification not delivered", agent=agent, resolution=resolution,
                   error=str(exc))
        except Exception as exc:  # a notification must never take its program down
            log.error("notification failed", agent=agent, resolution=resolution,
                      error=str(exc) or type(exc).__name__)
        finally:
            self._pending -= 1

    # -- the call itself --

    async def call(self, agent: str, service: str, payload: bytes, *, limit: int) -> bytes:
        """Call ``service`` of ``agent``'s domain with ``payload``; its output.

        Raises :class:`AgentCallError`. The caller bounds the time.
        """
        if agent in DOM0_NAMES:
            return await self._call_dom0(service, payload, limit)
        argv = [program("qrexec-client"), "--socket-dir", self.socket_dir, "-d", agent,
                f"DEFAULT:QUBESRPC {service} dom0"]
        return await self._run(argv, payload, limit, what=f"qrexec-client -d {agent}")

    async def _call_dom0(self, service: str, payload: bytes, limit: int) -> bytes:
        runner = dom0_runner()
        call = RpcCall(service, service, None, "dom0", "name", "dom0")
        try:
            plan = runner.plan_rpc(call, runner.identity_for(None))
        except LaunchError as exc:
            raise AgentCallError(
                f"dom0 has no usable {service} service: {exc.reason}",
                missing=exc.status == ExitStatus.SERVICE_NOT_FOUND) from None
        if isinstance(plan, ProgramPlan):
            return await self._run(plan.argv, payload, limit, what=plan.argv[0], env=plan.env,
                                   cwd=plan.cwd, executable=plan.executable)
        try:
            if isinstance(plan, SocketPlan):
                stream = await connect_unix(plan.path, timeout=self.timeouts.handshake)
            else:
                stream = await trio.open_tcp_stream(plan.host, plan.port)
        except OSError as exc:
            raise AgentCallError(f"cannot connect to dom0's {service}: {exc}") from exc
        try:
            async with stream:
                await stream.send_all(plan.descriptor + payload)
                await stream.send_eof()
                return await _read_to_eof(stream, limit)
        except (trio.BrokenResourceError, OSError) as exc:
            raise AgentCallError(f"dom0's {service} broke the connection: {exc}") from exc

    async def _run(self, argv: Sequence[str], payload: bytes, limit: int, *, what: str,
                   env: Mapping[str, str] | None = None, cwd: str | None = None,
                   executable: str | None = None) -> bytes:
        """Run ``argv`` with ``payload`` on stdin; its stdout (if it exits 0)."""
        try:
            async with child_process(argv, timeouts=self.timeouts, env=env, cwd=cwd,
                                     executable=executable, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=None) as proc:
                assert proc.stdin is not None and proc.stdout is not None
                async with trio.open_nursery() as io:
                    io.start_soon(_feed, proc.stdin, payload)
                    output = await _read_to_eof(proc.stdout, limit)
                status = exit_status(await proc.wait())
        except OSError as exc:
            raise AgentCallError(f"cannot run {what}: {exc}") from exc
        except BaseExceptionGroup as group:
            errors = group.subgroup(AgentCallError)
            if errors is not None:
                raise errors.exceptions[0] from None
            raise
        if status != 0:
            raise AgentCallError(f"{what} exited with status {status}",
                                 missing=status == ExitStatus.SERVICE_NOT_FOUND)
        return output


# --- the terminal agent -----------------------------------------------------------------

TTY: Final = "/dev/tty"
#: The most a request may be (its icons name every domain).
MAX_REQUEST: Final = 1 << 20
#: Tries at a question before a string of unusable answers counts as no.
MAX_TRIES: Final = 5
_MAX_LINE: Final = 256
_NO: Final = frozenset({"n", "no", "d", "deny"})
_RESOLUTIONS: Final = {"allow": "Allowed", "deny": "Denied", "fail": "Failed"}
_ME: Final = "qrexec-trio policy-agent"


class BadRequest(ValueError):
    """The request on stdin is not what dom0 sends."""


def _shown(text: str, limit: int = 80) -> str:
    """Safe to print on a terminal: printable ASCII only, and not too long."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean if len(clean) <= limit else clean[:limit] + "..."


def _strings(request: Mapping[str, Any], keys: Sequence[str]) -> dict[str, str]:
    found = {}
    for key in keys:
        value = request.get(key)
        if not isinstance(value, str):
            raise BadRequest(f"{key!r} must be a string")
        found[key] = value
    return found


def parse_ask(data: bytes) -> tuple[dict[str, str], list[str]]:
    """A policy.Ask request: its texts (source, service, argument, default_target)
    and the targets offered; raises :class:`BadRequest`."""
    request = _decode(data)
    texts = _strings(request, ("source", "service", "argument", "default_target"))
    targets = request.get("targets")
    if (not isinstance(targets, list) or not targets
            or not all(isinstance(t, str) and t for t in targets)):
        raise BadRequest("'targets' must be a non-empty list of names")
    if texts["default_target"] not in targets:
        texts["default_target"] = ""
    return texts, list(dict.fromkeys(targets))


def parse_notify(data: bytes) -> dict[str, str]:
    request = _decode(data)
    texts = _strings(request, ("resolution", "source", "service", "argument", "target"))
    if texts["resolution"] not in _RESOLUTIONS:
        raise BadRequest(f"unknown resolution {_shown(texts['resolution'], 20)!r}")
    return texts


def _decode(data: bytes) -> dict[str, Any]:
    try:
        request = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise BadRequest("not a JSON object")
    return request


def _rpc(service: str, argument: str) -> str:
    return service if argument in ("", "+") else service + argument


def notice_line(params: Mapping[str, str]) -> str:
    """One line saying what was decided, for a terminal."""
    word = _RESOLUTIONS[params["resolution"]]
    return (f"[qrexec] {word}: {_shown(_rpc(params['service'], params['argument']))} "
            f"from {_shown(params['source'], 31)} to {_shown(params['target'], 64)}\n")


def question_text(texts: Mapping[str, str], targets: Sequence[str]) -> str:
    lines = [f"\n[qrexec] {_shown(texts['source'], 31)} asks to call "
             f"{_shown(_rpc(texts['service'], texts['argument']))}"]
    for number, target in enumerate(targets, 1):
        mark = "  (default)" if target == texts["default_target"] else ""
        lines.append(f"  {number}) {_shown(target, 64)}{mark}")
    return "\n".join(lines) + "\n"


def prompt_text(targets: Sequence[str], default: str) -> str:
    enter = f"Enter for {targets.index(default) + 1}, " if default else ""
    return f"Allow the call to which target? (number or name, {enter}n to deny): "


def choose(line: str, targets: Sequence[str], default: str) -> str | bool | None:
    """What a typed line means: a target, None (no), or False (not an answer)."""
    text = line.strip()
    if not text:
        return default or False
    if text.lower() in _NO:
        return None
    if text.isdigit() and 1 <= int(text) <= len(targets):
        return targets[int(text) - 1]
    if text in targets:
        return text
    return False


def _write(fd: int, text: str) -> None:
    os.write(fd, text.encode("ascii", "replace"))


def _read_line(fd: int, deadline: float) -> str | None:
    """A line typed on ``fd``; None at end of file or when ``deadline`` passed."""
    data = bytearray()
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            readable, _, _ = select.select([fd], [], [], left)
        except InterruptedError:
            continue
        if not readable:
            return None
        chunk = os.read(fd, _MAX_LINE)
        if not chunk:
            return None
        data += chunk
        if len(data) > _MAX_LINE:
            data = bytearray(b"\n")  # an overlong line is no answer
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")


def _lock(fd: int, deadline: float) -> bool:
    """One question on a terminal at a time (other agents wait their turn)."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        except OSError:
            return True  # a terminal that cannot be locked is asked unlocked
        else:
            return True


@contextlib.contextmanager
def _foreground(fd: int) -> Iterator[None]:
    """Hold the terminal's foreground while asking, then give it back.

    A local world's services run in background process groups of the world's
    terminal, where reading the terminal would stop them (SIGTTIN). SIGTTOU is
    ignored, so this process may take the foreground, as a shell does.
    """
    own = os.getpgrp()
    try:
        previous: int | None = os.tcgetpgrp(fd)
    except OSError:
        previous = None
    if previous is not None and previous != own:
        try:
            os.tcsetpgrp(fd, own)
        except OSError:
            previous = None
    try:
        yield
    finally:
        if previous is not None and previous != own:
            with contextlib.suppress(OSError):
                os.tcsetpgrp(fd, previous)


class _Stopped(Exception):
    """SIGTERM or SIGHUP while asking: the terminal is given back, the ask denied."""


def _stop(signum: int, frame: object) -> None:
    raise _Stopped(signal.Signals(signum).name)


def ask_on_terminal(texts: Mapping[str, str], targets: Sequence[str], *,
                    timeout: float, tty: str = TTY) -> str | None:
    """Ask on the terminal; the chosen target, or None (denied, with the reason on
    stderr)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop)
    try:
        fd = os.open(tty, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        reason = "no controlling terminal" if exc.errno == errno.ENXIO else exc.strerror
        print(f"{_ME}: cannot ask on {tty} ({reason}): denied", file=sys.stderr)
        return None
    deadline = time.monotonic() + timeout
    try:
        if not _lock(fd, deadline):
            print(f"{_ME}: the terminal stayed busy with another question: denied",
                  file=sys.stderr)
            return None
        with _foreground(fd):
            # Keys typed before the question was shown answer nothing.
            with contextlib.suppress(termios.error):
                termios.tcflush(fd, termios.TCIFLUSH)
            return _ask(fd, texts, targets, deadline)
    except (KeyboardInterrupt, _Stopped):
        with contextlib.suppress(OSError):
            _write(fd, "\n[qrexec] interrupted: denied\n")
        print(f"{_ME}: interrupted while asking: denied", file=sys.stderr)
        return None
    finally:
        os.close(fd)


def _ask(fd: int, texts: Mapping[str, str], targets: Sequence[str],
         deadline: float) -> str | None:
    default = texts["default_target"]
    _write(fd, question_text(texts, targets))
    for _ in range(MAX_TRIES):
        _write(fd, prompt_text(targets, default))
        line = _read_line(fd, deadline)
        if line is None:
            _write(fd, "\n[qrexec] no answer: denied\n")
            print(f"{_ME}: no answer on the terminal: denied", file=sys.stderr)
            return None
        choice = choose(line, targets, default)
        if choice is None:
            _write(fd, "[qrexec] denied\n")
            return None
        if isinstance(choice, str):
            _write(fd, f"[qrexec] allowed to {_shown(choice, 64)}\n")
            return choice
        _write(fd, "  not one of the choices\n")
    _write(fd, "[qrexec] no usable answer: denied\n")
    return None


def _tell(params: Mapping[str, str], tty: str = TTY) -> None:
    line = notice_line(params)
    try:
        fd = os.open(tty, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        sys.stderr.write(line)
        return
    try:
        _write(fd, line)
    finally:
        os.close(fd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_ME,
        description="The policy agent's services on a terminal: install it as policy.Ask "
        "and policy.Notify in the domain that asks (dom0, or a qube's guivm). It reads "
        "the request (JSON) on stdin; policy.Ask asks on /dev/tty and writes allow:TARGET "
        "or deny; policy.Notify writes one line on the terminal.")
    parser.add_argument("service", nargs="?", choices=(ASK_SERVICE, NOTIFY_SERVICE),
                        help="which service to be (default: $QREXEC_SERVICE_FULL_NAME)")
    return finish_parser(
        parser,
        f"qrexec-trio policy-agent {ASK_SERVICE} < request.json   # asks on this terminal",
        f"qrexec-trio policy-agent --help   # installed as /etc/qubes-rpc/{NOTIFY_SERVICE} "
        "it takes its name from QREXEC_SERVICE_FULL_NAME")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    service = args.service or os.environ.get("QREXEC_SERVICE_FULL_NAME", "").partition("+")[0]
    if service not in (ASK_SERVICE, NOTIFY_SERVICE):
        print(f"{_ME}: which service? (policy.Ask or policy.Notify; not {service!r})",
              file=sys.stderr)
        return 2
    # Writing (and taking the foreground) from a background process group is fine.
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    data = sys.stdin.buffer.read(MAX_REQUEST + 1)
    try:
        if len(data) > MAX_REQUEST:
            raise BadRequest(f"longer than {MAX_REQUEST} bytes")
        if service == NOTIFY_SERVICE:
            _tell(parse_notify(data))
            return 0
        texts, targets = parse_ask(data)
    except BadRequest as exc:
        print(f"{_ME}: malformed {service} request: {exc}", file=sys.stderr)
        if service == ASK_SERVICE:
            sys.stdout.write("deny")
        return 1
    timeout = Timeouts.from_env().policy_ask
    choice = ask_on_terminal(texts, targets, timeout=timeout)
    sys.stdout.write("deny" if choice is None else f"allow:{choice}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
