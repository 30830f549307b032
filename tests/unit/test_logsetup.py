"""watcher.logsetup: every value of the watcher's own log is one line of printable text."""

from __future__ import annotations

import io
import logging

import pytest

from watcher.logsetup import LogfmtFormatter

HOSTILE = [
    "evil\nts=2026-01-01T00:00:00.000Z level=error msg=forged",
    "cr\rover",
    "\x1b[2J\x1b]0;title\x07",
    "nul\x00del\x7f",
    "c1\x85\x9b31m",
    "line\u2028sep\u2029para",
    "bidi\u202eevil",
    "tab\there",
]


def render(logger_name: str, msg: object, *args: object, exc: BaseException | None = None,
           stack: bool = False) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter())
    log = logging.getLogger(f"test-logsetup.{logger_name}")  # never the watcher's own loggers
    log.propagate = False
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG)
    try:
        if exc is not None:
            try:
                raise exc
            except BaseException:
                log.exception(msg, *args)
        else:
            log.warning(msg, *args, stack_info=stack)
    finally:
        log.handlers[:] = []
    return stream.getvalue()


def assert_one_clean_line(output: str) -> str:
    assert output.endswith("\n") and output.count("\n") == 1, output
    line = output[:-1]
    assert line.isprintable(), repr(line)
    assert "\x1b" not in line and "\r" not in line
    return line


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_args_are_escaped(value: str) -> None:
    line = assert_one_clean_line(render("watcher.fetch", "target %s: exec stderr: %s", value, value))
    assert " level=warning logger=test-logsetup.watcher.fetch msg=\"target " in line


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_message_is_escaped(value: str) -> None:
    assert_one_clean_line(render("watcher.reconcile", value))


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_exception_text_is_escaped(value: str) -> None:
    line = assert_one_clean_line(render("watcher.sources.docker", "inspect %s failed", value,
                                        exc=RuntimeError(value)))
    assert " exc=\"Traceback (most recent call last):\\n" in line
    assert line.endswith("RuntimeError: " + line.split("RuntimeError: ", 1)[1])


def test_hostile_logger_name_and_stack_are_escaped() -> None:
    assert_one_clean_line(render("evil\n\x1b[31m", "x", stack=True))


def test_exact_escapes() -> None:
    line = assert_one_clean_line(render("watcher", "name=%s", "a\nb\x1b[31mc\u2028d\"e\\f"))
    assert line.endswith(' msg="name=a\\nb\\x1b[31mc\\u2028d\\"e\\\\f"')


def test_plain_values_stay_bare_and_readable() -> None:
    line = assert_one_clean_line(render("watcher.app", "ready"))
    assert line.endswith(" level=warning logger=test-logsetup.watcher.app msg=ready")
    line = assert_one_clean_line(render("watcher.app", "ready: mode=%s", "docker"))
    assert line.endswith(' msg="ready: mode=docker"')
    assert assert_one_clean_line(render("watcher.app", "café")).endswith(" msg=café")


def test_a_record_whose_args_do_not_fit_is_still_one_line() -> None:
    line = assert_one_clean_line(render("watcher", "%d items\n", "not a number\x1b"))
    assert "%d items\\n" in line and "not a number" in line


def test_library_debug_chatter_stays_out_at_debug_level(capsys) -> None:
    from watcher.logsetup import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("debug")
        logging.getLogger("watchdog.observers.inotify_buffer").debug("in-event %s", "noise")
        logging.getLogger("kubernetes.client.rest").debug("response body: %s", "noise")
        logging.getLogger("watcher.app").debug("rendered keys written")
        logging.getLogger("watchdog.observers").warning("inotify watch limit reached")
        err = capsys.readouterr().err
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert "noise" not in err
    assert 'msg="rendered keys written"' in err
    assert "inotify watch limit reached" in err
