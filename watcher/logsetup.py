"""Structured, quiet-by-default logging: one logfmt line per record on stderr.

Log values come partly from targets (container names, exec stderr, HTTP bodies): every
value is escaped here, centrally, so no value can start a new line or carry a terminal
escape sequence, whatever the message that built it.
"""

from __future__ import annotations

import logging
import time

from .accesslog import logfmt_value


class LogfmtFormatter(logging.Formatter):
    """`ts=... level=... logger=... msg=... [exc=...] [stack=...]`, every value escaped.

    `msg` is the message with its args already interpolated, so hostile args are escaped
    too; exception and stack text keep their line breaks as `\\n` inside one quoted value.
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = [
            ("ts", f"{stamp}.{int(record.msecs):03d}Z"),
            ("level", record.levelname.lower()),
            ("logger", record.name),
            ("msg", _message(record)),
        ]
        if record.exc_info:
            fields.append(("exc", self.formatException(record.exc_info)))
        elif record.exc_text:
            fields.append(("exc", record.exc_text))
        if record.stack_info:
            fields.append(("stack", self.formatStack(record.stack_info)))
        return " ".join(f"{name}={logfmt_value(str(value))}" for name, value in fields)


def _message(record: logging.LogRecord) -> str:
    """The interpolated message; a record whose args do not fit still gives one line."""
    try:
        return record.getMessage()
    except Exception:  # a bad format string must not lose the record (nor raise in a handler)
        return f"{record.msg!s} {record.args!r}"


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # Libraries' own debug chatter stays out even at WATCHER_LOG_LEVEL=debug: urllib3's
    # connection pool, docker, kubernetes (whole response bodies), websocket, and watchdog
    # (a line per inotify event: each index write would log dozens).
    for noisy in NOISY_LIBRARIES:
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))


NOISY_LIBRARIES = ("urllib3", "docker", "kubernetes", "websocket", "watchdog")
