"""The installed policy commands, run as processes."""

from __future__ import annotations

import subprocess
from pathlib import Path

from harness import program


def _policy_d(tmp_path: Path, text: str) -> Path:
    root = tmp_path / "policy.d"
    root.mkdir()
    (root / "30-test.policy").write_text(text)
    return root


def test_qrexec_policy_prints_the_decision_on_stdout_and_logs_on_stderr(tmp_path: Path) -> None:
    root = _policy_d(tmp_path, "test.Svc * work personal allow\n")
    argv = [program("qrexec-policy"), "--policy-dir", str(tmp_path / "none"),
            "--policy-d", str(root), "--"]
    allowed = subprocess.run([*argv, "work", "personal", "test.Svc"],
                             capture_output=True, text=True, timeout=30)
    assert allowed.returncode == 0
    assert "result=allow\n" in allowed.stdout and "target=personal\n" in allowed.stdout
    assert "policy decision" in allowed.stderr and "policy decision" not in allowed.stdout
    denied = subprocess.run([*argv, "work", "vault", "test.Svc", "SOCKET7"],
                            capture_output=True, text=True, timeout=30)
    assert (denied.returncode, denied.stdout) == (1, "result=deny\n")
    just = subprocess.run([program("qrexec-policy"), "--just-evaluate", *argv[1:],
                           "work", "personal", "test.Svc", "SOCKET7"],
                          capture_output=True, text=True, timeout=30)
    assert (just.returncode, just.stdout) == (0, "")
    # With a request id, an allowed call is connected (R2): no daemon here, so it fails.
    no_daemon = subprocess.run([*argv[:1], "--socket-dir", str(tmp_path), *argv[1:],
                                "work", "personal", "test.Svc", "SOCKET7"],
                               capture_output=True, text=True, timeout=30)
    assert no_daemon.returncode == 1
    assert "result=allow\n" in no_daemon.stdout
    assert "connect failed" in no_daemon.stderr and "not running" in no_daemon.stderr


def test_policy_lint_through_the_umbrella(tmp_path: Path) -> None:
    good = _policy_d(tmp_path, "test.Svc * @anyvm @anyvm deny\n")
    clean = subprocess.run([program("qrexec-trio"), "policy", "lint", str(good)],
                           capture_output=True, text=True, timeout=30)
    assert (clean.returncode, clean.stdout) == (0, "")
    (good / "40-bad.policy").write_text("test.Svc * work\n")
    broken = subprocess.run([program("qrexec-trio"), "policy", "lint", str(good)],
                            capture_output=True, text=True, timeout=30)
    assert broken.returncode == 1
    assert broken.stdout.startswith(f"{good / '40-bad.policy'}:1: ")
