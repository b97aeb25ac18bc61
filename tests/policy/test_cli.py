"""``qrexec-policy`` and ``qrexec-trio policy lint`` called as functions."""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from qrexec_trio.roles.policy import lint_main, main

from .helpers import policy_d, r2_dir, write

POLICY = """\
test.Svc * work personal allow
test.Svc * work vault deny
test.Svc * work @tag:trusted allow user=root
test.Ask * work @anyvm ask default_target=personal
test.Redirect * work @default allow target=personal
"""


def _run(tmp_path: Path, *args: str, policy: str = POLICY) -> tuple[int, str, list[Any]]:
    root = policy_d(tmp_path, {"50-test.policy": policy})
    argv = ["--policy-dir", str(tmp_path / "no-r2"), "--policy-d", str(root), *args]
    return _call(main, argv)


def _call(function: Any, argv: list[str]) -> tuple[int, str, list[Any]]:
    """Run a CLI entry point; its logs are the JSON lines it writes to stderr."""
    out, err = io.StringIO(), io.StringIO()
    with capture_logs() as captured, redirect_stdout(out), redirect_stderr(err):
        status = function(argv)
    logs = [json.loads(line) for line in err.getvalue().splitlines() if line.startswith("{")]
    return status, out.getvalue(), logs + captured


def test_allow_prints_key_value_lines(tmp_path: Path) -> None:
    # The reference's three-argument evaluator form: decide and print, no connection.
    status, out, logs = _run(tmp_path, "--", "work", "personal", "test.Svc")
    assert status == 0
    assert out == (
        "user=DEFAULT\nresult=allow\ntarget=personal\nautostart=True\nrequested_target=personal\n"
    )
    decision_logs = [e for e in logs if e["event"] == "policy decision"]
    assert decision_logs[0]["result"] == "allow"
    _, _, logs = _run(tmp_path, "--just-evaluate", "--", "work", "personal", "test.Svc",
                      "SOCKET7")
    decision_logs = [e for e in logs if e["event"] == "policy decision"]
    assert decision_logs[0]["request_id"] == "SOCKET7"


def test_deny_prints_result_deny(tmp_path: Path) -> None:
    status, out, _ = _run(tmp_path, "--", "work", "vault", "test.Svc", "SOCKET7")
    assert (status, out) == (1, "result=deny\n")


def test_redirect_is_printed(tmp_path: Path) -> None:
    status, out, _ = _run(tmp_path, "--", "work", "@default", "test.Redirect")
    assert status == 0
    assert "target=personal\n" in out
    assert "requested_target=@default\n" in out


@pytest.mark.parametrize(
    ("target", "service", "status"),
    [("personal", "test.Svc", 0), ("vault", "test.Svc", 1), ("personal", "test.Other", 1),
     ("dom0", "test.Svc", 1)],
)
def test_just_evaluate_exit_status_and_silence(tmp_path: Path, target: str, service: str,
                                               status: int) -> None:
    result, out, _ = _run(tmp_path, "--just-evaluate", "--", "work", target, service, "7")
    assert (result, out) == (status, "")


@pytest.mark.parametrize(
    "request_args",
    [
        ["work", "personal", "test/Svc", "7"],
        ["work", "personal", "test.Svc$x", "7"],
        ["work", "personal", "test.Svc+" + "a" * 65_000, "7"],
        ["-work", "personal", "test.Svc", "7"],
        ["work", "--just-evaluate", "test.Svc", "7"],
        ["work", "personal", "test.Svc", "bad\nid"],
        ["work", "personal", "test.Svc", "x" * 32],
        ["work", "personal", "test.Svc", ""],
    ],
)
def test_invalid_requests_are_denied(tmp_path: Path, request_args: list[str]) -> None:
    status, out, _ = _run(tmp_path, "--", *request_args)
    assert (status, out) == (1, "result=deny\n")


def test_without_system_info_tags_do_not_exist(tmp_path: Path) -> None:
    # vault would match @tag:trusted with a registry; the minimal one has no tags,
    # and the explicit deny for vault comes first anyway: use a fresh name.
    status, _, _ = _run(tmp_path, "--", "work", "other", "test.Svc", "7",
                        policy="test.Svc * work @tag:trusted allow\n")
    assert status == 1


def test_system_info_file(tmp_path: Path) -> None:
    info = {"domains": {"dom0": {"type": "AdminVM"}, "work": {"type": "AppVM"},
                        "other": {"type": "AppVM", "tags": ["trusted"]}}}
    path = write(tmp_path / "system.json", json.dumps(info))
    status, out, _ = _run(tmp_path, "--system-info", str(path), "--",
                          "work", "other", "test.Svc")
    assert status == 0
    assert "user=root\n" in out


