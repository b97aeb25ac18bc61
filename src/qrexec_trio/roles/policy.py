"""``qrexec-policy`` (decide one call) and ``qrexec-trio policy lint`` (check files).

``qrexec-policy`` has R2's meaning: the daemon runs it for a VM's request
(``--policy-exec``) and it decides. With ``--just-evaluate`` only the exit
status answers (0 allow, 1 otherwise). Without it the decision is printed on
stdout as ``key=value`` lines in the policy daemon's response format
(wire-protocol.md §9); given the request's CID, an allowed call is then
connected with the daemon's own connection builder (R2), else the printed
decision is the whole answer (the reference's evaluator form, usable as the
daemon's ``-p``). Logs go through structlog, never to stdout.
"""

from __future__ import annotations

import argparse
import sys

import structlog
import trio

from qrexec_trio.policy import (
    DEFAULT_ASK_TIMEOUT,
    DEFAULT_POLICY_D,
    DEFAULT_R2_DIR,
    Decision,
    PolicyCache,
    Request,
    SystemInfo,
    SystemInfoError,
    deny,
    format_response,
    is_request_id,
    load_system_info,
    minimal_system_info,
    program_prompt,
    resolve_ask,
)

from .._config import Timeouts
from .._help import finish_parser
from ..domains import DEFAULT_QUBESD_INTERNAL_SOCKET
from ..nursery import CALL_FAILURES
from ..xen import VchanError, get_backend
from . import policy_tools
from ._cli import add_logging_options, run_until_signal, setup_logging
from ._connect import Target, connect_pending
from ._decide import QubesdSystemInfo, SystemInfoUnavailable
from .daemon import DEFAULT_SOCKET_DIR

log = structlog.get_logger(__name__)

EXIT_ALLOW = 0
EXIT_DENY = 1
EXIT_LINT_ERRORS = 1

_SYSTEM_INFO_HELP = (
    'JSON file describing the domains: {"domains": {"NAME": {"type": "AppVM", '
    '"tags": [...], "default_dispvm": NAME|null, "template_for_dispvms": false}}}. '
    "Without it, a minimal registry is built from the names in the request: dom0 "
    "as the AdminVM, every other name as an AppVM, with no tags and no DispVM "
    "templates (so @tag: rules never match and @dispvm calls are denied), unless "
    "--qubesd-internal-socket is given."
)
_QUBESD_HELP = (
    f"ask qubesd at PATH for the domains (internal.GetSystemInfo; qubesd serves it on "
    f"{DEFAULT_QUBESD_INTERNAL_SOCKET}); without an answer the call is denied. "
    "--system-info wins over it"
)


def _policy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrexec-policy",
        description="Evaluate the qrexec policy for one call.",
        epilog="Exit status: 0 if the call is allowed, 1 if it is denied, 2 on usage errors.",
    )
    parser.add_argument("--assume-yes-for-ask", action="store_true",
                        help="answer 'ask' rules with their default target instead of asking")
    parser.add_argument("--just-evaluate", action="store_true",
                        help="print nothing; only the exit status tells the decision")
    parser.add_argument("--policy-dir", metavar="D", default=DEFAULT_R2_DIR,
                        help=f"R2 per-service policy files (default: {DEFAULT_R2_DIR})")
    parser.add_argument("--policy-d", metavar="D", default=DEFAULT_POLICY_D,
                        help=f"*.policy files (default: {DEFAULT_POLICY_D})")
    parser.add_argument("--system-info", metavar="FILE.json", help=_SYSTEM_INFO_HELP)
    parser.add_argument("--qubesd-internal-socket", metavar="PATH", help=_QUBESD_HELP)
    parser.add_argument(
        "--ask-program", metavar="PROG",
        help="program to run for 'ask' (question as JSON on stdin, answer a target on "
        "stdout); without it, 'ask' denies",
    )
    # Every decision is logged at info: it is the audit trail.
    add_logging_options(parser, default="info")
    parser.add_argument("source", metavar="SRC", help="the calling domain")
    parser.add_argument("target", metavar="TARGET",
                        help="the target as the caller asked for it (a name or @keyword)")
    parser.add_argument("call_name", metavar="SERVICE[+ARG]", help="the service called")
    parser.add_argument(
        "request_id", metavar="CID", nargs="?",
        help="the request's id at SRC's daemon; with it an allowed call is connected (R2); "
        "without it the decision is only printed (the reference's evaluator form)",
    )
    parser.add_argument("--socket-dir", default=DEFAULT_SOCKET_DIR,
                        help=f"qrexec-daemon sockets, to connect the call (default "
                        f"{DEFAULT_SOCKET_DIR})")
    return finish_parser(
        parser,
        "qrexec-policy work vault qubes.Filecopy    # print the decision",
        "qrexec-policy --just-evaluate work @dispvm qubes.OpenURL && echo allowed")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _policy_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already reported by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_DENY
    # Logs go to stderr: stdout carries the decision.
    setup_logging(args, "qrexec-policy")
    request = Request.from_call(args.source, args.target, args.call_name)
    decision = _decide(args, request)
    log.info(
        "policy decision",
        result=decision.action.value, source=_clip(request.source),
        requested_target=_clip(request.target), service=_clip(request.call_name),
        target=decision.target, user=decision.user, rule=str(decision.rule or ""),
        reason=decision.reason, request_id=_clip(args.request_id or ""),
    )
    if args.just_evaluate:
        return EXIT_ALLOW if decision.allowed else EXIT_DENY
    sys.stdout.write(format_response(decision))
    sys.stdout.flush()
    if not decision.allowed:
        return EXIT_DENY
    if args.request_id is None:
        return EXIT_ALLOW
    # R2: the policy program makes the second half of the connection itself.
    return connect_allowed(args, decision)


