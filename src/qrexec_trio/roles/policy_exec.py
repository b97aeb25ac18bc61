"""``qrexec-policy-exec``: the reference's policy program, deciding with our engine.

Two forms, as the reference's::

    qrexec-policy-exec [options] SOURCE TARGET SERVICE[+ARG]
    qrexec-policy-exec [options] DOMID SOURCE TARGET SERVICE[+ARG] IDENT

With three arguments the decision is printed on stdout in the policy daemon's
response format (plus a newline) and the exit status is 0 for allow, 1
otherwise: the C ``qrexec-daemon`` runs ``qrexec-policy-exec -- SOURCE TARGET
SERVICE`` this way when the policy socket is absent or answered badly (and
our ``qrexec-daemon -p`` does the same). With ``--just-evaluate`` nothing is
printed and an ``ask`` is a deny unless ``--assume-yes-for-ask``; otherwise an
``ask`` is put to the policy agent (``--policy-agent``, ``policy.Ask``) and
decisions that notify are sent to its ``policy.Notify``, as ``qrexec-daemon``
does (see ``roles/policy_agent.py``).

With five arguments (the older daemons' fallback, wire-protocol.md §7.5) an
allowed call is connected by running ``qrexec-client`` as the reference does:
``-Ed TARGET -c IDENT,SOURCE,DOMID -- "USER:QUBESRPC SERVICE[+ARG] SOURCE"``
(``-EWkd`` for a new DispVM, made and started through qubesd first; a VM
target is started first unless the rule said ``autostart=no``), or for dom0
``-Ed dom0 -c ... -- "QUBESRPC SERVICE[+ARG] SOURCE name|keyword TARGET"``.
Nothing is printed; the status is qrexec-client's, or 1 if denied. Usage
errors exit 2. Logs go to stderr (structlog), the same ``policy decision``
event as the daemons'.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import structlog
import trio

from .._config import Timeouts
from .._defaults import QUBESD_SOCKET_ENV
from .._help import finish_parser
from .._logging import get_logger
from .._programs import program
from ..domains import DEFAULT_QUBESD_SOCKET, DomainsError, QubesdDomains
from ..policy import Verdict, is_request_id
from ._cli import add_logging_options, run_until_signal, setup_logging
from ._connect import DOM0_NAMES
from .daemon import DEFAULT_SOCKET_DIR
from .policy_daemon import (
    DENY_RESPONSE,
    add_policy_options,
    engines_from_args,
    format_verdict,
)

log = get_logger(__name__)

EXIT_ALLOW = 0
EXIT_DENY = 1
EXIT_USAGE = 2
DISPVM_PREFIX = "@dispvm:"

_USAGE = """\
qrexec-policy-exec [options] SOURCE TARGET SERVICE[+ARG]
       qrexec-policy-exec [options] DOMID SOURCE TARGET SERVICE[+ARG] IDENT"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrexec-policy-exec", usage=_USAGE,
        description="Evaluate the qrexec policy for one call (3 arguments: print the "
        "decision), or evaluate and connect it (5 arguments: DOMID and IDENT of the "
        "caller's pending request; deprecated in the reference).",
        epilog="Exit status: 0 allowed (5 arguments: qrexec-client's status), 1 denied, "
        "2 usage errors.",
    )
    parser.add_argument("--just-evaluate", action="store_true",
                        help="only evaluate: no output, no connection; exit 0 means allow")
    add_policy_options(parser, policy_d_aliases=("--path",))
    connect = parser.add_argument_group("connecting (5 arguments)")
    connect.add_argument("--socket-dir", default=DEFAULT_SOCKET_DIR,
                         help=f"qrexec-daemon sockets, for qrexec-client "
                         f"(default {DEFAULT_SOCKET_DIR})")
    connect.add_argument("--qubesd-socket", default=DEFAULT_QUBESD_SOCKET, metavar="PATH",
                         help="the domain manager's admin socket, to start the target and make "
                         f"DispVMs (default {DEFAULT_QUBESD_SOCKET}); '' for none")
    add_logging_options(parser)
    parser.add_argument("args", nargs="*", metavar="ARG",
                        help="SOURCE TARGET SERVICE[+ARG], or DOMID SOURCE TARGET "
                        "SERVICE[+ARG] IDENT")
    return finish_parser(
        parser,
        "qrexec-policy-exec work vault qubes.Filecopy          # print the decision",
        "qrexec-policy-exec --just-evaluate work vault qubes.Filecopy && echo allowed")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    count = len(args.args)
    if count == 3:
        domid, ident = None, None
        source, target, call_name = args.args
    elif count == 5:
        domid, source, target, call_name, ident = args.args
        if not domid.isdigit():
            parser.error(f"DOMID must be a domain id, not {domid!r}")
        if not is_request_id(ident):
            parser.error(f"invalid request identifier {ident!r}")
    else:
        parser.error(f"must have 3 or 5 positional arguments, not {count}")
    setup_logging(args, "qrexec-policy-exec")
    # As the reference's policy: an empty target is @default.
    target = target or "@default"
    timeouts = Timeouts.from_env()
    engines = engines_from_args(args, timeouts)

    async def decide() -> Verdict:
        with trio.move_on_after(timeouts.policy) as scope:
            return await engines.decide(source, target, call_name,
                                        assume_yes=args.assume_yes_for_ask,
                                        may_ask=not args.just_evaluate)
        if scope.cancelled_caught:
            log.warning("policy decision timed out; denying", timeout=timeouts.policy)
        return Verdict(allowed=False)

    context = {"source": source, "target": target, "service": call_name}
    if ident is not None:
        context["request"] = ident
    structlog.contextvars.bind_contextvars(**context)
    verdict: Verdict = Verdict(allowed=False)

    async def run_decide() -> int:
        nonlocal verdict
        # Notifications to the policy agent run beside the decision; this waits
        # for them (each bounded) only after the answer is out.
        async with trio.open_nursery() as nursery:
            engines.attach(nursery)
            verdict = await decide()
            if domid is None and not args.just_evaluate:
                sys.stdout.write(format_verdict(verdict).decode("ascii") + "\n")
                sys.stdout.flush()
        return 0

    status = run_until_signal(run_decide)
    if status != 0:
        return status
    # What the daemon would answer decides: a verdict that cannot travel is a deny.
    answer = format_verdict(verdict)
    allowed = answer != DENY_RESPONSE
    if domid is None or ident is None:
        return EXIT_ALLOW if allowed else EXIT_DENY
    if not allowed or verdict.target is None:
        return EXIT_DENY
    if args.just_evaluate:
        return EXIT_ALLOW
    return connect(args, verdict, domid=domid, source=source, intended_target=target,
                   call_name=call_name, ident=ident, timeouts=timeouts)


