"""What ``qrexec-trio world`` shows: by default its banner, then one line per
call naming the line of the world's config whose rule decided it; with a
log level, every program's records, the policy decision citing that line too."""

from __future__ import annotations

import json

from harness import Host, wait_for

from .worlds import CONFIG, RunningWorld

#: The rule lines of CONFIG that the calls below meet (as written in its [policy]).
ECHO_RULE = "demo.Echo * work vault allow"
#: A rule of its own for the denied call, so the denial cites a line too.
DENY_RULE = "demo.Echo * vault work deny"
OUTPUT_CONFIG = CONFIG.replace(ECHO_RULE, f"{ECHO_RULE}\n{DENY_RULE}")


def _line_of(rule: str) -> int:
    return OUTPUT_CONFIG.split("\n").index(rule) + 1


def _stop(world: RunningWorld, host: Host) -> str:
    """Stop ``world`` cleanly; what it wrote to stderr."""
    assert world.stop() == 0
    assert not world.dir.exists()
    return (host.root / "world.log").read_text()


def _lines_written(host: Host, count: int) -> list[str]:
    log = host.root / "world.log"
    return wait_for(lambda: (lines := log.read_text().splitlines()) and len(lines) >= count
                    and lines, timeout=30, what=f"{count} lines from the world")


def test_quiet_by_default_banner_then_a_line_per_call(host: Host) -> None:
    # Console: the format a terminal gets (the log is a file here).
    world = RunningWorld(host, OUTPUT_CONFIG, options=("--log-format", "console"))
    config = world.config
    assert world.proc.stdout is not None
    assert world.proc.stdout.readline().startswith(b"world ready in ")
    allowed = world.run("call", "work", "vault", "demo.Echo", input=b"hi\n")
    assert (allowed.returncode, allowed.stdout) == (0, b"vault\nhi\n"), allowed.stderr
    denied = world.run("call", "vault", "work", "demo.Echo")
    assert denied.returncode != 0
    ran = world.run("run", "work", "exit 5")
    assert ran.returncode == 5
    lines = _lines_written(host, 3)
    assert _stop(world, host).splitlines() == lines == [
        f"work -> vault demo.Echo: allowed by {config}:{_line_of(ECHO_RULE)}, exit 0",
        f"vault -> work demo.Echo: denied by {config}:{_line_of(DENY_RULE)}",
        "dom0 -> work (shell command): exit 5",
    ]


def test_a_policy_decision_cites_the_world_config_line(host: Host) -> None:
    world = RunningWorld(host, OUTPUT_CONFIG,
                         options=("--log-level", "info", "--log-format", "json"))
    result = world.run("call", "work", "vault", "demo.Echo", input=b"hi\n")
    assert result.returncode == 0, result.stderr
    result = world.run("call", "vault", "work", "demo.Echo")
    assert result.returncode != 0

    def decisions() -> list[dict[str, object]]:
        records = [json.loads(line) for line in
                   (host.root / "world.log").read_text().splitlines() if line.startswith("{")]
        return [r for r in records if r.get("event") == "policy decision"]

    wait_for(lambda: len(decisions()) == 2, timeout=30, what="both decisions logged")
    records = [json.loads(line) for line in _stop(world, host).splitlines()]
    allow, deny = (r for r in records if r["event"] == "policy decision")
    assert (allow["result"], allow["rule"]) == ("allow", f"{world.config}:{_line_of(ECHO_RULE)}")
    assert (deny["result"], deny["rule"]) == ("deny", f"{world.config}:{_line_of(DENY_RULE)}")
    assert str(allow["policy_file"]).endswith(".policy:1")
    assert allow["program"] == "qrexec-daemon" and allow["call"]
    # The line per call is a record too, with its fields, among the programs' own.
    said = [r for r in records if r["program"] == "qrexec-trio world"
            and str(r["event"]).startswith("work -> vault demo.Echo")]
    assert [(r["status"], r["rule"]) for r in said] == [(0, allow["rule"])]
    assert any(r["program"] == "qrexec-agent" for r in records)
