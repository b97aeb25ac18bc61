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
from typing import NoReturn

import trio

from .._config import Timeouts
from .._logging import configure_logging, get_logger
from .._programs import program
from ..domains import AdminProtocolError, DomainsError, QubesdDomains
from ..nursery import CONNECTIONS, KILL, UNKNOWN_CONNECTION, parse_connections
from ..world import WorldConfigError, load_world_config
from ..world._layout import WorldLayout, default_world_dir
from ..world._runner import World, WorldError
from ._cli import add_logging_options, run_until_signal, setup_logging

log = get_logger(__name__)


def _world_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", type=Path, default=default_world_dir(), metavar="DIR",
                        help=f"the world's directory (default {default_world_dir()})")


def _summary(world: World, domains: object) -> str:
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
        "  stop: Ctrl-C",
    ]
    return "\n".join(lines)


def world_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qrexec-trio world",
                                     description="Run a local world from a config file.")
    parser.add_argument("config", type=Path, help="the world's TOML file")
    parser.add_argument("--dir", type=Path, default=default_world_dir(),
                        help=f"where the running world lives (default {default_world_dir()})")
    add_logging_options(parser)
    args = parser.parse_args(argv)
    setup_logging(args, "qrexec-trio world")
    try:
        config = load_world_config(args.config)
    except WorldConfigError as exc:
        print(f"qrexec-trio world: {exc}", file=sys.stderr)
        return 1
    log_options = ("--log-level", args.log_level, "--log-format", args.log_format)
    try:
        world = World(config, args.dir.resolve(), timeouts=Timeouts.from_env(),
                      log_options=log_options)
    except WorldError as exc:
        print(f"qrexec-trio world: {exc}", file=sys.stderr)
        return 1

    async def run() -> int:
        async with trio.open_nursery() as nursery:
            domains = await nursery.start(world.run)
            print(_summary(world, domains), flush=True)
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


def _exec(argv: list[str], env: dict[str, str], state: dict[str, object]) -> NoReturn:
    """Become the client: its stdio, exit status and signals are the user's."""
    if state.get("group") is not None:
        # The client offers its data vchan as a file in the world's vchan
        # directory, which the world's programs (the group's) must connect to.
        os.umask(os.umask(0) & ~0o070)
    sys.stdout.flush()
    os.execve(argv[0], argv, env)


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("QREXEC", "VCHAN"))}


def call_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qrexec-trio call",
        description="Call SERVICE in TARGET from inside SRC (qrexec-client-vm in SRC).")
    _world_option(parser)
    parser.add_argument("source", metavar="SRC")
    parser.add_argument("target", metavar="TARGET")
    parser.add_argument("service", metavar="SERVICE[+ARG]")
    parser.add_argument("prog", nargs=argparse.REMAINDER, metavar="PROG ARGS",
                        help="a local program to connect instead of stdin/stdout")
    args = parser.parse_args(argv)
    state = _state(args.world)
    vms = state["vms"]
    assert isinstance(vms, dict)
    if args.source not in vms:
        print(f"qrexec-trio call: no VM {args.source!r} in this world "
              f"(VMs: {', '.join(sorted(vms))})", file=sys.stderr)
        return 1
    vm = vms[args.source]
    env = dict(_base_env(), VCHAN_DOMAIN=str(vm["domid"]),
               VCHAN_SOCKET_DIR=str(state["vchan_dir"]), QREXEC_VCHAN=str(state["vchan"]))
    agent_socket = os.path.join(vm["runtime_dir"], "qrexec-agent")
    return _exec([program("qrexec-client-vm"), "--agent-socket", agent_socket, args.target,
                  args.service, *args.prog], env, state)


def run_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qrexec-trio run", description="Run COMMAND in VM from dom0 (qrexec-client).")
    _world_option(parser)
    parser.add_argument("--user", default="DEFAULT", help="the user in the VM (default: its own)")
    parser.add_argument("-e", "--just-exec", action="store_true",
                        help="start the command without a data phase")
    parser.add_argument("vm", metavar="VM")
    parser.add_argument("command", metavar="COMMAND")
    args = parser.parse_args(argv)
    state = _state(args.world)
    env = dict(_base_env(), VCHAN_DOMAIN="0", VCHAN_SOCKET_DIR=str(state["vchan_dir"]),
               QREXEC_VCHAN=str(state["vchan"]))
    options = ["-e"] if args.just_exec else []
    return _exec([program("qrexec-client"), "--socket-dir", str(state["socket_dir"]), *options,
                  "-d", args.vm, f"{args.user}:{args.command}"], env, state)


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
