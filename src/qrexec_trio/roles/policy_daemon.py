"""``qrexec-policy-daemon``: the reference's policy socket, answered by our engine.

The reference C ``qrexec-daemon`` asks ``/run/qubes/policy.sock`` for every
VM-initiated call (wire-protocol.md §9). With this daemon on that socket it
decides with qrexec-trio's policy engine, byte for byte as the reference's
policy daemon answers. The protocol, as the reference serves it:

* Request: ASCII lines ``key=value``, ended by an empty line (or by EOF; a last
  line without its newline still counts). Keys: ``source``,
  ``intended_target``, ``service_and_arg`` (required), ``requested_source``,
  ``assume_yes_for_ask=yes|no``, ``just_evaluate=yes|no`` (optional). A line
  without ``=``, a duplicate or unknown key (``domain_id`` and
  ``process_ident`` of pre-4.2 daemons included), a missing required key, a bad
  yes/no or a non-ASCII byte: the connection is closed without an answer (the
  C daemon then falls back to ``qrexec-policy-exec``). Bytes after the empty
  line are never read: one decision per connection.
* Response, then EOF, *without* a trailing newline: ``result=deny``, or
  ``user=U\\nresult=allow\\ntarget=T\\nautostart=True|False\\nrequested_target=R``;
  with ``just_evaluate=yes`` only ``result=allow`` (an ``ask`` is then denied
  unless ``assume_yes_for_ask=yes``).

Beside it, as the reference, the qrexec socket services ``policy.EvalSimple``
and ``policy.EvalGUI`` (``/etc/qubes-rpc/policy.Eval*``): a qube asks whether
SOURCE may call SERVICE[+ARG] in TARGET. The call is
``policy.EvalSimple+SERVICE[+ARG] CALLER ...\\0`` then ``SOURCE\\0TARGET``
(at most 96 bytes, names of 1-31 and 1-63 characters); the answer is
``result=allow\\n`` or ``result=deny\\n`` (just evaluated, ``ask`` assumed
yes). ``policy.EvalGUI`` answers only a caller that is the GuiVM of both
qubes (tag ``guivm-CALLER`` on both, in the domains' facts: qubesd's
``internal.GetSystemInfo`` as the reference, or ``--system-info``); anything
invalid is closed without an answer.

Bounds: a request is at most 64 KiB and must arrive within the client request
timeout (``QREXEC_TIMEOUT_CLIENT_REQUEST``); a decision takes at most the
policy timeout. A client that breaks a rule is logged and closed; the others
are served meanwhile. The parser and formatter below are pure functions
(sans-IO); ``qrexec-policy-exec`` shares them and the engine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import grp
import itertools
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

import structlog
import trio

from .._config import Timeouts
from .._help import finish_parser
from .._logging import get_logger
from .._sockets import listening_socket, serve_socket
from ..domains import DEFAULT_QUBESD_INTERNAL_SOCKET
from ..nursery import ConnectionRegistry
from ..policy import DEFAULT_POLICY_D, DEFAULT_R2_DIR, SystemInfo, Verdict
from ._cli import (
    Lifecycle,
    add_lifecycle_options,
    add_logging_options,
    run_long_lived,
    setup_logging,
)
from ._decide import (
    EngineDecider,
    SystemInfoSource,
    SystemInfoUnavailable,
    system_info_from_args,
)
from .daemon import DEFAULT_SOCKET_DIR
from .policy_agent import DEFAULT_POLICY_AGENT, PolicyAgentCaller, valid_agent_name

log = get_logger(__name__)

#: Where the reference C qrexec-daemon asks (``QREXEC_SOCKET_PATH``).
DEFAULT_SOCKET_PATH: Final = "/run/qubes/policy.sock"
EVAL_SIMPLE: Final = "policy.EvalSimple"
EVAL_GUI: Final = "policy.EvalGUI"
#: The reference's socket services, where dom0's qrexec finds them.
DEFAULT_EVAL_SOCKET_PATH: Final = f"/etc/qubes-rpc/{EVAL_SIMPLE}"
DEFAULT_GUI_SOCKET_PATH: Final = f"/etc/qubes-rpc/{EVAL_GUI}"
#: As the reference: read and write for root and the ``qubes`` group.
SOCKET_MODE: Final = 0o660
SOCKET_GROUP: Final = "qubes"

#: The longest request we read (the reference's line limit, for the whole request).
MAX_REQUEST_BYTES: Final = 65536
REQUIRED_KEYS: Final = ("source", "intended_target", "service_and_arg")
FLAG_KEYS: Final = ("assume_yes_for_ask", "just_evaluate")
KNOWN_KEYS: Final = frozenset((*REQUIRED_KEYS, *FLAG_KEYS, "requested_source"))

DENY_RESPONSE: Final = b"result=deny"
#: The answer to an allowed ``just_evaluate=yes`` request.
JUST_EVALUATED_ALLOW: Final = b"result=allow"

#: policy.Eval*: what follows the call line, and the names in it.
EVAL_PAYLOAD_BYTES: Final = 96
EVAL_MAX_SOURCE: Final = 31
EVAL_MAX_TARGET: Final = 63
#: The call line (``policy.EvalX+SVC CALLER ...``) is at most this long.
EVAL_MAX_HEADER: Final = 65536
_EVAL_NAME: Final = re.compile(r"[A-Za-z0-9@_.-]+")

_RECEIVE_CHUNK: Final = 4096
_T = TypeVar("_T")


class BadRequest(ValueError):
    """A request that breaks the protocol: the connection is closed unanswered."""


# --- the policy socket: request parser and response formatter (sans-IO) -------------


@dataclass(frozen=True)
class PolicyRequest:
    """One request on the policy socket, as the reference's daemon reads it."""

    source: str
    intended_target: str
    service_and_arg: str
    requested_source: str = ""
    assume_yes_for_ask: bool = False
    just_evaluate: bool = False

    @property
    def target(self) -> str:
        """The target to evaluate: an empty one means ``@default``, as in the reference."""
        return self.intended_target or "@default"


