"""``!compat-4.0``: the legacy per-service files, read where the directive stands.

Semantics as the reference's (qubes-core-qrexec ``qrexec/policy/parser_compat.py``,
``doc/multifile-policy.markdown`` and the stock ``policy.d/35-compat.policy``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qrexec_trio.policy import Action, PolicyCache, load_policy

from .helpers import cache_for, decide, policy_d, r2_dir, write

COMPAT = "!compat-4.0\n"


def _bump(path: Path, text: str) -> None:
    """Rewrite ``path`` and move its mtime on, as a slow editor would."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


# --- position ---------------------------------------------------------------------

def test_legacy_rules_stand_exactly_where_the_directive_is(tmp_path: Path) -> None:
    # The reference's own example (TC_90_Compat40.test_100_implicit_deny), and one
    # file before the directive's.
    cache = cache_for(
        tmp_path,
        multi={
            "10-first.policy": "test.Early * @anyvm @anyvm allow\n",
            "35-compat.policy": "test.Before * @anyvm @anyvm allow\n" + COMPAT
            + "test.AllowAfter * @anyvm @anyvm allow\n"
            "test.ImplicitDeny * @anyvm @anyvm allow\n",
            "90-default.policy": "test.Late * @anyvm @anyvm allow\n",
        },
        r2={
            "test.Early": "work personal deny\n",
            "test.Before": "work personal deny\n",
            "test.AllowAfter": "work personal allow\n",
            "test.ImplicitDeny+arg": "work personal allow\n",
            "test.Late": "work personal deny\n",
        },
    )
    # Rules before the directive win over the legacy files...
    assert decide(cache, "work", "personal", "test.Early").allowed
    assert decide(cache, "work", "personal", "test.Before").allowed
    # ...the legacy files win over the rules after it.
    late = decide(cache, "work", "personal", "test.Late")
    assert late.action is Action.DENY
    assert late.rule is not None and late.rule.path.endswith("r2/test.Late")
    # A plain SERVICE file falls through to the rules after the directive.
    assert decide(cache, "work", "personal", "test.AllowAfter").allowed
    assert decide(cache, "work", "vault", "test.AllowAfter").allowed
    # A SERVICE+ARGUMENT file ends with the deny R4.0 implied.
    assert decide(cache, "work", "personal", "test.ImplicitDeny+arg").allowed
    implicit = decide(cache, "work", "vault", "test.ImplicitDeny+arg")
    assert implicit.action is Action.DENY
    assert implicit.notify is True
    assert implicit.rule is not None
    assert (Path(implicit.rule.path).name, implicit.rule.line) == ("test.ImplicitDeny+arg", 0)
    # Only for that argument.
    assert decide(cache, "work", "vault", "test.ImplicitDeny+other").allowed
    # The implicit deny covers dom0 as a target too.
    assert not decide(cache, "work", "dom0", "test.ImplicitDeny+arg").allowed


def test_without_the_directive_r2_files_still_come_first(tmp_path: Path) -> None:
    files = {"test.Svc": "work personal deny\n"}
    multi = {"00-first.policy": "test.Svc * work personal allow\n"}
    assert not decide(cache_for(tmp_path / "a", multi=multi, r2=files),
                      "work", "personal", "test.Svc").allowed
    with_compat = {**multi, "35-compat.policy": COMPAT}
    assert decide(cache_for(tmp_path / "b", multi=with_compat, r2=files),
                  "work", "personal", "test.Svc").allowed


def test_directive_reached_through_an_include(tmp_path: Path) -> None:
    cache = cache_for(tmp_path, multi={"10.policy": "!include inc/compat\n"
                                                   "* * @anyvm @anyvm allow\n",
                                       "inc/compat": COMPAT},
                      r2={"test.Svc": "work personal deny\n"})
    assert not decide(cache, "work", "personal", "test.Svc").allowed
    assert decide(cache, "work", "personal", "test.Other").allowed


