"""The clients' light command-line parser (qrexec_trio._options): getopt_long's rules,
argparse's messages, and a start-up cost of nothing but itself."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qrexec_trio._options import Namespace, Operand, Option, Parser
from qrexec_trio.roles import client, client_vm


def _parser(*, stop_at_operand: bool = False, usage_status: int = 2) -> Parser:
    return Parser(
        "prog",
        (
            Option("-a", "--alpha", metavar="A", help="the alpha value"),
            Option("-p", "--prefix-data", action="once", metavar="DATA", help="once only"),
            Option("-t", "--tee", dest="tee", action="true", default=None, help="tee on"),
            Option(None, "--no-tee", dest="tee", action="false", help="tee off"),
            Option("-v", "--verbose", action="count", help="more"),
            Option("-w", None, dest="wait", convert=float, help="seconds"),
            Option(None, "--level", choices=("low", "high"), default="low", help="how much"),
            Option(None, "--use-x", action="true", help="x"),
            Option(None, "--use-y", action="true", help="y"),
            Option(None, "--user", help="an exact name that is also a prefix of none"),
        ),
        (Operand("first", "FIRST", "the first"), Operand("rest", "REST...", rest=True)),
        description="A test program.", epilog="The end.", usage_status=usage_status,
        stop_at_operand=stop_at_operand, exclusive=[("use_x", "use_y")],
    )


def _usage_error(parser: Parser, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(argv)
    assert stopped.value.code == parser.usage_status
    out, err = capsys.readouterr()
    assert out == ""
    usage, error = err.splitlines()
    assert usage.startswith(f"usage: {parser.prog} ")
    assert error.startswith(f"{parser.prog}: error: ")
    return error.removeprefix(f"{parser.prog}: error: ")


def test_importing_the_parser_imports_nothing_heavy() -> None:
    """What the parser itself adds to a client's start-up (its packages are
    imported first: their own imports are theirs to keep light)."""
    heavy = ("argparse", "re", "typing", "dataclasses", "enum", "gettext", "textwrap")
    code = ("import sys; import qrexec_trio.roles; before = set(sys.modules); "
            "import qrexec_trio._options; "
            f"print(' '.join(name for name in {heavy!r} "
            "if name in sys.modules and name not in before))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == ""


def test_defaults() -> None:
    args = _parser().parse_args(["one"])
    assert vars(args) == {"alpha": None, "prefix_data": None, "tee": None,
                          "verbose": 0, "wait": None, "level": "low", "use_x": False,
                          "use_y": False, "user": None, "first": "one", "rest": []}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-tv", "-v", "x"], {"tee": True, "verbose": 2}),
        (["-tpDATA", "x"], {"tee": True, "prefix_data": "DATA"}),
        (["-p", "DATA", "x"], {"prefix_data": "DATA"}),
        # A value is the next argument whatever it looks like, as with getopt.
        (["-p", "-t", "x"], {"prefix_data": "-t", "tee": None}),
        (["--prefix-data=-t", "x"], {"prefix_data": "-t"}),
        (["--prefix-data", "", "x"], {"prefix_data": ""}),
        (["--alpha=a=b", "x"], {"alpha": "a=b"}),
        # Unambiguous prefixes of long names, with either form of value.
        (["--pre", "D", "--al=A", "--no", "x"], {"prefix_data": "D", "alpha": "A",
                                                   "tee": False}),
        # An exact name wins over the longer names it is a prefix of.
        (["--use-x", "x"], {"use_x": True}),
        (["--user", "u", "x"], {"user": "u"}),
        # The last of a true/false pair wins.
        (["-t", "--no-tee", "x"], {"tee": False}),
        (["--no-tee", "-t", "x"], {"tee": True}),
        (["-w", "1.5", "--level", "high", "x"], {"wait": 1.5, "level": "high"}),
        (["-w-1", "x"], {"wait": -1.0}),
        (["-a", "1", "-a", "2", "x"], {"alpha": "2"}),
    ],
)
def test_option_forms(argv: list[str], expected: dict[str, object]) -> None:
    args = vars(_parser().parse_args(argv))
    assert {name: args[name] for name in expected} == expected
    assert args["first"] == "x"


@pytest.mark.parametrize(
    ("argv", "first", "rest"),
    [
        (["-t", "a", "-t", "b"], "a", ["-t", "b"]),
        (["a", "--", "-t"], "a", ["--", "-t"]),
        (["--", "-t", "b"], "-t", ["b"]),
        (["-", "-t"], "-", ["-t"]),
    ],
)
def test_options_can_stop_at_the_first_operand(
    argv: list[str], first: str, rest: list[str]
) -> None:
    args = _parser(stop_at_operand=True).parse_args(argv)
    assert (args.first, args.rest, args.tee) == (first, rest, True if argv[0] == "-t" else None)


def test_otherwise_options_and_operands_mix_until_double_dash() -> None:
    args = _parser().parse_args(["a", "-t", "b", "--alpha", "A", "--", "-v"])
    assert (args.first, args.rest, args.tee, args.alpha, args.verbose) == (
        "a", ["b", "-v"], True, "A", 0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: FIRST"),
        (["-x", "a"], "unrecognized arguments: -x"),
        (["-tx", "a"], "unrecognized arguments: -x"),
        (["--nope", "a"], "unrecognized arguments: --nope"),
        (["--", "a"], None),
        (["--=x", "a"], "unrecognized arguments: --"),
        (["--use", "a"], "ambiguous option: --use could match --use-x, --use-y, --user"),
        (["a", "-p"], "argument -p/--prefix-data: expected one argument"),
        (["a", "--pre"], "argument -p/--prefix-data: expected one argument"),
        (["-p", "1", "--prefix-data=2", "a"], "--prefix-data can only be used once"),
        (["-p1", "-p2", "a"], "-p can only be used once"),
        (["--use-x", "--use-y", "a"],
         "argument --use-y: not allowed with argument --use-x"),
        (["--tee=yes", "a"], "argument -t/--tee: ignored explicit argument 'yes'"),
        (["--level", "mid", "a"],
         "argument --level: invalid choice: 'mid' (choose from 'low', 'high')"),
        (["-w", "soon", "a"], "argument -w: invalid float value: 'soon'"),
    ],
)
@pytest.mark.parametrize("usage_status", [1, 2])
def test_usage_errors(argv: list[str], message: str | None, usage_status: int,
                      capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser(usage_status=usage_status)
    if message is None:  # the contrast: this one is fine
        assert parser.parse_args(argv).first == "a"
        return
    assert _usage_error(parser, argv, capsys) == message


def test_too_many_operands_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    parser = Parser("prog", (), (Operand("only", "ONLY"),), usage_status=1)
    assert _usage_error(parser, ["a", "b", "c"], capsys) == "unrecognized arguments: b c"


def test_a_required_option(capsys: pytest.CaptureFixture[str]) -> None:
    parser = Parser("prog", (Option("-d", None, dest="target", required=True),),
                    (Operand("cmd", "CMD"),))
    assert _usage_error(parser, [], capsys) == "the following arguments are required: -d, CMD"
    assert _usage_error(parser, ["c"], capsys) == "the following arguments are required: -d"
    assert parser.parse_args(["c", "-d", "vm"]).target == "vm"


@pytest.mark.parametrize("argv", [["-h"], ["--help"], ["-t", "--he", "x"], ["-th"]])
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        _parser().parse_args(argv)
    assert stopped.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == "usage: prog [OPTIONS] FIRST [REST...]"
    assert "A test program." in lines and "The end." in lines
    for name, text in [("-a, --alpha A", "the alpha value"), ("--no-tee", "tee off"),
                       ("--level {low,high}", "how much"), ("-h, --help", "show this help"),
                       ("FIRST", "the first")]:
        assert any(line.strip().startswith(name) and text in line for line in lines), name


def test_the_namespace_takes_new_attributes() -> None:
    args = Namespace(a=1)
    args.b = 2
    assert (args.a, args.b) == (1, 2)
    assert repr(args) == "Namespace(a=1, b=2)"


# -- the programs' tables ----------------------------------------------------------------


def test_qrexec_client_vm_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        client_vm.main(["--help"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: qrexec-client-vm [OPTIONS] TARGET SERVICE[+ARG] "
                          "[PROG [ARGS...]]\n")
    for option in ("--agent-socket PATH", "--buffer-size N", "--filter-escape-chars-stdout",
                   "--no-filter-escape-chars-stdout", "--filter-escape-chars-stderr",
                   "--no-filter-escape-chars-stderr", "--prefix-data DATA",
                   "--use-stdin-socket", "--source-qube NAME", "--use-trigger-socket",
                   "--use-r2-fdpass", "--log-level", "--log-format"):
        assert option in out, option
    assert "PASS_LOCAL_STDERR" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dom0"], "the following arguments are required: SERVICE[+ARG]"),
        (["--use-r2", "--use-trig", "vm", "s"],
         "argument --use-trigger-socket: not allowed with argument --use-r2-fdpass"),
        (["--use", "vm", "s"], "ambiguous option: --use could match --use-stdin-socket, "
         "--use-trigger-socket, --use-r2-fdpass"),
        (["--log-level=loud", "vm", "s"], "argument --log-level: invalid choice: 'loud' "
         "(choose from 'debug', 'info', 'warning', 'error', 'critical')"),
    ],
)
def test_qrexec_client_vm_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _usage_error(client_vm.build_parser(), argv, capsys) == message


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-d", "vm", "user:cmd"], {"target": "vm", "cmdline": "user:cmd", "prefix_data": "",
                                    "socket_dir": client.DEFAULT_SOCKET_DIR,
                                    "connect_timeout": None, "just_exec": False,
                                    "log_level": "warning"}),
        # Options may follow the operand, as with the reference's getopt.
        (["-dvm", "user:cmd", "-tTEkW", "-w5"],
         {"target": "vm", "filter_stdout": True, "filter_stderr": True, "no_exit_code": True,
          "kill": True, "wait_connection_end": True, "connect_timeout": 5.0}),
        (["--socket-dir=/s", "-e", "-d", "vm", "-d", "vm2", "--", "-x"],
         {"socket_dir": "/s", "just_exec": True, "target": "vm2", "cmdline": "-x"}),
        (["-d", "dom0", "-c", "R,vm1,42", "--pre", "-x", "QUBESRPC a b"],
         {"connect_existing": "R,vm1,42", "prefix_data": "-x", "cmdline": "QUBESRPC a b"}),
        (["-d", "vm", "-l", "cat", "--use-stdin-socket", "c"],
         {"local_command": "cat", "use_stdin_socket": True}),
    ],
)
def test_qrexec_client_options(argv: list[str], expected: dict[str, object]) -> None:
    args = vars(client.build_parser().parse_args(argv))
    assert {name: args[name] for name in expected} == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: -d, CMDLINE"),
        (["-d", "vm"], "the following arguments are required: CMDLINE"),
        (["-d", "vm", "a", "b"], "unrecognized arguments: b"),
        (["-d"], "argument -d: expected one argument"),
        (["-d", "vm", "-l", "x", "-c", "y", "cmd"], "argument -c: not allowed with argument -l"),
        (["-d", "vm", "-e", "-l", "x", "cmd"], "argument -l: not allowed with argument -e"),
        (["-d", "vm", "-w", "x", "cmd"], "argument -w: invalid float value: 'x'"),
        (["-d", "vm", "-x", "cmd"], "unrecognized arguments: -x"),
    ],
)
def test_qrexec_client_usage_errors_exit_1(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = client.build_parser()
    assert parser.usage_status == 1
    assert _usage_error(parser, argv, capsys) == message


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-d", "vm", "-l", "x", "--use-stdin-socket", "cmd"],
         "at most one of -l and --use-stdin-socket can be specified"),
        (["-d", "dom0", "-e", "cmd"], "a dom0 to dom0 call takes neither -e nor -l"),
    ],
)
def test_qrexec_client_checks_in_main_exit_1(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        client.main(argv)
    assert stopped.value.code == 1
    assert capsys.readouterr().err.endswith(f"qrexec-client: error: {message}\n")
