"""The ask flow: a prompt program, no prompt, and --assume-yes-for-ask."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from qrexec_trio.policy import (
    Action,
    Decision,
    Question,
    ask_program,
    program_prompt,
    resolve_ask,
)

from .helpers import decide, one_file

POLICY = """\
test.Svc * work vault deny
test.Svc * work @anyvm ask default_target=personal
test.Allow * work @anyvm allow
"""


def _prompt_program(tmp_path: Path, body: str, name: str = "prompt") -> Path:
    """An executable Python script; ``body`` sees ``question`` (the decoded stdin)
    and the script also saves it beside itself for inspection."""
    path = tmp_path / name
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, sys, time\n"
        "question = json.load(sys.stdin)\n"
        f"open({str(path) + '.question'!r}, 'w').write(json.dumps(question))\n"
        f"{body}\n"
    )
    path.chmod(0o755)
    return path


def _ask(tmp_path: Path, target: str = "@default") -> Decision:
    decision = decide(one_file(tmp_path, POLICY), "work", target, "test.Svc")
    assert decision.action is Action.ASK
    return decision


def test_prompt_receives_the_question_as_json_and_picks_a_target(tmp_path: Path) -> None:
    program = _prompt_program(tmp_path, "print('fedora')")
    decision = resolve_ask(_ask(tmp_path), assume_yes=False,
                           prompt=program_prompt([str(program)], timeout=30))
    assert decision.action is Action.ALLOW
    assert decision.target == "fedora"
    question = json.loads(Path(str(program) + ".question").read_text())
    assert question == {
        "source": "work",
        "service": "test.Svc",
        "argument": "",
        "requested_target": "@default",
        "targets": ["disp7", "dvm", "fedora", "personal", "@dispvm:dvm"],  # never the caller
        "default_target": "personal",
    }


def test_empty_answer_denies(tmp_path: Path) -> None:
    program = _prompt_program(tmp_path, "pass")
    decision = resolve_ask(_ask(tmp_path), assume_yes=False,
                           prompt=program_prompt([str(program)], timeout=30))
    assert decision.action is Action.DENY
    assert decision.target is None


@pytest.mark.parametrize(
    "body",
    [
        "print('vault')",  # denied by the policy, so never offered
        "print('dom0')",
        "print('nobody')",
        "print('personal', 'fedora')",
        "print('x' * 1000)",
        "sys.stdout.buffer.write(b'personal\\xff')",
        "print('personal'); sys.exit(1)",
        "time.sleep(30)",
    ],
)
def test_bad_or_late_answers_deny(tmp_path: Path, body: str) -> None:
    program = _prompt_program(tmp_path, body)
    decision = resolve_ask(_ask(tmp_path), assume_yes=False,
                           prompt=program_prompt([str(program)], timeout=2))
    assert decision.action is Action.DENY


def test_missing_program_denies(tmp_path: Path) -> None:
    decision = resolve_ask(_ask(tmp_path), assume_yes=False,
                           prompt=program_prompt([str(tmp_path / "absent")], timeout=5))
    assert decision.action is Action.DENY


def test_program_is_run_as_argv_never_through_a_shell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where a shell would run "touch pwned"
    canary = tmp_path / "pwned"
    program = _prompt_program(tmp_path, "print('personal')", name="ask; touch pwned")
    decision = resolve_ask(_ask(tmp_path), assume_yes=False,
                           prompt=program_prompt([str(program)], timeout=30))
    assert decision.target == "personal"
    assert not canary.exists()


def test_ask_program_returns_the_answer_text(tmp_path: Path) -> None:
    program = _prompt_program(tmp_path, "print('  personal  ')")
    question = Question("work", "test.Svc", "", "@default", ("personal",), None)
    assert ask_program([str(program)], question, timeout=30) == "personal"


def test_no_prompt_configured_denies_with_a_log_line(tmp_path: Path) -> None:
    asked = _ask(tmp_path)
    with capture_logs() as logs:
        decision = resolve_ask(asked, assume_yes=False, prompt=None)
    assert decision.action is Action.DENY
    assert decision.reason == "ask: no prompt configured"
    assert [entry["event"] for entry in logs] == ["ask denied: no prompt program"]
    assert logs[0]["log_level"] == "warning"


def test_assume_yes_takes_the_default_target(tmp_path: Path) -> None:
    decision = resolve_ask(_ask(tmp_path), assume_yes=True, prompt=None)
    assert decision.action is Action.ALLOW
    assert decision.target == "personal"


def test_assume_yes_takes_the_named_target_over_default_target(tmp_path: Path) -> None:
    decision = resolve_ask(_ask(tmp_path, "fedora"), assume_yes=True, prompt=None)
    assert (decision.action, decision.target) == (Action.ALLOW, "fedora")


def test_assume_yes_without_any_default_denies(tmp_path: Path) -> None:
    cache = one_file(tmp_path, "test.Svc * work @anyvm ask\n")
    asked = decide(cache, "work", "@default", "test.Svc")
    assert asked.action is Action.ASK
    assert resolve_ask(asked, assume_yes=True, prompt=None).action is Action.DENY


def test_prompt_is_not_consulted_for_allow_or_deny(tmp_path: Path) -> None:
    def refuse_to_be_called(question: Question) -> str | None:
        raise AssertionError("prompt called")

    cache = one_file(tmp_path, POLICY)
    for target, call in (("personal", "test.Allow"), ("vault", "test.Svc")):
        decision = decide(cache, "work", target, call)
        assert resolve_ask(decision, assume_yes=False, prompt=refuse_to_be_called) == decision


def test_pluggable_prompt_callable(tmp_path: Path) -> None:
    asked: list[Question] = []

    def prompt(question: Question) -> str | None:
        asked.append(question)
        return question.targets[0]

    decision = resolve_ask(_ask(tmp_path, "personal"), assume_yes=False, prompt=prompt)
    assert decision.target == "disp7"
    assert asked[0].requested_target == "personal"
    assert asked[0].default_target == "personal"
