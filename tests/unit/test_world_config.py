"""The world's config file: the examples and the packaged demo world load, every
mistake is reported at its file and line before anything starts, and the policy
it yields means what it says."""

from __future__ import annotations

import grp
import os
import pwd
import stat
import tomllib
from pathlib import Path

import pytest

from qrexec_trio.policy import Policy, Request, SystemInfo, load_policy, system_info_from_json
from qrexec_trio.world import (
    WorldConfig,
    WorldConfigError,
    load_world_config,
    system_info_json,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# The demo world is package data (qrexec-trio demo runs it from an installed wheel).
DEMO = Path(__file__).resolve().parents[2] / "src" / "qrexec_trio" / "world" / "demo"


def _world(tmp_path: Path, text: str, name: str = "world.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _line(text: str, marker: str, occurrence: int = 1) -> int:
    """The 1-based line of the ``occurrence``-th line containing ``marker``."""
    hits = [n for n, line in enumerate(text.split("\n"), start=1) if marker in line]
    assert len(hits) >= occurrence, f"{marker!r} occurs {len(hits)} times"
    return hits[occurrence - 1]


def _error(path: Path) -> WorldConfigError:
    with pytest.raises(WorldConfigError) as caught:
        load_world_config(path)
    return caught.value


def _assert_error_at(path: Path, line: int, *fragments: str, file: Path | None = None) -> None:
    error = _error(path)
    where = file if file is not None else path
    assert (error.file, error.line) == (str(where), line), str(error)
    assert str(error).startswith(f"{where}:{line}: ")
    for fragment in fragments:
        assert fragment in error.message, str(error)


def _script(path: Path, text: str = "#!/bin/sh\nexec cat\n", mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


# --- the examples and the demo world ----------------------------------------------


def test_demo_world_loads_with_the_vms_the_demo_relies_on() -> None:
    config = load_world_config(DEMO / "demo.toml")
    by_name = {vm.name: vm for vm in config.vms}
    assert [vm.name for vm in config.vms] == ["work", "vault", "personal", "dvm"]
    assert {name: vm.domid for name, vm in by_name.items()} == {
        "work": 10, "vault": 11, "personal": 12, "dvm": 13,
    }
    assert by_name["work"].default_dispvm == "dvm"
    assert by_name["dvm"].template_for_dispvms and not by_name["dvm"].autostart
    assert all(by_name[n].autostart for n in ("work", "vault", "personal"))
    services = {name: {s.name for s in vm.services} for name, vm in by_name.items()}
    assert services == {
        "work": {"demo.Echo"},
        "vault": {"demo.Echo", "demo.Sign"},
        "personal": {"demo.Echo", "demo.Date", "demo.Store"},
        "dvm": {"demo.Reverse"},
    }
    assert config.user == pwd.getpwuid(os.geteuid()).pw_name
    assert all(vm.default_user == config.user for vm in config.vms)


def test_a_world_is_private_unless_its_config_names_a_group(tmp_path: Path) -> None:
    assert load_world_config(_world(tmp_path, "[vm.a]\n")).group is None
    group = grp.getgrgid(os.getegid()).gr_name
    config = load_world_config(_world(tmp_path, f"[world]\ngroup = '{group}'\n[vm.a]\n"))
    assert config.group == group


def test_demo_services_are_installed_as_written() -> None:
    config = load_world_config(DEMO / "demo.toml")
    vault = {s.name: s for s in config.vm("vault").services}
    personal = {s.name: s for s in config.vm("personal").services}
    sign_file = DEMO / "services" / "sign.sh"
    assert vault["demo.Sign"].script == sign_file.read_text()
    assert vault["demo.Sign"].origin == str(sign_file)
    assert vault["demo.Echo"].script == "#!/bin/sh\nexec cat\n"
    assert personal["demo.Date"].script == "#!/bin/sh\ndate -u\n"
    text = (DEMO / "demo.toml").read_text()
    assert personal["demo.Date"].origin == f"{DEMO / 'demo.toml'}:{_line(text, 'date -u')}"


def test_demo_service_files_are_executable_in_the_tree() -> None:
    scripts = sorted((DEMO / "services").glob("*.sh"))
    assert scripts
    for script in scripts:
        assert script.stat().st_mode & 0o777 == 0o755, script


def test_the_demo_program_loads_the_packaged_world() -> None:
    from qrexec_trio.roles.demo import packaged_world  # the program, not just the file

    with packaged_world() as config_file:
        assert config_file.read_text() == (DEMO / "demo.toml").read_text()
        config = load_world_config(config_file)
    assert [vm.name for vm in config.vms] == ["work", "vault", "personal", "dvm"]
    assert {s.name for s in config.vm("vault").services} == {"demo.Echo", "demo.Sign"}


def test_every_demo_world_file_is_declared_package_data() -> None:
    pyproject = tomllib.loads((DEMO.parents[3] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["qrexec_trio.world"]
    declared = {path for pattern in patterns for path in DEMO.parent.glob(pattern)}
    assert {path for path in DEMO.rglob("*") if path.is_file()} <= declared


def test_minimal_world_loads() -> None:
    config = load_world_config(EXAMPLES / "minimal.toml")
    assert [(vm.name, vm.domid) for vm in config.vms] == [("server", 10), ("client", 11)]
    assert [s.name for s in config.vm("server").services] == ["demo.Echo"]
    assert config.vm("client").services == ()
    assert len(config.policy_files) == 1


# --- the policy an example yields ---------------------------------------------------


def _demo_policy(tmp_path: Path) -> tuple[WorldConfig, Policy, SystemInfo]:
    config = load_world_config(DEMO / "demo.toml")
    policy_d = tmp_path / "policy.d"
    policy_d.mkdir()
    for name, text in config.policy_files:
        (policy_d / name).write_text(text)
    policy = load_policy(None, str(policy_d), required=True)
    assert policy.errors == ()
    return config, policy, system_info_from_json(system_info_json(config))


@pytest.mark.parametrize(
    ("source", "target", "service", "allowed"),
    [
        ("work", "vault", "demo.Sign", True),
        ("personal", "vault", "demo.Sign", False),
        ("work", "personal", "demo.Echo", True),
        ("work", "vault", "demo.Echo", True),
        ("personal", "work", "demo.Echo", False),
        ("vault", "personal", "demo.Date", True),
        ("work", "personal", "demo.Store+notes.txt", True),
        ("vault", "personal", "demo.Store", False),
        ("work", "vault", "demo.Reverse", False),
        ("personal", "@dispvm", "demo.Reverse", False),
    ],
)
def test_demo_policy_decides_as_documented(
    tmp_path: Path, source: str, target: str, service: str, allowed: bool
) -> None:
    _, policy, system_info = _demo_policy(tmp_path)
    decision = policy.evaluate(Request.from_call(source, target, service), system_info)
    assert decision.allowed is allowed


def test_demo_dispvm_call_goes_to_a_new_dispvm_of_dvm(tmp_path: Path) -> None:
    _, policy, system_info = _demo_policy(tmp_path)
    decision = policy.evaluate(Request.from_call("work", "@dispvm", "demo.Reverse"), system_info)
    assert decision.allowed
    assert decision.target == "@dispvm:dvm"


def test_demo_denial_is_traced_to_its_config_line(tmp_path: Path) -> None:
    config, policy, system_info = _demo_policy(tmp_path)
    decision = policy.evaluate(Request.from_call("personal", "vault", "demo.Sign"), system_info)
    assert not decision.allowed
    text = (DEMO / "demo.toml").read_text()
    rule_line = _line(text, "demo.Sign      *    personal  vault     deny")
    assert decision.rule is not None
    file_name = Path(decision.rule.path).name
    assert config.policy_location(file_name, decision.rule.line) == (
        f"{DEMO / 'demo.toml'}:{rule_line}"
    )


# --- system info --------------------------------------------------------------------


def test_system_info_is_accepted_by_the_policy_engine(tmp_path: Path) -> None:
    config = load_world_config(DEMO / "demo.toml")
    info = system_info_from_json(system_info_json(config))
    assert info.admin_vm == "dom0"
    assert set(info.domains) == {"dom0", "work", "vault", "personal", "dvm"}
    assert info.domains["work"].default_dispvm == "dvm"
    assert info.domains["work"].tags == frozenset({"trusted"})
    assert info.dispvm_template("dvm") is not None
    assert info.dispvm_template("work") is None
    world = _world(tmp_path, '[vm.t]\ntype = "TemplateVM"\n[vm.s]\ntype = "StandaloneVM"\n')
    types = system_info_from_json(system_info_json(load_world_config(world)))
    assert (types.domains["t"].type, types.domains["s"].type) == ("TemplateVM", "StandaloneVM")


# --- what loads, and how ------------------------------------------------------------


def test_defaults_and_domid_assignment(tmp_path: Path) -> None:
    path = _world(tmp_path, "[vm.a]\n[vm.b]\ndomid = 10\n[vm.c]\n[vm.d]\ndomid = 12\n")
    config = load_world_config(path)
    assert [(vm.name, vm.domid) for vm in config.vms] == [
        ("a", 11), ("b", 10), ("c", 13), ("d", 12),
    ]
    a = config.vm("a")
    assert (a.type, a.tags, a.default_dispvm, a.template_for_dispvms, a.autostart) == (
        "AppVM", (), None, False, True,
    )
    assert config.policy_files == ()
    assert config.dom0_services == ()


def test_service_forms(tmp_path: Path) -> None:
    _script(tmp_path / "svc" / "copy.py", "#!/usr/bin/env python3\nprint('hi')\n")
    path = _world(tmp_path, """\
[dom0.services]
"my.Echo" = "exec cat"
[vm.a.services]
"a.Shell" = "echo one\\necho two\\n"
"a.Command" = { command = "date -u" }
"a.Python" = "#!/usr/bin/python3\\nprint(1)"
"a.File" = { file = "svc/copy.py" }
"a.Arg+x.y" = "exec true"
""")
    config = load_world_config(path)
    scripts = {s.name: s.script for s in config.vm("a").services}
    assert scripts == {
        "a.Shell": "#!/bin/sh\necho one\necho two\n",
        "a.Command": "#!/bin/sh\ndate -u\n",
        "a.Python": "#!/usr/bin/python3\nprint(1)\n",
        "a.File": "#!/usr/bin/env python3\nprint('hi')\n",
        "a.Arg+x.y": "#!/bin/sh\nexec true\n",
    }
    assert [(s.name, s.script) for s in config.dom0_services] == [
        ("my.Echo", "#!/bin/sh\nexec cat\n"),
    ]


def test_policy_files_come_after_inline_rules_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "zz.policy").write_text("demo.A * a b allow\n")
    (tmp_path / "pol" / "aa.policy").write_text("demo.B * b a allow\n")
    path = _world(tmp_path, """\
[vm.a]
[vm.b]
[policy]
rules = '''
demo.C * a b deny
'''
files = ["pol/zz.policy", "pol/aa.policy"]
""")
    config = load_world_config(path)
    names = [name for name, _ in config.policy_files]
    assert names == sorted(names)
    assert [text for _, text in config.policy_files] == [
        "demo.C * a b deny\n", "demo.A * a b allow\n", "demo.B * b a allow\n",
    ]
    assert config.policy_location(names[0], 1) == f"{path}:5"
    assert config.policy_location(names[2], 1) == f"{tmp_path / 'pol' / 'aa.policy'}:1"


# --- bad input: TOML itself ---------------------------------------------------------


def test_duplicate_vm_table_is_reported_at_the_second_one(tmp_path: Path) -> None:
    text = "[vm.work]\ndomid = 10\n\n[vm.vault]\n\n[vm.work]\nautostart = false\n"
    _assert_error_at(_world(tmp_path, text), 6, "invalid TOML", "('vm', 'work')")


def test_toml_syntax_error_keeps_its_line(tmp_path: Path) -> None:
    _assert_error_at(_world(tmp_path, "[vm.a]\n\ndomid = \n"), 3, "invalid TOML")


def test_unterminated_string_is_reported_at_the_end(tmp_path: Path) -> None:
    text = '[vm.a]\n[policy]\nrules = """\ndemo.A * a a allow\n'
    _assert_error_at(_world(tmp_path, text), 5, "invalid TOML")


def test_missing_and_non_utf8_config(tmp_path: Path) -> None:
    _assert_error_at(tmp_path / "nope.toml", 1, "cannot read")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[vm.a]\n# caf\xe9\n")
    _assert_error_at(path, 2, "UTF-8")


# --- bad input: keys and types ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "marker", "fragments"),
    [
        ("[vm.a]\ndomdi = 10\n", "domdi", ("'domdi'", "did you mean 'domid'")),
        ("[vm.a]\n[vms.b]\n", "[vms.b]", ("'vms'", "top level")),
        ("[world]\nusr = 'x'\n[vm.a]\n", "usr", ("'usr'",)),
        ("[vm.a]\n[dom0]\nservice = {}\n", "service =", ("'service'",)),
        ("[vm.a]\n[policy]\nrule = ''\n", "rule =", ("'rule'",)),
        (
            "[vm.a]\n[vm.a.services]\n\"x.Y\" = { comand = 'true' }\n",
            "x.Y",
            ("'comand'", "did you mean 'command'"),
        ),
    ],
)
def test_unknown_keys_are_errors_at_their_line(
    tmp_path: Path, text: str, marker: str, fragments: tuple[str, ...]
) -> None:
    _assert_error_at(_world(tmp_path, text), _line(text, marker), "unknown key", *fragments)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("0", "from 1 to 32767"),
        ("32768", "from 1 to 32767"),
        ("-3", "from 1 to 32767"),
        ('"11"', "must be an integer"),
        ("true", "must be an integer"),
        ("1.5", "must be an integer"),
    ],
)
def test_bad_domid(tmp_path: Path, value: str, fragment: str) -> None:
    text = f"[vm.a]\n[vm.b]\ntags = []\ndomid = {value}\n"
    _assert_error_at(_world(tmp_path, text), 4, fragment)


def test_duplicate_domid_is_reported_at_the_second_vm(tmp_path: Path) -> None:
    text = "[vm.a]\ndomid = 20\n[vm.b]\n[vm.c]\nautostart = true\ndomid = 20\n"
    _assert_error_at(_world(tmp_path, text), 6, "domid 20", "'a'")


@pytest.mark.parametrize(
    ("text", "marker", "fragments"),
    [
        ("[vm.a]\ntags = 'x'\n", "tags", ("list of strings",)),
        ("[vm.a]\ntags = ['ok', 'not ok']\n", "tags", ("'not ok'",)),
        ("[vm.a]\nautostart = 'no'\n", "autostart", ("true or false",)),
        ("[vm.a]\ntype = 'DispVM'\n", "type", ("'DispVM'", "the world makes")),
        ("[vm.a]\ntype = 'AdminVM'\n", "type", ("'AdminVM'",)),
        ("[vm.a]\ntype = 'HVM'\n", "type", ("unknown type 'HVM'",)),
        (
            "[vm.a]\ntype = 'TemplateVM'\ntemplate_for_dispvms = true\n",
            "template_for_dispvms",
            ("TemplateVM",),
        ),
        ("[vm.a]\n[world]\nuser = 'no-such-user-qt'\n", "user", ("no such user",)),
        ("[vm.a]\n[world]\ngroup = 'no-such-group-qt'\n", "group",
         ("world.group: no such group 'no-such-group-qt'",)),
        ("[world]\ngroup = 'bad group'\n[vm.a]\n", "group", ("invalid group name",)),
        ("[world]\ngroup = 0\n[vm.a]\n", "group", ("world.group must be a string",)),
        ("[vm.a]\ndefault_user = 'bad user'\n", "default_user", ("invalid user name",)),
        ("vm = 3\n", "vm = 3", ("must be a table",)),
        ("[vm]\na = 3\n", "a = 3", ("vm.a must be a table",)),
        ("[world]\n", "[world]", ("at least one",)),
    ],
)
def test_wrong_values_are_errors_at_their_line(
    tmp_path: Path, text: str, marker: str, fragments: tuple[str, ...]
) -> None:
    _assert_error_at(_world(tmp_path, text), _line(text, marker), *fragments)


# --- bad input: VM names and DispVM templates ---------------------------------------


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        ("[vm.dom0]", "dom0 is the admin VM"),
        ('[vm."1st"]', "invalid VM name"),
        ('[vm."my vm"]', "invalid VM name"),
        (f'[vm.{"a" * 32}]', "invalid VM name"),
        ("[vm.disp12]", "reserved for DispVMs"),
    ],
)
def test_bad_vm_names(tmp_path: Path, header: str, fragment: str) -> None:
    text = f"[vm.ok]\n\n{header}\nautostart = true\n"
    _assert_error_at(_world(tmp_path, text), 3, fragment)