def test_unusable_system_info_denies(tmp_path: Path) -> None:
    path = write(tmp_path / "system.json", '{"domains": {"work": {"type": "Laptop"}}}')
    status, out, logs = _run(tmp_path, "--system-info", str(path), "--",
                             "work", "personal", "test.Svc", "7")
    assert (status, out) == (1, "result=deny\n")
    assert any(e["event"] == "system info unreadable" for e in logs)


def test_ask_without_prompt_denies(tmp_path: Path) -> None:
    status, out, logs = _run(tmp_path, "--", "work", "@default", "test.Ask", "7")
    assert (status, out) == (1, "result=deny\n")
    assert any(e["event"] == "ask denied: no prompt program" for e in logs)


def test_ask_with_assume_yes(tmp_path: Path) -> None:
    status, out, _ = _run(tmp_path, "--assume-yes-for-ask", "--",
                          "work", "personal", "test.Ask")
    assert status == 0
    assert "target=personal\n" in out


def test_assume_yes_for_default_needs_the_default_target_to_exist(tmp_path: Path) -> None:
    # A registry that lacks default_target=personal cannot offer it; one that
    # has it (a real one, or the one guessed from the request and the rules'
    # names) takes it.
    args = ("--assume-yes-for-ask", "--", "work", "@default", "test.Ask")
    info = {"domains": {"dom0": {"type": "AdminVM"}, "work": {"type": "AppVM"}}}
    path = write(tmp_path / "without.json", json.dumps(info))
    assert _run(tmp_path, "--system-info", str(path), *args)[:2] == (1, "result=deny\n")
    info["domains"]["personal"] = {"type": "AppVM"}
    path = write(tmp_path / "system.json", json.dumps(info))
    for options in (("--system-info", str(path)), ()):
        status, out, _ = _run(tmp_path, *options, *args)
        assert status == 0
        assert "target=personal\n" in out


def test_ask_with_assume_yes_and_just_evaluate(tmp_path: Path) -> None:
    status, out, _ = _run(tmp_path, "--assume-yes-for-ask", "--just-evaluate", "--",
                          "work", "personal", "test.Ask", "7")
    assert (status, out) == (0, "")


def test_ask_with_prompt_program(tmp_path: Path) -> None:
    program = tmp_path / "prompt"
    program.write_text(f"#!{sys.executable}\nimport sys, json\n"
                       "q = json.load(sys.stdin)\nprint(q['targets'][-1])\n")
    program.chmod(0o755)
    status, out, _ = _run(tmp_path, "--ask-program", str(program), "--",
                          "work", "@default", "test.Ask")
    assert status == 0
    # The registry guessed from the request and the rules' names: dom0 (never
    # offered to @anyvm), the caller work (never offered) and personal.
    assert "target=personal\n" in out


def test_r2_policy_dir(tmp_path: Path) -> None:
    root = r2_dir(tmp_path, {"qubes.OpenInVM": "$anyvm $dispvm allow\n$anyvm $anyvm ask\n"})
    status, out, _ = _call(main, ["--policy-dir", str(root), "--policy-d",
                                  str(tmp_path / "none"), "--assume-yes-for-ask", "--",
                                  "work", "personal", "qubes.OpenInVM"])
    assert status == 0
    assert "target=personal\n" in out


def test_usage_errors_and_help(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["work", "personal"]) == 2
    assert main(["--frobnicate", "--", "a", "b", "c", "d"]) == 2
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--system-info" in help_text
    assert "minimal registry" in help_text


# --- lint ------------------------------------------------------------------------

def test_lint_clean_directory(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"50.policy": POLICY})
    assert _call(lint_main, [str(root)])[:2] == (0, "")


def test_lint_prints_every_error_as_file_line_message(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {
        "10.policy": "test.Svc * work personal allow\ntest.Svc * @nope x allow\n",
        "20.policy": "\n!include missing\n",
    })
    (root / "30.policy").mkdir()
    r2 = r2_dir(tmp_path, {"test.Svc": "$anyvm $anyvm allow, user=root\n"})
    status, out, _ = _call(lint_main, [str(root), "--policy-dir", str(r2)])
    assert status == 1
    assert out.splitlines() == [
        f"{r2}/test.Svc:1: unexpected field 'user=root': options are glued to the action"
        " with commas, without spaces",
        f"{root}/10.policy:2: unknown keyword '@nope'",
        f"{root}/20.policy:2: cannot include '{root}/missing': cannot read:"
        " No such file or directory",
        f"{root}/30.policy:0: is a directory, not a policy file",
    ]


def test_lint_of_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    status, out, _ = _call(lint_main, [str(tmp_path / "absent")])
    assert status == 1
    assert out.startswith(f"{tmp_path / 'absent'}:0: ")


def test_lint_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert lint_main(["--bogus"]) == 2
    assert lint_main(["--help"]) == 0
    assert "FILE:LINE: MESSAGE" in capsys.readouterr().out
