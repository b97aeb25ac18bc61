"""qrexec-trio world / call / run / vms: the local world and commands against it.

``world CONFIG`` runs a whole world in the foreground until Ctrl-C or SIGTERM.
``call SRC TARGET SERVICE`` is qrexec-client-vm inside SRC, ``run VM CMD`` is
qrexec-client from dom0, ``vms`` lists the domains: none of them needs to know
where the world keeps its files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import trio

from .._config import Timeouts
from .._help import finish_parser
from .._logging import LEVELS, configure_logging, get_logger
from ..blocking._daemon_client import DOM0_NAMES
from ..domains import AdminProtocolError, DomainsError, QubesdDomains
from ..nursery import CONNECTIONS, KILL, UNKNOWN_CONNECTION, parse_connections
from ..protocol import ExitStatus, ProtocolError, RpcCall, parse_cmdline
from ..services import LaunchError, find_service
from ..world import WorldConfigError, load_world_config
from ..world._layout import WorldLayout, default_world_dir
from ..world._runner import World, WorldError
from . import client, client_vm
from ._cli import add_logging_options, run_until_signal, setup_logging

log = get_logger(__name__)


def _world_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", type=Path, default=default_world_dir(), metavar="DIR",
                        help=f"the world's directory (default {default_world_dir()})")


def _summary(world: World, domains: object, *, quiet: bool) -> str:
    layout = world.layout
    lines = [f"world ready in {layout.root}", "  VMs:"]
    for spec in world.config.vms:
        state = "running" if spec.autostart else "halted"
        extra = " (DispVM template)" if spec.template_for_dispvms else ""
        services = ", ".join(s.name for s in spec.services) or "-"
        lines.append(f"    {spec.name:<12} domid {spec.domid:<5} {state:<8} {services}{extra}")
    lines += [
        f"  policy: {layout.policy_d}",
        f"  daemon sockets: {layout.socket_dir}, vchans: {layout.vchan_dir}",
        f"  domain manager (qubesd protocol): {layout.qubesd_socket}",
        "  try:  qrexec-trio run VM 'echo hello'   |   qrexec-trio call SRC TARGET SERVICE",
    ]
    if quiet:
        lines.append("  logs: one line per call below; -v (or --log-level) for every program's")
    lines.append("  stop: Ctrl-C")
    return "\n".join(lines)


#: The world's own threshold: warnings, and the line per call, unless -v.
QUIET_LEVEL: Final = "warning"
#: What -v, -vv ask for.
VERBOSE_LEVELS: Final = ("info", "debug")


def _world_log_level(args: argparse.Namespace) -> str:
    """``--log-level``, or what ``-v`` asks for if that shows more."""
    levels: list[str] = [args.log_level]
    if args.verbose:
        levels.append(VERBOSE_LEVELS[min(args.verbose, len(VERBOSE_LEVELS)) - 1])
    return min(levels, key=LEVELS.index)


def _program_log_options(level: str) -> tuple[str, ...]:
    """The world's programs log JSON lines to the world, which shows them at its
    own level; they log info at least, which its line per call is made from."""
    return ("--log-level", "debug" if level == "debug" else "info", "--log-format", "json")


def world_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qrexec-trio world",
                                     description="Run a local world from a config file.")
    parser.add_argument("config", type=Path, help="the world's TOML file")
    parser.add_argument("--dir", type=Path, default=default_world_dir(),
                        help=f"where the running world lives (default {default_world_dir()})")
    add_logging_options(parser, default=QUIET_LEVEL)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="show every program's log: -v info, -vv debug "
                        "(default: warnings and one line per call)")
    finish_parser(parser, "qrexec-trio world examples/minimal.toml",
                  "qrexec-trio world -v --dir /tmp/my-world my-world.toml")
    args = parser.parse_args(argv)
    args.log_level = _world_log_level(args)
    setup_logging(args, "qrexec-trio world")
    try:
        config = load_world_config(args.config)
    except WorldConfigError as exc:
        print(f"qrexec-trio world: {exc}", file=sys.stderr)
        return 1
    try:
        world = World(config, args.dir.resolve(), timeouts=Timeouts.from_env(),
                      log_options=_program_log_options(args.log_level), relay_logs=True)
    except WorldError as exc:
        print(f"qrexec-trio world: {exc}", file=sys.stderr)
        return 1
    quiet = LEVELS.index(args.log_level) >= LEVELS.index(QUIET_LEVEL)

    async def run() -> int:
        async with trio.open_nursery() as nursery:
            domains = await nursery.start(world.run)
            print(_summary(world, domains, quiet=quiet), flush=True)
        return 0

    try:
        return run_until_signal(run, stopped_status=0)
    except (WorldError, DomainsError, OSError) as exc:
        print(f"qrexec-trio world: {exc}", file=sys.stderr)
        return 1


def _state(world_dir: Path) -> dict[str, object]:
    layout = WorldLayout(world_dir)
    if not layout.state_file.exists():
        raise SystemExit(f"qrexec-trio: no world is running in {world_dir} "
                         "(start one with: qrexec-trio world CONFIG)")
    return layout.read_state()


# -- call and run: one wording and one exit status per caller-side error -----------------
#
# Both commands run the reference-named client (qrexec-client-vm, qrexec-client)
# in this process, with the world's environment: its stdio, signals and exit
# status are the user's, as if it had been started directly. What the user got
# wrong is said once, the same way by both (docs/world-format.md, "Calling"):

#: A VM name the world does not have: nothing was started.
EXIT_UNKNOWN_VM: Final = int(ExitStatus.PROBLEM)
#: dom0 refused the call: its policy denied it, or its target could not be started.
EXIT_REFUSED: Final = int(ExitStatus.REFUSED)
#: The call was allowed, but the target has no such service.
EXIT_SERVICE_NOT_FOUND: Final = int(ExitStatus.SERVICE_NOT_FOUND)
REFUSED_MESSAGE: Final = ("qrexec-trio: call refused (the policy denied it, or its target "
                          "could not be started)")


def _complain(message: str, status: int) -> int:
    print(f"qrexec-trio: {message}", file=sys.stderr)
    return status


def _world_vms(state: dict[str, object]) -> dict[str, dict[str, Any]]:
    vms = state["vms"]
    assert isinstance(vms, dict)
    return vms


def _unknown_vm(name: str, vms: dict[str, dict[str, Any]]) -> int:
    return _complain(f"unknown VM {name!r} (known: {', '.join(vms)})", EXIT_UNKNOWN_VM)


def _named_target(target: str) -> str | None:
    """The VM a call's TARGET names, if it names one (not ``@default``, ``@dispvm``...)."""
    keyword, colon, name = target.replace("$", "@", 1).partition(":")
    if keyword == "@dispvm" and colon and not name.startswith("@"):
        return name  # a DispVM of that template
    if not target or target.startswith(("@", "$")) or ":" in target:
        return None
    return target