def test_two_directives_read_the_files_twice_harmlessly(tmp_path: Path) -> None:
    cache = cache_for(tmp_path, multi={"10.policy": COMPAT, "20.policy": COMPAT},
                      r2={"test.Svc": "work personal allow\n"})
    assert cache.policy().errors == ()
    assert decide(cache, "work", "personal", "test.Svc").allowed


# --- order of the legacy files ------------------------------------------------------

def test_argument_files_come_before_the_plain_file_of_their_service(tmp_path: Path) -> None:
    cache = cache_for(tmp_path, multi={"35.policy": COMPAT}, r2={
        "test.Svc": "work personal allow\n",
        "test.Svc+b": "work vault allow\n",
        "test.Svc+a": "work personal deny\n",
        "test.Svc+": "work personal deny\n",
    })
    assert not decide(cache, "work", "personal", "test.Svc+a").allowed
    # +b's implicit deny comes before the plain file's allow.
    assert not decide(cache, "work", "personal", "test.Svc+b").allowed
    assert decide(cache, "work", "vault", "test.Svc+b").allowed
    # "SERVICE+" is the empty argument, which the call without "+" also has.
    assert not decide(cache, "work", "personal", "test.Svc").allowed
    assert decide(cache, "work", "personal", "test.Svc+c").allowed
    paths = [Path(rule.location.path).name for rule in cache.policy().rules]
    assert paths == ["test.Svc+"] * 3 + ["test.Svc+a"] * 3 + ["test.Svc+b"] * 3 + ["test.Svc"]


def test_services_in_name_order(tmp_path: Path) -> None:
    cache = cache_for(tmp_path, multi={"35.policy": COMPAT}, r2={
        "b.Svc": "work personal allow\n", "a.Svc": "work personal allow\n",
        "B.Svc": "work personal allow\n",
    })
    assert [Path(r.location.path).name for r in cache.policy().rules] == [
        "B.Svc", "a.Svc", "b.Svc"
    ]


def test_what_is_skipped_in_the_legacy_directory(tmp_path: Path) -> None:
    legacy = r2_dir(tmp_path, {
        "test.Svc": "work personal allow\n",
        "test.Svc.rpmnew": "garbage\n",
        "test.Svc.rpmsave": "garbage\n",
        "test.Svc.swp": "garbage\n",
        ".test.Svc": "garbage\n",
        "test.Svc~": "garbage\n",
        "test Svc": "garbage\n",
        "+arg": "garbage\n",
        "include/admin-local-rwx": "garbage\n",
    })
    os.mkfifo(legacy / "test.Fifo")
    (legacy / "test.Gone").symlink_to(tmp_path / "nowhere")
    (legacy / "test.Link").symlink_to(legacy / "test.Svc")
    cache = PolicyCache(str(legacy), str(policy_d(tmp_path, {"35.policy": COMPAT})))
    assert cache.policy().errors == ()
    assert decide(cache, "work", "personal", "test.Svc").allowed
    # A symlink to a regular file is read, under its own name.
    assert decide(cache, "work", "personal", "test.Link").allowed


# --- the R4.0 syntax of the legacy files --------------------------------------------

LEGACY_40 = {
    "test.Keywords": (
        "$tag:trusted $anyvm allow,target=dom0\n"
        "$type:TemplateVM $default allow,target=personal\n"
        "work $dispvm:dvm allow\n"
        "work $adminvm ask,default_target=$adminvm\n"
        "personal $anyvm ask,default_target=$dispvm\n"
    ),
    "test.Options": (
        "work personal allow,target=vault,user=root\n"
        "work vault allow, user=alice\n"
        "personal @default allow target=work user=bob\n"
    ),
}


