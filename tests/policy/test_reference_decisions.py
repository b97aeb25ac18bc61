"""Our decisions beside the reference's, as data: one row per request.

The registry is the one the reference's own parser tests use (qubes-core-qrexec
``qrexec/tests/policy_parser.py``, ``SYSTEM_INFO``), so that rows taken from those
tests can be compared as they are; the rest follow the reference's
``qrexec/policy/parser.py`` (``DispVM.match``, ``Allow.evaluate``, ``Ask.evaluate``,
``AbstractPolicy.collect_targets_for_ask``). Every row says what the reference
decides; ``ours`` says where we deliberately decide otherwise, and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qrexec_trio.policy import Action, DomainInfo, PolicyCache, SystemInfo

from .helpers import decide, policy_d


def _domain(name: str, domain_type: str, tags: tuple[str, ...], default_dispvm: str | None,
            template_for_dispvms: bool = False) -> DomainInfo:
    return DomainInfo(name, domain_type, frozenset(tags), default_dispvm, template_for_dispvms)


#: The reference tests' registry (their power states left out: not used here).
REFERENCE_DOMAINS = [
    _domain("dom0", "AdminVM", ("dom0-tag",), "default-dvm"),
    _domain("test-vm1", "AppVM", ("tag1", "tag2"), "default-dvm"),
    _domain("test-vm2", "AppVM", ("tag2",), "default-dvm"),
    _domain("test-vm3", "AppVM", ("tag3",), "default-dvm", template_for_dispvms=True),
    _domain("default-dvm", "AppVM", (), "default-dvm", template_for_dispvms=True),
    _domain("test-invalid-dvm", "AppVM", ("tag1", "tag2"), "test-vm1"),
    _domain("test-no-dvm", "AppVM", ("tag1", "tag2"), None),
    _domain("test-template", "TemplateVM", ("tag1", "tag2"), "default-dvm"),
    _domain("test-standalone", "StandaloneVM", ("tag1", "tag2"), "default-dvm"),
]
REFERENCE = SystemInfo.of(REFERENCE_DOMAINS)
#: The same, plus a qube whose default DispVM template no longer exists.
WITH_GONE_DEFAULT = SystemInfo.of(
    [*REFERENCE_DOMAINS, _domain("test-gone-dvm", "AppVM", (), "no-such-dvm")]
)

ALLOW, DENY, ASK = Action.ALLOW, Action.DENY, Action.ASK
CALL = "test.Service+argument"

#: The reference's TC_40_evaluate policy.
TC_40 = """\
* * test-vm1 test-vm2 allow
* * test-vm1 @default allow target=test-vm2
* * @tag:tag1 test-vm2 ask
* * @tag:tag1 test-vm3 ask default_target=test-vm3
* * @tag:tag2 @anyvm allow
* * test-vm3 @anyvm deny
"""
#: The reference's test_020_collect_targets_for_ask policy, with a last ask rule
#: for @default so that the collected targets become a decision (a rule whose
#: target is @default adds nothing to the collection).
TC_20 = """\
* * test-vm1 test-vm2 allow
* * test-vm1 @anyvm ask
* * test-vm2 @tag:tag1 deny
* * test-vm2 @tag:tag2 allow
* * test-no-dvm @type:AppVM deny
* * @type:AppVM @default allow target=test-vm3
* * @tag:tag1 @type:AppVM allow
* * test-no-dvm @dispvm allow
* * test-standalone @dispvm allow
* * test-standalone @adminvm allow
* * @anyvm @default ask
"""


@dataclass(frozen=True)
class Case:
    #: Which difference the row is about: "dispvm", "redirect", "ask", "unknown".
    topic: str
    policy: str
    source: str
    target: str
    action: Action
    #: allow: where the call goes.
    result: str | None = None
    #: ask: the targets offered, in any order, and the pre-selected one.
    choices: frozenset[str] | None = None
    default: str | None = None
    system: SystemInfo = field(default=REFERENCE, compare=False)
    #: Where we decide otherwise than the reference: why.
    ours: str = ""

    def __str__(self) -> str:
        return f"{self.topic}:{self.source}->{self.target}"


def _set(*names: str) -> frozenset[str]:
    return frozenset(names)


CASES = [
    # --- a rule for @dispvm does not cover a request for @dispvm:T --------------------
    Case("dispvm", "* * @anyvm @dispvm allow", "test-vm1", "@dispvm",
         ALLOW, "@dispvm:default-dvm"),
    Case("dispvm", "* * @anyvm @dispvm allow", "test-vm1", "@dispvm:default-dvm", DENY),
    Case("dispvm", "* * @anyvm @dispvm allow", "test-vm1", "@dispvm:test-vm3", DENY),
    Case("dispvm", "* * @anyvm @dispvm deny\n* * @anyvm @anyvm allow", "test-vm1",
         "@dispvm:default-dvm", ALLOW, "@dispvm:default-dvm"),
    # ... while a rule for @dispvm:T covers @dispvm when T is the caller's default
    Case("dispvm", "* * @anyvm @dispvm:default-dvm allow", "test-vm1", "@dispvm",
         ALLOW, "@dispvm:default-dvm"),
    Case("dispvm", "* * @anyvm @dispvm:default-dvm allow", "test-vm1", "@dispvm:default-dvm",
         ALLOW, "@dispvm:default-dvm"),
    Case("dispvm", "* * @anyvm @dispvm:@tag:tag3 allow", "test-vm1", "@dispvm:test-vm3",
         ALLOW, "@dispvm:test-vm3"),
    Case("dispvm", "* * test-vm3 @dispvm allow", "test-vm3", "@dispvm",
         ALLOW, "@dispvm:default-dvm"),
    Case("dispvm", "* * test-no-dvm @dispvm allow", "test-no-dvm", "@dispvm", DENY),
    Case("dispvm", TC_40, "test-vm2", "@dispvm", ALLOW, "@dispvm:default-dvm"),
    # --- allow target=X: X must exist --------------------------------------------------
    Case("redirect", "* * test-vm3 @anyvm allow target=no-such-vm", "test-vm3", "@default",
         DENY),
    Case("redirect", "* * @anyvm @anyvm allow target=no-such-vm", "test-vm1", "test-vm2",
         DENY),
    Case("redirect", "* * @anyvm @anyvm allow target=@dispvm:test-vm1", "test-vm1",
         "test-vm2", DENY),
    Case("redirect", "* * @anyvm @anyvm allow target=@dispvm", "test-no-dvm", "test-vm2",
         DENY),
    Case("redirect", "* * @anyvm @anyvm allow target=@dispvm", "test-vm1", "test-vm2",
         ALLOW, "@dispvm:default-dvm"),
    Case("redirect", "* * @anyvm @anyvm allow target=dom0", "test-vm1", "test-vm2",
         ALLOW, "dom0"),
    Case("redirect", TC_40, "test-vm1", "@default", ALLOW, "test-vm2"),
    Case("redirect", TC_40, "test-standalone", "@default", DENY),
    # --- ask: the targets, never the caller, default only from default_target= ---------
    Case("ask", TC_40, "test-standalone", "test-vm2", ASK,
         choices=_set("test-vm1", "test-vm2", "test-vm3", "@dispvm:test-vm3", "default-dvm",
                      "@dispvm:default-dvm", "test-invalid-dvm", "test-no-dvm",
                      "test-template")),
    Case("ask", TC_40, "test-standalone", "test-vm3", ASK,
         choices=_set("test-vm1", "test-vm2", "test-vm3", "@dispvm:test-vm3", "default-dvm",
                      "@dispvm:default-dvm", "test-invalid-dvm", "test-no-dvm",
                      "test-template"),
         default="test-vm3"),
    Case("ask", "* * test-vm3 @default ask", "test-vm3", "@default", DENY),
    Case("ask", "* * test-vm1 @anyvm ask", "test-vm1", "test-vm2", ASK,
         choices=_set("test-standalone", "test-vm2", "test-vm3", "@dispvm:test-vm3",
                      "default-dvm", "@dispvm:default-dvm", "test-invalid-dvm", "test-no-dvm",
                      "test-template")),
    Case("ask", TC_20, "test-vm1", "@default", ASK,
         choices=_set("test-vm2", "test-vm3", "@dispvm:test-vm3", "default-dvm",
                      "@dispvm:default-dvm", "test-invalid-dvm", "test-no-dvm",
                      "test-template", "test-standalone")),
    # dom0 is offered where a rule allows it
    Case("ask", TC_20, "test-standalone", "@default", ASK,
         choices=_set("test-vm1", "test-vm2", "test-vm3", "default-dvm", "test-no-dvm",
                      "test-invalid-dvm", "@dispvm:default-dvm", "dom0")),
    Case("redirect", TC_20, "test-no-dvm", "@default", ALLOW, "test-vm3"),
    # an earlier deny takes away what a later allow or ask offers; a redirect adds itself
    Case("ask", "* * test-vm1 @tag:tag1 deny\n* * test-vm1 test-vm3 allow target=dom0\n"
                "* * test-vm1 @anyvm ask",
         "test-vm1", "@default", ASK,
         choices=_set("test-vm2", "test-vm3", "@dispvm:test-vm3", "default-dvm",
                      "@dispvm:default-dvm", "dom0")),
    # the caller itself is never offered, not even as the only target
    Case("ask", "* * @anyvm @anyvm ask", "test-vm2", "test-vm2", ASK,
         choices=_set("test-vm1", "test-vm3", "@dispvm:test-vm3", "default-dvm",
                      "@dispvm:default-dvm", "test-invalid-dvm", "test-no-dvm",
                      "test-template", "test-standalone")),
    Case("ask", "* * @anyvm test-vm1 ask", "test-vm1", "test-vm1", DENY),
    Case("ask", "* * test-vm1 @default ask target=test-vm1", "test-vm1", "@default", DENY,
         ours="the reference offers test-vm1 and refuses the loopback call once chosen"),
    # the pre-selected target is only ever the rule's default_target=
    Case("ask", "* * @anyvm test-vm2 ask\n* * @anyvm test-vm3 allow", "test-vm1",
         "test-vm2", ASK, choices=_set("test-vm2", "test-vm3")),
    Case("ask", "* * @anyvm @dispvm ask default_target=@dispvm\n* * @anyvm test-vm2 allow",
         "test-vm1", "@dispvm", ASK, choices=_set("@dispvm:default-dvm", "test-vm2"),
         default="@dispvm:default-dvm"),
    Case("ask", "* * @anyvm * ask default_target=@adminvm\n", "test-vm3", "@default", ASK,
         choices=_set("dom0", "test-vm1", "test-vm2", "default-dvm", "test-invalid-dvm",
                      "test-no-dvm", "test-template", "test-standalone",
                      "@dispvm:test-vm3", "@dispvm:default-dvm"),
         default="dom0"),
    Case("ask", "* * @anyvm @default ask target=test-vm2", "test-vm1", "@default", ASK,
         choices=_set("test-vm2")),
    Case("ask", "* * @anyvm test-vm2 deny\n* * @anyvm @anyvm ask default_target=test-vm2",
         "test-vm1", "test-vm3", ASK,
         choices=_set("test-vm3", "@dispvm:test-vm3", "default-dvm", "@dispvm:default-dvm",
                      "test-invalid-dvm", "test-no-dvm", "test-template", "test-standalone"),
         ours="the reference asserts that default_target is among the targets (a crash);"
              " we pre-select nothing"),
    # --- unknown target names, and the reference's crashes -------------------------------
    Case("unknown", "* * @anyvm @default allow target=test-vm2\n* * @anyvm @anyvm allow",
         "test-vm1", "no-such-vm", DENY,
         ours="the reference evaluates an unknown name as @default (here: allow test-vm2);"
              " we refuse it as an invalid request"),
    Case("unknown", "* * @anyvm @anyvm allow", "test-vm1", "@dispvm:test-vm1", DENY),
    Case("unknown", "* * @anyvm @dispvm:default-dvm allow", "test-no-dvm", "@dispvm", DENY),
    Case("unknown", "* * @anyvm @dispvm:@tag:tag3 allow", "test-gone-dvm", "@dispvm", DENY,
         system=WITH_GONE_DEFAULT,
         ours="the reference raises KeyError (the default template does not exist)"),
    Case("unknown", "* * @anyvm @dispvm:default-dvm allow\n* * @anyvm @dispvm allow",
         "test-gone-dvm", "@dispvm", DENY, system=WITH_GONE_DEFAULT,
         ours="the reference allows @dispvm:no-such-dvm (a default template is not"
              " checked), which then fails to start"),
    Case("unknown", "* * @anyvm @dispvm:no-such-dvm allow\n* * @anyvm test-vm2 ask",
         "test-vm1", "test-vm2", ASK, choices=_set("test-vm2"),
         ours="the reference raises KeyError expanding @dispvm:no-such-dvm for the prompt"),
]


def test_every_difference_has_several_rows() -> None:
    topics = [case.topic for case in CASES]
    assert all(topics.count(topic) >= 3 for topic in ("dispvm", "redirect", "ask", "unknown"))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_decision_as_the_reference(tmp_path: Path, case: Case) -> None:
    cache = PolicyCache(None, str(policy_d(tmp_path, {"50-test.policy": case.policy + "\n"})))
    assert cache.policy().errors == ()
    decision = decide(cache, case.source, case.target, CALL, case.system)
    assert decision.action is case.action, decision.reason
    assert decision.target == case.result
    if case.action is ASK:
        assert frozenset(decision.ask_targets) == case.choices
        assert case.source not in decision.ask_targets
        assert decision.default_target == case.default