def connect_allowed(args: argparse.Namespace, decision: Decision) -> int:
    """Connect the allowed call, with the daemon's own connection builder."""
    assert decision.target is not None
    request = decision.request
    if decision.target.startswith("@dispvm"):
        log.warning("connect failed", error="DispVM targets are not available yet")
        return EXIT_DENY
    timeouts = Timeouts.from_env()
    try:
        backend = get_backend(send_finish=timeouts.send_finish)
    except VchanError as exc:
        log.error("connect failed", error=str(exc))
        return EXIT_DENY
    target = Target(decision.target, decision.user or "DEFAULT", request.target)

    async def run() -> int:
        await connect_pending(
            backend, timeouts, args.socket_dir, source=request.source,
            source_domain=request.source, ident=args.request_id.encode(), target=target,
            descriptor=request.call_name)
        return EXIT_ALLOW

    try:
        return run_until_signal(run)
    except CALL_FAILURES as exc:
        log.error("connect failed", error=str(exc) or type(exc).__name__)
        return EXIT_DENY


def _decide(args: argparse.Namespace, request: Request) -> Decision:
    if args.request_id is not None and not is_request_id(args.request_id):
        return deny(request, "invalid request id (CID)")
    cache = PolicyCache(args.policy_dir, args.policy_d)
    try:
        system_info = _system_info(args, request, cache)
    except SystemInfoError as exc:
        log.error("system info unreadable", error=str(exc))
        return deny(request, "system information unusable")
    except SystemInfoUnavailable as exc:
        log.error("system info unavailable", **{exc.origin: exc.path}, error=exc.error)
        return deny(request, "system information unavailable")
    decision = cache.evaluate(request, system_info)
    prompt = None if args.ask_program is None else program_prompt(
        [args.ask_program], timeout=DEFAULT_ASK_TIMEOUT
    )
    return resolve_ask(decision, assume_yes=args.assume_yes_for_ask, prompt=prompt)


def _clip(text: str, limit: int = 200) -> str:
    # The request comes from a VM and may be invalid and 64 KiB long; the log
    # line must stay readable either way.
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def _system_info(args: argparse.Namespace, request: Request, cache: PolicyCache) -> SystemInfo:
    if args.system_info is not None:
        return load_system_info(args.system_info)
    if args.qubesd_internal_socket:
        source = QubesdSystemInfo(args.qubesd_internal_socket,
                                  call_timeout=Timeouts.from_env().admin_call)
        return trio.run(source.current)
    # A registry guessed from the request must know the rules' redirect targets.
    return minimal_system_info([request.source, request.target,
                                *cache.policy().redirect_names()])


# --- lint ---------------------------------------------------------------------


def lint_main(argv: list[str] | None = None) -> int:
    """``qrexec-trio policy lint``: the same command as ``qubes-policy-lint``
    (one implementation, in policy_tools), printing ``FILE:LINE: MESSAGE``."""
    return policy_tools.run_lint(argv, policy_tools.TRIO_POLICY_LINT)