class RequestReader:
    """Reads one request incrementally: feed it bytes as they arrive.

    Each complete line is checked at once, so that a bad line ends the
    connection without waiting for the rest. ``feed`` returns the request once
    its empty line arrived (None before); ``feed_eof`` ends it at EOF. Both
    raise :class:`BadRequest`. Bytes after the empty line are only counted
    (``trailing``): one decision per connection.
    """

    def __init__(self, limit: int = MAX_REQUEST_BYTES) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._consumed = 0
        self._fields: dict[str, str] = {}
        self.request: PolicyRequest | None = None
        self.trailing = 0

    def feed(self, data: bytes) -> PolicyRequest | None:
        if self.request is not None:
            self.trailing += len(data)
            return self.request
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[:end + 1]
            self._consumed += end + 1
            self._check_size(0)
            if not line:
                self.trailing = len(self._buffer)
                self._buffer.clear()
                self.request = self._finish()
                return self.request
            self._field(line)
        self._check_size(len(self._buffer))
        return None

    def feed_eof(self) -> PolicyRequest:
        """The client stopped sending: what it sent is the request."""
        if self.request is not None:
            return self.request
        if self._buffer:
            line = bytes(self._buffer)
            self._buffer.clear()
            self._field(line)
        self.request = self._finish()
        return self.request

    def _check_size(self, pending: int) -> None:
        if self._consumed + pending > self._limit:
            raise BadRequest(f"request longer than {self._limit} bytes")

    def _field(self, line: bytes) -> None:
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            raise BadRequest("request is not ASCII") from None
        key, equals, value = text.partition("=")
        if not equals:
            raise BadRequest(f"line without '=': {_clip(text)!r}")
        if key in self._fields:
            raise BadRequest(f"duplicate key {_clip(key)!r}")
        if key not in KNOWN_KEYS:
            raise BadRequest(f"unknown key {_clip(key)!r}")
        if key in FLAG_KEYS and value not in ("yes", "no"):
            raise BadRequest(f"{key} must be yes or no, not {_clip(value)!r}")
        self._fields[key] = value

    def _finish(self) -> PolicyRequest:
        missing = [key for key in REQUIRED_KEYS if key not in self._fields]
        if missing:
            raise BadRequest(f"missing {', '.join(missing)}")
        fields = self._fields
        return PolicyRequest(
            source=fields["source"],
            intended_target=fields["intended_target"],
            service_and_arg=fields["service_and_arg"],
            requested_source=fields.get("requested_source", ""),
            assume_yes_for_ask=fields.get("assume_yes_for_ask") == "yes",
            just_evaluate=fields.get("just_evaluate") == "yes",
        )


