"""`hal0 serve` reads its own options without argparse, exactly as argparse would, and leaves every other spelling
to argparse; and what a restarted API imports before it serves."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hal0.cli import _serve_options, build_parser


def _without_func(ns: object) -> dict[str, object]:
    return {k: v for k, v in vars(ns).items() if k != "func"}


@pytest.mark.parametrize("argv", [
    [],
    ["--port", "8080"],
    ["--port=8080"],
    ["--host", "127.0.0.1", "--port", "9000", "--no-demo", "--log-level", "warning"],
    ["--log-level=debug", "--no-demo", "--host="],
    ["--port", "1", "--port", "2"],
])
def test_hal0_serve_reads_its_plain_options_as_argparse_does(argv: list[str]) -> None:
    fast = _serve_options(argv)
    assert fast is not None
    parsed = build_parser().parse_args(["serve", *argv])
    assert _without_func(fast) == _without_func(parsed)
    assert fast.func is parsed.func


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["-h"],
    ["--port", "nope"],
    ["--port"],
    ["--log-level", "loud"],
    ["--no-demo=yes"],
    ["--host", "--port", "1"],  # argparse takes --port for an option, not for the host's value
    ["--port", "-1"],  # and -1 for a number: a value that starts with "-" is argparse's to judge
    ["--log", "debug"],  # an abbreviation: argparse's to expand
    ["--json"],
    ["--url", "http://127.0.0.1:1"],
    ["--", "--port", "1"],
    ["extra"],
])
def test_every_other_spelling_is_left_to_argparse(argv: list[str]) -> None:
    assert _serve_options(argv) is None


def test_argparse_answers_what_the_start_does_not_read(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as bad:
        build_parser().parse_args(["serve", "--port", "nope"])
    assert bad.value.code == 2
    assert "invalid int value: 'nope'" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--log", "debug"]).log_level == "debug"


def test_a_restarted_api_imports_only_what_serving_needs() -> None:
    """Before it serves, `hal0 serve` imports neither argparse (nor shutil, which its help formatter brings),
    nor the digest library (model verification), nor the peers' views (only a hal0 with peers follows any), nor
    the TOML writer (only a change of config writes one), nor `http` (status phrases beyond hal0's own)."""
    script = textwrap.dedent("""
        import sys
        import hal0.cli
        assert hal0.cli._serve_options(["--port", "8080", "--no-demo"]) is not None
        import hal0.api.app, hal0.server
        off = ("argparse", "shutil", "hashlib", "hal0.peers.view", "tomli_w", "http")
        print(sorted(m for m in off if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
