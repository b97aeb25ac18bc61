"""The domain registry as a JSON file, and the minimal one built from a request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qrexec_trio.policy import (
    DomainInfo,
    SystemInfo,
    SystemInfoError,
    load_system_info,
    minimal_system_info,
    system_info_from_json,
)

GOOD: dict[str, Any] = {
    "domains": {
        "dom0": {"type": "AdminVM"},
        "work": {"type": "AppVM", "tags": ["trusted"], "default_dispvm": "dvm"},
        "dvm": {"type": "AppVM", "template_for_dispvms": True},
    }
}


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "system.json"
    path.write_text(json.dumps(GOOD))
    info = load_system_info(str(path))
    assert info.admin_vm == "dom0"
    assert info.domains["work"] == DomainInfo("work", "AppVM", frozenset({"trusted"}), "dvm")
    assert info.dispvm_template("dvm") is not None
    assert info.dispvm_template("work") is None


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"domains": []},
        {"domains": {}, "extra": 1},
        {"domains": {"work": {"type": "Laptop"}}},
        {"domains": {"work": {}}},
        {"domains": {"work": {"type": "AppVM", "tag": ["x"]}}},
        {"domains": {"work": {"type": "AppVM", "tags": "x"}}},
        {"domains": {"work": {"type": "AppVM", "tags": ["a b"]}}},
        {"domains": {"work": {"type": "AppVM", "default_dispvm": "a/b"}}},
        {"domains": {"work": {"type": "AppVM", "template_for_dispvms": "yes"}}},
        {"domains": {"wo rk": {"type": "AppVM"}}},
        {"domains": {"a": {"type": "AdminVM"}, "b": {"type": "AdminVM"}}},
        {"domains": {"work": "AppVM"}},
    ],
)
def test_malformed_system_info(data: Any) -> None:
    with pytest.raises(SystemInfoError):
        system_info_from_json(data)


def test_unreadable_or_invalid_json(tmp_path: Path) -> None:
    with pytest.raises(SystemInfoError, match=r"absent\.json"):
        load_system_info(str(tmp_path / "absent.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemInfoError, match=r"bad\.json"):
        load_system_info(str(tmp_path / "bad.json"))


def test_minimal_system_info() -> None:
    info = minimal_system_info(["work", "dom0", "@dispvm", "bad/name"])
    assert set(info.domains) == {"dom0", "work"}
    assert info.domains["dom0"].is_admin
    assert info.domains["work"].type == "AppVM"
    assert info.domains["work"].default_dispvm is None


def test_system_info_is_read_only() -> None:
    info = SystemInfo.of([DomainInfo("work", "AppVM")])
    with pytest.raises(TypeError):
        info.domains["x"] = DomainInfo("x", "AppVM")  # type: ignore[index]
