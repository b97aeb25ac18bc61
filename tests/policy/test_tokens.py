"""Every source/target keyword against every kind of request target.

A token "matches" when the rule holding it decides the call (``decision.rule``
is set), whatever the action then makes of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qrexec_trio.policy import Action

from .helpers import cache_for, decide, one_file

# (source token, target token, calling qube, requested target, matches?)
MULTIFILE_CASES = [
    # --- sources
    ("*", "*", "work", "personal", True),
    ("*", "*", "dom0", "personal", True),
    ("@anyvm", "*", "work", "personal", True),
    ("@anyvm", "*", "dom0", "personal", False),
    ("$anyvm", "*", "dom0", "personal", False),
    ("$anyvm", "*", "work", "personal", True),
    ("@adminvm", "*", "dom0", "personal", True),
    ("@adminvm", "*", "work", "personal", False),
    ("$adminvm", "*", "dom0", "personal", True),
    ("dom0", "*", "dom0", "personal", True),
    ("dom0", "*", "work", "personal", False),
    ("work", "*", "work", "personal", True),
    ("work", "*", "personal", "work", False),
    ("@tag:trusted", "*", "work", "personal", True),
    ("@tag:trusted", "*", "vault", "personal", True),
    ("@tag:trusted", "*", "personal", "work", False),
    ("$tag:trusted", "*", "work", "personal", True),
    ("@type:AppVM", "*", "work", "personal", True),
    ("@type:AppVM", "*", "fedora", "personal", False),
    ("@type:AppVM", "*", "dom0", "personal", False),
    ("@type:TemplateVM", "*", "fedora", "personal", True),
    ("@type:AdminVM", "*", "dom0", "personal", True),
    ("@type:DispVM", "*", "disp7", "personal", True),
    ("@type:DispVM", "*", "work", "personal", False),
    # --- targets
    ("work", "*", "work", "dom0", True),
    ("work", "*", "work", "@adminvm", True),
    ("work", "*", "work", "@default", True),
    ("work", "*", "work", "@dispvm", True),
    ("work", "*", "work", "@dispvm:dvm", True),
    ("work", "@anyvm", "work", "personal", True),
    ("work", "@anyvm", "work", "dom0", False),
    ("work", "@anyvm", "work", "@adminvm", False),
    ("work", "$anyvm", "work", "dom0", False),
    ("work", "@anyvm", "work", "@default", True),
    ("work", "@anyvm", "work", "@dispvm", True),
    ("work", "@anyvm", "work", "@dispvm:dvm", True),
    ("work", "@adminvm", "work", "dom0", True),
    ("work", "@adminvm", "work", "@adminvm", True),
    ("work", "@adminvm", "work", "personal", False),
    ("work", "dom0", "work", "@adminvm", True),
    ("work", "dom0", "work", "dom0", True),
    ("work", "dom0", "work", "personal", False),
    ("work", "personal", "work", "personal", True),
    ("work", "personal", "work", "vault", False),
    ("work", "@default", "work", "@default", True),
    ("work", "@default", "work", "personal", False),
    ("work", "@default", "work", "@dispvm", False),
    ("work", "$default", "work", "@default", True),
    ("work", "@dispvm", "work", "@dispvm", True),
    ("work", "@dispvm", "work", "$dispvm", True),
    # work's default DispVM template is dvm, so both spellings name the same DispVM
    ("work", "@dispvm", "work", "@dispvm:dvm", False),  # as the reference
    ("work", "@dispvm", "work", "personal", False),
    ("work", "@dispvm", "work", "@default", False),
    ("work", "$dispvm", "work", "@dispvm", True),
    ("work", "@dispvm:dvm", "work", "@dispvm:dvm", True),
    ("work", "@dispvm:dvm", "work", "@dispvm", True),
    ("work", "@dispvm:dvm", "work", "dvm", False),
    ("vault", "@dispvm:dvm", "vault", "@dispvm", False),  # vault has no default DispVM
    ("vault", "@dispvm:dvm", "vault", "@dispvm:dvm", True),
    ("work", "@dispvm:@tag:dvm-tag", "work", "@dispvm:dvm", True),
    ("work", "@dispvm:@tag:dvm-tag", "work", "@dispvm", True),
    ("work", "@dispvm:@tag:other", "work", "@dispvm:dvm", False),
    ("work", "$dispvm:$tag:dvm-tag", "work", "@dispvm:dvm", True),
    ("work", "@dispvm:@tag:dvm-tag", "work", "dvm", False),
    ("work", "@tag:trusted", "work", "vault", True),
    ("work", "@tag:trusted", "work", "personal", False),
    ("work", "@tag:dvm-tag", "work", "@dispvm:dvm", False),
    ("work", "@type:AppVM", "work", "personal", True),
    ("work", "@type:AppVM", "work", "fedora", False),
    ("work", "@type:AppVM", "work", "dom0", False),
    ("work", "@type:TemplateVM", "work", "fedora", True),
    ("work", "@type:AdminVM", "work", "dom0", True),
]


@pytest.mark.parametrize(("source_token", "target_token", "source", "target", "matches"),
                         MULTIFILE_CASES)
def test_multifile_token(tmp_path: Path, source_token: str, target_token: str,
                         source: str, target: str, matches: bool) -> None:
    cache = one_file(tmp_path, f"test.Svc * {source_token} {target_token} deny\n")
    decision = decide(cache, source, target, "test.Svc")
    assert not decision.allowed
    assert (decision.rule is not None) == matches, decision.reason


R2_CASES = [
    ("$anyvm", "$anyvm", "work", "personal", True),
    ("$anyvm", "$anyvm", "dom0", "personal", False),
    ("$anyvm", "$anyvm", "work", "dom0", False),
    ("$anyvm", "$anyvm", "work", "$dispvm", True),
    ("dom0", "$anyvm", "dom0", "personal", True),
    ("$anyvm", "dom0", "work", "dom0", True),
    ("$anyvm", "$dispvm", "work", "$dispvm", True),
    ("$anyvm", "$dispvm", "work", "@dispvm", True),
    ("$anyvm", "$dispvm", "work", "personal", False),
    ("work", "personal", "work", "personal", True),
    ("work", "personal", "vault", "personal", False),
]


@pytest.mark.parametrize(("source_token", "target_token", "source", "target", "matches"),
                         R2_CASES)
def test_r2_token(tmp_path: Path, source_token: str, target_token: str,
                  source: str, target: str, matches: bool) -> None:
    cache = cache_for(tmp_path, r2={"test.Svc": f"{source_token} {target_token} deny\n"})
    decision = decide(cache, source, target, "test.Svc")
    assert (decision.rule is not None) == matches, decision.reason


@pytest.mark.parametrize("anyvm", ["@anyvm", "$anyvm"])
@pytest.mark.parametrize("target", ["dom0", "@adminvm"])
def test_anyvm_never_reaches_dom0_even_with_allow(tmp_path: Path, anyvm: str,
                                                 target: str) -> None:
    cache = one_file(tmp_path, f"* * {anyvm} {anyvm} allow\n")
    assert decide(cache, "work", "personal", "test.Svc").allowed
    assert not decide(cache, "work", target, "test.Svc").allowed
    assert not decide(cache, "dom0", "personal", "test.Svc").allowed


def test_r2_anyvm_never_reaches_dom0_even_with_allow(tmp_path: Path) -> None:
    cache = cache_for(tmp_path, r2={"test.Svc": "$anyvm $anyvm allow\n"})
    assert decide(cache, "work", "personal", "test.Svc").allowed
    assert not decide(cache, "work", "dom0", "test.Svc").allowed
    assert not decide(cache, "dom0", "work", "test.Svc").allowed


def test_star_reaches_dom0(tmp_path: Path) -> None:
    cache = one_file(tmp_path, "* * * * allow\n")
    to_dom0 = decide(cache, "work", "dom0", "test.Svc")
    assert to_dom0.action is Action.ALLOW
    assert to_dom0.target == "dom0"
    assert decide(cache, "dom0", "work", "test.Svc").allowed
    assert decide(cache, "work", "@adminvm", "test.Svc").target == "dom0"