def _enter_world(state: dict[str, object], domain: int) -> None:
    """This process becomes a program of the world's ``domain``."""
    if state.get("group") is not None:
        # The client offers its data vchan as a file in the world's vchan
        # directory, which the world's programs (the group's) must connect to.
        os.umask(os.umask(0) & ~0o070)
    for name in [name for name in os.environ if name.startswith(("QREXEC", "VCHAN"))]:
        del os.environ[name]
    os.environ.update(VCHAN_DOMAIN=str(domain), VCHAN_SOCKET_DIR=str(state["vchan_dir"]),
                      QREXEC_VCHAN=str(state["vchan"]))


def _service_missing(world_dir: Path, vm: str, service: str, source: str) -> bool:
    """Whether ``vm`` of the world has no handler for ``service`` (as its agent looks
    it up), to tell a missing service from a service that exited 127."""
    directory = WorldLayout(world_dir).dom0_services if vm in DOM0_NAMES \
        else WorldLayout(world_dir).vm_dir(vm) / "rpc"
    try:
        command = parse_cmdline(f"QUBESRPC {service} {source}".encode(), with_user=False).command
        assert isinstance(command, RpcCall)  # the line starts with QUBESRPC
        find_service(command, [str(directory)])
    except LaunchError as exc:
        return exc.status == ExitStatus.SERVICE_NOT_FOUND
    except ProtocolError:
        return False  # not a service name the agent would look up
    return False


