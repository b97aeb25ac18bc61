"""Where logs go decides how they look: the journal gets each line's priority,
a terminal gets colour (unless NO_COLOR), anything else plain JSON lines; and
the world turns its programs' records into one line per call."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from qrexec_trio.world._calls import HOLD, CallLines, policy_file_citer

#: Logs a record at each level, with a call id bound: what every program does.
_PROGRAM = """
import sys
from qrexec_trio._logging import bind_context, configure_logging, get_logger
configure_logging("debug", program="qrexec-test")
bind_context(call="10.1-2-3")
log = get_logger("test")
log.debug("d")
log.info("i", detail=1)
log.warning("w")
log.error("e")
log.critical("c")
if len(sys.argv) > 1:
    import structlog
    structlog.contextvars.bind_contextvars(call="10.4-5-6")
    log.info("bound by structlog")
"""

_PRIORITIES = ["<7>", "<6>", "<4>", "<3>", "<2>"]


def _run(stderr: int, env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "-c", _PROGRAM, *args], stderr=stderr, check=True,
                   timeout=60, env={**os.environ, **env})


def _journal_env(fd: int) -> dict[str, str]:
    status = os.fstat(fd)
    return {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}", "NO_COLOR": ""}


def _split_priorities(lines: list[str]) -> list[tuple[str, dict[str, object]]]:
    return [(line[:3], json.loads(line[3:])) for line in lines]


def test_journal_file_gets_priorities_and_the_call_id(tmp_path: Path) -> None:
    log = tmp_path / "journal"
    with open(log, "wb") as stream:
        _run(stream.fileno(), _journal_env(stream.fileno()), "structlog")
    records = _split_priorities(log.read_text().splitlines())
    assert [prefix for prefix, _ in records] == [*_PRIORITIES, "<6>"]
    assert [r["event"] for _, r in records] == ["d", "i", "w", "e", "c", "bound by structlog"]
    assert [r["call"] for _, r in records] == ["10.1-2-3"] * 5 + ["10.4-5-6"]
    assert all(r["program"] == "qrexec-test" for _, r in records)


def test_journal_pipe_gets_priorities(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        _run(write_end, _journal_env(write_end))
        os.close(write_end)
        write_end = -1
        with open(read_end, "rb", closefd=False) as reader:
            lines = reader.read().decode().splitlines()
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    assert [prefix for prefix, _ in _split_priorities(lines)] == _PRIORITIES


def test_no_priorities_when_the_journal_is_another_file(tmp_path: Path) -> None:
    log = tmp_path / "not-the-journal"
    other = tmp_path / "journal"
    other.touch()
    with open(log, "wb") as stream, open(other, "rb") as journal:
        _run(stream.fileno(), _journal_env(journal.fileno()))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["event"] for r in records] == ["d", "i", "w", "e", "c"]
    assert all(r["call"] == "10.1-2-3" for r in records)


def _on_a_terminal(env: dict[str, str]) -> str:
    """What the program writes to stderr when stderr is a terminal."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-c", _PROGRAM], stderr=follower,
                                env={**os.environ, "JOURNAL_STREAM": "", **env})
        os.close(follower)
        follower = -1
        output = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 60)
            assert ready, "the program wrote nothing for 60 s"
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(60) == 0
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    return output.decode()


def test_a_terminal_gets_colour() -> None:
    text = _on_a_terminal({"NO_COLOR": ""})
    # The console format, its level names coloured (each its own colour).
    assert not text.lstrip().startswith("{") and "10.1-2-3" in text
    coloured = re.findall(r"\[(?:\x1b\[[0-9;]*m)+(debug|info|warning|error|critical)", text)
    assert coloured == ["debug", "info", "warning", "error", "critical"], text


@pytest.mark.parametrize("value", ["1", "yes"])
def test_no_colour_with_no_color(value: str) -> None:
    text = _on_a_terminal({"NO_COLOR": value})
    assert "\x1b[" not in text
    assert "[critical ] c" in text and "call=10.1-2-3" in text


