"""watcher/hostkeys.py: scan output parsing, known_hosts rendering, and the learner's
bookkeeping (keys dropped when a target goes or moves, re-learned when it is re-created)."""

from __future__ import annotations

import base64
import struct
from pathlib import Path
from typing import Callable

import pytest

from watcher.hostkeys import (HEADER, HostKeyError, HostKeyLearner, ScanPolicy, ScanSubject,
                              Wanted, parse_scan, render, ssh_port, wanted)
from watcher.snapshot import TargetStatus, WatcherState

FAST = ScanPolicy(attempts=3, max_total=60.0, max_wait=0.0, again_after=300.0)


def string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def ed25519(seed: int) -> str:
    """A well-formed ssh-ed25519 key part (`type blob`), distinct per seed."""
    blob = string(b"ssh-ed25519") + string(bytes([seed]) * 32)
    return "ssh-ed25519 " + base64.b64encode(blob).decode()


def target(tid: str, name: str, address: str, *extra: str) -> TargetStatus:
    return TargetStatus(id=tid, name=name, address=address, aliases=(name, tid, address, *extra))


def state(*targets: TargetStatus) -> WatcherState:
    return WatcherState(targets=targets)


# --- pure ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ports, expected", [
    (("*",), 22), (("22",), 22), (("2222",), 2222), (("22", "2222"), 22), ((), 22)])
def test_ssh_port_is_22_unless_one_literal_port_is_permitted(ports, expected) -> None:
    assert ssh_port(ports) == expected


def test_parse_scan_keeps_valid_keys_of_the_scanned_host_only() -> None:
    subject = ScanSubject("aaaaaaaaaaaa", "172.18.0.5")
    output = (f"# 172.18.0.5:22 SSH-2.0-OpenSSH_9.2p1\n"
              f"172.18.0.5 {ed25519(1)}\n"
              f"172.18.0.5 {ed25519(1)}\n"          # twice: once
              f"172.18.0.9 {ed25519(2)}\n"          # another host's answer
              f"172.18.0.5 ssh-ed25519 AAAAnotakey\n"
              f"172.18.0.5 {ed25519(3)} comment\n")
    keys, problems = parse_scan(output, subject)
    assert [k.line() for k in keys] == [ed25519(1), ed25519(3)]
    assert all(k.comment == "" for k in keys)
    assert len(problems) == 2 and "another host" in problems[0]


def test_parse_scan_on_another_port_expects_bracketed_host() -> None:
    subject = ScanSubject("aaaaaaaaaaaa", "172.18.0.5", 2222)
    keys, problems = parse_scan(f"[172.18.0.5]:2222 {ed25519(1)}\n172.18.0.5 {ed25519(2)}\n",
                                subject)
    assert [k.line() for k in keys] == [ed25519(1)] and len(problems) == 1


def test_wanted_keeps_only_names_and_addresses_that_cannot_widen_a_line() -> None:
    hostile = TargetStatus(id="bbbbbbbbbbbb", name="evil", address="172.18.0.7",
                           aliases=("evil", "*", "a,b", "!x", "x y", "[h]:22", "172.18.0.7"))
    assert wanted(state(hostile), 22)["bbbbbbbbbbbb"].names == ("evil", "172.18.0.7")
    no_address = TargetStatus(id="cccccccccccc", name="far", aliases=("far",))
    no_names = TargetStatus(id="dddddddddddd", name="x y", address="172.18.0.8")
    assert wanted(state(no_address, no_names), 22) == {}


def test_render_keys_each_target_by_its_names_only() -> None:
    a = Wanted(ScanSubject("aaaaaaaaaaaa", "172.18.0.5"), "ws-a", ("ws-a", "aaaaaaaaaaaa", "172.18.0.5"))
    b = Wanted(ScanSubject("bbbbbbbbbbbb", "172.18.0.6"), "ws-b", ("ws-b",))
    keys_a = parse_scan(f"172.18.0.5 {ed25519(1)}\n172.18.0.5 {ed25519(2)}\n", a.subject)[0]
    text = render({"bbbbbbbbbbbb": b, "aaaaaaaaaaaa": a}, {a.subject: keys_a})  # b: not learned
    assert text == (HEADER + "# ws-a\n"
                    f"ws-a,aaaaaaaaaaaa,172.18.0.5 {ed25519(1)}\n"
                    f"ws-a,aaaaaaaaaaaa,172.18.0.5 {ed25519(2)}\n")


