"""B6 watcher cost (no Docker): the real Reconciler and OutputWriter fed by a synthetic source.

For each size (1k, 10k and 100k targets), in a process of its own so that peak RSS is that
size's: all targets arrive at once (replace_all, as a resync does) and are fetched by a
fake key fetch that answers at once; then render+write (Reconciler.flush, the real writer
into a temporary directory: index, cache, /etc/hosts block) is timed alone; then a churn of
R events/s for D seconds, each event a target restarted with a new key (an upsert whose new
start time makes the reconciler fetch again): process CPU per event, and latency from the
event to the index written with the new key (seen by a wrapper around the real writer).
The supervisor's status heartbeat (status.json every 2 s, with the reconciler's last
published snapshot) runs beside them, as in the app: its CPU counts, and its write time is
reported. Last, synchronously, rounds of restarts whose new keys arrive a round later (as a
restarted container's key API answers once it has booted): the loop's own CPU per flush.
Memory: VmRSS once the load is served and idle, sampled every 0.1 s during the churn, and
the run's peak.

    .venv/bin/python bench/watcher_cost.py [--sizes 1000,10000,100000] [--rate 1000] [--seconds 60]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import queue
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stats import REPO_ROOT, dist, save, table  # noqa: E402,F401

sys.path.insert(0, str(REPO_ROOT))

from watcher.allocator import fix_mmap_threshold  # noqa: E402
from watcher.app import OutputWriter, Paths  # noqa: E402
from watcher.cache import read_index, read_unmanaged_hosts  # noqa: E402
from watcher.config import RunMode, load_settings  # noqa: E402
from watcher.model import KeyState, PublicKey, Target  # noqa: E402
from watcher.reconcile import Reconciler, _Fetched  # noqa: E402
from watcher.render import Rendered  # noqa: E402
from watcher.snapshot import StatusDocument, WatcherState  # noqa: E402
from watcher.sshd import SshdPaths  # noqa: E402
from watcher.status import StatusWriter, write_status  # noqa: E402
from watcher.targets import ProxyIdentity  # noqa: E402


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def make_key(seed: str) -> PublicKey:
    """A distinct ed25519 key per seed, as the unit tests make them (no crypto needed)."""
    blob = _string(b"ssh-ed25519") + _string(hashlib.sha256(seed.encode()).digest())
    fp = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return PublicKey("ssh-ed25519", base64.b64encode(blob).decode(), "", fp, 256)


def make_target(i: int, started_at: str) -> Target:
    # Addresses are only text in the rendered files here: nothing is ever contacted.
    # Ids as Docker makes them (random hex): a counter's id would give every target the
    # same all-digit short id, which the alias rules refuse as address-like, 100k times.
    return Target(id=_target_id(i), name=f"t{i}", address=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
                  started_at=started_at)


def _target_id(i: int) -> str:
    return hashlib.sha256(f"target-{i}".encode()).hexdigest()


def fetch(target: Target) -> KeyState:
    return KeyState(keys=(make_key(f"{target.id}/{target.started_at}"),), status="ok", via="http")


class Observed:
    """The real writer, plus when each awaited key was first written to the index (what
    sshd reads; the hosts block is written before it, the cache for people after it)."""

    def __init__(self, writer: OutputWriter) -> None:
        self.writer = writer
        write_index = writer._write_index

        def index_written(rendered: Rendered) -> bool:
            changed = write_index(rendered)
            self._index_written(rendered, time.perf_counter())
            return changed

        writer._write_index = index_written  # type: ignore[method-assign]
        self.lock = threading.Lock()
        # target number -> (the fingerprint awaited, when its event was posted): only the
        # keys not written yet. The bench's own memory counts in the process's RSS: a map
        # of every restarted target's last fingerprint, and a list of float objects, were
        # ~10 MB at 100k targets after a minute of churn.
        self.awaited: dict[int, tuple[str, float]] = {}
        self.latencies = array("d")  # seconds
        self.write_seconds: list[float] = []
        self.superseded = 0  # restarted again before its key was written: not a latency
        self.served = 0  # lines of the render last written to the index

    def await_key(self, target: int, fingerprint: str, posted: float) -> None:
        with self.lock:
            if self.awaited.pop(target, None) is not None:
                self.superseded += 1
            self.awaited[target] = (fingerprint, posted)

    def reset(self) -> None:
        with self.lock:
            self.awaited.clear()
            self.latencies = array("d")
            self.superseded = 0

    def __call__(self, rendered: Rendered) -> bool:
        started = time.perf_counter()
        changed = self.writer(rendered)
        self.write_seconds.append(time.perf_counter() - started)
        return changed

    def _index_written(self, rendered: Rendered, done: float) -> None:
        self.served = rendered.keys_served
        with self.lock:
            seen = [target for target, (fp, _) in self.awaited.items() if fp in rendered.owners]
            for target in seen:
                self.latencies.append(done - self.awaited.pop(target)[1])


class Heartbeat:
    """The supervisor's heartbeat, as the app runs it beside the reconciler: every 2 s, the
    writer's retry (which folds the index's recent changes into its groups once the index
    is quiet) and status.json with the last published snapshot (every target's row)."""

    def __init__(self, path: Path, retry) -> None:
        self.path = path
        self.retry = retry
        self.snapshot = WatcherState()
        self.writer = StatusWriter()
        self.costs: list[float] = []  # seconds per write
        self.written = WatcherState()  # the snapshot of the last write

    def publish(self, snapshot: WatcherState) -> None:
        self.snapshot = snapshot

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(2.0):
            self.retry()
            started, state = time.perf_counter(), self.snapshot
            write_status(self.path, StatusDocument(heartbeat=time.time(), mode="docker", sshd_pid=1,
                                                   state=state), writer=self.writer)
            self.costs.append(time.perf_counter() - started)
            self.written = state

    def shows_all_served(self, size: int) -> bool:
        """status.json lists every target with its key: what `watcher status` would show."""
        state = self.written
        return (state is self.snapshot and len(state.targets) == size
                and all(row.key_status == "ok" for row in state.targets))


def one_size(size: int, rate: int, seconds: float, isolated: int = 60, spacing: float = 0.15) -> dict:
    fix_mmap_threshold()  # as the watcher does when it starts (App._run)
    tmp = Path(tempfile.mkdtemp(prefix="ssh-proxy-bench-watcher."))
    hosts = tmp / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n")
    paths = Paths(cache=tmp / "cache", hosts=hosts, access_log=tmp / "access.log", status=tmp / "status.json",
                  keys_dir=tmp / "keys.d", sshd=SshdPaths(index_dir=tmp / "index.d"))
    writer = Observed(OutputWriter(paths, RunMode.DOCKER, pin_names=True))
    settings = load_settings({})
    status = Heartbeat(paths.status, writer.writer.retry)
    rec = Reconciler(settings, ProxyIdentity(names=frozenset({"ssh-proxy"})), fetch, writer, pin_names=True,
                     unmanaged_hosts=lambda: read_unmanaged_hosts(hosts),  # as the app does
                     publish=status.publish)
    beating = threading.Event()
    threading.Thread(target=status.run, args=(beating,), name=HEARTBEAT, daemon=True).start()
    stop = threading.Event()
    loop = threading.Thread(target=rec.run, args=(stop,), name=LOOP, daemon=True)

    # 1. all targets at once, until the index has every key
    cpu0, wall0 = time.process_time(), time.perf_counter()
    rec.replace_all(make_target(i, "2024-01-01T00:00:00Z") for i in range(size))
    loop.start()
    while writer.served < size:
        time.sleep(0.2)
    initial = {"wall": time.perf_counter() - wall0, "cpu": time.process_time() - cpu0}
    # The load ends when status.json shows it too: after a load every status row is new, and
    # encoding them (~1 s at 100k) would otherwise fall on the first isolated events.
    deadline = time.perf_counter() + 120
    while not status.shows_all_served(size):
        if time.perf_counter() > deadline:
            raise SystemExit(f"status.json did not show all {size} targets served within 120 s")
        time.sleep(0.2)
    initial["status_wall"] = time.perf_counter() - wall0
    loaded_rss_mib = vm_rss_mib()  # the state itself: every target served, the loop idle
    stop.set()
    loop.join()

    # 2. render+write alone (loop stopped; a changed key each time so every file is written)
    flushes = []
    for r in range(5):
        entry = rec.entries[_target_id(r)]
        # As a key fetch would report it (the reconciler renders what changed since the last flush).
        rec.inbox.put(_Fetched(entry.target.id, entry.generation, fetch(make_target(r, f"flush-{r}"))))
        while not rec.inbox.empty():
            rec._apply(rec.inbox.get_nowait())
        started = time.perf_counter()
        rec.flush()
        flushes.append(time.perf_counter() - started)

    # 3. isolated events: one restart at a time, `spacing` apart (the loop is idle between):
    # event -> index written with the new key, the figure the 1.5x goal is about
    rec.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="keyfetch")  # run() shut the last
    stop = threading.Event()
    loop = threading.Thread(target=rec.run, args=(stop,), name=LOOP, daemon=True)
    loop.start()
    writer.reset()
    for n in range(isolated):
        i = (n * 104729) % size
        target = make_target(i, f"isolated-{n}")
        writer.await_key(i, fetch(target).keys[0].fingerprint, time.perf_counter())
        rec.upsert(target)
        time.sleep(spacing)
    deadline = time.perf_counter() + 30
    while writer.awaited and time.perf_counter() < deadline:
        time.sleep(0.05)
    isolated_latencies = list(writer.latencies)
    writer.reset()

    # 4. churn: `rate` restarts per second for `seconds`
    # CPU: the process's, less this thread's own (pacing the events, making the targets,
    # computing the keys it awaits, waiting at the end), plus the upserts it makes, which
    # are the source's hand-off to the reconciler (a source thread makes them in the app).
    events = int(rate * seconds)
    upsert_cpu = 0.0
    sampling = threading.Event()
    churn_rss: list[float] = []
    sampler_cpu: list[float] = []
    sampler = threading.Thread(target=sample_rss, args=(churn_rss, sampling, sampler_cpu), name=SAMPLER,
                               daemon=True)
    sampler.start()
    stages0 = thread_cpu()
    cpu0, own0, wall0 = time.process_time(), time.thread_time(), time.perf_counter()
    for n in range(events):
        due = wall0 + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        i = (n * 7919) % size
        target = make_target(i, f"churn-{n}")
        writer.await_key(i, fetch(target).keys[0].fingerprint, time.perf_counter())
        started = time.thread_time()
        rec.upsert(target)
        upsert_cpu += time.thread_time() - started
    posting = time.perf_counter() - wall0
    deadline = time.perf_counter() + 120
    while writer.awaited and time.perf_counter() < deadline:
        time.sleep(0.1)
    churn_wall = time.perf_counter() - wall0
    process_cpu = time.process_time() - cpu0
    own_cpu = time.thread_time() - own0
    stages = {name: cpu - stages0.get(name, 0.0) for name, cpu in thread_cpu().items()
              if name not in (MAIN_STAGE, SAMPLER_STAGE)}  # the sampler still runs: named, left out
    sampling.set()
    sampler.join()
    churn_cpu = process_cpu - own_cpu - sum(sampler_cpu) + upsert_cpu
    stages["source hand-off (upserts)"] = upsert_cpu
    stop.set()
    loop.join()
    beating.set()
    # The watcher's peak, taken before what follows: the split restarts below, and two
    # renders from scratch, the bench's own verification, which the watcher never does.
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # 5. restarts whose new key comes a flush later, as in production (a restarted
    # container's key API answers once it has booted): the reconciler's CPU per flush. Last:
    # its ~11k changed status rows, encoded by the heartbeat, held the GIL for seconds at
    # 100k during the isolated events and the churn when it ran before them.
    split_flushes = split_restarts(rec, size)
    writer.writer.close()  # the cache follows the index (debounced): what is due is written
    cache_correct = paths.cache.read_text() == rec.full_render().cache
    index_correct = _index_text(paths) == rec.full_render().index
    index_bytes = len(_index_text(paths).encode())
    subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return {"size": size, "initial": initial, "flush_seconds": flushes,
            "index_bytes": index_bytes, "split_flushes": split_flushes,
            "events": events, "posting_seconds": posting, "churn_wall": churn_wall,
            "churn_cpu": churn_cpu, "cpu_per_event": churn_cpu / events,
            "process_cpu_per_event": process_cpu / events, "stage_cpu": stages,
            "latencies": list(writer.latencies), "never_written": len(writer.awaited),
            "superseded": writer.superseded, "isolated": isolated_latencies,
            "cache_correct": cache_correct, "index_correct": index_correct,
            "peak_rss_mib": peak_rss_mib, "loaded_rss_mib": loaded_rss_mib, "churn_rss_mib": churn_rss,
            "status_writes": status.costs}


