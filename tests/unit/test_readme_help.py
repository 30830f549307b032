"""Every command's `--help` is complete and shown verbatim in the README ("Commands"), so
the README never drifts: rewrite it with `python -m tests.unit.update_readme_help`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from update_readme_help import README, TOP, block, commands, help_text

EXPECTED = {"run", "check-config", "health", "status", "logs"}  # at least these


def test_every_command_is_found() -> None:
    assert EXPECTED <= set(commands())


@pytest.mark.parametrize("command", [TOP, *commands()])
def test_the_readme_shows_each_commands_help_verbatim(command: str) -> None:
    text = help_text(command)
    assert text.startswith("usage: watcher"), text
    assert block(command) in README.read_text(), (
        f"README.md's block for `{command} --help` is out of date or missing: run "
        "`python -m tests.unit.update_readme_help` from the repository root")


@pytest.mark.parametrize("command", [TOP, *commands()])
def test_every_option_has_a_help_text(command: str) -> None:
    text = help_text(command)
    options = text.split("options:\n", 1)[1].split("\n\n", 1)[0]
    lines = options.splitlines()
    for n, line in enumerate(lines):
        if line.startswith("  -"):
            # argparse puts the help on the next, deeper-indented line after a long option
            following = lines[n + 1] if n + 1 < len(lines) else ""
            helped = "  " in line.strip() or following.startswith(" " * 8)
            assert helped, f"`{command}`: option without help: {line!r}"
    assert argparse.SUPPRESS not in text


def test_a_command_without_a_block_is_added_after_the_last(tmp_path: Path) -> None:
    import update_readme_help as updater
    readme = f"intro\n<!-- help:{TOP} -->\nold\n<!-- /help:{TOP} -->\nafter\n"
    new = updater.updated(readme)
    assert new.startswith("intro\n" + block(TOP)) and new.endswith("\nafter\n")
    for command in commands():
        assert block(command) in new
    assert updater.updated(new) == new  # a second run changes nothing
