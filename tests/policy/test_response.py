"""Decisions as key=value lines (wire-protocol.md §9)."""

from __future__ import annotations

from pathlib import Path

import pytest

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


class TestParseResponse:
    """Reading a response back, by the policy daemon client's rules."""

    def test_allow_round_trips_through_format_and_parse(self) -> None:
        from qrexec_trio.policy import parse_response

        text = (b"user=DEFAULT\nresult=allow\ntarget=work\nautostart=True\n"
                b"requested_target=@default\n")
        verdict = parse_response(text)
        assert (verdict.allowed, verdict.target, verdict.user, verdict.autostart) == (
            True, "work", "DEFAULT", True)
        assert verdict.requested_target == "@default"

    def test_deny_and_unknown_keys(self) -> None:
        from qrexec_trio.policy import parse_response

        assert not parse_response(b"result=deny\n").allowed
        assert parse_response(b"result=deny\npolicy_source=x").allowed is False

    @pytest.mark.parametrize("text", [
        b"", b"result=maybe", b"result=allow", b"result=deny\nuser=x", b"result=deny\nnoequals",
        b"result=deny\nresult=deny", b"result=deny\0", b"x" * 5000,
        b"user=u\nresult=allow\ntarget=t\nautostart=yes\nrequested_target=t",
    ])
    def test_malformed_responses_are_refused(self, text: bytes) -> None:
        from qrexec_trio.policy import MalformedResponse, parse_response

        with pytest.raises(MalformedResponse):
            parse_response(text)