def vm_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def sample_rss(into: list[float], done: threading.Event, cpu: list[float], every: float = 0.1) -> None:
    """VmRSS every `every` seconds until `done`: the churn's memory as a distribution (its
    peak is one moment; blocks made and freed by each flush move it by tens of MiB). The
    thread is the bench's (SAMPLER): its CPU is not the watcher's."""
    while not done.wait(every):
        into.append(vm_rss_mib())
    cpu.append(time.thread_time())


LOOP = "reconciler"
HEARTBEAT = "status-heartbeat"
MAIN_STAGE = "bench (posting the events)"
SAMPLER = "rss-sampler"
SAMPLER_STAGE = "bench (sampling RSS)"
_STAGES = {LOOP: "reconciler loop", HEARTBEAT: "status heartbeat", "keyfetch": "key fetch (the fake's hashing)",
           "cache-writer": "cache writer", "MainThread": MAIN_STAGE, SAMPLER: SAMPLER_STAGE}


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system, /proc) of this process's live threads, summed by stage:
    the thread's name, a pool's threads under their prefix (keyfetch_3 -> keyfetch)."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:  # the thread ended
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on: utime is 14th
        name = names.get(int(tid), "other")
        stage = _STAGES.get(name, _STAGES.get(name.rsplit("_", 1)[0], "other threads"))
        out[stage] = out.get(stage, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


SPLIT_PER_FLUSH = 480  # about what one flush at 100k targets takes in under 1,000 restarts/s


class _Deferred:
    """A key-fetch pool that only records what it is handed (run later, outside the timing)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def submit(self, fn, *args) -> None:
        self.calls.append((fn, args))

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        self.calls.clear()


def split_restarts(rec: Reconciler, size: int, per: int = SPLIT_PER_FLUSH, flushes: int = 23) -> list[float]:
    """Synchronously (the loop stopped): each round, `per` targets restart and the keys of
    the last round's restarts arrive; the loop thread's CPU (thread_time) to apply them,
    start the fetches and flush. The fetches themselves (the fake's hashing) and making the
    targets are not timed. Returns the CPU of each flush after the first 3."""
    pool, deferred, limit = rec.pool, _Deferred(), rec.fetch_limit
    rec.pool = deferred  # type: ignore[assignment]
    # Every restart's fetch handed over in its round (the deferred pool answers them all
    # with the next): what this measures is a flush's work for `per` keys a round.
    rec.fetch_limit = per
    costs = []
    try:
        for round_ in range(flushes + 1):
            if round_ < flushes:
                for k in range(per):
                    rec.upsert(make_target(((round_ * per + k) * 7919) % size, f"split-{round_}-{k}"))
            started = time.thread_time()
            while True:
                try:
                    rec._apply(rec.inbox.get_nowait())
                except queue.Empty:
                    break
            rec._start_due_fetches()
            rec.flush()
            costs.append(time.thread_time() - started)
            calls, deferred.calls = deferred.calls, []
            for fn, args in calls:  # answered now: applied with the next round
                fn(*args)
    finally:
        rec.pool, rec.fetch_limit = pool, limit
    return costs[3:flushes]


def _index_text(paths: Paths) -> str:
    """The index as sshd sees it."""
    return read_index(paths.sshd.index_dir).decode()


def python_speed() -> float:
    """Millions of iterations per second of a fixed loop of dict and str work (best of 3):
    the absolute figures above (ms of CPU per event, seconds of latency) scale with it, so
    runs on different machines compare through it."""
    best = float("inf")
    for _ in range(3):
        started, table = time.process_time(), {}
        for i in range(1_000_000):
            table[i & 1023] = str(i)
        best = min(best, time.process_time() - started)
    return 1.0 / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.rate, args.seconds)))
        return 0
    results = {}
    speed = python_speed()
    for size in (int(s) for s in args.sizes.split(",")):
        print(f"watcher_cost: {size} targets", file=sys.stderr)
        proc = subprocess.run([sys.executable, __file__, "--one", str(size), "--rate", str(args.rate),
                               "--seconds", str(args.seconds)], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            print(f"watcher_cost: the {size}-target run failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[size] = json.loads(proc.stdout.strip().splitlines()[-1])
    sizes = list(results)
    base = results[sizes[0]]
    rows = []
    nan = float("nan")
    base_iso = dist(base["isolated"])
    for size, r in results.items():
        lat = dist(r["latencies"])
        iso = dist(r["isolated"])
        fl = sorted(r["flush_seconds"])[len(r["flush_seconds"]) // 2]
        split, base_split = dist(r["split_flushes"]), dist(base["split_flushes"])
        rows.append([f"{size:,}", f"{r['initial']['wall']:.1f} / {r['initial']['status_wall']:.1f}", f"{fl:.3f}",
                     f"{fl / (sorted(base['flush_seconds'])[len(base['flush_seconds']) // 2]):.1f}x",
                     f"{iso.get('p50', nan) * 1e3:.0f} / {iso.get('p99', nan) * 1e3:.0f}",
                     f"{iso.get('p50', nan) / base_iso.get('p50', nan):.2f}x / "
                     f"{iso.get('p99', nan) / base_iso.get('p99', nan):.2f}x",
                     f"{split.get('p50', nan) * 1e3:.0f} / {split.get('p90', nan) * 1e3:.0f}",
                     f"{split.get('p50', nan) / base_split.get('p50', nan):.1f}x",
                     f"{r['cpu_per_event'] * 1e3:.2f}", f"{r['cpu_per_event'] / base['cpu_per_event']:.1f}x",
                     f"{r['events'] / r['posting_seconds']:.0f}",
                     f"{lat.get('p50', nan):.2f} / {lat.get('p99', nan):.2f} / {lat.get('max', nan):.2f}",
                     f"{lat.get('p99', nan) / dist(base['latencies']).get('p99', nan):.2f}x",
                     f"{r['never_written']} / {r['superseded']}",
                     "yes" if r["cache_correct"] and r["index_correct"] else "NO",
                     f"{r['peak_rss_mib']:.0f}", f"{r['peak_rss_mib'] / base['peak_rss_mib']:.1f}x",
                     f"{dist(r['status_writes']).get('p50', nan) * 1e3:.0f} / "
                     f"{dist(r['status_writes']).get('max', nan) * 1e3:.0f}"])
    md = ("### B6 watcher cost\n\nThe real Reconciler and OutputWriter (files in a temporary directory), "
          "a synthetic source, a key fetch that answers at once; one process per size. "
          "Isolated events: 60 restarts 0.15 s apart (the loop idle between them), each with a new "
          "key; latency = event posted -> index shard written with its key (this includes the "
          "reconciler's 0.1 s debounce). Churn: 1,000 restarts/s; a restart of a target whose "
          "previous restart's key was not written yet supersedes it (counted, not a latency). "
          f"Split restarts: rounds of {SPLIT_PER_FLUSH} restarts whose new keys arrive with the next "
          "round, as a restarted container's key API answers after it boots (the churn's fetch "
          "answers at once, so most of its restarts are one change); the loop's own CPU per flush, "
          "synchronous (no threads), 20 rounds. "
          "The supervisor's status heartbeat runs beside them as in the app (status.json every "
          "2 s with every target's row): its CPU is in the CPU per event; the initial load ends "
          "when status.json shows every target served too. CPU per event: the process's CPU "
          "during the churn less the bench's own thread (pacing the events, making each target "
          "and the key it awaits), plus the upserts that thread makes (the source's hand-off); "
          "the table after it splits it by thread (/proc, per thread). The last table gives the "
          "watcher's RSS: loaded and idle (the state itself), during the churn as a distribution, "
          "and the peak. "
          f"Ratios are to the first size. This machine ran a fixed loop of dict and str work "
          f"(bench/watcher_cost.py, python_speed) at {speed:.2f} M iterations/s: absolute "
          "CPU and latency figures scale with it.\n\n"
          + table(["targets", "initial load s: index / status.json", "render+write s (p50 of 5)", "vs first",
                   "isolated event->index ms p50 / p99", "vs first p50 / p99",
                   f"split restarts: loop CPU ms per flush of {SPLIT_PER_FLUSH} p50 / p90", "vs first",
                   "CPU ms/event (churn)", "vs first", "events/s offered",
                   "churn event->index s p50 / p99 / max", "p99 vs first",
                   "never written (120 s) / superseded", "index and cache correct at the end",
                   "peak RSS MiB", "vs first", "status.json write ms p50 / max"], rows)
          + "\n\n" + stage_table(results) + "\n\n" + memory_table(results))
    save("watcher_cost", md, {"python_speed_M_per_s": speed, **{str(k): v for k, v in results.items()}})
    return 0


def stage_table(results: dict) -> str:
    """Churn CPU per event by thread, ms, one column per size."""
    stages = [stage for stage in STAGE_ORDER if any(stage in r["stage_cpu"] for r in results.values())]
    rows = [[stage, *(f"{r['stage_cpu'].get(stage, 0.0) / r['events'] * 1e3:.3f}" for r in results.values())]
            for stage in stages]
    rows.append(["the watcher (the sum: CPU ms/event above)",
                 *(f"{r['cpu_per_event'] * 1e3:.3f}" for r in results.values())])
    rows.append([f"whole process, with {MAIN_STAGE}",
                 *(f"{r['process_cpu_per_event'] * 1e3:.3f}" for r in results.values())])
    return table(["churn CPU ms per event, by thread", *(f"{size:,} targets" for size in results)], rows)


def memory_table(results: dict) -> str:
    """VmRSS in MiB, one column per size: the state (loaded, idle), under the churn, the peak."""
    nan = float("nan")
    rows = [["loaded and idle (every target served, before the isolated events)",
             *(f"{r['loaded_rss_mib']:.0f}" for r in results.values())],
            ["during the churn, sampled every 0.1 s: p50 / p90 / max",
             *(f"{dist(r['churn_rss_mib']).get('p50', nan):.0f} / {dist(r['churn_rss_mib']).get('p90', nan):.0f} / "
               f"{dist(r['churn_rss_mib']).get('max', nan):.0f}" for r in results.values())],
            ["peak of the run so far (ru_maxrss, the table above)",
             *(f"{r['peak_rss_mib']:.0f}" for r in results.values())]]
    return table(["watcher RSS MiB", *(f"{size:,} targets" for size in results)], rows)


STAGE_ORDER = ("reconciler loop", "key fetch (the fake's hashing)", "source hand-off (upserts)",
               "status heartbeat", "cache writer", "other threads")


if __name__ == "__main__":
    sys.exit(main())
