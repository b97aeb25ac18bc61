"""qrexec-trio: one command in front of all the programs."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from .. import __version__, torture
from . import agent, client, daemon, demo, policy, policy_agent, policy_daemon, world


def _programs() -> dict[str, tuple[Callable[[list[str]], int], str]]:
    return {
        "demo": (demo.main, "the narrated demo: a local world, calls of every kind"),
        "world": (world.world_main, "run a local world from a config file (foreground)"),
        "call": (world.call_main, "call a service from a VM of the running world"),
        "run": (world.run_main, "run a command in a VM of the running world, from dom0"),
        "vms": (world.vms_main, "list the domains of the running world"),
        "connections": (world.connections_main, "list the running world's live connections"),
        "kill": (world.kill_main, "cancel one live connection of the running world"),
        "top": (_top, "watch the running world's live connections (refreshes; --once)"),
        "torture": (torture.main, "fault-injection run against a local world, with a report"),
        "daemon": (daemon.main, "qrexec-daemon (dom0, one per VM)"),
        "client": (client.main, "qrexec-client (dom0)"),
        "agent": (agent.main, "qrexec-agent (VM)"),
        "policy": (_policy, "qrexec-policy (dom0); 'policy lint [DIRS]' checks policy files"),
        "policy-daemon": (policy_daemon.main, "qrexec-policy-daemon (dom0): the policy socket"),
        "policy-agent": (policy_agent.main, "policy.Ask / policy.Notify service: asks on the "
                         "terminal (install it in the domain that asks)"),
    }


def _top(args: list[str]) -> int:
    from . import top  # noqa: PLC0415 (it brings rich: loaded only when top runs)

    return top.main(args)


def _policy(args: list[str]) -> int:
    if args[:1] == ["lint"]:
        return policy.lint_main(args[1:])
    return policy.main(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    programs = _programs()
    if not args or args[0] in ("-h", "--help"):
        print("usage: qrexec-trio COMMAND [ARGS...]\n\ncommands:")
        for name, (_, about) in programs.items():
            print(f"  {name:<8} {about}")
        print("  version  print the version (also: --version, here and after any COMMAND)")
        print("\n'qrexec-trio COMMAND --help' describes each command.\n\nexamples:\n"
              "  qrexec-trio demo\n"
              "  qrexec-trio world examples/minimal.toml\n"
              "  qrexec-trio run server 'echo hello'\n"
              "  echo hi | python -m qrexec_trio call client server demo.Echo")
        return 0 if args else 1
    if args[0] in ("version", "--version"):
        print(f"qrexec-trio {__version__}")
        return 0
    entry = programs.get(args[0])
    if entry is None:
        print(f"qrexec-trio: unknown command {args[0]!r} (see qrexec-trio --help)",
              file=sys.stderr)
        return 1
    return entry[0](args[1:])


if __name__ == "__main__":
    sys.exit(main())