def parse_request(data: bytes, limit: int = MAX_REQUEST_BYTES) -> PolicyRequest:
    """A whole request (up to its empty line, or all of ``data``)."""
    reader = RequestReader(limit)
    return reader.feed(data) or reader.feed_eof()


def format_verdict(verdict: Verdict, *, just_evaluate: bool = False) -> bytes:
    """The policy daemon's answer, as the reference writes it: no trailing newline.

    Anything but a complete allow is a deny, and so is a value that could not
    travel (non-ASCII, a newline or a NUL in it): the answer fails closed.
    """
    if not verdict.allowed or verdict.target is None or verdict.requested_target is None:
        return DENY_RESPONSE
    if just_evaluate:
        return JUST_EVALUATED_ALLOW
    fields = (
        ("user", verdict.user or "DEFAULT"),
        ("result", "allow"),
        ("target", verdict.target),
        ("autostart", "True" if verdict.autostart else "False"),
        ("requested_target", verdict.requested_target),
    )
    if not all(value.isascii() and "\n" not in value and "\0" not in value
               for _, value in fields):
        return DENY_RESPONSE
    return "\n".join(f"{key}={value}" for key, value in fields).encode("ascii")


# --- policy.EvalSimple / policy.EvalGUI (sans-IO) ------------------------------------


@dataclass(frozen=True)
class EvalQuery:
    """A qube's question through policy.Eval*: may SOURCE call SERVICE in TARGET?"""

    caller: str
    service_and_arg: str
    source: str
    target: str


def eval_call_complete(data: bytes | bytearray) -> bool:
    """Whether ``data`` holds the call line and the whole payload the reference reads."""
    space = data.find(b" ")
    if space < 0:
        return False
    nul = data.find(b"\0", space + 1)
    return nul >= 0 and len(data) - (nul + 1) >= EVAL_PAYLOAD_BYTES


def parse_eval_call(data: bytes, service_name: str) -> EvalQuery:
    """A policy.Eval* call: ``NAME+SVC[+ARG] CALLER ...\\0SOURCE\\0TARGET``.

    Raises :class:`BadRequest` for anything the reference would not answer.
    """
    descriptor, space, rest = data.partition(b" ")
    if not space:
        raise BadRequest("no space after the service descriptor")
    invoked, plus, queried = descriptor.partition(b"+")
    if invoked != service_name.encode():
        raise BadRequest(f"invoked as {_clip(invoked.decode(errors='replace'))!r}")
    if not plus or not queried or queried.startswith(b"+"):
        raise BadRequest(f"{service_name} needs an argument: the service to ask about")
    metadata, nul, payload = rest.partition(b"\0")
    if not nul:
        raise BadRequest("no NUL after the call's metadata")
    source, nul, target = payload[:EVAL_PAYLOAD_BYTES].partition(b"\0")
    if not nul:
        raise BadRequest("no NUL between source and target")
    if not 1 <= len(target) <= EVAL_MAX_TARGET:
        raise BadRequest(f"target of {len(target)} bytes (1 to {EVAL_MAX_TARGET})")
    if not 1 <= len(source) <= EVAL_MAX_SOURCE:
        raise BadRequest(f"source of {len(source)} bytes (1 to {EVAL_MAX_SOURCE})")
    try:
        names = [part.decode("ascii") for part in
                 (metadata.split(b" ", 1)[0], queried, source, target)]
    except UnicodeDecodeError:
        raise BadRequest("not ASCII") from None
    caller, service_and_arg, source_name, target_name = names
    for name in (source_name, target_name):
        if _EVAL_NAME.fullmatch(name) is None:
            raise BadRequest(f"invalid qube name {name!r}")
    return EvalQuery(caller, service_and_arg, source_name, target_name)


