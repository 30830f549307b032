"""Shared machinery of the benchmarks: the e2e helpers (imported, not copied), a bench run
that labels and always removes what it starts, interleaved sampling and percentile tables.

Every container a benchmark starts carries `ssh-proxy-bench=1` and `ssh-proxy-bench-run=<id>`;
the run removes its own (by the run id) at exit, on an exception and on SIGINT/SIGTERM.
"""

from __future__ import annotations

import atexit
import base64
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from stats import (BENCH_DIR, REPO_ROOT, RESULTS_DIR, dist, median, paired_ratios, pct,  # noqa: F401
                   save, table, valid)

# Own image tags, so a benchmark never overwrites the images of a test run.
os.environ.setdefault("SSH_PROXY_TEST_PROXY_IMAGE", "ssh-proxy:bench")
os.environ.setdefault("SSH_PROXY_TEST_TARGET_IMAGE", "ssh-proxy-target:bench")
sys.path.insert(0, str(REPO_ROOT / "tests" / "e2e"))
sys.path.insert(0, str(REPO_ROOT))

import helpers  # noqa: E402
from helpers import (KeyPair, Proxy, SshClient, Target, build_image, docker,  # noqa: E402,F401
                     make_keypair, run_proxy_container, run_target_container)

BENCH_LABEL = "ssh-proxy-bench"
"""Every container and network a benchmark starts carries `ssh-proxy-bench=1`; bench/run.sh
removes whatever carries it at start and exit."""
RUN_LABEL = "ssh-proxy-bench-run"

# The e2e helpers stamp what they start with the tests' labels (read at call time), and
# tests/run.sh removes whatever carries `ssh-proxy-test=1`: a benchmark's containers carry
# ours instead, so a test run and a benchmark never remove each other's containers.
helpers.TEST_LABEL = BENCH_LABEL
helpers.SESSION_LABEL = RUN_LABEL


class BenchError(Exception):
    """A benchmark could not measure what it set out to (setup failed, a login never worked)."""


def _failed_to_error(fn: Callable, *args, **kwargs):
    """helpers fail through pytest.fail (a BaseException outside pytest): make it ours."""
    try:
        return fn(*args, **kwargs)
    except Exception:
        raise
    except BaseException as exc:  # pytest's Failed / OutcomeException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise BenchError(str(exc)) from None


@dataclass
class BenchRun:
    """One benchmark's Docker resources: a network, labelled containers, removed at exit."""

    name: str
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    network: str = ""
    work: Path = field(default_factory=Path)

    def __post_init__(self) -> None:
        self.work = Path(subprocess.run(["mktemp", "-d", f"/tmp/ssh-proxy-bench-{self.name}.XXXXXX"],
                                        capture_output=True, text=True, check=True).stdout.strip())
        atexit.register(self.cleanup)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.cleanup()
        sys.exit(128 + signum)

    @property
    def labels(self) -> dict[str, str]:
        return {BENCH_LABEL: "1", RUN_LABEL: self.run_id}

    def label_args(self) -> list[str]:
        return [a for k, v in self.labels.items() for a in ("--label", f"{k}={v}")]

    def create_network(self) -> str:
        self.network = f"sshproxy-bench-{self.run_id}"
        docker("network", "create", *self.label_args(), self.network)
        return self.network

    def cleanup(self) -> None:
        ids = docker("ps", "-aq", "--filter", f"label={RUN_LABEL}={self.run_id}", check=False).stdout.split()
        if ids:
            docker("rm", "-f", "-v", *ids, check=False, timeout=300)
        if self.network:
            docker("network", "rm", self.network, check=False)
            self.network = ""
        subprocess.run(["rm", "-rf", str(self.work)], check=False)

    # -- containers

    def images(self) -> tuple[str, str]:
        """Builds (or refreshes from cache) the proxy and target images: (proxy, target)."""
        _failed_to_error(build_image, helpers.TARGET_IMAGE, helpers.TARGET_CONTEXT)
        _failed_to_error(build_image, helpers.PROXY_IMAGE, REPO_ROOT)
        return helpers.PROXY_IMAGE, helpers.TARGET_IMAGE

    def target(self, name: str, key: KeyPair | str | None, serve_publickey: bool = True,
               labels: Mapping[str, str] | None = None, **kw) -> Target:
        return _failed_to_error(run_target_container, name, key, self.network, self.run_id,
                                labels={**self.labels, **(labels or {})},
                                serve_publickey=serve_publickey, **kw)

    def proxy(self, env: Mapping[str, str] | None = None, volumes: Sequence[str] = (),
              docker_args: Sequence[str] = (), docker_socket: bool = True, **kw) -> Proxy:
        return _failed_to_error(run_proxy_container, self.network, self.run_id,
                                name=helpers.unique_name(f"ssh-proxy-bench-{self.name}"),
                                env=env, volumes=list(volumes), docker_socket=docker_socket,
                                docker_args=[*self.label_args(), *docker_args], **kw)

    def key(self, name: str) -> KeyPair:
        return make_keypair(self.work / "keys", name)


# --------------------------------------------------------------------------- keys


def fake_key_line(i: int, options: str = "") -> str:
    """A well-formed ed25519 authorized_keys line with a random key nobody holds."""
    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + os.urandom(32)
    return f"{options}ssh-ed25519 {base64.b64encode(blob).decode()} filler{i}@bench"


def write_filler(path: Path, count: int, options: str = "") -> None:
    path.write_text("".join(fake_key_line(i, options) + "\n" for i in range(count)))


# --------------------------------------------------------------------------- measuring


def timed(argv: Sequence[str], timeout: float = 60, input: bytes | None = None
          ) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of one process run to its end, and its result (timeout: returncode -9)."""
    started = time.perf_counter()
    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        proc = subprocess.CompletedProcess(list(argv), -9, exc.stdout or b"", exc.stderr or b"")
    return time.perf_counter() - started, proc


def interleave(variants: Mapping[str, Callable[[], float | None]], rounds: int,
               warmup: int = 1) -> dict[str, list[float | None]]:
    """Runs every variant once per round, A B C A B C ..., rotating the order each round so
    none always runs first. Sample i of every variant is from round i; a variant returning
    None failed that round (kept as None, so pairs stay aligned; never timed)."""
    names = list(variants)
    samples: dict[str, list[float | None]] = {n: [] for n in names}
    failures: dict[str, int] = {n: 0 for n in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            value = variants[name]()
            if r < warmup:
                continue
            if value is None:
                failures[name] += 1
            samples[name].append(value)
    for name, count in failures.items():
        if count:
            print(f"  warning: {name}: {count} of {rounds} runs failed", file=sys.stderr)
    return samples