def test_render_brackets_names_on_another_port() -> None:
    a = Wanted(ScanSubject("aaaaaaaaaaaa", "172.18.0.5", 2222), "ws-a", ("ws-a", "172.18.0.5"))
    keys = parse_scan(f"[172.18.0.5]:2222 {ed25519(1)}\n", a.subject)[0]
    assert render({"a": a}, {a.subject: keys}).endswith(
        f"[ws-a]:2222,[172.18.0.5]:2222 {ed25519(1)}\n")


# --- the learner (synchronous scans, a real file) ---------------------------------------------


class FakeScanner:
    """Answers per address from a table; an address missing = nothing listens yet."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[ScanSubject] = []
        self.during: Callable[[], None] | None = None

    def __call__(self, subject: ScanSubject) -> str:
        self.calls.append(subject)
        if self.during is not None:
            self.during()
        if subject.address not in self.answers:
            raise HostKeyError(f"no host key from {subject.address}")
        return "".join(f"{subject.scanned_host} {k}\n" for k in self.answers[subject.address])


def inline(fn, *args):  # a pool that runs the scan at once
    fn(*args)


@pytest.fixture
def clock() -> list[float]:
    return [1000.0]


def learner(tmp_path: Path, scanner: FakeScanner, clock: list[float], port: int = 22) -> HostKeyLearner:
    return HostKeyLearner(tmp_path / "target_known_hosts", port, scanner, FAST, lambda: clock[0])


def lines_for(path: Path, name: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in path.read_text().splitlines()
            if line and not line.startswith("#") and name in line.split(" ")[0].split(",")]


def test_learns_drops_on_removal_and_relearns_a_recreated_target(tmp_path, clock) -> None:
    scanner = FakeScanner({"172.18.0.5": [ed25519(1)], "172.18.0.6": [ed25519(2)]})
    hk = learner(tmp_path, scanner, clock)
    hk.sync(inline)
    assert not hk.path.exists()  # nothing published yet: nothing written
    hk.update(state(target("aaaaaaaaaaaa", "ws-a", "172.18.0.5"),
                    target("bbbbbbbbbbbb", "ws-b", "172.18.0.6")))
    hk.sync(inline)
    assert lines_for(hk.path, "ws-a") == [ed25519(1)]
    assert lines_for(hk.path, "ws-b") == [ed25519(2)]
    hk.sync(inline)
    assert len(scanner.calls) == 2  # learned once, not on every snapshot

    hk.update(state(target("bbbbbbbbbbbb", "ws-b", "172.18.0.6")))  # ws-a goes
    hk.sync(inline)
    assert lines_for(hk.path, "ws-a") == [] and ed25519(1) not in hk.path.read_text()

    # Re-created: a new container (id) with the same name, a new key at the same address.
    scanner.answers["172.18.0.5"] = [ed25519(3)]
    hk.update(state(target("cccccccccccc", "ws-a", "172.18.0.5"),
                    target("bbbbbbbbbbbb", "ws-b", "172.18.0.6")))
    hk.sync(inline)
    assert lines_for(hk.path, "ws-a") == [ed25519(3)]
    assert ed25519(1) not in hk.path.read_text()


def test_a_new_address_drops_the_old_keys_and_scans_again(tmp_path, clock) -> None:
    scanner = FakeScanner({"172.18.0.5": [ed25519(1)], "172.18.0.9": [ed25519(4)]})
    hk = learner(tmp_path, scanner, clock)
    hk.update(state(target("aaaaaaaaaaaa", "ws-a", "172.18.0.5")))
    hk.sync(inline)
    hk.update(state(target("aaaaaaaaaaaa", "ws-a", "172.18.0.9")))
    hk.sync(inline)
    assert lines_for(hk.path, "ws-a") == [ed25519(4)]
    assert "172.18.0.5" not in hk.path.read_text()


def test_renamed_names_follow_without_a_new_scan(tmp_path, clock) -> None:
    scanner = FakeScanner({"172.18.0.5": [ed25519(1)]})
    hk = learner(tmp_path, scanner, clock)
    hk.update(state(target("aaaaaaaaaaaa", "ws-a", "172.18.0.5", "alias-1")))
    hk.sync(inline)
    hk.update(state(target("aaaaaaaaaaaa", "ws-a", "172.18.0.5")))  # the alias was refused since
    hk.sync(inline)
    assert "alias-1" not in hk.path.read_text() and len(scanner.calls) == 1


def test_a_scan_that_ends_after_its_target_went_is_discarded(tmp_path, clock) -> None:
    """The address's next owner must never get the previous target's names (or vice versa)."""
    scanner = FakeScanner({"172.18.0.5": [ed25519(1)]})
    hk = learner(tmp_path, scanner, clock)

    def target_goes() -> None:
        scanner.during = None
        hk.update(state(target("bbbbbbbbbbbb", "other", "172.18.0.6")))
        hk.sync(lambda *_: None)

    scanner.during = target_goes
    hk.update(state(target("aaaaaaaaaaaa", "ws-a", "172.18.0.5")))
    hk.sync(inline)
    assert ed25519(1) not in hk.path.read_text()


def test_a_hostile_answer_for_another_host_is_never_stored(tmp_path, clock) -> None:
    """A target that answers with lines for another target's address gets nothing from
    them: only its own host's lines count, and only on its own names."""
    class Liar(FakeScanner):
        def __call__(self, subject: ScanSubject) -> str:
            self.calls.append(subject)
            if subject.address == "172.18.0.5":
                return f"172.18.0.6 {ed25519(9)}\n{subject.scanned_host} {ed25519(1)}\n"
            return f"{subject.scanned_host} {ed25519(2)}\n"

    hk = learner(tmp_path, Liar({}), clock)
    hk.update(state(target("aaaaaaaaaaaa", "evil", "172.18.0.5", "victim-alias"),
                    target("bbbbbbbbbbbb", "victim", "172.18.0.6")))
    hk.sync(inline)
    assert ed25519(9) not in hk.path.read_text()
    assert lines_for(hk.path, "evil") == [ed25519(1)]
    assert lines_for(hk.path, "victim") == [ed25519(2)]


