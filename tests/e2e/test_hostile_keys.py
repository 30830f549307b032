"""Hostile /publickey bodies: whatever a target publishes, its keys never reach beyond that
target, the rejection is logged with the target's name and a reason, a well-behaved target
next to them keeps working and the watcher stays healthy.

One proxy, one GOOD control target, one hostile target per body. The proxy reads the key
file at the body's path (SSH_TARGET_KEY_PATH), so the exec fallback sees the same hostile
content as HTTP and cannot hand the watcher a valid key of its own.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from helpers import (PUBLICKEY_BODY_PATH, KeyPair, SshClient, access_events, make_keypair, parse_logfmt, status,
                     wait_for_login, wait_until)

BASE_OPTIONS = "restrict,port-forwarding,permitopen="


def make_key(directory: Path, name: str, kind: str = "ed25519", bits: int | None = None) -> KeyPair:
    """A key pair of any type (the keypair fixture only makes ed25519)."""
    return make_keypair(directory, name, comment=f"{name}@hostile-test", kind=kind, bits=bits)


@dataclass
class Hostile:
    label: str
    body: bytes
    reason: str  # regex the logged rejection must match
    keys: tuple[KeyPair, ...]  # private keys behind whatever valid-looking keys the body holds
    accepted: bool = False  # the body's keys are fine: served, but for this target only


def test_hostile_publickey_bodies(start_target, start_proxy, keypair, tmp_path):
    sfx = secrets.token_hex(3)
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    k = {name: make_key(keys_dir, name) for name in ("opt", "two_a", "two_victim", "big", "mismatch",
                                                      "cr_first", "cr_injected")}
    k["rsa1024"] = make_key(keys_dir, "rsa1024", "rsa", 1024)
    control_key = keypair("control")

    mismatch_blob = k["mismatch"].blob
    big = (f"{k['big'].public}\n".encode()
           + (b"# " + b"x" * 1021 + b"\n") * (10 * 1024))  # a valid key, then 10 MiB of comments
    hostiles = [
        Hostile("opt", f'permitopen="*:*" {k["opt"].public}\n'.encode(),
                r"option", (k["opt"],)),
        Hostile("two", f"{k['two_a'].public}\n{k['two_victim'].public}\n".encode(),
                "", (k["two_a"], k["two_victim"]), accepted=True),
        Hostile("big", big, r"exceed|too (large|big)|limit", (k["big"],)),
        Hostile("b64", b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA!!not*base64!! x@y\n",
                r"base64", ()),
        Hostile("mismatch", f"ssh-rsa {mismatch_blob} mismatch@hostile\n".encode(),
                r"mismatch|ssh-ed25519", (k["mismatch"],)),
        Hostile("rsa1024", f"{k['rsa1024'].public}\n".encode(), r"1024.bits?|2048", (k["rsa1024"],)),
        Hostile("crlf", (f"{k['cr_first'].public}\r"
                         f'restrict,permitopen="control-{sfx}:22" {k["cr_injected"].public}\n').encode(),
                r"control char|U\+000D|\\r|CR", (k["cr_first"], k["cr_injected"])),
    ]
    assert len(big) > 10 * 1024 * 1024

    control = start_target(f"control-{sfx}", control_key)
    targets = {}
    for h in hostiles:
        body = tmp_path / f"body-{h.label}"
        body.write_bytes(h.body)
        targets[h.label] = start_target(f"h-{h.label}-{sfx}", None, body_file=body)
    # Only this test's containers (others on the host would only add noise to the checks).
    proxy = start_proxy(env={"SSH_PERMIT_TARGET_HOST": f"*-{sfx}",
                             "SSH_TARGET_KEY_PATH": PUBLICKEY_BODY_PATH})
    control_client = SshClient(proxy, control_key)
    wait_for_login(control_client, control.name)

    # ---- every hostile target was looked at, its rejection logged with name and reason
    def logged(h: Hostile) -> list[str]:
        name = targets[h.label].name
        return [line for line in proxy.logs().splitlines()
                if "level=warning" in line and f"target {name}" in line
                and re.search(h.reason, parse_logfmt(line).get("msg", ""), re.IGNORECASE)]

    for h in hostiles:
        if h.accepted:
            continue
        assert wait_until(lambda: bool(logged(h)), 30, interval=0.5), \
            f"no warning naming target {targets[h.label].name} with a reason matching {h.reason!r}:\n" \
            f"{proxy.logs()}"
    two = targets["two"]
    wanted_fps = {k["two_a"].fingerprint, k["two_victim"].fingerprint}

    def two_served() -> bool:
        rows = [t for t in status(proxy).get("targets", []) if t["name"] == two.name]
        return bool(rows) and set(rows[0]["fingerprints"]) == wanted_fps

    assert wait_until(two_served, 20, interval=0.5), json.dumps(status(proxy), indent=1)

    # ---- status.json: rejected targets have no key, and say why. status.json is written
    # every 2 s: a row rejected after the one awaited above shows in a later write.
    def said(row: dict) -> str:
        return " ".join([row.get("error") or "", *row.get("rejected", [])])

    def all_shown() -> bool:
        rows = {t["name"]: t for t in status(proxy).get("targets", [])}
        return all(targets[h.label].name in rows and (
            h.accepted or re.search(h.reason, said(rows[targets[h.label].name]), re.IGNORECASE))
            for h in hostiles)

    wait_until(all_shown, 20, interval=0.5)
    rows = {t["name"]: t for t in status(proxy)["targets"]}
    for h in hostiles:
        row = rows[targets[h.label].name]
        if h.accepted:
            assert row["key_status"] == "ok", row
            continue
        assert row["fingerprints"] == [] and row["key_status"] != "ok", row
        assert re.search(h.reason, said(row), re.IGNORECASE), row

    # ---- no key of a hostile body opens the control target
    def through_proxy_to_control(key: KeyPair) -> subprocess.CompletedProcess:
        # The control key logs in to the control target: only the proxy hop can stop this.
        return SshClient(proxy, control_key, proxy_key=key.private).ssh(control.name, "true", timeout=30)

    all_keys = [key for h in hostiles for key in h.keys]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(through_proxy_to_control, all_keys))
    for key, result in zip(all_keys, results):
        assert result.returncode == 255, (key.public, result.returncode, result.stderr)

    for h in hostiles:
        for key in h.keys:
            if h.accepted:
                # Accepted at the proxy, but the tunnel to the control target is refused ...
                assert wait_until(lambda: bool(access_events(
                    proxy, event="tunnel-denied", fp=key.fingerprint, dest=f"{control.name}:22")), 10), \
                    (key.public, proxy.access_log())
                # ... while it does open its own target (positive control for this key).
                own = SshClient(proxy, key.private).direct_proxy(opts=["-W", f"{two.name}:22"], input="",
                                                                 timeout=30)
                assert own.returncode == 0 and own.stdout.startswith("SSH-2.0-"), own
            else:
                # Rejected keys do not even log in to the proxy.
                assert wait_until(lambda: bool(access_events(proxy, event="denied", fp=key.fingerprint)),
                                  10), (h.label, key.public, proxy.access_log())
                assert not access_events(proxy, event="accepted", fp=key.fingerprint), h.label

    # ---- the rendered files: only the proxy's own options, only the line's own target
    aliases = {t["name"]: set(t["aliases"]) for t in status(proxy)["targets"]}
    def files() -> tuple[str, str, list[str], list[str]]:
        cache, index = proxy.read_file("/etc/ssh/authorized_keys_cache"), proxy.read_index()
        return (cache, index, [line for line in cache.splitlines() if line and not line.startswith("#")],
                [line.split(" ", 1)[1] for line in index.splitlines() if line])
    # The cache follows the index, at most once a second.
    assert wait_until(lambda: sorted(files()[2]) == sorted(files()[3]), 10), files()[:2]
    cache, index, cache_lines, index_lines = files()
    assert cache_lines, cache
    for line in cache_lines:
        assert "*:*" not in line and '"*:' not in line, line
        assert "\r" not in line, repr(line)
        assert line.startswith(BASE_OPTIONS), line
        options, key_type, blob, *comment = line.split(" ")
        owners = comment[0].split(",") if comment else []
        assert owners and all(o in aliases for o in owners), line
        allowed = set().union(*(aliases[o] for o in owners))
        opts = options.split(",")
        assert opts[:2] == ["restrict", "port-forwarding"], line
        for opt in opts[2:]:
            match = re.fullmatch(r'permitopen="([^"]+):(\*|\d+)"', opt)
            assert match, f"unexpected option {opt!r} in {line}"
            assert match.group(1) in allowed, f"{match.group(1)} is not an alias of {owners}: {line}"
    by_blob = {line.split(" ")[2]: line for line in cache_lines}
    for h in hostiles:
        for key in h.keys:
            if h.accepted:
                assert by_blob[key.blob].split(" ")[3] == two.name, by_blob[key.blob]
            else:
                assert key.blob not in cache, (h.label, key.public)
    assert mismatch_blob not in cache

    # ---- the watcher survived all of it, and the control target still works
    health = proxy.exec(["watcher", "health"])
    assert health.returncode == 0 and "healthy" in health.stdout, health
    again = control_client.ssh(control.name, "hostname", timeout=30)
    assert again.returncode == 0 and again.stdout.strip() == control.name, again


def test_key_files_that_block_do_not_starve_other_targets(start_target, start_proxy, keypair, tmp_path):
    sfx = secrets.token_hex(3)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes to it: `cat` of it blocks
    with ThreadPoolExecutor(max_workers=8) as pool:
        hung = list(pool.map(lambda i: start_target(f"hung-{i}-{sfx}", None, serve_publickey=False,
                                                    body_file=fifo), range(8)))
    proxy = start_proxy(env={"SSH_PERMIT_TARGET_HOST": f"*-{sfx}", "SSH_TARGET_KEY_PATH": PUBLICKEY_BODY_PATH})

    def reading(target) -> bool:
        return PUBLICKEY_BODY_PATH in target.exec(["ps", "-eo", "args"]).stdout

    assert wait_until(lambda: all(reading(t) for t in hung), 20, interval=0.5), \
        "the proxy did not try to read every hung target's key file"

    # A well-behaved target that starts now must still be served.
    key = keypair("good")
    good = start_target(f"good-{sfx}", key)
    wait_for_login(SshClient(proxy, key), good.name, deadline=15)
    health = proxy.exec(["watcher", "health"])
    assert health.returncode == 0, health
