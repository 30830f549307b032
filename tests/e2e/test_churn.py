"""Churn: 50 targets, over 1,000 start/stop/rename/network/re-create events as fast as the
engine takes them; once things settle, the proxy's index, cache and hosts block equal what
`docker inspect` says (computed here, independently of the watcher's code)."""

from __future__ import annotations

import fnmatch
import json
import random
import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import docker as docker_sdk
import pytest

from helpers import (CAT_INDEX, SESSION_LABEL, TEST_LABEL, KeyPair, Proxy, SshClient, make_keypair,
                     wait_for_event, wait_for_login, wait_until)

SLOTS = 50
EVENTS = 1000
WORKERS = 4  # bounded: the engine on 2 shared cores keeps up
SETTLE_DEADLINE = 120.0
CACHE = "/etc/ssh/authorized_keys_cache"
HOSTS_BEGIN = "# BEGIN ssh-proxy targets"
HOSTS_END = "# END ssh-proxy targets"


@dataclass
class Slot:
    """One target position: its container changes (rename, re-create), the slot stays."""
    index: int
    key: KeyPair
    lock: threading.Lock
    cid: str = ""


class Churn:
    def __init__(self, sfx: str, network: str, side: str, session_id: str, image: str,
                 keydir) -> None:
        self.sfx, self.network, self.side = sfx, network, side
        self.session_id, self.image, self.keydir = session_id, image, keydir
        self.local = threading.local()
        self.count_lock = threading.Lock()
        self.done = 0
        self.removed_keys: list[KeyPair] = []
        self.keys_made = 0

    @property
    def client(self) -> docker_sdk.DockerClient:
        if not hasattr(self.local, "client"):
            self.local.client = docker_sdk.from_env(timeout=120)
        return self.local.client

    def label(self) -> str:
        return f"ssh-proxy-churn={self.sfx}"

    def new_key(self) -> KeyPair:
        with self.count_lock:
            self.keys_made += 1
            n = self.keys_made
        return make_keypair(self.keydir, f"k{n}")

    def name(self, slot: int, variant: str) -> str:
        # chp-* is permitted, chx-* is not: a rename moves a target in and out of scope.
        return {"p": f"chp-{slot}-{self.sfx}", "r": f"chp-{slot}r-{self.sfx}",
                "x": f"chx-{slot}-{self.sfx}"}[variant]

    def run(self, slot: Slot) -> None:
        container = self.client.containers.run(
            self.image, detach=True, name=self.name(slot.index, "p"), hostname=f"chh-{slot.index}-{self.sfx}",
            network=self.network,
            labels={TEST_LABEL: "1", SESSION_LABEL: self.session_id, "ssh-proxy-churn": self.sfx,
                    "ssh-proxy-churn-slot": str(slot.index)},
            environment={"SERVE_PUBLICKEY": "1", "PUBLICKEY_PORT": "8080",
                         "TARGET_PUBKEY": slot.key.public})
        self.client.networks.get(self.side).connect(container)
        slot.cid = container.id

    def step(self, slot: Slot, rng: random.Random) -> int:
        """One random operation on the slot's container; returns how many engine events
        (operations) it performed."""
        with slot.lock:
            c = self.client.containers.get(slot.cid)
            running = c.status == "running"
            shared = self.network in (c.attrs["NetworkSettings"]["Networks"] or {})
            op = rng.choice(["stop", "start", "rename", "rename", "net", "net", "recreate"])
            if op in ("stop", "start"):
                if running:
                    c.stop(timeout=0)  # docker stop -t 0: the target needs no grace
                else:
                    c.start()
            elif op == "rename":
                others = [self.name(slot.index, v) for v in ("p", "r", "x")]
                c.rename(rng.choice([n for n in others if n != c.name]))
            elif op == "net":
                net = self.client.networks.get(self.network)
                if shared:
                    net.disconnect(c)
                else:
                    net.connect(c)
            else:
                c.remove(force=True)
                self.removed_keys.append(slot.key)
                slot.key = self.new_key()
                self.run(slot)
                return 3  # rm, run, connect
            return 1


class EventCounter:
    """Counts, live, the engine's events about our containers and the shared network
    (the engine replays only its last 256 events, so `since` alone would undercount)."""

    CONTAINER_ACTIONS = ("create", "start", "die", "rename", "destroy")

    def __init__(self, client: docker_sdk.DockerClient, label: str, networks: list[str]) -> None:
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.streams = [
            client.events(decode=True, filters={"type": "container", "label": label,
                                                "event": list(self.CONTAINER_ACTIONS)}),
            client.events(decode=True, filters={"type": "network", "network": networks,
                                                "event": ["connect", "disconnect"]})]
        self.threads = [threading.Thread(target=self._read, args=(s,), daemon=True) for s in self.streams]
        for t in self.threads:
            t.start()

    def _read(self, stream) -> None:
        try:
            for event in stream:
                with self.lock:
                    key = f"{event.get('Type')}:{event.get('Action')}"
                    self.counts[key] = self.counts.get(key, 0) + 1
        except Exception:  # the stream is closed under us at the end
            return

    def stop(self) -> dict[str, int]:
        time.sleep(1.0)  # the last events are in flight
        for s in self.streams:
            s.close()
        with self.lock:
            return dict(self.counts)


