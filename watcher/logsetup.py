"""Structured, quiet-by-default logging: one logfmt line per record on stderr."""

from __future__ import annotations

import logging
import time


def _quote(value: str) -> str:
    text = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{text}"' if (" " in text or "=" in text or not text) else text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (f"ts={stamp}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
                f"logger={record.name} msg={_quote(record.getMessage())}")
        if record.exc_info:
            line += f" exc={_quote(self.formatException(record.exc_info))}"
        return line


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # Library chatter (urllib3 connection pool, docker) only when asked for.
    for noisy in ("urllib3", "docker"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
