"""The README's "Commands" section: each command's `--help`, verbatim, between markers
`<!-- help:NAME -->` ... `<!-- /help:NAME -->` (NAME `watcher` for the top level).

    python -m tests.unit.update_readme_help      # from the repository root: rewrite them

Commands are found from the parser itself (its list of choices), so a command added later
gets its block too (after the last one). tests/unit/test_readme_help.py fails while the
README differs from what this would write.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path
from typing import Iterator

from watcher.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"
COLUMNS = "100"  # argparse wraps at the terminal's width: fixed, so the text is stable
TOP = "watcher"


@contextlib.contextmanager
def _columns() -> Iterator[None]:
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = COLUMNS
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved


def _run(argv: list[str]) -> tuple[str, str]:
    """(stdout, stderr) of `watcher ARGV`, which exits (argparse) or returns."""
    out, err = io.StringIO(), io.StringIO()
    with _columns(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit:
            pass
    return out.getvalue(), err.getvalue()


def commands() -> list[str]:
    """The subcommands, in the parser's order (from its `invalid choice` message)."""
    _, err = _run(["no-such-command-x"])
    match = re.search(r"choose from (.*)\)", err)
    if match is None:
        raise RuntimeError(f"cannot read the commands from: {err!r}")
    return re.findall(r"'([^']+)'", match.group(1))


def help_text(command: str) -> str:
    """`watcher [COMMAND] --help`, as printed."""
    out, _ = _run(["--help"] if command == TOP else [command, "--help"])
    return out


def block(command: str) -> str:
    shown = "watcher --help" if command == TOP else f"watcher {command} --help"
    return (f"<!-- help:{command} -->\n```console\n$ {shown}\n{help_text(command).rstrip()}\n"
            f"```\n<!-- /help:{command} -->")


def _pattern(command: str) -> re.Pattern[str]:
    name = re.escape(command)
    return re.compile(rf"<!-- help:{name} -->\n.*?<!-- /help:{name} -->", re.DOTALL)


def updated(readme: str) -> str:
    """The README text with every command's block (re)written."""
    for command in [TOP, *commands()]:
        pattern = _pattern(command)
        new = block(command)
        if pattern.search(readme):
            readme = pattern.sub(lambda _: new, readme, count=1)
            continue
        ends = list(re.finditer(r"<!-- /help:[^ ]+ -->", readme))
        if not ends:
            raise RuntimeError(f"{README} has no help block to add {command!r} after: add "
                               f"'<!-- help:{TOP} -->' and '<!-- /help:{TOP} -->' first")
        at = ends[-1].end()
        readme = readme[:at] + "\n\n" + new + readme[at:]
    return readme


def main_update() -> int:
    text = README.read_text()
    new = updated(text)
    if new != text:
        README.write_text(new)
        print(f"updated {README}")
    else:
        print(f"{README} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main_update())