def test_no_colour_for_a_console_format_file(tmp_path: Path) -> None:
    code = ("import sys\nfrom qrexec_trio._logging import configure_logging, get_logger\n"
            "configure_logging('info', json=False)\nget_logger('t').warning('plain')\n")
    log = tmp_path / "log"
    with open(log, "wb") as stream:
        subprocess.run([sys.executable, "-c", code], stderr=stream, check=True, timeout=60,
                       env={**os.environ, "NO_COLOR": ""})
    text = log.read_text()
    assert "[warning  ] plain" in text and "\x1b[" not in text


_RELAY = """
from qrexec_trio._logging import announce, configure_logging, relay
configure_logging("warning", json={json}, program="qrexec-trio world")
relay({{"event": "hidden", "level": "info", "program": "qrexec-agent"}})
relay({{"event": "shown", "level": "warning", "program": "qrexec-agent",
        "timestamp": "2000-01-01T00:00:00Z", "call": "10.513"}})
announce("work -> vault demo.Echo: allowed, exit 0", status=0)
"""


def test_relayed_records_keep_their_fields_and_pass_the_threshold(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", _RELAY.format(json=True)],
                            capture_output=True, text=True, check=True, timeout=60)
    shown, said = (json.loads(line) for line in result.stderr.splitlines())
    assert (shown["event"], shown["program"], shown["timestamp"], shown["call"],
            shown["level"]) == ("shown", "qrexec-agent", "2000-01-01T00:00:00Z", "10.513",
                                "warning")
    # A line per call is said whatever the level; for machines, with its fields.
    assert (said["event"], said["status"], said["level"], said["program"]) == (
        "work -> vault demo.Echo: allowed, exit 0", 0, "info", "qrexec-trio world")


def test_said_lines_are_plain_text_for_people() -> None:
    result = subprocess.run([sys.executable, "-c", _RELAY.format(json=False)],
                            capture_output=True, text=True, check=True, timeout=60)
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and "shown" in lines[0] and "program=qrexec-agent" in lines[0]
    assert lines[1] == "work -> vault demo.Echo: allowed, exit 0"


# -- one line per call ---------------------------------------------------------------

POLICY_D = "/w/policy.d"


def _citer(file_name: str, line: int) -> str:
    return f"world.toml:{40 + line}"


def _daemon(event: str, call: str = "10.13-15-16", **fields: object) -> dict[str, object]:
    context = {"source": "work", "target": "vault", "service": "demo.Echo"}
    return {**context, **fields, "event": event, "call": call, "program": "qrexec-daemon"}


def _agent(event: str, call: str, **fields: object) -> dict[str, object]:
    return {**fields, "event": event, "call": call, "program": "qrexec-agent"}


DECISION = _daemon("policy decision", result="allow", target="vault", reason="allowed by rule",
                   rule=f"{POLICY_D}/00-rules.policy:2")
LEG = _daemon("target leg open", target="vault", target_call="11.513")
CALLER = [_agent("request forwarded", "10.13-15-16", target="vault", service="demo.Echo"),
          _agent("call finished", "10.13-15-16", target="vault", service="demo.Echo",
                 status=3)]
LEG_RECORDS = [_agent("running", "11.513", domain=0, what="demo.Echo+"),
               _agent("finished", "11.513", domain=0, status=3)]


def _feed(lines: CallLines, records: list[tuple[str, dict[str, object]]],
          now: float = 0.0) -> list[str]:
    said = []
    for vm, record in records:
        said += [line.text for line in lines.feed(vm, record, now)]
    return said


def _calls() -> CallLines:
    return CallLines(policy_file_citer(POLICY_D, _citer))


ALLOWED_LINE = "work -> vault demo.Echo: allowed by world.toml:42, exit 3"