def expected(client: docker_sdk.DockerClient, sfx: str, network: str, permit: str) -> dict[str, dict]:
    """Ground truth from `docker inspect`: key blob -> the target it opens, for the running
    containers whose name the permit glob matches and that share `network` with the proxy."""
    truth: dict[str, dict] = {}
    for c in client.containers.list(all=True, filters={"label": f"ssh-proxy-churn={sfx}"}):
        attrs = client.api.inspect_container(c.id)
        name = attrs["Name"].lstrip("/")
        nets = attrs["NetworkSettings"]["Networks"] or {}
        ip = (nets.get(network) or {}).get("IPAddress", "")
        if not (attrs["State"]["Running"] and fnmatch.fnmatchcase(name, permit) and ip):
            continue
        env = dict(e.split("=", 1) for e in attrs["Config"]["Env"])
        blob = env["TARGET_PUBKEY"].split()[1]
        truth[blob] = {"name": name, "ip": ip, "hostname": attrs["Config"]["Hostname"],
                       "id": attrs["Id"]}
    return truth


def proxy_files(proxy: Proxy) -> tuple[str, str, str]:
    out = proxy.exec(f"({CAT_INDEX}); echo '@@@'; cat {CACHE}; echo '@@@'; cat /etc/hosts", check=True).stdout
    index, cache, hosts = out.split("@@@\n")
    return index, cache, hosts


KEY_RE = re.compile(r"(?:^|\s)(ssh-ed25519|ecdsa-sha2-\S+|ssh-rsa) (\S+)")


def blobs(text: str) -> dict[str, str]:
    """key blob -> its line, for every key line of an index or cache."""
    found = {}
    for line in text.splitlines():
        m = KEY_RE.search(line)
        if m and not line.startswith("#"):
            found[m.group(2)] = line
    return found


def hosts_block(hosts: str) -> list[tuple[str, list[str]]]:
    rows, inside = [], False
    for line in hosts.splitlines():
        if line.startswith(HOSTS_BEGIN):
            inside = True
        elif line.startswith(HOSTS_END):
            inside = False
        elif inside and line.strip():
            ip, *names = line.split()
            rows.append((ip, names))
    return rows


def watcher_view(proxy: Proxy, truth: dict[str, dict], index: str) -> str:
    """What the watcher thinks of each expected target whose key is not served: its status
    row or its ignored row (matched by container id, whatever name the watcher has), and
    the watcher's log lines about it."""
    try:
        doc = json.loads(proxy.read_file("/run/ssh-proxy/status.json"))
    except ValueError as exc:
        return f"(no status: {exc})"
    served = blobs(index)
    missing = [t for blob, t in truth.items() if blob not in served]
    rows = {row.get("id", ""): ("target", row) for row in doc.get("targets", [])}
    rows.update({row.get("id", ""): ("ignored", row) for row in doc.get("ignored", [])})
    log_lines = proxy.logs().splitlines()
    out = [f"status: heartbeat {doc.get('heartbeat')}, last event {doc.get('last_event')}, "
           f"last write {doc.get('last_write')}, writes {doc.get('writes')}, now {time.time():.1f}"]
    for t in missing:
        kind, row = next(((k, r) for i, (k, r) in rows.items() if i and t["id"].startswith(i)),
                         ("absent", {}))
        out.append(f"{t['name']} ({t['id'][:12]}, {t['ip']}): {kind} {json.dumps(row)}")
        slot = re.compile(rf"ch[px]-{re.escape(t['name'].split('-')[1].rstrip('r'))}r?-")
        about = [line for line in log_lines if t["id"][:12] in line or slot.search(line)]
        out.extend(f"    {line}" for line in about[-30:])
    return "\n".join(out)


def mismatches(truth: dict[str, dict], index: str, cache: str, hosts: str, sfx: str) -> list[str]:
    problems = []
    served, cached = blobs(index), blobs(cache)
    for what, have in (("index", served), ("cache", cached)):
        if set(have) != set(truth):
            missing = sorted(truth[b]["name"] for b in set(truth) - set(have))
            problems.append(f"{what}: {len(set(have) - set(truth))} key(s) too many, "
                            f"{len(missing)} missing (of {', '.join(missing) or '-'})")
    ours = re.compile(rf'permitopen="(ch[px]-\d+r?-{sfx}):')
    for blob, line in served.items():
        target = truth.get(blob)
        if target is None:
            continue
        if f'permitopen="{target["name"]}:' not in line or f'permitopen="{target["ip"]}:' not in line:
            problems.append(f"{target['name']}: its line lacks its name or IP: {line}")
        stale = set(ours.findall(line)) - {target["name"]}
        if stale:
            problems.append(f"{target['name']}: its line still opens {sorted(stale)}")
    owners = {}
    for t in truth.values():
        for alias in (t["name"], t["hostname"], t["id"][:12]):
            owners[alias] = t
    for ip, names in hosts_block(hosts):
        for name in names:
            owner = owners.get(name)
            if owner is None:
                problems.append(f"/etc/hosts pins {name} ({ip}), which no served target has")
            elif owner["ip"] != ip:
                problems.append(f"/etc/hosts pins {name} to {ip}, its target is at {owner['ip']}")
    return problems


