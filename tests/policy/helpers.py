"""Shared fixtures-as-functions for the policy tests."""

from __future__ import annotations

from pathlib import Path

from qrexec_trio.policy import (
    Decision,
    DomainInfo,
    Policy,
    PolicyCache,
    Request,
    SystemInfo,
)

#: A small world: dom0, three AppVMs, one DispVM template, one running DispVM.
SYSTEM = SystemInfo.of(
    [
        DomainInfo("dom0", "AdminVM"),
        DomainInfo("work", "AppVM", tags=frozenset({"trusted"}), default_dispvm="dvm"),
        DomainInfo("personal", "AppVM", default_dispvm="dvm"),
        DomainInfo("vault", "AppVM", tags=frozenset({"trusted", "offline"})),
        DomainInfo("fedora", "TemplateVM"),
        DomainInfo("dvm", "AppVM", tags=frozenset({"dvm-tag"}), template_for_dispvms=True),
        DomainInfo("disp7", "DispVM"),
    ]
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def policy_d(tmp_path: Path, files: dict[str, str]) -> Path:
    """A policy.d directory holding ``files`` (name -> text)."""
    root = tmp_path / "policy.d"
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write(root / name, text)
    return root


def r2_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "r2"
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write(root / name, text)
    return root


def cache_for(tmp_path: Path, *, multi: dict[str, str] | None = None,
              r2: dict[str, str] | None = None) -> PolicyCache:
    return PolicyCache(
        str(r2_dir(tmp_path, r2 or {})), str(policy_d(tmp_path, multi or {}))
    )


def decide(policy: Policy | PolicyCache, source: str, target: str, call: str,
           system: SystemInfo = SYSTEM) -> Decision:
    return policy.evaluate(Request.from_call(source, target, call), system)


def one_file(tmp_path: Path, text: str) -> PolicyCache:
    """A cache over a policy.d holding one file with ``text``."""
    return cache_for(tmp_path, multi={"50-test.policy": text})