def gui_may_ask(system_info: SystemInfo, query: EvalQuery) -> bool:
    """policy.EvalGUI: the caller must be the GuiVM of both qubes (tag ``guivm-CALLER``)."""
    tag = f"guivm-{query.caller}"
    for name in (query.source, query.target):
        domain = system_info.domains.get(name)
        if domain is None or tag not in domain.tags:
            return False
    return True


def format_eval_answer(allowed: bool) -> bytes:
    return b"result=allow\n" if allowed else b"result=deny\n"


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


# --- the engine, per answering mode ---------------------------------------------------


class PolicyEngines:
    """The policy engine (:class:`EngineDecider`) for each way of answering an ask.

    The daemon's own options give the normal one; a request may instead ask to
    assume yes, or to only evaluate (no prompt: an ask is denied). Each mode is
    built once, when first needed, and kept with its cache; all share one
    source of the domains' facts (and so its cached answer).
    """

    def __init__(self, r2_dir: str | None, policy_d: str | None, *,
                 system_info: SystemInfoSource, ask_program: str | None = None,
                 assume_yes_for_ask: bool = False,
                 policy_agent: PolicyAgentCaller | None = None) -> None:
        self.r2_dir = r2_dir
        self.policy_d = policy_d
        self.system_info = system_info
        self._ask_program = ask_program
        self._assume_yes = assume_yes_for_ask
        #: Asked and notified, shared by every mode but "only evaluate" (which, as
        #: the reference's just_evaluate, asks nobody and notifies nobody).
        self.policy_agent = policy_agent
        self._deciders: dict[tuple[bool, str | None, bool], EngineDecider] = {}

    def attach(self, nursery: trio.Nursery) -> None:
        """Send notifications in the background, in ``nursery``."""
        if self.policy_agent is not None:
            self.policy_agent.attach(nursery)

    async def reload(self) -> str:
        """SIGHUP: read the policy again now (every mode's engine); says what was read."""
        await trio.lowlevel.checkpoint()
        rules = [decider.reload() for decider in self._deciders.values()]
        if not rules:
            rules = [self.decider().reload()]
        return f"policy ({rules[0]} rules)"

    def decider(self, *, assume_yes: bool = False, may_ask: bool = True) -> EngineDecider:
        assume_yes = assume_yes or self._assume_yes
        program = self._ask_program if may_ask and not assume_yes else None
        key = (assume_yes, program, may_ask)
        decider = self._deciders.get(key)
        if decider is None:
            decider = EngineDecider(
                self.r2_dir, self.policy_d, system_info=self.system_info,
                ask_program=[program] if program else None, assume_yes_for_ask=assume_yes,
                policy_agent=self.policy_agent if may_ask else None)
            self._deciders[key] = decider
        return decider

    async def decide(self, source: str, target: str, call_name: str, *,
                     assume_yes: bool = False, may_ask: bool = True) -> Verdict:
        """The engine's verdict; an error in the engine (unreadable system
        information, ...) is logged and denies."""
        decider = self.decider(assume_yes=assume_yes, may_ask=may_ask)
        try:
            return await decider.decide(source, target, call_name)
        except Exception as exc:  # any engine failure must deny, never kill the caller
            log.error("policy evaluation failed; denying", error=str(exc) or type(exc).__name__)
            return Verdict(allowed=False)


