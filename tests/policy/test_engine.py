"""Actions, parameters, ordering and request validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrexec_trio.policy import (
    Action,
    DomainInfo,
    Policy,
    PolicyCache,
    Request,
    SystemInfo,
    evaluate,
)

from .helpers import SYSTEM, cache_for, decide, one_file

# --- each action, each parameter -------------------------------------------------

# (rule, requested target, action, resolved target, user, autostart, notify)
ACTION_CASES = [
    ("test.Svc * work personal allow", "personal", Action.ALLOW, "personal", None, True, False),
    ("test.Svc * work personal allow user=root", "personal", Action.ALLOW, "personal", "root",
     True, False),
    ("test.Svc * work personal allow autostart=no", "personal", Action.ALLOW, "personal", None,
     False, False),
    ("test.Svc * work personal allow notify=yes", "personal", Action.ALLOW, "personal", None,
     True, True),
    ("test.Svc * work personal allow target=vault", "personal", Action.ALLOW, "vault", None,
     True, False),
    ("test.Svc * work @default allow target=vault", "@default", Action.ALLOW, "vault", None,
     True, False),
    ("test.Svc * work personal allow target=@adminvm", "personal", Action.ALLOW, "dom0", None,
     True, False),
    ("test.Svc * work personal allow target=dom0", "personal", Action.ALLOW, "dom0", None,
     True, False),
    ("test.Svc * work personal allow target=@dispvm", "personal", Action.ALLOW, "@dispvm:dvm",
     None, True, False),
    ("test.Svc * work personal allow target=$dispvm:dvm", "personal", Action.ALLOW,
     "@dispvm:dvm", None, True, False),
    ("test.Svc * work @dispvm allow", "@dispvm", Action.ALLOW, "@dispvm:dvm", None, True, False),
    ("test.Svc * work @dispvm:dvm allow", "@dispvm:dvm", Action.ALLOW, "@dispvm:dvm", None,
     True, False),
    ("test.Svc * work personal deny", "personal", Action.DENY, None, None, True, True),
    ("test.Svc * work personal deny notify=no", "personal", Action.DENY, None, None, True,
     False),
    ("test.Svc * work personal ask", "personal", Action.ASK, None, None, True, False),
    ("test.Svc * work personal ask user=root autostart=no", "personal", Action.ASK, None,
     "root", False, False),
]


@pytest.mark.parametrize(
    ("rule", "requested", "action", "target", "user", "autostart", "notify"), ACTION_CASES
)
def test_action_and_params(tmp_path: Path, rule: str, requested: str, action: Action,
                           target: str | None, user: str | None, autostart: bool,
                           notify: bool) -> None:
    decision = decide(one_file(tmp_path, rule + "\n"), "work", requested, "test.Svc")
    assert decision.action is action, decision.reason
    assert decision.target == target
    assert decision.user == user
    assert decision.autostart is autostart
    assert decision.notify is notify
    assert decision.rule is not None
    assert decision.rule.line == 1


def test_no_matching_rule_denies(tmp_path: Path) -> None:
    decision = decide(one_file(tmp_path, "other.Svc * @anyvm @anyvm allow\n"),
                      "work", "personal", "test.Svc")
    assert decision.action is Action.DENY
    assert decision.rule is None
    assert decision.reason == "no matching rule"


def test_no_policy_at_all_denies(tmp_path: Path) -> None:
    cache = cache_for(tmp_path)
    assert decide(cache, "work", "personal", "test.Svc").action is Action.DENY


def test_missing_directories_deny_without_error(tmp_path: Path) -> None:
    cache = PolicyCache(str(tmp_path / "nope-r2"), str(tmp_path / "nope.d"))
    assert cache.policy().errors == ()
    assert not decide(cache, "work", "personal", "test.Svc").allowed


def test_allow_without_any_target_denies(tmp_path: Path) -> None:
    decision = decide(one_file(tmp_path, "test.Svc * work @default allow\n"),
                      "work", "@default", "test.Svc")
    assert decision.action is Action.DENY
    assert "no target" in decision.reason


def test_dispvm_without_default_template_denies(tmp_path: Path) -> None:
    decision = decide(one_file(tmp_path, "test.Svc * vault @dispvm allow\n"),
                      "vault", "@dispvm", "test.Svc")
    assert decision.action is Action.DENY
    assert decision.rule is not None


# --- service and argument columns ------------------------------------------------

@pytest.mark.parametrize(
    ("column", "call", "matches"),
    [
        ("test.Svc *", "test.Svc", True),
        ("test.Svc *", "test.Svc+x", True),
        ("test.Svc +", "test.Svc", True),
        ("test.Svc +", "test.Svc+", True),
        ("test.Svc +", "test.Svc+x", False),
        ("test.Svc +x", "test.Svc+x", True),
        ("test.Svc +x", "test.Svc+xy", False),
        ("test.Svc +x", "test.Svc", False),
        ("test.Svc +a+b", "test.Svc+a+b", True),
        ("test.Svc +-rf", "test.Svc+-rf", True),
        ("* *", "any.Thing+arg", True),
        ("* +x", "any.Thing+x", True),
        ("* +x", "any.Thing+y", False),
        ("test.Svc *", "test.Svcx", False),
        ("test.Svc *", "Test.Svc", False),
    ],
)
def test_service_and_argument_columns(tmp_path: Path, column: str, call: str,
                                      matches: bool) -> None:
    decision = decide(one_file(tmp_path, f"{column} work personal allow\n"),
                      "work", "personal", call)
    assert decision.allowed is matches


def test_r2_file_covers_every_argument_of_its_service(tmp_path: Path) -> None:
    cache = cache_for(tmp_path, r2={"test.Svc": "work personal allow\n"})
    assert decide(cache, "work", "personal", "test.Svc+anything").allowed
    assert not decide(cache, "work", "personal", "test.Other").allowed


# --- order -----------------------------------------------------------------------

def test_first_match_wins_within_a_file(tmp_path: Path) -> None:
    cache = one_file(tmp_path, "test.Svc * work personal deny\ntest.Svc * work personal allow\n")
    decision = decide(cache, "work", "personal", "test.Svc")
    assert decision.action is Action.DENY
    assert decision.rule is not None
    assert decision.rule.line == 1


def test_first_match_across_files_in_c_locale_order(tmp_path: Path) -> None:
    # C-locale order is byte order: "10" < "9" and "Z" < "a", unlike human collation.
    cache = cache_for(tmp_path, multi={
        "9-late.policy": "test.Svc * work personal deny\n",
        "10-early.policy": "test.Svc * work personal allow target=vault\n",
        "a.policy": "test.Other * work personal deny\n",
        "Z.policy": "test.Other * work personal allow\n",
    })
    first = decide(cache, "work", "personal", "test.Svc")
    assert first.target == "vault"
    assert first.rule is not None
    assert first.rule.path.endswith("10-early.policy")
    second = decide(cache, "work", "personal", "test.Other")
    assert second.allowed
    assert second.rule is not None
    assert second.rule.path.endswith("Z.policy")


def test_only_dot_policy_files_are_read(tmp_path: Path) -> None:
    cache = cache_for(tmp_path, multi={
        "50-a.policy~": "test.Svc * work personal allow\n",
        ".hidden.policy": "test.Svc * work personal allow\n",
        "50-b.policy": "",
    })
    assert not decide(cache, "work", "personal", "test.Svc").allowed


def test_r2_files_come_before_policy_d(tmp_path: Path) -> None:
    cache = cache_for(
        tmp_path,
        r2={"test.Svc": "work personal deny\n"},
        multi={"00-first.policy": "test.Svc * work personal allow\n"},
    )
    assert decide(cache, "work", "personal", "test.Svc").action is Action.DENY


def test_wildcard_service_rules_keep_their_place_among_named_ones(tmp_path: Path) -> None:
    cache = one_file(tmp_path, "test.A * work personal deny\n* * work personal allow\n"
                               "test.B * work personal deny\n")
    assert not decide(cache, "work", "personal", "test.A").allowed
    assert decide(cache, "work", "personal", "test.B").allowed
    assert decide(cache, "work", "personal", "test.C").allowed


# --- redirect --------------------------------------------------------------------

def test_redirect_is_not_checked_again(tmp_path: Path) -> None:
    cache = one_file(tmp_path, "test.Svc * work vault deny\n"
                               "test.Svc * work personal allow target=vault\n")
    assert decide(cache, "work", "vault", "test.Svc").action is Action.DENY
    redirected = decide(cache, "work", "personal", "test.Svc")
    assert redirected.action is Action.ALLOW
    assert redirected.target == "vault"
    assert redirected.request.target == "personal"


def test_rules_match_the_requested_target_not_the_redirect(tmp_path: Path) -> None:
    cache = one_file(tmp_path, "test.Svc * work personal allow target=dom0\n")
    assert decide(cache, "work", "personal", "test.Svc").target == "dom0"
    assert not decide(cache, "work", "dom0", "test.Svc").allowed


# --- ask -------------------------------------------------------------------------

ASK_POLICY = """\
test.Svc * work vault deny
test.Svc * work personal allow
test.Svc * work @tag:dvm-tag ask
test.Svc * work @dispvm:dvm allow
test.Svc * work @default ask default_target=personal
test.Svc * work fedora ask target=personal
"""


def test_ask_offers_every_target_the_policy_would_allow_or_ask_for(tmp_path: Path) -> None:
    decision = decide(one_file(tmp_path, ASK_POLICY), "work", "@default", "test.Svc")
    assert decision.action is Action.ASK
    # vault is denied, dom0/work/disp7 have no rule; fedora's rule redirects to personal.
    assert decision.ask_targets == ("dvm", "personal", "@dispvm:dvm")
    assert decision.default_target == "personal"


def test_ask_for_a_named_target_offers_it_but_does_not_preselect_it(tmp_path: Path) -> None:
    # Only default_target= pre-selects (as the reference): the caller does not
    # choose what the user confirms by pressing Enter.
    decision = decide(one_file(tmp_path, ASK_POLICY), "work", "dvm", "test.Svc")
    assert decision.action is Action.ASK
    assert decision.default_target is None
    assert "dvm" in decision.ask_targets


def test_ask_with_redirect_offers_only_the_redirect(tmp_path: Path) -> None:
    decision = decide(one_file(tmp_path, ASK_POLICY), "work", "fedora", "test.Svc")
    assert decision.action is Action.ASK
    assert decision.ask_targets == ("personal",)
    assert decision.default_target is None


def test_ask_default_target_must_be_offered(tmp_path: Path) -> None:
    decision = decide(one_file(tmp_path, "test.Svc * work @default ask default_target=vault\n"
                                         "test.Svc * work vault deny\n"),
                      "work", "@default", "test.Svc")
    # vault is denied, so nothing is left to offer: the ask itself denies.
    assert decision.action is Action.DENY


# --- syntax errors anywhere deny everything ------------------------------------------

def test_syntax_error_in_another_file_denies_every_call(tmp_path: Path) -> None:
    good = {"10-good.policy": "* * @anyvm @anyvm allow\n"}
    assert decide(cache_for(tmp_path, multi=good), "work", "personal", "test.Svc").allowed
    cache = cache_for(tmp_path / "b", multi={**good, "90-bad.policy": "\n\nbad line\n"})
    decision = decide(cache, "work", "personal", "test.Svc")
    assert decision.action is Action.DENY
    assert "90-bad.policy:3" in decision.reason


def test_syntax_error_in_an_r2_file_of_another_service_denies(tmp_path: Path) -> None:
    cache = cache_for(tmp_path, r2={"test.Svc": "$anyvm $anyvm allow\n",
                                    "other.Svc": "$anyvm $anyvm allow,usr=root\n"})
    decision = decide(cache, "work", "personal", "test.Svc")
    assert decision.action is Action.DENY
    assert "other.Svc:1" in decision.reason


# --- request validation: deny, never rewrite -------------------------------------

@pytest.mark.parametrize(
    ("source", "target", "call"),
    [
        ("work", "personal", "test/Svc"),
        ("work", "personal", "../test.Svc"),
        ("work", "personal", "test.Svc$x"),
        ("work", "personal", "test.Svc+$x"),
        ("work", "personal", "test.Svc+a/b"),
        ("work", "personal", "test.Svc+a b"),
        ("work", "personal", ""),
        ("work", "personal", "+arg"),
        ("work", "personal", ".."),
        ("work", "personal", "s" * 256),
        ("work", "personal", "test.Svc+" + "a" * 65_000),
        ("work", "personal", "tést.Svc"),
        ("work", "personal", "test.Svc\n"),
        ("nobody", "personal", "test.Svc"),
        ("-work", "personal", "test.Svc"),
        ("work$", "personal", "test.Svc"),
        ("w" * 32, "personal", "test.Svc"),
        ("work", "nobody", "test.Svc"),
        ("work", "", "test.Svc"),
        ("work", "@anyvm", "test.Svc"),
        ("work", "$anyvm", "test.Svc"),
        ("work", "*", "test.Svc"),
        ("work", "@tag:trusted", "test.Svc"),
        ("work", "@type:AppVM", "test.Svc"),
        ("work", "@dispvm:work", "test.Svc"),  # work is no DispVM template
        ("work", "@dispvm:nobody", "test.Svc"),
        ("work", "@dispvm:$dvm", "test.Svc"),
        ("work", "pers$onal", "test.Svc"),
        ("work", "personal\n", "test.Svc"),
        ("work", "uuid:00000000-0000-0000-0000-000000000000", "test.Svc"),
    ],
)
def test_invalid_requests_are_denied_before_matching(tmp_path: Path, source: str,
                                                     target: str, call: str) -> None:
    cache = one_file(tmp_path, "* * * * allow\n")
    decision = decide(cache, source, target, call)
    assert decision.action is Action.DENY
    assert decision.rule is None
    assert decision.reason.startswith("invalid request")


def test_dollar_in_service_is_not_sanitised_into_a_matching_name(tmp_path: Path) -> None:
    cache = one_file(tmp_path, "test.Svc_x * work personal allow\n"
                               "test.Svc * work personal allow\n")
    assert decide(cache, "work", "personal", "test.Svc_x").allowed
    assert not decide(cache, "work", "personal", "test.Svc$x").allowed


def test_longest_valid_argument_is_accepted(tmp_path: Path) -> None:
    argument = "a" * (64_999 - len("test.Svc+"))
    cache = one_file(tmp_path, "test.Svc * work personal allow\n")
    assert decide(cache, "work", "personal", f"test.Svc+{argument}").allowed
    assert not decide(cache, "work", "personal", f"test.Svc+{argument}a").allowed


def test_dollar_keyword_targets_are_reported_in_at_spelling(tmp_path: Path) -> None:
    cache = one_file(tmp_path, "test.Svc * work @dispvm allow\n")
    decision = decide(cache, "work", "$dispvm", "test.Svc")
    assert decision.allowed
    assert decision.request.target == "@dispvm"


def test_evaluate_function_and_method_agree() -> None:
    policy = Policy([])
    request = Request("work", "personal", "test.Svc")
    assert evaluate(policy, request, SYSTEM) == policy.evaluate(request, SYSTEM)


def test_admin_vm_need_not_be_called_dom0(tmp_path: Path) -> None:
    system = SystemInfo.of([DomainInfo("admin", "AdminVM"), DomainInfo("work", "AppVM")])
    cache = one_file(tmp_path, "test.Svc * work @adminvm allow\n")
    assert decide(cache, "work", "@adminvm", "test.Svc", system).target == "admin"
    assert not decide(cache, "work", "dom0", "test.Svc", system).allowed
