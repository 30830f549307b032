"""Writes bench/RESULTS.md from the sections the benchmarks saved (bench/results/*.md,
*.json), with the machine, date and versions on top, and a PNG plot per benchmark beside it.

A section this run did not produce keeps its text from the previous RESULTS.md, with the
date and commit of the run that measured it (its own `Run:` line), so running one benchmark
again refreshes that section only.

    .venv/bin/python bench/report.py [--failed NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, REPO_ROOT, RESULTS_DIR, valid  # noqa: E402

import helpers  # noqa: E402

ORDER = ["keys_scale", "overhead", "burst", "watcher_cost", "propagation", "cold_start", "shutdown"]
TITLES = {"keys_scale": "B2 keys scale", "overhead": "B3 overhead", "burst": "B4 burst",
          "watcher_cost": "B6 watcher cost", "propagation": "B1 propagation", "cold_start": "B5 cold start",
          "shutdown": "Shutdown and give-up"}
STAMP = re.compile(r"^_Run: .*_$", re.M)


def commit() -> str:
    return sh("git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD")


def stamped(section: str, stamp: str) -> str:
    """The section with its `Run:` line (after the heading), unless it has one already."""
    if STAMP.search(section):
        return section
    heading, _, body = section.partition("\n")
    return f"{heading}\n\n{stamp}\n{body}"


def previous_sections(path: Path) -> dict[str, str]:
    """name -> section text (heading to the next heading, plot included) of an earlier
    RESULTS.md, each stamped with that file's date and commit when it has no stamp yet."""
    if not path.exists():
        return {}
    text = path.read_text().split("\n## Reading these results", 1)[0]
    head = re.search(r"^- Date: (.*?); commit (\w+)", text, re.M)
    stamp = f"_Run: {head.group(1)}, commit {head.group(2)}_" if head else "_Run: an earlier run_"
    by_title = {title: name for name, title in TITLES.items()}
    out = {}
    for chunk in re.split(r"^(?=### )", text, flags=re.M)[1:]:
        title = chunk.splitlines()[0][4:].strip()
        if title in by_title and "Did not complete in this run" not in chunk:
            out[by_title[title]] = stamped(chunk.rstrip() + "\n", stamp)
    return out


def sh(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine() -> str:
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "0")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    ssh_in_image = sh("docker", "run", "--rm", "--entrypoint", "sshd", helpers.PROXY_IMAGE, "-V")
    ssh_in_image = ssh_in_image or sh("sh", "-c", f"docker run --rm --entrypoint sshd {helpers.PROXY_IMAGE} -V 2>&1")
    return "\n".join([
        f"- Report written: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {commit()} "
        "(each section says when and at which commit it was measured)",
        f"- Machine: {os.cpu_count()} cores ({cpu}), {int(mem) // 1048576} GiB, {platform.platform()}",
        f"- Load average when the report was written: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
        "(the machine is shared with other developers' builds and tests while the benchmarks run: "
        "absolute times are this machine's on a busy day; the ratios, paired round by round, are the figures to quote)",
        f"- Docker {sh('docker', 'version', '--format', '{{.Server.Version}}')}; proxy image {helpers.PROXY_IMAGE}: "
        f"{ssh_in_image.splitlines()[0] if ssh_in_image else '?'}; client {sh('sh', '-c', 'ssh -V 2>&1')}; "
        f"Python {platform.python_version()}",
    ])


def cdf(ax, values, label) -> None:
    values = sorted(valid(values))
    if values:
        ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label)


def plot(name: str, data: dict) -> bool:
    fig, ax = plt.subplots(figsize=(7, 4))
    if name == "keys_scale":
        d = data["dist"]
        sizes = sorted({int(k.rsplit("-", 1)[1]) for k in d
                        if k.startswith("index-") and k.rsplit("-", 1)[1].isdigit()})
        for kind in ("index", "stock"):
            ax.plot(sizes, [d[f"{kind}-{s}"]["p50"] * 1000 for s in sizes], marker="o",
                    label=f"{kind} (p50)")
            ax.plot(sizes, [d[f"{kind}-{s}"]["p90"] * 1000 for s in sizes], marker=".", linestyle=":",
                    label=f"{kind} (p90)")
        ax.set_xscale("log")
        ax.set_xlabel("keys served")
        ax.set_ylabel("login through the proxy, ms")
    elif name == "overhead":
        for k, v in data["login"].items():
            cdf(ax, [x * 1000 if x else None for x in v], f"login {k}")
        ax.set_xlabel("login, ms")
        ax.set_ylabel("fraction of logins")
    elif name == "burst":
        for k, v in data["results"].items():
            cdf(ax, [r[0] for r in v if r[2] == "ok"], k)
        ax.set_xlabel("seconds to a successful login (failures not drawn)")
        ax.set_ylabel("fraction")
    elif name == "watcher_cost":
        for size, r in data.items():
            if isinstance(r, dict):  # a size's run (python_speed_M_per_s is a number)
                cdf(ax, r["latencies"], f"{int(size):,} targets")
        ax.set_xscale("log")
        ax.set_xlabel("event -> index written, s")
        ax.set_ylabel("fraction of events")
    elif name == "propagation":
        added = data["added"] if isinstance(data["added"], dict) else {"docker": data["added"]}
        for mode, v in added.items():
            cdf(ax, v, f"{mode}: started -> first login")
        for how, v in data["removed"].items():
            cdf(ax, v, f"{how} -> refused")
        for kind, v in data.get("late", {}).items():
            cdf(ax, v, f"late key file, {kind} -> first login")
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of targets")
    elif name == "cold_start":
        # One run per mode and set of targets; an older result held a single Docker run.
        runs = data.get("runs") or [{"mode": "docker", "variant": "all fast", "listening": data["listening"],
                                     "served": {"fast": data["served"]}}]
        for r in runs:
            cdf(ax, [t for times in r["served"].values() for t in times], f"{r['mode']}, {r['variant']}")
            ax.axvline(r["listening"], color=ax.lines[-1].get_color(), linestyle=":", alpha=0.6)
        ax.plot([], [], color="grey", linestyle=":", label="sshd listening (same colour)")
        ax.set_xlabel("seconds since the proxy's docker run")
        ax.set_ylabel("fraction of targets")
    else:
        plt.close(fig)
        return False
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(name.replace("_", " "))
    fig.tight_layout()
    fig.savefig(BENCH_DIR / f"{name}.png", dpi=90)
    plt.close(fig)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--failed", nargs="*", default=[])
    args = parser.parse_args()
    parts = ["# Benchmark results\n", "Written by `bench/run.sh`; see README \"Benchmarks\".\n", machine(), ""]
    earlier = previous_sections(BENCH_DIR / "RESULTS.md")
    for name in ORDER:
        md, js = RESULTS_DIR / f"{name}.md", RESULTS_DIR / f"{name}.json"
        if name in args.failed or not md.exists():
            parts.append(earlier.get(name) or f"### {TITLES[name]}\n\nDid not complete in this run (see the run's output).\n")
            continue
        measured = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(md.stat().st_mtime))
        parts.append(stamped(md.read_text(), f"_Run: {measured}, commit {commit()}_"))
        if js.exists() and plot(name, json.loads(js.read_text())):
            parts.append(f"![{name}]({name}.png)\n")
    analysis = BENCH_DIR / "ANALYSIS.md"  # the reading of a run, written by a person
    if analysis.exists():
        parts.append(analysis.read_text())
    (BENCH_DIR / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {BENCH_DIR / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