def add_policy_options(parser: argparse.ArgumentParser, *, policy_d_aliases: Sequence[str] = ()
                       ) -> argparse._ArgumentGroup:
    """The policy options of ``qrexec-daemon``, with the same names and meanings."""
    group = parser.add_argument_group("policy")
    group.add_argument("--policy-dir", default=DEFAULT_R2_DIR, metavar="D",
                       help=f"R2 per-service policy files (default {DEFAULT_R2_DIR})")
    group.add_argument("--policy-d", *policy_d_aliases, dest="policy_d", default=None,
                       metavar="D", help=f"*.policy files (default {DEFAULT_POLICY_D})")
    group.add_argument("--system-info", metavar="FILE.json",
                       help="the domains for the policy from this file (see qrexec-policy "
                       "--help) instead of from qubesd")
    group.add_argument("--qubesd-internal-socket", metavar="PATH",
                       default=DEFAULT_QUBESD_INTERNAL_SOCKET,
                       help="where the policy asks qubesd for the domains (internal."
                       "GetSystemInfo, as the reference; without an answer every call is "
                       f"denied) (default {DEFAULT_QUBESD_INTERNAL_SOCKET}); '' for none: "
                       "the policy then knows only the request's names (test rigs)")
    group.add_argument("--policy-agent", metavar="DOMAIN", default=DEFAULT_POLICY_AGENT,
                       type=_agent_name,
                       help="where 'ask' rules are asked (policy.Ask) and notifications go "
                       "(policy.Notify) for a source whose guivm the domains' facts do not "
                       f"name (default {DEFAULT_POLICY_AGENT}); '' for none: such asks are "
                       "denied, as the reference does")
    group.add_argument("--ask-program", metavar="PROG",
                       help="program answering 'ask' rules instead of the policy agent")
    group.add_argument("--assume-yes-for-ask", action="store_true",
                       help="answer 'ask' rules with their default target")
    return group


def _agent_name(text: str) -> str:
    if not valid_agent_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a domain name")
    return text


def engines_from_args(args: argparse.Namespace, timeouts: Timeouts) -> PolicyEngines:
    """The engines; a policy agent in a VM is called through ``args.socket_dir``."""
    return PolicyEngines(
        args.policy_dir or None, args.policy_d or DEFAULT_POLICY_D,
        system_info=system_info_from_args(args, timeouts), ask_program=args.ask_program,
        assume_yes_for_ask=args.assume_yes_for_ask,
        policy_agent=PolicyAgentCaller(args.policy_agent, socket_dir=args.socket_dir,
                                       timeouts=timeouts))


# --- serving --------------------------------------------------------------------------


class PolicyDaemon:
    """Serves the policy socket and the policy.Eval* sockets, a task per connection."""

    def __init__(self, engines: PolicyEngines, timeouts: Timeouts) -> None:
        self.engines = engines
        self.timeouts = timeouts
        self._numbers = itertools.count(1)

    async def serve_policy(self, stream: trio.SocketStream) -> None:
        with structlog.contextvars.bound_contextvars(policy_conn=next(self._numbers)):
            try:
                await self._answer_policy(stream)
            finally:
                await stream.aclose()

    async def _receive(self, read: Callable[[], Awaitable[_T]], what: str) -> _T | None:
        """A client's request within the request timeout; ``None`` (logged) if it broke."""
        try:
            with trio.fail_after(self.timeouts.client_request):
                return await read()
        except BadRequest as exc:
            log.warning(f"bad policy {what}; closing", error=str(exc))
        except trio.TooSlowError:
            log.warning(f"policy {what} not received in time; closing",
                        timeout=self.timeouts.client_request)
        except trio.BrokenResourceError as exc:
            log.warning("policy client failed while sending", error=str(exc))
        return None

    async def _decide(self, source: str, target: str, call_name: str, *,
                      assume_yes: bool, may_ask: bool) -> Verdict:
        """The engine's verdict within the policy timeout; deny when it takes longer."""
        verdict = Verdict(allowed=False)
        with trio.move_on_after(self.timeouts.policy) as scope:
            verdict = await self.engines.decide(source, target, call_name,
                                                assume_yes=assume_yes, may_ask=may_ask)
        if scope.cancelled_caught:
            log.warning("policy decision timed out; denying", timeout=self.timeouts.policy)
        return verdict

    async def _answer_policy(self, stream: trio.SocketStream) -> None:
        reader = RequestReader()
        request = await self._receive(lambda: _read_request(stream, reader), "request")
        if request is None:
            return
        if reader.trailing:
            log.info("bytes after the request ignored", size=reader.trailing)
        context = {"source": _clip(request.source), "target": _clip(request.target),
                   "service": _clip(request.service_and_arg)}
        if request.requested_source:
            # Our engine evaluates the calling qube itself: a relayed source is
            # never claimed (as our own qrexec-daemon does).
            context["requested_source"] = _clip(request.requested_source)
        with structlog.contextvars.bound_contextvars(**context):
            verdict = await self._decide(
                request.source, request.target, request.service_and_arg,
                assume_yes=request.assume_yes_for_ask, may_ask=not request.just_evaluate)
            await self._send(stream, format_verdict(verdict, just_evaluate=request.just_evaluate))

    async def serve_eval(self, stream: trio.SocketStream, service_name: str,
                         check_gui: bool) -> None:
        with structlog.contextvars.bound_contextvars(policy_conn=next(self._numbers),
                                                     eval_service=service_name):
            try:
                await self._answer_eval(stream, service_name, check_gui)
            finally:
                await stream.aclose()

    async def _answer_eval(self, stream: trio.SocketStream, service_name: str,
                           check_gui: bool) -> None:
        async def read() -> EvalQuery:
            return parse_eval_call(await _read_eval_call(stream), service_name)

        query = await self._receive(read, "query")
        if query is None:
            return
        with structlog.contextvars.bound_contextvars(
                caller=query.caller, source=query.source, target=query.target,
                service=_clip(query.service_and_arg)):
            if check_gui and not await self._caller_is_guivm(query):
                log.warning("policy query refused; closing",
                            error="the caller is not the GuiVM of both qubes")
                return
            verdict = await self._decide(query.source, query.target, query.service_and_arg,
                                         assume_yes=True, may_ask=False)
            await self._send(stream, format_eval_answer(verdict.allowed))

    async def _caller_is_guivm(self, query: EvalQuery) -> bool:
        try:
            with trio.fail_after(self.timeouts.policy):
                info = await self.engines.system_info.get(query.source, query.target)
        except (SystemInfoUnavailable, trio.TooSlowError) as exc:
            log.error("system info unavailable", error=str(exc) or type(exc).__name__)
            return False
        return gui_may_ask(info, query)

    async def _send(self, stream: trio.SocketStream, answer: bytes) -> None:
        try:
            with trio.fail_after(self.timeouts.client_request):
                await stream.send_all(answer)
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            log.warning("policy client did not take the answer",
                        error=str(exc) or type(exc).__name__)


