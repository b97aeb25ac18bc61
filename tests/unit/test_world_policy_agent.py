"""A world's policy agent: ``[policy] agent``, checked like the rest of the config,
and the policy.Ask / policy.Notify services the world installs for it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qrexec_trio.world import WorldConfigError, load_world_config
from qrexec_trio.world._layout import WorldLayout
from qrexec_trio.world._runner import _lay_out, policy_agent_services

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

BASE = """\
[vm.work]
[vm.gui]
[vm.gui.services]
"policy.Notify" = "cat >> /tmp/notes"
[vm.late]
autostart = false
[policy]
rules = "demo.Echo * work gui ask"
"""


def _config(tmp_path: Path, agent_line: str) -> Path:
    path = tmp_path / "world.toml"
    path.write_text(BASE + agent_line)
    return path


def test_the_ask_example_names_its_agent() -> None:
    config = load_world_config(EXAMPLES / "ask.toml")
    assert config.policy_agent == "client"


@pytest.mark.parametrize(("line", "agent"), [("", None), ('agent = "gui"\n', "gui"),
                                             ('agent = "dom0"\n', "dom0")])
def test_agent_is_dom0_or_a_vm(tmp_path: Path, line: str, agent: str | None) -> None:
    assert load_world_config(_config(tmp_path, line)).policy_agent == agent


@pytest.mark.parametrize(("line", "message"), [
    ('agent = "nobody"\n', "neither dom0 nor a VM of this world"),
    ('agent = "late"\n', "must start with the world"),
    ("agent = 3\n", "policy.agent must be a string"),
])
def test_bad_agents_are_errors_at_their_line(tmp_path: Path, line: str, message: str) -> None:
    path = _config(tmp_path, line)
    with pytest.raises(WorldConfigError) as caught:
        load_world_config(path)
    assert (caught.value.line, message in caught.value.message) == (
        BASE.count("\n") + 1, True), str(caught.value)


def test_agent_services_run_the_terminal_agent_unless_the_config_has_its_own(
        tmp_path: Path) -> None:
    config = load_world_config(_config(tmp_path, 'agent = "gui"\n'))
    (ask,) = policy_agent_services(config.vm("gui").services)
    assert ask.name == "policy.Ask"
    assert ask.script.startswith("#!/bin/sh\nexec ")
    assert ask.script.endswith(" policy-agent policy.Ask\n")
    assert {s.name for s in policy_agent_services(())} == {"policy.Ask", "policy.Notify"}


@pytest.mark.parametrize("agent", ["gui", "dom0"])
def test_the_world_installs_them_where_the_agent_is(tmp_path: Path, agent: str) -> None:
    config = load_world_config(_config(tmp_path, f'agent = "{agent}"\n'))
    layout = WorldLayout(tmp_path / "w")
    layout.root.mkdir()
    _lay_out(config, layout)
    where = layout.dom0_services if agent == "dom0" else layout.vm_dir("gui") / "rpc"
    ask = where / "policy.Ask"
    assert os.access(ask, os.X_OK)
    assert "policy-agent policy.Ask" in ask.read_text()
    notify = (where / "policy.Notify").read_text()
    assert ("cat >> /tmp/notes" in notify) == (agent == "gui")  # the config's own stays
    assert not (layout.vm_dir("work") / "rpc" / "policy.Ask").exists()
