"""Bad input: every error names its file and line, evaluation denies, nothing crashes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qrexec_trio.policy import (
    Action,
    PolicyCache,
    PolicySyntaxError,
    load_policy,
    parse_multifile_text,
    parse_r2_text,
)

from .helpers import decide, policy_d, r2_dir, write

ALLOW_ALL = "* * * * allow\n"

# (a line of today's format, a fragment of the expected message)
MULTIFILE_ERRORS = [
    ("test.Svc * @foo work allow", "unknown keyword '@foo'"),
    ("test.Svc * work $foo allow", "unknown keyword '@foo'"),
    ("test.Svc * work @tag: allow", "invalid tag"),
    ("test.Svc * work @type:Laptop allow", "unknown domain type"),
    ("test.Svc * @default work allow", "can only be a target"),
    ("test.Svc * @dispvm work allow", "can only be a target"),
    ("test.Svc * @dispvm:dvm work allow", "can only be a target"),
    ("test.Svc * work @dispvm:@anyvm allow", "invalid qube name"),
    ("test.Svc * work personal", "missing action"),
    ("test.Svc * work", "missing action"),
    ("work personal allow", "missing action"),
    ("test.Svc * work personal permit", "unknown action 'permit'"),
    ("test.Svc * work personal allow frobnicate=yes", "'frobnicate' not valid for allow"),
    ("test.Svc * work personal deny target=vault", "'target' not valid for deny"),
    ("test.Svc * work personal deny user=root", "'user' not valid for deny"),
    ("test.Svc * work personal allow default_target=vault", "'default_target' not valid"),
    ("test.Svc * work personal allow user=", "empty value"),
    ("test.Svc * work personal allow user=a user=b", "given twice"),
    ("test.Svc * work personal allow user=a:b", "invalid user name"),
    ("test.Svc * work personal allow autostart=maybe", "must be yes or no"),
    ("test.Svc * work personal allow notify=1", "must be yes or no"),
    ("test.Svc * work personal allow target=@anyvm", "invalid target"),
    ("test.Svc * work personal allow target=x/y", "invalid qube name"),
    ("test.Svc * work personal allow,target=vault", "unknown action"),
    ("test.Svc * work personal allow user", "expected key=value"),
    ("qubes/Svc * work personal allow", "invalid service name"),
    ("qubes.Svc$x * work personal allow", "invalid service name"),
    ("$x * work personal allow", "invalid service name"),
    (".. * work personal allow", "invalid service name"),
    ("s" * 256 + " * work personal allow", "longer than 255"),
    ("test.Svc +" + "a" * 65_000 + " work personal allow", "argument longer than"),
    ("test.Svc arg work personal allow", "argument must be"),
    ("test.Svc +a/b work personal allow", "invalid argument"),
    ("test.Svc +a$b work personal allow", "invalid argument"),
    ("test.Svc * wörk personal allow", "unexpected character U+00F6"),
    ("test.Svc * work personal allow\r", "unexpected character U+000D"),
    ("test.Svc * work personal allow # no", "'#' only starts a comment"),
    ("test.Svc * work personal allow user=a#b", "'#' only starts a comment"),
    ("!frob x", "unknown directive '!frob'"),
    ("!include", "takes exactly one path"),
    ("!include a b", "takes exactly one path"),
    ("!include-dir", "takes exactly one path"),
    ("!include-service test.Svc * ", "takes SERVICE ARGUMENT PATH"),
    ("!include-service test/Svc * x", "invalid service name"),
    ("!compat-4.0 x", "takes no operands"),
]


@pytest.mark.parametrize(("line", "message"), MULTIFILE_ERRORS)
def test_multifile_error_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    root = policy_d(tmp_path, {"10-ok.policy": ALLOW_ALL,
                               "20-bad.policy": f"# comment\n\n{line}\n"})
    policy = load_policy(None, str(root))
    assert len(policy.errors) == 1, policy.errors
    error = policy.errors[0]
    assert error.path == str(root / "20-bad.policy")
    assert error.line == 3
    assert message in error.message
    assert str(error) == f"{root / '20-bad.policy'}:3: {error.message}"
    cache = PolicyCache(None, str(root))
    assert decide(cache, "work", "personal", "test.Svc").action is Action.DENY


@pytest.mark.parametrize(("line", "message"), MULTIFILE_ERRORS)
def test_multifile_strict_parser_raises_the_same_error(line: str, message: str) -> None:
    with pytest.raises(PolicySyntaxError) as info:
        parse_multifile_text(f"\n{line}\n", path="f.policy")
    assert info.value.path == "f.policy"
    assert info.value.line == 2
    assert message in info.value.message


R2_ERRORS = [
    ("$anyvm $anyvm", "missing action"),
    ("$anyvm", "missing action"),
    ("$anyvm $anyvm allow, user=root", "unexpected field"),
    ("$anyvm $anyvm allow user=root", "unexpected field"),
    ("$anyvm $anyvm allow,frob=1", "'frob' not valid for allow"),
    ("$anyvm $anyvm allow,", "expected key=value"),
    ("$anyvm $anyvm allow,user=root,user=x", "given twice"),
    ("$anyvm $anyvm allow,autostart=no", "'autostart' not valid"),
    ("$anyvm $anyvm deny,user=root", "'user' not valid for deny"),
    ("$anyvm $anyvm ask,target=$anyvm", "unknown keyword"),
    ("$anyvm $anyvm permit", "unknown action"),
    ("$foo $anyvm allow", "unknown keyword '$foo'"),
    ("@anyvm $anyvm allow", "invalid qube name '@anyvm'"),
    ("* $anyvm allow", "invalid qube name"),
    ("$dispvm $anyvm allow", "can only be a target"),
    ("work pers/onal allow", "invalid qube name"),
]


@pytest.mark.parametrize(("line", "message"), R2_ERRORS)
def test_r2_error_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    root = r2_dir(tmp_path, {"test.Svc": f"## shipped comment\n{line}\n$anyvm $anyvm allow\n"})
    policy = load_policy(str(root), None)
    assert [(e.path, e.line) for e in policy.errors] == [(str(root / "test.Svc"), 2)]
    assert message in policy.errors[0].message
    cache = PolicyCache(str(root), None)
    assert decide(cache, "work", "personal", "test.Svc").action is Action.DENY


def test_r2_strict_parser() -> None:
    rules = parse_r2_text("# c\n$anyvm $dispvm allow,user=root\n", service="test.Svc")
    assert len(rules) == 1
    assert rules[0].params.user == "root"
    with pytest.raises(PolicySyntaxError, match=r"^<string>:1: missing action"):
        parse_r2_text("$anyvm\n", service="test.Svc")


@pytest.mark.parametrize("name", ["qubes.Svc$x", "qubes.Svc+arg", "qubes.Svc~"])
def test_r2_file_name_must_be_a_service_name(tmp_path: Path, name: str) -> None:
    root = r2_dir(tmp_path, {name: "$anyvm $anyvm allow\n"})
    policy = load_policy(str(root), None)
    assert [(e.path, e.line) for e in policy.errors] == [(str(root / name), 0)]
    assert "not a service name" in policy.errors[0].message


def test_r2_hidden_files_are_skipped(tmp_path: Path) -> None:
    root = r2_dir(tmp_path, {".test.Svc.swp": "\0binary\n", "test.Svc": "work vault allow\n"})
    assert load_policy(str(root), None).errors == ()


def test_every_error_of_a_file_is_reported(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"a.policy": "bad\ntest.Svc * work personal allow\nworse x\n"})
    policy = load_policy(None, str(root))
    assert [e.line for e in policy.errors] == [1, 3]
    assert len(policy.rules) == 1


def test_invalid_utf8_is_reported_with_its_line(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {})
    (root / "a.policy").write_bytes(b"# fine\n\n# caf\xe9\n")
    policy = load_policy(None, str(root))
    assert [(e.line, e.message) for e in policy.errors] == [(3, "not valid UTF-8")]


def test_comments_may_hold_any_text(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"a.policy": "# wörk $anyvm, allow user=x # ok\n   \t# indented\n"})
    assert load_policy(None, str(root)).errors == ()


# --- files that cannot be read ---------------------------------------------------

def test_policy_file_that_is_a_directory(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"10-ok.policy": ALLOW_ALL})
    (root / "20-dir.policy").mkdir()
    policy = load_policy(None, str(root))
    assert [str(e) for e in policy.errors] == [
        f"{root / '20-dir.policy'}:0: is a directory, not a policy file"
    ]
    assert not decide(PolicyCache(None, str(root)), "work", "personal", "test.Svc").allowed


def test_r2_entry_that_is_a_directory(tmp_path: Path) -> None:
    root = r2_dir(tmp_path, {})
    (root / "test.Svc").mkdir()
    policy = load_policy(str(root), None)
    assert [(e.line, e.message) for e in policy.errors] == [
        (0, "is a directory, not a policy file")
    ]


def test_dangling_symlink_is_unreadable(tmp_path: Path) -> None:
    # Tests run as root, for whom chmod 000 hides nothing; a dangling link cannot
    # be read by anyone.
    root = policy_d(tmp_path, {"10-ok.policy": ALLOW_ALL})
    (root / "20-gone.policy").symlink_to(tmp_path / "nowhere")
    policy = load_policy(None, str(root))
    assert [str(e) for e in policy.errors] == [
        f"{root / '20-gone.policy'}:0: cannot read: No such file or directory"
    ]
    assert not decide(PolicyCache(None, str(root)), "work", "personal", "test.Svc").allowed


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {})
    os.mkfifo(root / "10-fifo.policy")
    policy = load_policy(None, str(root))
    assert [(e.line, e.message) for e in policy.errors] == [(0, "not a regular file")]


def test_policy_d_that_is_a_file(tmp_path: Path) -> None:
    path = write(tmp_path / "policy.d", ALLOW_ALL)
    policy = load_policy(None, str(path))
    assert [str(e) for e in policy.errors] == [f"{path}:0: not a directory"]


# --- includes --------------------------------------------------------------------

def test_include_file_and_dir_and_service(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {
        "10-main.policy": "!include inc/first\n!include-dir more\n"
                          "!include-service test.Svc +old compat/test.Svc\n"
                          "* * @anyvm @anyvm deny\n",
        "inc/first": "test.A * work personal allow\n",
        "more/b.policy": "test.B * work personal allow\n",
        "more/a.policy": "test.B * work personal deny\n",
        "more/skipped.txt": "test.C * work personal allow\n",
        "compat/test.Svc": "$anyvm $anyvm allow,user=root\nwork $dispvm allow user=x\n",
    })
    cache = PolicyCache(None, str(root))
    assert cache.policy().errors == ()
    assert decide(cache, "work", "personal", "test.A").allowed
    # more/a.policy comes before more/b.policy
    assert not decide(cache, "work", "personal", "test.B").allowed
    assert not decide(cache, "work", "personal", "test.C").allowed
    compat = decide(cache, "work", "personal", "test.Svc+old")
    assert compat.allowed
    assert compat.user == "root"
    assert not decide(cache, "work", "personal", "test.Svc+new").allowed


def test_absolute_include(tmp_path: Path) -> None:
    outside = write(tmp_path / "elsewhere" / "rules", "test.A * work personal allow\n")
    root = policy_d(tmp_path, {"10.policy": f"!include {outside}\n"})
    assert decide(PolicyCache(None, str(root)), "work", "personal", "test.A").allowed


def _single_error(root: Path) -> PolicySyntaxError:
    policy = load_policy(None, str(root))
    assert len(policy.errors) == 1, policy.errors
    assert not decide(PolicyCache(None, str(root)), "work", "personal", "test.Svc").allowed
    return policy.errors[0]


def test_missing_include_is_an_error_at_the_including_line(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"10.policy": ALLOW_ALL + "!include nope/missing\n"})
    error = _single_error(root)
    assert (error.path, error.line) == (str(root / "10.policy"), 2)
    assert "cannot include" in error.message
    assert "No such file or directory" in error.message


def test_missing_include_dir_is_an_error(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"10.policy": ALLOW_ALL + "!include-dir nope\n"})
    error = _single_error(root)
    assert (error.path, error.line) == (str(root / "10.policy"), 2)
    assert "cannot include directory" in error.message


def test_include_of_a_directory_is_an_error(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"10.policy": ALLOW_ALL + "!include sub\n"})
    (root / "sub").mkdir()
    error = _single_error(root)
    assert error.line == 2
    assert "is a directory" in error.message


def test_include_cycle_is_an_error(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {
        "10.policy": ALLOW_ALL + "!include inc/a\n",
        "inc/a": "!include inc/b\n",
        "inc/b": "# b\n!include inc/a\n",
    })
    error = _single_error(root)
    assert (error.path, error.line) == (str(root / "inc/b"), 2)
    assert "include cycle" in error.message


def test_self_include_is_a_cycle(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"10.policy": ALLOW_ALL + "!include 10.policy\n"})
    error = _single_error(root)
    assert (error.line, "include cycle" in error.message) == (2, True)


def test_include_dir_of_its_own_directory_is_a_cycle(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"10.policy": ALLOW_ALL + "!include-dir .\n"})
    error = _single_error(root)
    assert (error.path, error.line) == (str(root / "10.policy"), 2)
    assert "include cycle" in error.message


def test_symlink_loop_in_include_dir(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"10.policy": ALLOW_ALL + "!include-dir loops\n"})
    loops = root / "loops"
    loops.mkdir()
    (loops / "a.policy").symlink_to(loops / "b.policy")
    (loops / "b.policy").symlink_to(loops / "a.policy")
    policy = load_policy(None, str(root))
    assert [(e.path, e.line) for e in policy.errors] == [(str(root / "10.policy"), 2)] * 2
    assert all("symbolic link loop" in e.message for e in policy.errors)
    assert not decide(PolicyCache(None, str(root)), "work", "personal", "test.Svc").allowed


def test_include_dir_that_is_a_symlink_loop(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"10.policy": ALLOW_ALL + "!include-dir loop\n"})
    (root / "loop").symlink_to(root / "loop")
    error = _single_error(root)
    assert error.line == 2
    assert "symbolic link loop" in error.message


def test_directory_symlink_back_up_is_caught(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"10.policy": ALLOW_ALL + "!include-dir sub\n"})
    (root / "sub").mkdir()
    (root / "sub" / "up.policy").symlink_to(root)
    error = _single_error(root)
    assert error.line == 2
    assert "is a directory" in error.message


def test_deep_include_chain_is_bounded(tmp_path: Path) -> None:
    files = {f"inc/{n}": f"!include inc/{n + 1}\n" for n in range(40)}
    files["10.policy"] = ALLOW_ALL + "!include inc/0\n"
    files["inc/40"] = ""
    error = _single_error(policy_d(tmp_path, files))
    assert "nested deeper than" in error.message


def test_error_inside_an_included_file_names_that_file(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"10.policy": ALLOW_ALL + "!include inc/x\n",
                               "inc/x": "\n\ntest.Svc * @nope work allow\n"})
    error = _single_error(root)
    assert (error.path, error.line) == (str(root / "inc/x"), 3)


def test_directives_are_refused_in_include_service_files(tmp_path: Path) -> None:
    # Only !include (of another file of the same layout) is allowed there.
    root = policy_d(tmp_path, {"10.policy": "!include-service test.Svc * c\n",
                               "c": "!include-dir other\n"})
    error = _single_error(root)
    assert (error.path, error.line) == (str(root / "c"), 1)


def test_file_included_twice_reports_its_error_once(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"10.policy": "!include x\n!include x\n", "x": "bad\n"})
    assert len(load_policy(None, str(root)).errors) == 1


# --- arbitrary text never raises anything but PolicySyntaxError -------------------

_VOCABULARY = [
    "*", "+", "+arg", "@anyvm", "$anyvm", "@adminvm", "@default", "@dispvm", "@dispvm:",
    "@dispvm:dvm", "@dispvm:@tag:", "@tag:", "@tag:x", "@type:", "@type:AppVM", "dom0",
    "work", "allow", "deny", "ask", "target=", "target=@dispvm", "user=root", "autostart=no",
    "notify=yes", "default_target=work", "allow,user=x", "!include", "!include-dir",
    "!include-service", "x", "=", ",", "#", "/", "$", "..", "\0", "\t", " ", "\r", "é",
    "test.Svc", "-",
]
policy_text = st.one_of(
    st.text(),
    st.lists(
        st.lists(st.sampled_from(_VOCABULARY), max_size=8).map(" ".join), max_size=8
    ).map("\n".join),
)


@settings(max_examples=300, deadline=None)
@given(policy_text)
def test_strict_parsers_raise_only_policy_syntax_error(text: str) -> None:
    for parse in (lambda: parse_multifile_text(text),
                  lambda: parse_r2_text(text, service="test.Svc")):
        with contextlib.suppress(PolicySyntaxError):
            parse()


@settings(max_examples=150, deadline=None)
@given(policy_text)
def test_loading_arbitrary_text_never_raises(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "d").mkdir()
        (root / "r2").mkdir()
        (root / "d" / "a.policy").write_text(text, errors="surrogateescape")
        (root / "r2" / "test.Svc").write_text(text, errors="surrogateescape")
        cache = PolicyCache(str(root / "r2"), str(root / "d"))
        policy = cache.policy()
        assert all(isinstance(e, PolicySyntaxError) for e in policy.errors)
        decision = decide(cache, "work", "personal", "test.Svc")
        if policy.errors:
            assert decision.action is Action.DENY