async def _read_request(stream: trio.SocketStream, reader: RequestReader) -> PolicyRequest:
    while True:
        data = await stream.receive_some(_RECEIVE_CHUNK)
        if not data:
            return reader.feed_eof()
        request = reader.feed(data)
        if request is not None:
            return request


async def _read_eval_call(stream: trio.SocketStream) -> bytes:
    """Up to EOF, or until the call line and the reference's 96 payload bytes arrived."""
    data = bytearray()
    while not eval_call_complete(data):
        chunk = await stream.receive_some(_RECEIVE_CHUNK)
        if not chunk:
            break
        data += chunk
        if len(data) > EVAL_MAX_HEADER + EVAL_PAYLOAD_BYTES:
            raise BadRequest(f"call longer than {EVAL_MAX_HEADER + EVAL_PAYLOAD_BYTES} bytes")
    return bytes(data)


Handler = Callable[[trio.SocketStream], Awaitable[None]]


def _endpoints(args: argparse.Namespace, daemon: PolicyDaemon) -> list[tuple[str, Handler]]:
    endpoints: list[tuple[str, Handler]] = [(args.socket_path, daemon.serve_policy)]
    for path, name, check_gui in ((args.eval_socket_path, EVAL_SIMPLE, False),
                                  (args.gui_socket_path, EVAL_GUI, True)):
        if path:
            endpoints.append((path, functools.partial(
                daemon.serve_eval, service_name=name, check_gui=check_gui)))
    return endpoints


def _qubes_group() -> int | None:
    """The reference's sockets belong to the ``qubes`` group when run as root."""
    if os.geteuid() != 0:
        return None
    try:
        return grp.getgrnam(SOCKET_GROUP).gr_gid
    except KeyError:
        return None


async def _open_nursery(task_status: trio.TaskStatus[trio.Nursery]) -> None:
    """A nursery for tasks that may be ended together, without what they started."""
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