@pytest.mark.parametrize(
    ("source", "target", "call", "action", "result", "user"),
    [
        # $tag:, $anyvm, $type:, $default, $dispvm:VM, $adminvm read as "@"
        ("work", "personal", "test.Keywords", Action.ALLOW, "dom0", None),
        ("vault", "personal", "test.Keywords", Action.ALLOW, "dom0", None),
        ("fedora", "@default", "test.Keywords", Action.ALLOW, "personal", None),
        ("personal", "@default", "test.Keywords", Action.ASK, None, None),
        # options glued with commas, with spaces after the commas, or spaced
        ("work", "personal", "test.Options", Action.ALLOW, "vault", "root"),
        ("work", "vault", "test.Options", Action.ALLOW, "vault", "alice"),
        ("personal", "@default", "test.Options", Action.ALLOW, "work", "bob"),
    ],
)
def test_r4_0_syntax(tmp_path: Path, source: str, target: str, call: str, action: Action,
                     result: str | None, user: str | None) -> None:
    cache = cache_for(tmp_path, multi={"35.policy": COMPAT}, r2=LEGACY_40)
    assert cache.policy().errors == ()
    decision = decide(cache, source, target, call)
    assert decision.action is action, decision.reason
    assert decision.target == result
    assert decision.user == user


def test_r4_0_default_targets(tmp_path: Path) -> None:
    cache = cache_for(tmp_path, multi={"35.policy": COMPAT}, r2=LEGACY_40)
    fedora = decide(cache, "work", "fedora", "test.Keywords")
    # work's tag rule comes first for work ($tag:trusted).
    assert fedora.allowed
    from_personal = decide(cache, "personal", "@default", "test.Keywords")
    assert from_personal.default_target == "@dispvm:dvm"
    dispvm = decide(cache, "work", "@dispvm:dvm", "test.Keywords")
    assert dispvm.target == "dom0"  # the tag rule again: $anyvm covers new DispVMs


def test_strict_r2_would_refuse_what_compat_reads(tmp_path: Path) -> None:
    legacy = {"test.Svc": "$tag:trusted $anyvm allow,target=dom0\n"}
    without = cache_for(tmp_path / "a", r2=legacy)
    assert len(without.policy().errors) == 1
    with_compat = cache_for(tmp_path / "b", multi={"35.policy": COMPAT}, r2=legacy)
    assert with_compat.policy().errors == ()


def test_include_lines_are_relative_to_the_legacy_directory(tmp_path: Path) -> None:
    cache = cache_for(tmp_path, multi={"35.policy": COMPAT}, r2={
        "admin.vm.List": "$include:include/admin-global-ro\n",
        "admin.vm.Start": "!include include/admin-global-rwx\n$anyvm $anyvm deny\n",
        "include/admin-global-ro": "$include:include/admin-global-rwx\n"
                                   "work $adminvm allow,target=dom0\n",
        "include/admin-global-rwx": "vault $adminvm allow,target=dom0\n",
    })
    assert cache.policy().errors == ()
    assert decide(cache, "vault", "dom0", "admin.vm.List").allowed
    assert decide(cache, "work", "dom0", "admin.vm.List").allowed
    assert not decide(cache, "personal", "dom0", "admin.vm.List").allowed
    assert decide(cache, "vault", "dom0", "admin.vm.Start").allowed
    assert not decide(cache, "work", "dom0", "admin.vm.Start").allowed


# --- errors -------------------------------------------------------------------------

def test_an_error_in_a_legacy_file_denies_every_call(tmp_path: Path) -> None:
    cache = cache_for(tmp_path, multi={"35.policy": COMPAT + "* * @anyvm @anyvm allow\n"},
                      r2={"test.Svc": "# ok\nwork personal permit\n"})
    errors = cache.policy().errors
    assert [(Path(e.path).name, e.line) for e in errors] == [("test.Svc", 2)]
    assert not decide(cache, "work", "personal", "test.Other").allowed


