"""The index's file of recent changes through the real sshd: a key added since the group files
were written logs in from `.recent`, and a key removed since is refused there (its
`<fingerprint> #` line, a comment), while the group file still holds its old line.

The index needs enough keys that one change stays under a sixteenth of it (else the groups
are written at once): 80 admin keys whose grants no target changes (permitopen of a fixed
name). The watcher folds `.recent` into the groups once the index has been quiet for a
second, so a second key file is written and removed in turns meanwhile; and a check counts
only if the group files still lacked the key (or still held it) after its login.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from pathlib import Path
from typing import Iterator

from helpers import (INDEX_DIR, KeyPair, Proxy, SshClient, access_events, make_keypair, wait_for_login,
                     wait_until)

KEYS_DIR = "/etc/ssh/authorized_keys.d"
ATTEMPTS = 3


def _recent(proxy: Proxy) -> tuple[str, str]:
    """(the version `.recent` leads to, its text); ("", "") when there is none."""
    out = proxy.exec(["sh", "-c", f"readlink {INDEX_DIR}/.recent && cat {INDEX_DIR}/.recent"]).stdout
    version, _, text = out.partition("\n")
    return version, text


def _wait_for_line(proxy: Proxy, line: str, deadline: float = 20) -> tuple[str, str]:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        version, text = _recent(proxy)
        if line in text:
            return version, text
        time.sleep(0.05)
    raise AssertionError(f"{line!r} never appeared in {INDEX_DIR}/.recent: {_recent(proxy)}")


def _admin_lines(keys: list[KeyPair]) -> str:
    """Admin lines whose grants no target changes (a fixed permitopen)."""
    return "".join(f'permitopen="nowhere:22" {k.public}\n' for k in keys)


def test_recent_keys_log_in_and_removed_ones_are_refused(start_proxy, start_target, keypair, tmp_path) -> None:
    token = secrets.token_hex(3)
    keys_dir = tmp_path / "keys.d"
    keys_dir.mkdir()
    admins = [make_keypair(tmp_path, f"admin{i}") for i in range(80)]
    (keys_dir / "admins.keys").write_text(_admin_lines(admins))
    proxy = start_proxy(env={"SSH_PERMIT_TARGET_HOST": f"rc-*-{token}"}, volumes=[f"{keys_dir}:{KEYS_DIR}"])

    with _never_quiet(keys_dir / "busy.keys", keypair("busy")):
        # Added: a target's key, written to .recent only, opens the target.
        for attempt in range(ATTEMPTS):
            own = keypair(f"own{attempt}")
            target = start_target(f"rc-{attempt}-{token}", own)
            _wait_for_line(proxy, f"{own.fingerprint} restrict,")
            wait_for_login(SshClient(proxy_port=proxy, key=own), target.name, deadline=30)
            if own.fingerprint not in _groups(proxy):
                break  # the groups never had it: answered from .recent
        else:
            raise AssertionError(NOT_CHECKED)

        # Removed: the last admin line deleted from its file (deleting an earlier one renumbers
        # the lines after it: many keys change, and the groups are written at once); .recent
        # says so, the group still has it.
        kept = list(admins)
        for attempt in range(ATTEMPTS):
            gone = kept.pop()
            (keys_dir / "admins.keys").write_text(_admin_lines(kept))
            _wait_for_line(proxy, f"{gone.fingerprint} #\n")
            refused = SshClient(proxy_port=proxy, key=gone).direct_proxy(opts=["-W", "nowhere:22"], input="",
                                                                          timeout=30)
            if gone.fingerprint in _groups(proxy):
                break  # the groups still held it: refused by .recent
        else:
            raise AssertionError(NOT_CHECKED)
    assert refused.returncode == 255, refused
    assert wait_until(lambda: bool(access_events(proxy, event="denied", fp=gone.fingerprint,
                                                 reason="unknown-key")), 10), proxy.access_log()
    assert not access_events(proxy, event="accepted", fp=gone.fingerprint), proxy.access_log()
    # Another admin key, in the groups only, is let in (its tunnel to nowhere then fails).
    still = kept[0]
    SshClient(proxy_port=proxy, key=still).direct_proxy(opts=["-W", "nowhere:22"], input="", timeout=30)
    assert wait_until(lambda: bool(access_events(proxy, event="accepted", fp=still.fingerprint)), 10), \
        proxy.access_log()


NOT_CHECKED = (f"no login of {ATTEMPTS} came while only .recent knew of the change: the groups were "
               "written first each time, or the keys command does not read .recent")


@contextlib.contextmanager
def _never_quiet(path: Path, key: KeyPair) -> Iterator[None]:
    """A key file written and removed in turns every 0.4 s: the index is never quiet for a
    second, so the watcher does not fold .recent into the groups meanwhile."""
    stop = threading.Event()

    def toggle() -> None:
        while not stop.wait(0.4):
            if path.exists():
                path.unlink()
            else:
                path.write_text(_admin_lines([key]))
    thread = threading.Thread(target=toggle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _groups(proxy: Proxy) -> str:
    """The group files' lines (what a key not in .recent is answered from)."""
    return proxy.exec(["sh", "-c", f"cat {INDEX_DIR}/.g*"]).stdout