def _tracked(registry: ConnectionRegistry, handler: Handler, kind: str,
             numbers: Iterator[int]) -> Handler:
    """``handler`` with each connection in ``registry`` (counted in STATUS=, waited
    for and then cancelled at a graceful stop)."""

    async def tracked(stream: trio.SocketStream) -> None:
        # The handler closes the stream, however it ends (cancelled included).
        async with registry.open(f"{kind}-{next(numbers)}", kind=kind):
            await handler(stream)

    return tracked


async def _serve(args: argparse.Namespace, engines: PolicyEngines, timeouts: Timeouts,
                 life: Lifecycle) -> int:
    daemon = PolicyDaemon(engines, timeouts)
    endpoints = _endpoints(args, daemon)
    group = _qubes_group()
    registry = ConnectionRegistry(cleanup_timeout=timeouts.cleanup)
    numbers = itertools.count(1)
    life.track(registry)
    life.on_reload(engines.reload)
    with contextlib.ExitStack() as stack:
        listening = []
        for path, handler in endpoints:
            try:
                sock = stack.enter_context(listening_socket(path, mode=SOCKET_MODE))
                if group is not None:
                    os.chown(path, -1, group)
            except OSError as exc:
                log.error("cannot listen", socket=path, error=str(exc))
                return 1
            kind = "policy" if path == args.socket_path else "eval"
            listening.append((sock, _tracked(registry, handler, kind, numbers)))
        async with trio.open_nursery() as nursery:
            engines.attach(nursery)  # notifications to the policy agent
            # The accept loops in a nursery of their own, the connections in
            # ours: a graceful stop ends the former only.
            accepting = await nursery.start(_open_nursery)
            life.on_stop(accepting.cancel_scope.cancel)
            for sock, handler in listening:
                accepting.start_soon(serve_socket, sock, handler, nursery)
            log.info("policy daemon ready", sockets=[path for path, _ in endpoints],
                     policy_dir=engines.r2_dir, policy_d=engines.policy_d)
            life.ready()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrexec-policy-daemon",
        description="Answer the qrexec policy socket (and policy.EvalSimple / policy.EvalGUI) "
        "with qrexec-trio's policy engine, as the reference's qrexec-policy-daemon.",
        epilog="A path given as '' disables that socket.",
    )
    parser.add_argument("--socket-path", default=DEFAULT_SOCKET_PATH, metavar="PATH",
                        help=f"the policy socket (default {DEFAULT_SOCKET_PATH})")
    parser.add_argument("--eval-socket-path", default=DEFAULT_EVAL_SOCKET_PATH, metavar="PATH",
                        help=f"the {EVAL_SIMPLE} socket service "
                        f"(default {DEFAULT_EVAL_SOCKET_PATH})")
    parser.add_argument("--gui-socket-path", default=DEFAULT_GUI_SOCKET_PATH, metavar="PATH",
                        help=f"the {EVAL_GUI} socket service (default {DEFAULT_GUI_SOCKET_PATH})")
    group = add_policy_options(parser)
    group.add_argument("--policy-path", action="append", metavar="D",
                       help="the reference's name for --policy-d (one directory here)")
    group.add_argument("--socket-dir", default=DEFAULT_SOCKET_DIR, metavar="DIR",
                       help="qrexec-daemon sockets, for qrexec-client to a policy agent in a "
                       f"VM (default {DEFAULT_SOCKET_DIR})")
    add_logging_options(parser)
    add_lifecycle_options(parser)
    return finish_parser(
        parser,
        "qrexec-policy-daemon                  # as its unit starts it",
        "qrexec-policy-daemon --policy-d /tmp/policy.d --socket-path /tmp/policy.sock "
        "--eval-socket-path '' --gui-socket-path ''")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.policy_path:
        if len(args.policy_path) > 1 or args.policy_d is not None:
            parser.error("this engine reads one policy.d directory: give --policy-path "
                         "(or --policy-d) once")
        args.policy_d = args.policy_path[0]
    if not args.socket_path:
        parser.error("--socket-path must not be empty")
    setup_logging(args, "qrexec-policy-daemon")
    timeouts = Timeouts.from_env()
    engines = engines_from_args(args, timeouts)
    return run_long_lived(lambda life: _serve(args, engines, timeouts, life),
                          stop_grace=args.stop_grace)


if __name__ == "__main__":
    sys.exit(main())
