"""Bad policy input: one error naming ``file:line``, every call denied until it is fixed.

test_parsers.py covers each kind of bad line and file; here each case goes through
the whole cycle with the cache a daemon keeps: broken, every call denied, fixed,
calls decided again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from qrexec_trio.policy import Action, PolicyCache
from qrexec_trio.policy._errors import MAX_MESSAGE_LEN

from .helpers import decide, policy_d, write

ALLOW_ALL = "* * @anyvm @anyvm allow\n"
MEGABYTE = 1024 * 1024


def _bump(path: Path, data: bytes) -> None:
    """Rewrite ``path`` and move its mtime on, as a slow editor would."""
    before = path.lstat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


@dataclass(frozen=True)
class Broken:
    name: str
    #: Makes the policy.d broken; returns where the error is: (path, line).
    damage: Callable[[Path], tuple[Path, int]]
    #: Repairs it.
    repair: Callable[[Path], None]
    message: str

    def __str__(self) -> str:
        return self.name


def _cycle(root: Path) -> tuple[Path, int]:
    write(root / "20.policy", "!include inc/a\n")
    write(root / "inc/a", "!include inc/b\n")
    write(root / "inc/b", "# b\n!include inc/a\n")
    return root / "inc/b", 2


def _missing(root: Path) -> tuple[Path, int]:
    write(root / "20.policy", "# x\n!include inc/nope\n")
    return root / "20.policy", 2


def _long_line(text: str) -> Callable[[Path], tuple[Path, int]]:
    def damage(root: Path) -> tuple[Path, int]:
        write(root / "20.policy", f"# x\n\n{text}\n")
        return root / "20.policy", 3
    return damage


def _invalid_utf8(root: Path) -> tuple[Path, int]:
    (root / "20.policy").write_bytes(b"# fine\n\ntest.Svc * work vault deny # caf\xe9\n")
    return root / "20.policy", 3


def _symlink_to_directory(root: Path) -> tuple[Path, int]:
    (root.parent / "somedir").mkdir()
    (root / "20.policy").symlink_to(root.parent / "somedir")
    return root / "20.policy", 0


def _fix_20(root: Path) -> None:
    path = root / "20.policy"
    if path.is_symlink():
        path.unlink()
        write(path, "# fixed\n")
    else:
        _bump(path, b"# fixed\n")


def _fix_cycle(root: Path) -> None:
    _bump(root / "inc/b", b"# b, fixed\n")


def _fix_missing(root: Path) -> None:
    write(root / "inc/nope", "# now here\n")


CASES = [
    Broken("include-cycle", _cycle, _fix_cycle, "include cycle"),
    Broken("include-of-a-missing-file", _missing, _fix_missing, "No such file or directory"),
    Broken("1MB-user-name", _long_line("test.Svc * work personal allow user=" + "u" * MEGABYTE),
           _fix_20, "invalid user name 'uuuu"),
    Broken("1MB-keyword", _long_line("test.Svc * work @" + "k" * MEGABYTE + " allow"),
           _fix_20, "unknown keyword '@kkk"),
    Broken("1MB-parameter", _long_line("test.Svc * work personal allow " + "p" * MEGABYTE),
           _fix_20, "expected key=value, got 'ppp"),
    Broken("1MB-directive", _long_line("!" + "d" * MEGABYTE), _fix_20,
           "unknown directive '!ddd"),
    Broken("1MB-word", _long_line("w" * MEGABYTE), _fix_20, "missing action"),
    Broken("invalid-utf8", _invalid_utf8, _fix_20, "not valid UTF-8"),
    Broken("symlink-to-a-directory", _symlink_to_directory, _fix_20, "is a directory"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_one_error_every_call_denied_until_fixed(tmp_path: Path, case: Broken) -> None:
    root = policy_d(tmp_path, {"10.policy": ALLOW_ALL})
    cache = PolicyCache(None, str(root))
    assert decide(cache, "work", "personal", "test.Svc").allowed
    path, line = case.damage(root)

    errors = cache.policy().errors
    assert len(errors) == 1, errors
    error = errors[0]
    assert (error.path, error.line) == (str(path), line)
    assert case.message in error.message
    text = str(error)
    assert text.startswith(f"{path}:{line}: ")
    # a long line is shown cut short, never whole
    assert len(text) < len(str(path)) + MAX_MESSAGE_LEN + 100
    for source, target, call in (("work", "personal", "test.Svc"),
                                 ("personal", "work", "other.Svc+arg"),
                                 ("work", "@dispvm", "qubes.OpenInVM")):
        decision = decide(cache, source, target, call)
        assert decision.action is Action.DENY
        assert f"{path}:{line}" in decision.reason

    case.repair(root)
    assert cache.policy().errors == ()
    assert decide(cache, "work", "personal", "test.Svc").allowed


def test_a_long_line_is_quoted_short(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"10.policy": "test.Svc * work personal allow user="
                                            + "u" * MEGABYTE + "\n"})
    (error,) = PolicyCache(None, str(root)).policy().errors
    assert error.message == f"invalid user name '{'u' * 60}...'"


def test_redirect_to_a_qube_that_does_not_exist(tmp_path: Path) -> None:
    # Which qubes exist is known only when a call is decided, so this is no
    # syntax error: the calls that reach the rule are denied, naming it, and the
    # others are decided as usual until the rule is fixed.
    root = policy_d(tmp_path, {"10.policy": "test.Svc * work @default allow target=gone\n"
                                            "test.Svc * work personal allow target=@dispvm:gone\n"
                                            + ALLOW_ALL})
    cache = PolicyCache(None, str(root))
    assert cache.policy().errors == ()
    for target, line in (("@default", 1), ("personal", 2)):
        decision = decide(cache, "work", target, "test.Svc")
        assert decision.action is Action.DENY
        assert decision.rule is not None
        assert (decision.rule.path, decision.rule.line) == (str(root / "10.policy"), line)
        assert f"{root / '10.policy'}:{line}" in decision.reason
    assert "target= names 'gone', which does not exist" in decide(
        cache, "work", "@default", "test.Svc").reason
    assert decide(cache, "work", "vault", "test.Svc").allowed
    _bump(root / "10.policy",
          b"test.Svc * work @default allow target=vault\n" + ALLOW_ALL.encode())
    fixed = decide(cache, "work", "@default", "test.Svc")
    assert (fixed.action, fixed.target) == (Action.ALLOW, "vault")


def test_redirect_names_for_a_registry_that_is_only_a_guess(tmp_path: Path) -> None:
    root = policy_d(tmp_path, {"10.policy": "test.Svc * work @default allow target=gone\n"
                                            "test.Svc * work vault ask default_target=dom0\n"
                                            "test.Svc * work @anyvm ask target=@dispvm:dvm\n"})
    assert PolicyCache(None, str(root)).policy().redirect_names() == {"gone", "dom0"}