def _not_found(service: str, vm: str) -> int:
    return _complain(f"service {service!r} not found in VM {vm!r}", EXIT_SERVICE_NOT_FOUND)


def call_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qrexec-trio call",
        description="Call SERVICE in TARGET from inside SRC (qrexec-client-vm in SRC).",
        epilog=f"Exit status: the service's; {EXIT_UNKNOWN_VM} unknown VM, {EXIT_REFUSED} "
        f"refused, {EXIT_SERVICE_NOT_FOUND} service not found (or the service's own 127).")
    _world_option(parser)
    parser.add_argument("source", metavar="SRC", help="the VM the call is made from")
    parser.add_argument("target", metavar="TARGET",
                        help="the VM called: a name, @default, @dispvm or @dispvm:TEMPLATE")
    parser.add_argument("service", metavar="SERVICE[+ARG]",
                        help="the service, with its argument if any")
    parser.add_argument("prog", nargs=argparse.REMAINDER, metavar="PROG ARGS",
                        help="a local program to connect instead of stdin/stdout")
    finish_parser(parser, "echo hi | qrexec-trio call work vault demo.Echo",
                  "qrexec-trio call work @dispvm demo.Reverse /bin/echo stressed",
                  "qrexec-trio call --world /tmp/my-world work vault demo.Echo")
    args = parser.parse_args(argv)
    state = _state(args.world)
    vms = _world_vms(state)
    if args.source not in vms:
        return _unknown_vm(args.source, vms)
    named = _named_target(args.target)
    if named is not None and named not in vms and named not in DOM0_NAMES:
        return _unknown_vm(named, vms)
    vm = vms[args.source]
    _enter_world(state, int(vm["domid"]))
    agent_socket = os.path.join(vm["runtime_dir"], "qrexec-agent")
    status = client_vm.main(["--agent-socket", agent_socket, args.target, args.service,
                             *args.prog], refused_message=REFUSED_MESSAGE)
    if status == EXIT_SERVICE_NOT_FOUND and named is not None \
            and _service_missing(args.world, named, args.service, args.source):
        return _not_found(args.service, named)
    return status


def run_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qrexec-trio run", description="Run COMMAND in VM from dom0 (qrexec-client).",
        epilog=f"Exit status: COMMAND's; {EXIT_UNKNOWN_VM} unknown VM; for a 'QUBESRPC "
        f"SERVICE SRC' COMMAND, {EXIT_SERVICE_NOT_FOUND} service not found.")
    _world_option(parser)
    parser.add_argument("--user", default="DEFAULT", help="the user in the VM (default: its own)")
    parser.add_argument("-e", "--just-exec", action="store_true",
                        help="start the command without a data phase")
    parser.add_argument("vm", metavar="VM", help="the VM to run COMMAND in")
    parser.add_argument("command", metavar="COMMAND",
                        help="a shell command line, or 'QUBESRPC SERVICE[+ARG] SRC'")
    finish_parser(parser, "qrexec-trio run work 'echo hello'",
                  "qrexec-trio run --user root -e work 'touch /tmp/x'",
                  "echo hi | qrexec-trio run vault 'QUBESRPC demo.Echo dom0'")
    args = parser.parse_args(argv)
    state = _state(args.world)
    vms = _world_vms(state)
    if args.vm not in vms and args.vm not in DOM0_NAMES:
        return _unknown_vm(args.vm, vms)
    _enter_world(state, 0)
    options = ["-e"] if args.just_exec else []
    status = client.main(["--socket-dir", str(state["socket_dir"]), *options, "-d", args.vm,
                          f"{args.user}:{args.command}"])
    service, source = _rpc_command(args.command)
    if status == EXIT_SERVICE_NOT_FOUND and service is not None \
            and _service_missing(args.world, args.vm, service, source):
        return _not_found(service, args.vm)
    return status