def test_dom0_services_table_without_its_header_points_at_that_table(tmp_path: Path) -> None:
    text = "[vm.ok]\n\n[vm.dom0.services]\n'x' = 'true'\n"
    _assert_error_at(_world(tmp_path, text), 3, "dom0 is the admin VM")


def test_default_dispvm_naming_an_unknown_vm(tmp_path: Path) -> None:
    text = "[vm.work]\ntags = []\ndefault_dispvm = 'nosuch'\n[vm.dvm]\n"
    _assert_error_at(_world(tmp_path, text), 3, "'nosuch'", "not a VM")


def test_default_dispvm_naming_a_vm_that_is_not_a_template(tmp_path: Path) -> None:
    text = "[vm.dvm]\ntemplate_for_dispvms = false\n[vm.work]\ndefault_dispvm = 'dvm'\n"
    _assert_error_at(_world(tmp_path, text), 4, "'dvm' is not a template", "[vm.dvm]")


# --- bad input: services ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ('"a/b"', "contains '/'"),
        ('"../x"', "contains '/'"),
        ('"my service"', "invalid service name"),
        ('"+arg"', "invalid service name"),
        ('"svc$"', "invalid service name"),
        ('".."', "invalid service name"),
        (f'"{"s" * 256}"', "invalid service name"),
    ],
)
def test_bad_service_names(tmp_path: Path, name: str, fragment: str) -> None:
    text = f"[vm.a]\n[vm.a.services]\n\"ok\" = 'true'\n{name} = 'true'\n"
    _assert_error_at(_world(tmp_path, text), 4, fragment)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("''", "empty command"),
        ("{ command = '  ' }", "empty command"),
        ("{ command = 'a', file = 'b' }", "exactly one"),
        ("{}", "exactly one"),
        ("{ file = 3 }", "must be a string"),
        ("7", "shell command"),
        ('"a\\u0000b"', "NUL"),
    ],
)
def test_bad_service_definitions(tmp_path: Path, value: str, fragment: str) -> None:
    text = f"[vm.a.services]\n\n\"x.Y\" = {value}\n"
    _assert_error_at(_world(tmp_path, text), 3, fragment)


