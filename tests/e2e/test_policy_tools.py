"""``qubes-policy-lint`` and ``qrexec-legacy-convert``, run as processes.

The converter's promise is checked with the engine itself: the policy loaded
from both directories before the conversion and after it must decide every
request of a table the same way.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness import program
from qrexec_trio.policy import (
    Action,
    Decision,
    DomainInfo,
    Request,
    SystemInfo,
    load_policy,
)

# --- helpers -----------------------------------------------------------------------


def run(
    name: str, *args: str | Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([program(name), *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


def files(root: Path, contents: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def snapshot(*roots: Path) -> dict[str, tuple[str, bytes | None, int]]:
    """Every path under ``roots`` with its kind, content and mtime: equal
    snapshots mean nothing was written, renamed or touched."""
    seen: dict[str, tuple[str, bytes | None, int]] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            info = path.lstat()
            if path.is_symlink():
                seen[str(path)] = ("link", os.readlink(path).encode(), info.st_mtime_ns)
            elif path.is_dir():
                seen[str(path)] = ("dir", None, info.st_mtime_ns)
            else:
                seen[str(path)] = ("file", path.read_bytes(), info.st_mtime_ns)
    return seen


SYSTEM = SystemInfo.of([
    DomainInfo("dom0", "AdminVM"),
    DomainInfo("work", "AppVM", tags=frozenset({"trusted"}), default_dispvm="dvm"),
    DomainInfo("personal", "AppVM", default_dispvm="dvm"),
    DomainInfo("vault", "AppVM", tags=frozenset({"trusted", "offline"})),
    DomainInfo("fedora", "TemplateVM"),
    DomainInfo("dvm", "AppVM", tags=frozenset({"dvm-tag"}), template_for_dispvms=True),
    DomainInfo("disp7", "DispVM"),
])
SOURCES = ("dom0", "work", "personal", "vault", "fedora", "disp7")
TARGETS = ("dom0", "@adminvm", "work", "personal", "vault", "fedora", "dvm", "@default",
           "@dispvm", "@dispvm:dvm", "$default", "$dispvm")


Essence = tuple[object, ...]


def decisions(
    legacy: Path, policy_d: Path, calls: tuple[str, ...]
) -> dict[tuple[str, ...], Essence]:
    """What the engine decides for every (source, target, call) of the table,
    loading both directories as the daemon does."""
    policy = load_policy(str(legacy), str(policy_d))
    assert policy.errors == ()

    def essence(decision: Decision) -> Essence:
        return (decision.action, decision.target, decision.user, decision.ask_targets,
                decision.default_target, decision.notify, decision.autostart)

    return {
        (source, target, call): essence(policy.evaluate(Request.from_call(source, target, call),
                                                        SYSTEM))
        for source in SOURCES for target in TARGETS for call in calls
    }


# --- qubes-policy-lint ---------------------------------------------------------------

GOOD = """\
# a comment, then rules and directives of today's format
test.Svc * work personal allow
test.Svc +arg @tag:trusted @dispvm:dvm allow user=root
!include include/elsewhere
"""


def test_lint_of_good_files_and_directories_prints_nothing(tmp_path: Path) -> None:
    root = files(tmp_path / "policy.d", {"30-good.policy": GOOD.replace("!include", "#"),
                                         "40-other.policy": "* * @anyvm @anyvm deny\n"})
    lone = files(tmp_path / "lone", {"good.policy": GOOD})
    # A lone file's includes are not followed (include/elsewhere does not exist).
    result = run("qubes-policy-lint", lone / "good.policy", root)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_lint_reports_every_error_of_every_file_as_file_line_error_message(
    tmp_path: Path,
) -> None:
    first = files(tmp_path, {"a.policy": "test.Svc * work\n\ntest.Svc * work vault allw\n"})
    second = files(tmp_path, {"b.policy": "test.Svc * @nope vault allow\n"})
    result = run("qubes-policy-lint", first / "a.policy", second / "b.policy")
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{first / 'a.policy'}:1: error: missing action: expected SERVICE ARGUMENT SOURCE"
        " TARGET ACTION [key=value ...]",
        f"{first / 'a.policy'}:3: error: unknown action 'allw' (expected allow, deny or ask)",
        f"{second / 'b.policy'}:1: error: unknown keyword '@nope'",
    ]
    # The same command under its other name: one implementation, untagged lines.
    trio = run("qrexec-trio", "policy", "lint", first / "a.policy", second / "b.policy")
    assert trio.returncode == 1
    assert trio.stdout == result.stdout.replace(": error: ", ": ")


def test_lint_show_line_cuts_long_lines_and_escapes_control_characters(
    tmp_path: Path,
) -> None:
    long_line = "test.Svc * work vault allow user=" + "x" * 5000
    path = files(tmp_path, {"long.policy": f"{long_line}\ntest.Svc * work \x1b[2J allow\n"})
    result = run("qubes-policy-lint", "--show-line", path / "long.policy")
    assert result.returncode == 1
    first, second = result.stdout.splitlines()
    assert first.startswith(f"{path / 'long.policy'}:1: error: invalid user name")
    assert first.endswith(f"...({len(long_line)} characters)")
    assert len(first) < 600
    assert "\x1b" not in result.stdout
    assert second == (f"{path / 'long.policy'}:2: error: unexpected character U+001B:"
                      " test.Svc * work \\x1b[2J allow")
    # Without --show-line the message alone, still of bounded length.
    short = run("qubes-policy-lint", path / "long.policy")
    assert all(len(line) < 600 for line in short.stdout.splitlines())


def test_lint_include_service_reads_the_per_service_layout(tmp_path: Path) -> None:
    service = files(tmp_path, {"test.Svc": "$anyvm $tag:trusted allow,user=root\n"
                                           "$anyvm $default ask,default_target=work\n"
                                           "$include:include/more\n"})
    result = run("qubes-policy-lint", "-i", service / "test.Svc")
    assert (result.returncode, result.stdout) == (0, "")
    # Read as a *.policy file instead, the same lines are errors.
    assert run("qubes-policy-lint", service / "test.Svc").returncode == 1
    bad = files(tmp_path, {"test.Bad": "$anyvm $anyvm allow\nwork $bogus deny\n"})
    result = run("qubes-policy-lint", "--include-service", bad / "test.Bad")
    assert result.returncode == 1
    assert result.stdout == f"{bad / 'test.Bad'}:2: error: unknown keyword '@bogus'\n"


def test_lint_reads_standard_input_as_dash() -> None:
    assert run("qubes-policy-lint", "-", stdin=GOOD.replace("!include", "#")).returncode == 0
    result = run("qubes-policy-lint", "-s", "-", stdin="\ntest.Svc * work\n")
    assert result.returncode == 1
    assert result.stdout.startswith("-:2: error: missing action")
    assert result.stdout.endswith(": test.Svc * work\n")
    result = run("qubes-policy-lint", "-i", "-", stdin="work vault allow,target=$anyvm\n")
    assert result.returncode == 1
    assert result.stdout.startswith("-:1: error: invalid target '@anyvm'")


def test_lint_of_a_missing_file_and_usage_errors(tmp_path: Path) -> None:
    result = run("qubes-policy-lint", tmp_path / "absent.policy")
    assert result.returncode == 1
    assert result.stdout == (f"{tmp_path / 'absent.policy'}:0: error: cannot read:"
                             " No such file or directory\n")
    assert run("qubes-policy-lint", "--bogus").returncode == 2
    assert run("qubes-policy-lint", "-", "-").returncode == 2
    helped = run("qubes-policy-lint", "--help")
    assert helped.returncode == 0
    assert "FILE:LINE: error: MESSAGE" in helped.stdout
    for option in ("--include-service", "--show-line", "--policy-dir"):
        assert option in helped.stdout


# --- qrexec-legacy-convert -------------------------------------------------------------

#: Today's dom0: R4.0 per-service files, read by !compat-4.0 in 35-compat.policy.
LEGACY = {
    "test.Svc": (
        "# R4.0 layout: $ keywords, options glued by commas\n"
        "$tag:trusted $tag:trusted allow,user=root\n"
        "work $default ask,default_target=personal\n"
        "work $dispvm:dvm allow\n"
        "personal vault allow,target=$dispvm\n"
        "$anyvm dom0 allow,target=dom0,user=root\n"
        "$anyvm $anyvm ask\n"
    ),
    "test.Svc+secret": "vault work allow\n",
    "test.Tpl": "$type:TemplateVM $adminvm allow\n$anyvm $anyvm deny\n",
    "test.Empty": "# nothing here: every call falls through to the defaults\n",
}
POLICY_D = {
    "35-compat.policy": "# the stock compatibility include\n!compat-4.0\n",
    "90-default.policy": ("test.Empty * @anyvm @anyvm allow\n"
                          "test.Svc * @anyvm @anyvm deny\n"
                          "* * @anyvm @adminvm deny\n"),
}
CALLS = ("test.Svc", "test.Svc+secret", "test.Svc+other", "test.Tpl", "test.Empty",
         "test.Unknown")


def _legacy_world(tmp_path: Path) -> tuple[Path, Path]:
    legacy = files(tmp_path / "qubes-rpc-policy", LEGACY)
    (legacy / "include").mkdir()  # R4.0's include directory: not a policy file
    (legacy / "test.Old.rpmsave").write_text("$anyvm $anyvm allow\n")
    return legacy, files(tmp_path / "policy.d", POLICY_D)


def test_convert_gives_the_decisions_of_the_legacy_files(tmp_path: Path) -> None:
    legacy, policy_d = _legacy_world(tmp_path)
    before = decisions(legacy, policy_d, CALLS)
    assert {d[0] for d in before.values()} == set(Action)  # the table reaches all three

    result = run("qrexec-legacy-convert", "--policy-dir", legacy, "--policy-d", policy_d)
    assert result.returncode == 0, result.stderr
    assert f"wrote 11 rule(s) from 4 file(s) to {policy_d / '30-user.policy'}" in result.stdout

    # The old files are kept as NAME.rpmsave; the rest of the directory stays.
    assert sorted(p.name for p in legacy.iterdir()) == sorted(
        [f"{name}.rpmsave" for name in LEGACY] + ["include", "test.Old.rpmsave"])
    converted = (policy_d / "30-user.policy").read_text()
    rules = [line for line in converted.splitlines() if line and not line.startswith("#")]
    assert rules[:3] == [
        "test.Svc\t+secret\tvault\twork\tallow",
        # R4.0 ended a per-argument file with a deny: now written out.
        "test.Svc\t+secret\t@anyvm\t@anyvm\tdeny",
        "test.Svc\t+secret\t@anyvm\t@adminvm\tdeny",
    ]
    assert "test.Svc\t*\t@tag:trusted\t@tag:trusted\tallow user=root" in rules
    assert "test.Svc\t*\twork\t@default\task default_target=personal" in rules
    assert "test.Svc\t*\tpersonal\tvault\tallow target=@dispvm" in rules
    assert "test.Tpl\t*\t@type:TemplateVM\t@adminvm\tallow" in rules
    assert run("qubes-policy-lint", policy_d / "30-user.policy").returncode == 0

    # The same decisions, the engine loading both directories as the daemon does.
    assert decisions(legacy, policy_d, CALLS) == before


def test_convert_writes_out_what_legacy_files_include(tmp_path: Path) -> None:
    # R4.0's admin policy: per-service files that $include: shared lists.
    legacy = files(tmp_path / "qubes-rpc-policy", {
        "test.List": "$include:include/ro\n$anyvm $adminvm deny\n",
        "include/ro": "vault $adminvm allow,target=dom0\n$include:include/rw\n",
        "include/rw": "work $adminvm allow,target=dom0\n",
    })
    policy_d = files(tmp_path / "policy.d", POLICY_D)
    before = decisions(legacy, policy_d, ("test.List",))
    result = run("qrexec-legacy-convert", "--policy-dir", legacy, "--policy-d", policy_d)
    assert result.returncode == 0, result.stderr
    rules = [line for line in (policy_d / "30-user.policy").read_text().splitlines()
             if line and not line.startswith("#")]
    assert rules == ["test.List\t*\tvault\t@adminvm\tallow target=dom0",
                     "test.List\t*\twork\t@adminvm\tallow target=dom0",
                     "test.List\t*\t@anyvm\t@adminvm\tdeny"]
    # The included files stay where they are (other files may still name them).
    assert sorted(p.name for p in legacy.rglob("*")) == ["include", "ro", "rw",
                                                         "test.List.rpmsave"]
    assert decisions(legacy, policy_d, ("test.List",)) == before


def test_convert_r2_files_read_ahead_of_policy_d(tmp_path: Path) -> None:
    # No !compat-4.0: the engine reads the old directory as R2 files, first.
    legacy = files(tmp_path / "r2", {
        "test.Svc": "work $dispvm allow\nwork vault allow,target=personal,user=root\n"
                    "$anyvm $anyvm ask,user=user\n",
        "test.Tpl": "fedora dom0 allow\n",
    })
    policy_d = files(tmp_path / "policy.d", {"90-default.policy": "* * @anyvm @anyvm deny\n"})
    before = decisions(legacy, policy_d, CALLS)
    result = run("qrexec-legacy-convert", "--policy-dir", legacy, "--policy-d", policy_d)
    assert result.returncode == 0, result.stderr
    assert not (legacy / "test.Svc").exists() and (legacy / "test.Svc.rpmsave").exists()
    assert decisions(legacy, policy_d, CALLS) == before
    assert decisions(tmp_path / "gone", policy_d, CALLS) == before


def test_convert_is_idempotent_and_keeps_what_the_output_file_held(tmp_path: Path) -> None:
    legacy, policy_d = _legacy_world(tmp_path)
    own = "# my own rules\ntest.Other * work personal allow\n"
    (policy_d / "30-user.policy").write_text(own)
    before = decisions(legacy, policy_d, (*CALLS, "test.Other"))
    first = run("qrexec-legacy-convert", "--policy-dir", legacy, "--policy-d", policy_d)
    assert first.returncode == 0, first.stderr
    text = (policy_d / "30-user.policy").read_text()
    assert text.endswith("\n" + own) and text.startswith("# Converted by qrexec-legacy-convert")
    assert (policy_d / "30-user.policy.bak").read_text() == own
    assert decisions(legacy, policy_d, (*CALLS, "test.Other")) == before

    state = snapshot(legacy, policy_d)
    again = run("qrexec-legacy-convert", "--policy-dir", legacy, "--policy-d", policy_d)
    assert (again.returncode, again.stderr) == (0, "")
    assert again.stdout == f"qrexec-legacy-convert: nothing to convert in {legacy}\n"
    assert snapshot(legacy, policy_d) == state


def test_convert_dry_run_prints_the_rules_and_writes_nothing(tmp_path: Path) -> None:
    legacy, policy_d = _legacy_world(tmp_path)
    state = snapshot(legacy, policy_d)
    result = run("qrexec-legacy-convert", "-n", "--policy-dir", legacy, "--policy-d", policy_d)
    assert result.returncode == 0, result.stderr
    assert "test.Svc\t+secret\tvault\twork\tallow\n" in result.stdout
    assert f"would rename {legacy / 'test.Svc'} to {legacy / 'test.Svc.rpmsave'}" in result.stderr
    assert snapshot(legacy, policy_d) == state


def _refused(tmp_path: Path, legacy: Path, policy_d: Path, *args: str) -> list[str]:
    """Run a conversion that must be refused; prove nothing changed; return the
    error lines."""
    state = snapshot(tmp_path)
    result = run("qrexec-legacy-convert", "--policy-dir", legacy, "--policy-d", policy_d, *args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    *errors, last = result.stderr.splitlines()
    assert last == "qrexec-legacy-convert: cannot convert exactly; nothing written"
    assert snapshot(tmp_path) == state
    return errors


@pytest.mark.parametrize(("name", "text", "line", "message"), [
    ("test.Svc", "work vault allow\nwork vault allow,target=$anyvm\n", 2,
     "invalid target '@anyvm'"),
    ("test.Svc+arg", "$bogus vault allow\n", 1, "unknown keyword '@bogus'"),
    ("test.Svc", "work vault allow user=root,frobnicate=yes\n", 1, "parameter 'frobnicate'"),
])
def test_convert_refuses_a_line_the_engine_rejects(
    tmp_path: Path, name: str, text: str, line: int, message: str,
) -> None:
    legacy, policy_d = _legacy_world(tmp_path)
    (legacy / name).write_text(text)
    errors = _refused(tmp_path, legacy, policy_d)
    assert errors[0].startswith(f"{legacy / name}:{line}: error: {message}")


def test_convert_refuses_to_move_rules_past_others_and_names_them(tmp_path: Path) -> None:
    # Compat: a rule of 30-user.policy comes before the legacy rules today; the
    # converted rules would go in front of it.
    legacy, policy_d = _legacy_world(tmp_path)
    (policy_d / "30-user.policy").write_text("\ntest.Tpl * fedora @adminvm deny\n")
    errors = _refused(tmp_path, legacy, policy_d)
    assert errors == [
        f"{policy_d / '30-user.policy'}:2: error: this rule applies to test.Tpl and is "
        f"evaluated before the rules of {legacy} today, but would come after the converted"
        " ones; write them to a file that sorts after this one (--output)"]
    # Written after it (and before 35-compat.policy), nothing moves: accepted.
    ok = run("qrexec-legacy-convert", "--policy-dir", legacy, "--policy-d", policy_d,
             "--output", "31-legacy.policy")
    assert ok.returncode == 0, ok.stderr

    # R2 files are read ahead of everything: a "*" rule of an earlier file blocks.
    r2 = files(tmp_path / "r2", {"test.Svc": "work vault allow\n"})
    early = files(tmp_path / "early.d", {"10-early.policy": "* * @anyvm dom0 deny\n"})
    errors = _refused(tmp_path, r2, early)
    assert errors == [
        f"{early / '10-early.policy'}:1: error: this rule applies to test.Svc and would be "
        f"evaluated before the converted rules, but today the rules of {r2} come first;"
        " write them to a file that sorts before this one (--output)"]
    ok = run("qrexec-legacy-convert", "--policy-dir", r2, "--policy-d", early,
             "-o", "05-legacy.policy")
    assert ok.returncode == 0, ok.stderr


def test_convert_refuses_a_policy_that_already_has_errors(tmp_path: Path) -> None:
    legacy, policy_d = _legacy_world(tmp_path)
    (policy_d / "50-broken.policy").write_text("test.Svc * work\n")
    errors = _refused(tmp_path, legacy, policy_d)
    assert errors == [f"{policy_d / '50-broken.policy'}:1: error: missing action: expected"
                      " SERVICE ARGUMENT SOURCE TARGET ACTION [key=value ...]"]
    # The output must be a plain file: a directory in its place is refused too.
    (policy_d / "50-broken.policy").unlink()
    (policy_d / "30-user.policy").mkdir()
    errors = _refused(tmp_path, legacy, policy_d)
    assert errors[0].startswith(f"{policy_d / '30-user.policy'}:0: error: ")


@pytest.mark.parametrize("output", ["30-user", ".hidden.policy", "sub/30-user.policy"])
def test_convert_output_must_be_a_policy_file_name(tmp_path: Path, output: str) -> None:
    legacy, policy_d = _legacy_world(tmp_path)
    state = snapshot(tmp_path)
    result = run("qrexec-legacy-convert", "--policy-dir", legacy, "--policy-d", policy_d,
                 "--output", output)
    assert result.returncode == 2
    assert snapshot(tmp_path) == state


def test_convert_with_no_legacy_directory_has_nothing_to_do(tmp_path: Path) -> None:
    policy_d = files(tmp_path / "policy.d", POLICY_D)
    result = run("qrexec-legacy-convert", "--policy-dir", tmp_path / "none",
                 "--policy-d", policy_d)
    assert (result.returncode, result.stderr) == (0, "")
    assert "nothing to convert" in result.stdout
    assert run("qrexec-legacy-convert", "--bogus").returncode == 2