@pytest.mark.timeout(900)  # on a loaded machine the engine alone may take minutes for the churn
def test_churn_settles_to_ground_truth(start_proxy, test_network, session_id, target_image,
                                       tmp_path_factory):
    sfx = secrets.token_hex(3)
    permit = f"chp-*-{sfx}"
    client = docker_sdk.from_env(timeout=120)
    side = client.networks.create(f"sshproxy-churn-side-{sfx}", labels={TEST_LABEL: "1", SESSION_LABEL: session_id})
    churn = Churn(sfx, test_network, side.name, session_id, target_image, tmp_path_factory.mktemp("churnkeys"))
    try:
        proxy = start_proxy(env={"SSH_PERMIT_TARGET_HOST": permit, "SSH_TARGET_KEY_SOURCE": "api"})
        slots = [Slot(i, churn.new_key(), threading.Lock()) for i in range(SLOTS)]
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(churn.run, slots))
        counter = EventCounter(client, churn.label(), [test_network, side.name])
        started = time.monotonic()

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            while True:
                with churn.count_lock:
                    if churn.done >= EVENTS:
                        return
                n = churn.step(rng.choice(slots), rng)
                with churn.count_lock:
                    churn.done += n

        with ThreadPoolExecutor(WORKERS) as pool:
            for future in [pool.submit(worker, seed) for seed in range(WORKERS)]:
                future.result()
        churn_seconds = time.monotonic() - started
        counts = counter.stop()
        performed = churn.done
        print(f"churn: {performed} operations in {churn_seconds:.0f} s; engine events: {counts}")
        assert performed >= EVENTS, performed
        # The engine saw them too (a stop is one `die`, a re-create three events, ...).
        assert sum(counts.values()) >= EVENTS, counts

        # Settled = the index stopped changing and equals the ground truth.
        state: dict = {}

        def settled() -> bool:
            truth = expected(client, sfx, test_network, permit)
            index, cache, hosts = proxy_files(proxy)
            problems = mismatches(truth, index, cache, hosts, sfx)
            stable = state.get("index") == index
            state.update(index=index, truth=truth, problems=problems)
            return stable and not problems

        assert wait_until(settled, SETTLE_DEADLINE, interval=2.0), \
            (f"not settled after {SETTLE_DEADLINE} s:\n" + "\n".join(state["problems"][:40])
             + "\nwatcher's view of the missing targets:\n"
             + watcher_view(proxy, state["truth"], state["index"]))
        truth = state["truth"]
        assert truth, "churn left no served target: nothing was checked"

        # Every pinned name resolves, inside the proxy, to its own target.
        index, cache, hosts = proxy_files(proxy)
        pinned = {name: ip for ip, names in hosts_block(hosts) for name in names}
        names = [t["name"] for t in truth.values()]
        assert set(names) <= set(pinned), sorted(set(names) - set(pinned))
        resolved = {}
        for line in proxy.exec(["getent", "hosts", *pinned], check=True).stdout.splitlines():
            ip, *aliases = line.split()
            for alias in aliases:
                resolved[alias] = ip
        assert {n: resolved.get(n) for n in pinned} == pinned

        # A removed target's key is refused; a live target's key logs in.
        live_blob, live = next(iter(sorted(truth.items(), key=lambda kv: kv[1]["name"])))
        live_slot = next(s for s in slots if s.key.public.split()[1] == live_blob)
        wait_for_login(SshClient(proxy, live_slot.key), live["name"], deadline=60)
        assert churn.removed_keys, "no target was re-created"
        gone = churn.removed_keys[0]
        refused = SshClient(proxy, gone).ssh(live["name"], "true", timeout=60)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused.stderr
        wait_for_event(proxy, event="denied", fp=gone.fingerprint, deadline=30)
    finally:
        for c in client.containers.list(all=True, filters={"label": churn.label()}):
            c.remove(force=True)
        # The engine lets a network go once the removed containers' endpoints are gone.
        wait_until(lambda: _removed(side), 60, interval=1.0)


def _removed(network) -> bool:
    try:
        network.remove()
    except docker_sdk.errors.NotFound:
        return True
    except docker_sdk.errors.APIError:
        return False
    return True
