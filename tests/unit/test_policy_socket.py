"""The policy socket's request reader and answer formats (pure functions, no I/O)."""

from __future__ import annotations

import pytest

from qrexec_trio.policy import DomainInfo, SystemInfo, Verdict
from qrexec_trio.roles.policy_daemon import (
    EVAL_GUI,
    EVAL_SIMPLE,
    BadRequest,
    EvalQuery,
    PolicyRequest,
    RequestReader,
    eval_call_complete,
    format_eval_answer,
    format_verdict,
    gui_may_ask,
    parse_eval_call,
    parse_request,
)

# What the reference C qrexec-daemon sends (wire-protocol.md §9).
C_DAEMON_REQUEST = (b"source=work\nrequested_source=\nintended_target=personal\n"
                    b"service_and_arg=test.Svc+arg\n\n")


def test_the_c_daemons_request() -> None:
    assert parse_request(C_DAEMON_REQUEST) == PolicyRequest(
        source="work", intended_target="personal", service_and_arg="test.Svc+arg")


def test_byte_by_byte_gives_the_request_at_its_empty_line() -> None:
    reader = RequestReader()
    for index in range(len(C_DAEMON_REQUEST) - 1):
        assert reader.feed(C_DAEMON_REQUEST[index:index + 1]) is None
    request = reader.feed(C_DAEMON_REQUEST[-1:])
    assert request is not None and request.source == "work"
    assert reader.feed(b"more") is request and reader.trailing == 4


def test_flags_and_requested_source() -> None:
    request = parse_request(b"source=a\nintended_target=b\nservice_and_arg=c\n"
                            b"assume_yes_for_ask=yes\njust_evaluate=no\nrequested_source=r\n\n")
    assert request.assume_yes_for_ask and not request.just_evaluate
    assert request.requested_source == "r"


def test_eof_ends_the_request_and_a_last_line_without_newline_counts() -> None:
    reader = RequestReader()
    assert reader.feed(b"source=a\nintended_target=b\nservice_and_arg=c") is None
    assert reader.feed_eof().service_and_arg == "c"
    reader = RequestReader()
    reader.feed(b"source=a\nintended_target=b\nservice_and_arg=c\n")
    assert reader.feed_eof().intended_target == "b"


def test_empty_target_means_default_and_values_may_be_empty() -> None:
    request = parse_request(b"source=a\nintended_target=\nservice_and_arg=c=d\n\n")
    assert (request.intended_target, request.target) == ("", "@default")
    assert request.service_and_arg == "c=d"  # split on the first '=' only


def test_bytes_after_the_empty_line_are_not_a_second_request() -> None:
    reader = RequestReader()
    request = reader.feed(C_DAEMON_REQUEST + b"source=evil\n\n")
    assert request is not None and request.source == "work"
    assert reader.trailing == len(b"source=evil\n\n")