def test_missing_service_file(tmp_path: Path) -> None:
    text = "[vm.a]\n[vm.a.services]\n'ok' = 'true'\n'x.Y' = { file = 'services/nope.sh' }\n"
    _assert_error_at(_world(tmp_path, text), 4, "does not exist", "services/nope.sh")


def test_non_executable_service_file(tmp_path: Path) -> None:
    script = _script(tmp_path / "services" / "plain.sh", mode=0o644)
    assert not script.stat().st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    text = "[vm.a.services]\n'x.Y' = { file = 'services/plain.sh' }\n"
    _assert_error_at(_world(tmp_path, text), 2, "not executable")


def test_service_file_without_shebang_or_not_a_file(tmp_path: Path) -> None:
    _script(tmp_path / "services" / "bare.sh", "exec cat\n")
    text = "[vm.a.services]\n'x.Y' = { file = 'services/bare.sh' }\n"
    _assert_error_at(_world(tmp_path, text), 2, "'#!'")
    text = "[vm.a.services]\n\n'x.Y' = { file = 'services' }\n"
    _assert_error_at(_world(tmp_path, text, "dir.toml"), 3, "not a regular file")


# --- bad input: policy --------------------------------------------------------------


def test_bad_inline_rule_is_reported_at_its_config_line(tmp_path: Path) -> None:
    text = """\
[vm.work]
[vm.vault]

[policy]
rules = \"\"\"
# a comment, then a blank line

demo.Echo * work vault allow
demo.Echo * work vault permit
\"\"\"
"""
    _assert_error_at(_world(tmp_path, text), 9, "unknown action 'permit'")