def client_argv(verdict: Verdict, *, domid: str, source: str, intended_target: str,
                call_name: str, ident: str, socket_dir: str,
                dispvm_name: str | None = None) -> list[str]:
    """The reference's qrexec-client command line for an allowed call."""
    assert verdict.target is not None
    caller = ",".join((ident, source, domid))
    if verdict.target in DOM0_NAMES:
        keyword = intended_target.startswith("@")
        shown = intended_target[1:] if keyword else intended_target
        cmdline = f"QUBESRPC {call_name} {source} {'keyword' if keyword else 'name'} {shown}"
        return [program("qrexec-client"), "--socket-dir", socket_dir, "-Ed", "dom0",
                "-c", caller, "--", cmdline]
    cmdline = f"{verdict.user or 'DEFAULT'}:QUBESRPC {call_name} {source}"
    if dispvm_name is not None:
        return [program("qrexec-client"), "--socket-dir", socket_dir, "-EWkd", dispvm_name,
                "-c", caller, "--", cmdline]
    return [program("qrexec-client"), "--socket-dir", socket_dir, "-Ed", verdict.target,
            "-c", caller, "--", cmdline]


def connect(args: argparse.Namespace, verdict: Verdict, *, domid: str, source: str,
            intended_target: str, call_name: str, ident: str, timeouts: Timeouts) -> int:
    """Connect the allowed call through qrexec-client; its exit status is ours."""
    assert verdict.target is not None
    target = verdict.target
    env = dict(os.environ)
    if args.qubesd_socket:
        env[QUBESD_SOCKET_ENV] = args.qubesd_socket
    domains = (QubesdDomains(args.qubesd_socket, call_timeout=timeouts.admin_call)
               if args.qubesd_socket else None)

    async def run() -> int:
        dispvm_name = None
        try:
            with trio.fail_after(timeouts.domain_start):
                if target.startswith(DISPVM_PREFIX):
                    if domains is None:
                        log.error("connect failed", error="a DispVM needs --qubesd-socket")
                        return EXIT_DENY
                    dispvm_name = await domains.create_disposable(target[len(DISPVM_PREFIX):])
                    await domains.start(dispvm_name)
                elif target not in DOM0_NAMES and verdict.autostart and domains is not None:
                    await domains.start(target)
        except (DomainsError, trio.TooSlowError) as exc:
            log.error("connect failed", error=str(exc) or type(exc).__name__)
            if dispvm_name is not None:
                await _kill_quietly(domains, dispvm_name)
            return EXIT_DENY
        argv = client_argv(verdict, domid=domid, source=source,
                           intended_target=intended_target, call_name=call_name, ident=ident,
                           socket_dir=args.socket_dir, dispvm_name=dispvm_name)
        log.info("connecting the call", argv=argv[1:])
        # The call's data phase lasts as long as it lasts: qrexec-client bounds
        # its own waits; a stop signal ends it (run_process kills it).
        result = await trio.run_process(argv, check=False, env=env)
        log.info("qrexec-client finished", status=result.returncode)
        return result.returncode

    return run_until_signal(run)


async def _kill_quietly(domains: QubesdDomains | None, name: str) -> None:
    if domains is None:
        return
    try:
        await domains.kill(name)
    except DomainsError as exc:
        log.error("could not remove the DispVM", dispvm=name, error=str(exc))


if __name__ == "__main__":
    sys.exit(main())
