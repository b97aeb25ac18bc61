"""Decisions as key=value lines (wire-protocol.md §9)."""

from __future__ import annotations

from pathlib import Path

from qrexec_trio.policy import Action, Decision, Request, format_response

from .helpers import decide, one_file


def _parse(text: str) -> dict[str, str]:
    """Read a response as the reference reader does: one trailing newline dropped,
    every line key=value, no key twice."""
    assert text.endswith("\n")
    pairs: dict[str, str] = {}
    for line in text[:-1].split("\n"):
        key, sep, value = line.partition("=")
        assert sep, line
        assert key not in pairs, key
        pairs[key] = value
    return pairs


def test_allow_response(tmp_path: Path) -> None:
    decision = decide(one_file(tmp_path, "test.Svc * work @default allow target=vault\n"),
                      "work", "@default", "test.Svc")
    assert format_response(decision) == (
        "user=DEFAULT\nresult=allow\ntarget=vault\nautostart=True\nrequested_target=@default\n"
    )


def test_allow_response_with_user_and_no_autostart(tmp_path: Path) -> None:
    decision = decide(one_file(tmp_path, "test.Svc * work @dispvm allow user=root autostart=no\n"),
                      "work", "$dispvm", "test.Svc")
    assert _parse(format_response(decision)) == {
        "user": "root", "result": "allow", "target": "@dispvm:dvm", "autostart": "False",
        "requested_target": "@dispvm",
    }


def test_deny_response_carries_nothing_else(tmp_path: Path) -> None:
    decision = decide(one_file(tmp_path, "test.Svc * work personal deny\n"),
                      "work", "personal", "test.Svc")
    assert format_response(decision) == "result=deny\n"


def test_unanswered_ask_is_a_deny(tmp_path: Path) -> None:
    decision = decide(one_file(tmp_path, "test.Svc * work personal ask\n"),
                      "work", "personal", "test.Svc")
    assert decision.action is Action.ASK
    assert format_response(decision) == "result=deny\n"


def test_a_value_that_would_break_the_format_is_refused() -> None:
    request = Request("work", "personal", "test.Svc")
    forged = Decision(Action.ALLOW, request, target="vault\nresult=allow")
    assert format_response(forged) == "result=deny\n"
    oversized = Decision(Action.ALLOW, request, target="v" * 5000)
    assert format_response(oversized) == "result=deny\n"
    assert format_response(Decision(Action.ALLOW, request, target=None)) == "result=deny\n"
