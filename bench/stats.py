"""The benchmarks' percentiles, tables and saved results: plain Python, no Docker, no test
helpers, so that a benchmark of the watcher alone (watcher_cost.py) measures the watcher's
process, not pytest's or the e2e helpers' imports beside it."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / "bench"
RESULTS_DIR = Path(os.environ.get("SSH_PROXY_BENCH_OUT", BENCH_DIR / "results"))


def valid(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def pct(values: Sequence[float | None], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of the sample's valid values (nan if none)."""
    ordered = sorted(valid(values))
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def dist(values: Sequence[float | None]) -> dict[str, float]:
    values = valid(values)
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": pct(values, 50), "p90": pct(values, 90),
            "p99": pct(values, 99), "max": max(values)}


def paired_ratios(a: Sequence[float | None], b: Sequence[float | None]) -> list[float]:
    """a[i]/b[i] per round (both ran back to back, so drift of the machine cancels); rounds
    where either failed are left out."""
    return [x / y for x, y in zip(a, b) if x is not None and y is not None and y > 0]


# --------------------------------------------------------------------------- reporting


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, markdown: str, data: dict) -> None:
    """Prints the section and keeps it (markdown + raw samples) for run.sh's RESULTS.md,
    stamped with when and at which commit it was measured (report.py keeps the stamp when a
    later run refreshes other sections only)."""
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    heading, _, body = markdown.partition("\n")
    markdown = f"{heading}\n\n_Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}_\n{body}"
    print(markdown)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.md").write_text(markdown + "\n")
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(data, indent=1))


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
