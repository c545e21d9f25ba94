"""``--help`` of every subcommand: each argument explained, real defaults shown, examples and exit codes."""

from __future__ import annotations

import argparse

import pytest

from label_pipeline.cli import DELEGATED, build_parser, main


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p for name, p in sub.choices.items() if name not in DELEGATED}


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_argument_has_help_and_the_epilog_examples_and_exit_codes(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = _subcommands()[name]
    for action in parser._actions:
        if action.help is argparse.SUPPRESS:
            continue
        assert action.help, f"{name}: {action.dest} has no help"
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"label-pipeline {name}" in text.split("examples:", 1)[1]
    assert "exit codes:" in text and "  0 " in text.split("exit codes:", 1)[1]
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in parser._actions:
        nothing = action.default is None or action.default is False or action.default == []
        shown = not nothing and action.default != argparse.SUPPRESS and action.option_strings
        if shown and "default" not in (action.help or ""):
            assert f"(default: {action.default})" in " ".join(text.split()), f"{name}: {action.dest}"


def test_main_help_has_examples_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "exit codes:" in text and "label-pipeline experts" in text