@pytest.mark.parametrize(("data", "why"), [
    (b"domain_id=3\nsource=a\nintended_target=b\nservice_and_arg=c\n\n", "unknown key"),
    (b"source=a\nintended_target=b\nservice_and_arg=c\nprocess_ident=1\n\n", "unknown key"),
    (b"source=a\nsource=a\nintended_target=b\nservice_and_arg=c\n\n", "duplicate"),
    (b"source=a\nintended_target=b\n\n", "missing service_and_arg"),
    (b"\n", "missing source, intended_target, service_and_arg"),
    (b"hello\n", "without '='"),
    (b"source=a\njust_evaluate=maybe\n", "yes or no"),
    (b"source=\xc3\xa9\n", "not ASCII"),
])
def test_bad_requests(data: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        parse_request(data)


def test_a_bad_line_is_refused_before_the_request_ends() -> None:
    reader = RequestReader()
    with pytest.raises(BadRequest, match="unknown key"):
        reader.feed(b"bogus=1\n")


def test_size_is_bounded_with_or_without_newlines() -> None:
    with pytest.raises(BadRequest, match="longer than 100 bytes"):
        RequestReader(limit=100).feed(b"x" * 101)
    reader = RequestReader(limit=100)
    reader.feed(b"source=" + b"a" * 90 + b"\n")  # 98 bytes: fine so far
    with pytest.raises(BadRequest, match="longer than"):
        reader.feed(b"intended_target=b\n")
    # Exactly at the limit is fine.
    request = b"source=a\nintended_target=b\nservice_and_arg=c\n\n"
    assert parse_request(request, limit=len(request)).source == "a"


def test_allow_is_written_as_the_reference_writes_it() -> None:
    verdict = Verdict(allowed=True, target="personal", user="DEFAULT", autostart=True,
                      requested_target="@default")
    assert format_verdict(verdict) == (b"user=DEFAULT\nresult=allow\ntarget=personal\n"
                                       b"autostart=True\nrequested_target=@default")
    no_start = Verdict(allowed=True, target="t", user=None, autostart=False,
                       requested_target="t")
    assert format_verdict(no_start) == (b"user=DEFAULT\nresult=allow\ntarget=t\n"
                                        b"autostart=False\nrequested_target=t")
    assert format_verdict(verdict, just_evaluate=True) == b"result=allow"


def test_deny_and_anything_that_cannot_travel_is_a_deny() -> None:
    assert format_verdict(Verdict(allowed=False)) == b"result=deny"
    assert format_verdict(Verdict(allowed=False), just_evaluate=True) == b"result=deny"
    for bad in ("a\nresult=allow", "a\0", "caf\u00e9"):
        verdict = Verdict(allowed=True, target=bad, user="u", autostart=True,
                          requested_target="t")
        assert format_verdict(verdict) == b"result=deny"
    assert format_verdict(Verdict(allowed=True, target="t", requested_target=None)) == (
        b"result=deny")


# --- policy.EvalSimple / policy.EvalGUI ---------------------------------------------


def test_eval_call() -> None:
    data = b"policy.EvalSimple+qubes.Filecopy+x gui keyword adminvm\0work\0personal"
    assert parse_eval_call(data, EVAL_SIMPLE) == EvalQuery(
        caller="gui", service_and_arg="qubes.Filecopy+x", source="work", target="personal")
    assert format_eval_answer(True) == b"result=allow\n"
    assert format_eval_answer(False) == b"result=deny\n"


@pytest.mark.parametrize(("data", "why"), [
    (b"policy.EvalGUI+d c keyword adminvm\0a\0b", "invoked as"),
    (b"policy.EvalSimple b c d\0e\0f", "needs an argument"),
    (b"policy.EvalSimple+ b c d\0e\0f", "needs an argument"),
    (b"policy.EvalSimple++a b c d\0e\0f", "needs an argument"),
    (b"policy.EvalSimple+a b c d\0" + b"c" * 32 + b"\0d", "source of 32 bytes"),
    (b"policy.EvalSimple+a b c d\0d\0" + b"c" * 64, "target of 64 bytes"),
    (b"policy.EvalSimple+a b c d\0" + b"c" * 31, "no NUL between"),
    (b"policy.EvalSimple+a b c d\0\0d", "source of 0 bytes"),
    (b"unfinished", "no space"),
    (b"policy.EvalSimple+a b c d", "no NUL after"),
    (b"policy.EvalSimple+a b c d\0a b\0c", "invalid qube name"),
    (b"policy.EvalSimple+a b c d\0a\0\xff", "not ASCII"),
])
def test_bad_eval_calls(data: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        parse_eval_call(data, EVAL_SIMPLE)


def test_eval_payload_is_cut_at_96_bytes_as_the_reference_reads() -> None:
    header = b"policy.EvalSimple+a b keyword adminvm\0"
    assert not eval_call_complete(header + b"x" * 95)
    assert eval_call_complete(header + b"x" * 96)
    assert not eval_call_complete(b"no-space-yet\0" + b"x" * 200)
    # Only 96 bytes are read; everything after the NUL in them is the target.
    assert parse_eval_call(header + b"work\0" + b"t" * 63, EVAL_SIMPLE).target == "t" * 63
    with pytest.raises(BadRequest, match="target of 91 bytes"):
        parse_eval_call(header + b"work\0" + b"t" * 63 + b"x" * 40, EVAL_SIMPLE)


def test_eval_gui_needs_the_caller_to_be_both_qubes_guivm() -> None:
    info = SystemInfo.of([
        DomainInfo("a", "AppVM", frozenset({"guivm-gui"})),
        DomainInfo("b", "AppVM", frozenset({"guivm-gui"})),
        DomainInfo("c", "AppVM", frozenset({"guivm-other"})),
    ])
    assert gui_may_ask(info, EvalQuery("gui", "s", "a", "b"))
    assert not gui_may_ask(info, EvalQuery("gui", "s", "a", "c"))
    assert not gui_may_ask(info, EvalQuery("gui", "s", "c", "a"))
    assert not gui_may_ask(info, EvalQuery("gui", "s", "a", "missing"))
    assert not gui_may_ask(info, EvalQuery("other", "s", "a", "b"))
    data = b"policy.EvalGUI+s gui keyword adminvm\0a\0b"
    assert parse_eval_call(data, EVAL_GUI).caller == "gui"