def _rpc_command(command: str) -> tuple[str | None, str]:
    """``(SERVICE, SRC)`` of a ``QUBESRPC SERVICE SRC`` command line, else ``(None, "")``."""
    words = command.split(" ")
    if len(words) >= 3 and words[0] == "QUBESRPC":
        return words[1], words[2]
    return None, ""


def _against_world(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                   body: Callable[[argparse.Namespace, QubesdDomains], Awaitable[int]]) -> int:
    """Run one command against the running world's admin socket; errors exit 1."""
    _world_option(parser)
    args = parser.parse_args(argv)
    configure_logging("warning")
    state = _state(args.world)
    domains = QubesdDomains(str(state["qubesd_socket"]))
    try:
        return trio.run(body, args, domains)
    except DomainsError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1


def vms_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qrexec-trio vms",
                                     description="List the domains of the running world.")
    finish_parser(parser, "qrexec-trio vms", "qrexec-trio vms --world /tmp/my-world")

    async def show(args: argparse.Namespace, domains: QubesdDomains) -> int:
        for domain in await domains.list():
            state_text = f"running, domid {domain.domid}" if domain.running else "halted"
            print(f"{domain.name:<14} {domain.type:<12} {state_text}")
        return 0

    return _against_world(parser, argv, show)


def connections_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qrexec-trio connections",
        description="List the live connections of the running world: every daemon's and "
        "every agent's. A call shows once per program it passes through, under one id.")
    parser.add_argument("--json", action="store_true", help="one JSON object a line")
    finish_parser(parser, "qrexec-trio connections",
                  "qrexec-trio connections --json | jq -r .id")

    async def show(args: argparse.Namespace, domains: QubesdDomains) -> int:
        entries = parse_connections(await domains.call(CONNECTIONS, "dom0"))
        if args.json:
            for entry in entries:
                print(json.dumps(entry, sort_keys=True))
            return 0
        print(f"{'ID':<16} {'OWNER':<22} {'STATE':<8} {'AGE':>7} {'IN':>10} {'OUT':>10}  "
              "SOURCE -> TARGET  SERVICE")
        for entry in entries:
            print(f"{entry.get('id', '?'):<16} {entry.get('owner', '?'):<22} "
                  f"{entry.get('state', '?'):<8} {float(entry.get('age', 0)):>6.1f}s "
                  f"{_bytes(entry.get('bytes_to_service')):>10} "
                  f"{_bytes(entry.get('bytes_to_caller')):>10}  "
                  f"{entry.get('source') or '?'} -> {entry.get('target') or '?'}  "
                  f"{entry.get('service') or ''}")
        return 0

    return _against_world(parser, argv, show)


def _bytes(value: object) -> str:
    return str(value) if isinstance(value, int) else "-"


def kill_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qrexec-trio kill",
        description="Cancel one live connection of the running world (an id from "
        "'qrexec-trio connections'): its whole pipeline is torn down.")
    parser.add_argument("id", help="the connection's id")
    finish_parser(parser, "qrexec-trio kill 10.3-1-2      # an ID from qrexec-trio connections")

    async def kill(args: argparse.Namespace, domains: QubesdDomains) -> int:
        try:
            await domains.call(KILL, "dom0", args.id)
        except AdminProtocolError:
            print(f"qrexec-trio kill: {args.id!r} is not a connection id", file=sys.stderr)
            return 1
        except DomainsError as exc:
            if exc.kind != UNKNOWN_CONNECTION:
                raise
            print(f"qrexec-trio kill: no live connection {args.id!r}", file=sys.stderr)
            return 1
        return 0

    return _against_world(parser, argv, kill)