def test_retries_while_sshd_boots_then_gives_up_until_later(tmp_path, clock) -> None:
    scanner = FakeScanner({})
    hk = learner(tmp_path, scanner, clock)
    hk.update(state(target("aaaaaaaaaaaa", "ws-a", "172.18.0.5")))
    hk.sync(inline)
    assert len(scanner.calls) == FAST.attempts  # tenacity: capped attempts
    assert lines_for(hk.path, "ws-a") == []
    hk.sync(inline)
    assert len(scanner.calls) == FAST.attempts  # gave up: not again at once
    clock[0] += FAST.again_after
    scanner.answers["172.18.0.5"] = [ed25519(1)]
    hk.sync(inline)
    assert lines_for(hk.path, "ws-a") == [ed25519(1)]


def test_booting_sshd_answers_on_a_later_attempt(tmp_path, clock) -> None:
    scanner = FakeScanner({})

    def boots() -> None:
        if len(scanner.calls) == 2:
            scanner.answers["172.18.0.5"] = [ed25519(1)]

    scanner.during = boots
    hk = learner(tmp_path, scanner, clock)
    hk.update(state(target("aaaaaaaaaaaa", "ws-a", "172.18.0.5")))
    hk.sync(inline)
    assert lines_for(hk.path, "ws-a") == [ed25519(1)] and len(scanner.calls) == 2


def test_write_error_is_kept_and_cleared(tmp_path, clock) -> None:
    scanner = FakeScanner({"172.18.0.5": [ed25519(1)]})
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    hk = HostKeyLearner(blocker / "target_known_hosts", 22, scanner, FAST, lambda: clock[0])
    hk.update(state(target("aaaaaaaaaaaa", "ws-a", "172.18.0.5")))
    hk.sync(inline)
    assert hk.error
    blocker.unlink()
    blocker.mkdir()
    hk.sync(inline)
    assert hk.error == "" and lines_for(hk.path, "ws-a") == [ed25519(1)]