def test_bad_inline_rule_on_the_opening_line(tmp_path: Path) -> None:
    text = "[vm.work]\n[policy]\nrules = 'demo.Echo * work'\n"
    _assert_error_at(_world(tmp_path, text), 3, "missing action")
    text = "[vm.work]\n[policy]\nrules = '''demo.Echo * work work allow\ndemo.Echo\n'''\n"
    _assert_error_at(_world(tmp_path, text, "two.toml"), 4, "missing action")


def test_bad_policy_file_is_reported_at_its_own_line(tmp_path: Path) -> None:
    policy = tmp_path / "policy" / "extra.policy"
    policy.parent.mkdir()
    policy.write_text("# extra\ndemo.Echo * work work allow\ndemo.Echo * @bogus work allow\n")
    text = "[vm.work]\n[policy]\nfiles = ['policy/extra.policy']\n"
    _assert_error_at(_world(tmp_path, text), 3, "@bogus", file=policy)


def test_missing_or_repeated_policy_file_is_reported_at_files(tmp_path: Path) -> None:
    text = "[vm.work]\n[policy]\nrules = ''\nfiles = ['nope.policy']\n"
    _assert_error_at(_world(tmp_path, text), 4, "does not exist")
    (tmp_path / "a.policy").write_text("")
    text = "[vm.work]\n[policy]\nfiles = ['a.policy', './a.policy', 'a.policy']\n"
    _assert_error_at(_world(tmp_path, text, "twice.toml"), 3, "listed twice")


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        ("demo.Echo * work vualt allow", "'vualt' is not a domain"),
        ("demo.Echo * wrok vault allow", "'wrok' is not a domain"),
        ("demo.Echo * work @dispvm:vault allow", "'vault' is not a VM with template_for"),
        ("demo.Echo * work @anyvm allow target=nosuch", "'nosuch' is not a domain"),
        ("demo.Echo * work @dispvm allow target=@dispvm:work", "'work' is not a VM"),
        ("!include other.policy", "!include"),
    ],
)
def test_policy_must_fit_the_world(tmp_path: Path, rule: str, fragment: str) -> None:
    text = f"[vm.work]\n[vm.vault]\n[policy]\nrules = '''\n{rule}\n'''\n"
    _assert_error_at(_world(tmp_path, text), 5, fragment)


def test_policy_may_name_dom0_templates_and_keywords(tmp_path: Path) -> None:
    text = """\
[vm.work]
default_dispvm = "dvm"
tags = ["t"]
[vm.dvm]
template_for_dispvms = true
[policy]
rules = '''
demo.A * work dom0 allow
demo.B * @tag:t @adminvm allow
demo.C * @type:AppVM @dispvm:dvm allow
demo.D * work @dispvm:@tag:t allow
demo.E * work @default allow target=dvm
demo.F * work @default ask default_target=@dispvm:dvm
'''
"""
    config = load_world_config(_world(tmp_path, text))
    assert "demo.F" in config.policy_files[0][1]


# --- the line finder does not take string contents for structure ------------------


def test_table_lookalikes_inside_multiline_strings_are_not_headers(tmp_path: Path) -> None:
    text = """\
[vm.a.services]
"x.Y" = '''
if [ -f x ]; then :; fi
[vm.b]
domid = 5
'''

[vm.b]
domid = 0
"""
    _assert_error_at(_world(tmp_path, text), 9, "from 1 to 32767")