@pytest.mark.parametrize(
    ("files", "where", "message"),
    [
        ({"35.policy": "!compat-4.0 now\n"}, ("35.policy", 1), "takes no operands"),
        ({"35.policy": "!include-service test.Svc * svc\n", "svc": "!compat-4.0\n"},
         ("svc", 1), "only !include is allowed"),
    ],
)
def test_misplaced_directive(tmp_path: Path, files: dict[str, str], where: tuple[str, int],
                             message: str) -> None:
    root = policy_d(tmp_path, files)
    policy = load_policy(str(r2_dir(tmp_path, {})), str(root))
    assert [(Path(e.path).name, e.line) for e in policy.errors] == [where]
    assert message in policy.errors[0].message


def test_include_cycle_among_legacy_files(tmp_path: Path) -> None:
    cache = cache_for(tmp_path, multi={"35.policy": COMPAT}, r2={
        "test.Svc": "$include:include/a\n",
        "include/a": "$include:include/b\n",
        "include/b": "$include:include/a\n",
    })
    errors = cache.policy().errors
    assert len(errors) == 1
    assert (Path(errors[0].path).name, errors[0].line) == ("b", 1)
    assert "include cycle" in errors[0].message


def test_missing_or_absent_legacy_directory_adds_nothing(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"35.policy": COMPAT + "* * @anyvm @anyvm allow\n"})
    for legacy in (str(tmp_path / "nowhere"), None):
        cache = PolicyCache(legacy, str(root))
        assert cache.policy().errors == ()
        assert decide(cache, "work", "personal", "test.Svc").allowed
    # lint of a named legacy directory that is missing says so, at the directive
    policy = load_policy(str(tmp_path / "nowhere"), str(root), required=True)
    assert [(Path(e.path).name, e.line) for e in policy.errors] == [("35.policy", 1)]


def test_legacy_directory_that_is_a_file(tmp_path: Path) -> None:
    legacy = write(tmp_path / "legacy", "work personal allow\n")
    root = policy_d(tmp_path, {"35.policy": COMPAT})
    errors = load_policy(str(legacy), str(root)).errors
    assert [(Path(e.path).name, e.line) for e in errors] == [("35.policy", 1)]
    assert "not a directory" in errors[0].message


# --- the cache follows the legacy files -----------------------------------------------

def test_edited_added_and_removed_legacy_files_are_seen(tmp_path: Path) -> None:
    cache = cache_for(tmp_path, multi={"35.policy": COMPAT + "* * @anyvm @anyvm allow\n"},
                      r2={"test.Svc": "work personal deny\n"})
    legacy = tmp_path / "r2"
    assert not decide(cache, "work", "personal", "test.Svc").allowed
    _bump(legacy / "test.Svc", "work vault deny\n")
    assert decide(cache, "work", "personal", "test.Svc").allowed
    write(legacy / "test.Svc+x", "work personal allow\n")
    assert decide(cache, "work", "personal", "test.Svc+x").allowed
    assert not decide(cache, "work", "vault", "test.Svc+x").allowed  # implicit deny
    (legacy / "test.Svc+x").unlink()
    assert not decide(cache, "work", "vault", "test.Svc+x").allowed  # test.Svc's deny
    (legacy / "test.Svc").unlink()
    assert decide(cache, "work", "vault", "test.Svc+x").allowed


def test_leftovers_are_not_policy_in_the_r2_directory_either(tmp_path: Path) -> None:
    """Without !compat-4.0 the per-service directory skips the same leftovers."""
    legacy = tmp_path / "r2"
    legacy.mkdir()
    (legacy / "test.Svc.rpmsave").write_text("$anyvm $anyvm allow\n")
    (legacy / "test.Svc.rpmnew").write_text("$anyvm $anyvm allow\n")
    (legacy / "test.Svc.swp").write_text("garbage that would not parse\n")
    (tmp_path / "policy.d").mkdir()
    cache = PolicyCache(str(legacy), str(tmp_path / "policy.d"))
    assert not cache.policy().rules and not cache.policy().errors