@pytest.mark.parametrize("order", ["as written", "leg before its daemon", "status first"])
def test_an_allowed_call_is_one_line_whatever_the_order(order: str) -> None:
    records = {
        "as written": [("work", CALLER[0]), ("work", DECISION), ("work", LEG),
                       *[("vault", r) for r in LEG_RECORDS], ("work", CALLER[1]),
                       ("work", _daemon("call finished"))],
        "leg before its daemon": [("work", CALLER[0]), ("work", DECISION),
                                  *[("vault", r) for r in LEG_RECORDS], ("work", LEG),
                                  ("work", CALLER[1]), ("work", _daemon("call finished"))],
        "status first": [("work", CALLER[0]), ("work", CALLER[1]),
                         *[("vault", r) for r in LEG_RECORDS], ("work", DECISION),
                         ("work", LEG)],
    }[order]
    lines = _calls()
    said = _feed(lines, records)
    said += [line.text for line in lines.due(HOLD * 2)]
    assert said == [ALLOWED_LINE]


def test_a_denied_call_cites_its_rule_once() -> None:
    decision = _daemon("policy decision", result="deny", target=None, reason="denied by rule",
                       rule=f"{POLICY_D}/00-rules.policy:3")
    lines = _calls()
    said = _feed(lines, [("work", CALLER[0]), ("work", decision),
                         ("work", _daemon("request denied")),
                         ("work", _agent("request refused by dom0", "10.13-15-16"))])
    assert said == ["work -> vault demo.Echo: denied by world.toml:43"]
    assert [line.text for line in lines.due(HOLD * 1000)] == []


def test_no_rule_says_why() -> None:
    decision = _daemon("policy decision", result="deny", target=None,
                       reason="no matching rule", rule="")
    said = _feed(_calls(), [("work", decision), ("work", _daemon("request denied"))])
    assert said == ["work -> vault demo.Echo: denied (no matching rule)"]


def test_a_command_from_dom0_is_said_once_it_cannot_be_a_leg() -> None:
    lines = _calls()
    run = [_agent("running", "11.513", domain=0, what="shell command"),
           _agent("finished", "11.513", domain=0, status=5)]
    assert _feed(lines, [("vault", r) for r in run]) == []
    assert [line.text for line in lines.due(HOLD / 2)] == []
    assert [line.text for line in lines.due(HOLD)] == ["dom0 -> vault (shell command): exit 5"]
    # The port is used again at once: the first command is said, not merged.
    lines = _calls()
    said = _feed(lines, [("vault", r) for r in run + run])
    assert said == ["dom0 -> vault (shell command): exit 5"]


def test_a_leg_named_late_is_no_command_of_its_own() -> None:
    lines = _calls()
    _feed(lines, [("work", CALLER[0]), ("work", DECISION), ("vault", LEG_RECORDS[0]),
                  ("vault", LEG_RECORDS[1])])
    said = _feed(lines, [("work", LEG), ("work", CALLER[1])])
    assert said == [ALLOWED_LINE]
    assert [line.text for line in lines.due(HOLD * 2)] == []


def test_a_dispvm_call_names_the_vm_it_went_to() -> None:
    decision = {**DECISION, "target": "@dispvm:dvm"}
    leg = _daemon("target leg open", target="disp1", target_call="1000.513")
    caller = [{**record, "target": "@dispvm"} for record in CALLER]
    lines = _calls()
    said = _feed(lines, [("work", caller[0]), ("work", {**decision, "target": "@dispvm"}),
                         ("work", leg), ("work", caller[1])])
    assert said == ["work -> @dispvm demo.Echo: allowed by world.toml:42 (to disp1), exit 3"]


def test_a_failed_call_says_so() -> None:
    said = _feed(_calls(), [("work", DECISION),
                            ("work", _daemon("call failed", error="target VM did not start"))])
    assert said == ["work -> vault demo.Echo: allowed by world.toml:42, "
                    "failed: target VM did not start"]


def test_rules_of_other_files_are_cited_as_they_are() -> None:
    cite = policy_file_citer(POLICY_D, _citer)
    assert cite(f"{POLICY_D}/00-rules.policy:1") == "world.toml:41"
    assert cite("/etc/qubes/policy.d/30-user.policy:7") == "/etc/qubes/policy.d/30-user.policy:7"
    assert cite("not a location") == "not a location"
