"""watcher.render: authorized keys cache, the fingerprint index, the hosts block."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from watcher.model import ManualLine, PublicKey, Target, owner_names
from watcher.render import (
    _ipv4,
    BASE_OPTIONS,
    EMPTY_SHARD,
    SHARD_NAMES,
    HOSTS_BEGIN,
    HOSTS_END,
    HostsBlock,
    Rendered,
    ServedTarget,
    permitopen_options,
    render,
    render_discovered,
    render_hosts_block,
    render_manual,
    splice_hosts_block,
    unmanaged_hosts_entries,
)

REPO = Path(__file__).resolve().parents[2]
KEYS_COMMAND = REPO / "sshd" / "authorized-keys-command"
LOOK = "/usr/bin/look"


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def make_key(seed: int | bytes, comment: str = "") -> PublicKey:
    raw = seed if isinstance(seed, bytes) else hashlib.sha256(str(seed).encode()).digest()
    blob = _string(b"ssh-ed25519") + _string(raw[:32])
    fp = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return PublicKey("ssh-ed25519", base64.b64encode(blob).decode(), comment, fp, 256)


def target(name: str, idc: str, address: str = "") -> Target:
    return Target(id=idc * 64, name=name, address=address)


def served(name: str, idc: str, address: str, aliases: tuple[str, ...],
           keys: tuple[PublicKey, ...]) -> ServedTarget:
    return ServedTarget(target(name, idc, address), aliases, keys)


K1, K2, K3 = make_key(1), make_key(2), make_key(3)


# --- authorized keys lines ------------------------------------------------------------

def test_permitopen_options_cross_product() -> None:
    assert permitopen_options(["a", "1.2.3.4"], ["22", "80"]) == [
        'permitopen="a:22"', 'permitopen="a:80"',
        'permitopen="1.2.3.4:22"', 'permitopen="1.2.3.4:80"']
    assert permitopen_options(["a"], ["*"]) == ['permitopen="a:*"']
    assert permitopen_options([], ["22"]) == []


def test_one_line_per_key_with_every_alias_and_port() -> None:
    s = served("web", "a", "172.18.0.5", ("web", "aaaaaaaaaaaa", "172.18.0.5"), (K1,))
    assert render_discovered([s], ("22", "2222")) == [(K1.fingerprint, (
        'restrict,port-forwarding,'
        'permitopen="web:22",permitopen="web:2222",'
        'permitopen="aaaaaaaaaaaa:22",permitopen="aaaaaaaaaaaa:2222",'
        'permitopen="172.18.0.5:22",permitopen="172.18.0.5:2222" '
        f'ssh-ed25519 {K1.blob_b64} web'))]


def test_port_star_kept_as_star() -> None:
    s = served("web", "a", "172.18.0.5", ("web", "172.18.0.5"), (K1,))
    [(fp, line)] = render_discovered([s], ("*",))
    assert fp == K1.fingerprint
    assert line == (f'restrict,port-forwarding,permitopen="web:*",permitopen="172.18.0.5:*" '
                    f'ssh-ed25519 {K1.blob_b64} web')


def test_two_keys_of_one_target_give_two_lines() -> None:
    s = served("web", "a", "172.18.0.5", ("web",), (K1, K2))
    lines = render_discovered([s], ("22",))
    assert [fp for fp, _ in lines] == [K1.fingerprint, K2.fingerprint]
    assert lines[1][1] == f'restrict,port-forwarding,permitopen="web:22" {K2.line()} web'


def test_shared_key_opens_both_targets() -> None:
    a = served("web", "a", "172.18.0.5", ("web", "172.18.0.5"), (K1,))
    b = served("db", "b", "172.18.0.6", ("db", "172.18.0.6"), (K1, K2))
    lines = dict(render_discovered([a, b], ("22",)))
    assert len(lines) == 2
    # Targets are taken in name order: db before web.
    assert lines[K1.fingerprint] == (
        'restrict,port-forwarding,permitopen="db:22",permitopen="172.18.0.6:22",'
        'permitopen="web:22",permitopen="172.18.0.5:22" '
        f'{K1.line()} db,web')
    assert lines[K2.fingerprint] == (
        f'restrict,port-forwarding,permitopen="db:22",permitopen="172.18.0.6:22" {K2.line()} db')


def test_target_without_aliases_or_keys_gives_no_line() -> None:
    no_alias = served("web", "a", "172.18.0.5", (), (K1,))
    no_keys = served("db", "b", "172.18.0.6", ("db",), ())
    assert render_discovered([no_alias, no_keys], ("22",)) == []
    # A key shared with an alias-less target only opens the target that has aliases.
    other = served("zz", "c", "172.18.0.7", ("zz",), (K1,))
    [(fp, line)] = render_discovered([no_alias, no_keys, other], ("22",))
    assert line == f'restrict,port-forwarding,permitopen="zz:22" {K1.line()} zz'
    rendered = render([no_alias, no_keys, other], ("22",))
    assert rendered.owners == {K1.fingerprint: ("zz",)}


def test_render_empty() -> None:
    rendered = render([], ("*",))
    assert rendered == Rendered(shards=dict.fromkeys(SHARD_NAMES, EMPTY_SHARD),
                                hosts=HostsBlock(), owners={})
    assert rendered.hosts_block == f"{HOSTS_BEGIN}\n{HOSTS_END}\n"
    assert rendered.cache == "# ssh-proxy authorized keys: rendered by the watcher, do not edit\n"
    assert rendered.index == "" and rendered.keys_served == 0


def test_cache_index_and_owners() -> None:
    a = served("web", "a", "172.18.0.5", ("web",), (K1,))
    b = served("db", "b", "172.18.0.6", ("db",), (K1, K2))
    rendered = render([a, b], ("22",))
    cache_lines = rendered.cache.splitlines()
    assert cache_lines[0] == "# ssh-proxy authorized keys: rendered by the watcher, do not edit"
    assert len(cache_lines) == 3
    index_lines = rendered.index.splitlines()
    # The cache lists the lines in the index's order (by fingerprint, the order sshd tries).
    assert cache_lines[1:] == [line.split(" ", 1)[1] for line in index_lines]
    assert len(index_lines) == 2
    for line in index_lines:
        fp, rest = line.split(" ", 1)
        assert rest in cache_lines
        assert fp in (K1.fingerprint, K2.fingerprint)
        assert rest.split(" ")[2] == (K1 if fp == K1.fingerprint else K2).blob_b64
    assert rendered.owners == {K1.fingerprint: ("db", "web"), K2.fingerprint: ("db",)}


# --- index ordering and lookup --------------------------------------------------------

def _many_served(count: int) -> list[ServedTarget]:
    rng = random.Random(1234)
    out = []
    for i in range(count):
        key = make_key(rng.randbytes(32))
        name = f"t{i:05d}"
        out.append(ServedTarget(Target(id=f"{i:064x}", name=name, address=f"10.{i // 250}.{i % 250}.9"),
                                (name, f"10.{i // 250}.{i % 250}.9"), (key,)))
    return out


@pytest.fixture(scope="module")
def big_render() -> tuple[list[ServedTarget], Rendered]:
    items = _many_served(2000)
    return items, render(items, ("22",))


def test_index_sorted_bytewise(big_render, tmp_path: Path) -> None:
    _, rendered = big_render
    lines = rendered.index.splitlines()
    assert len(lines) == 2000
    assert lines == sorted(lines)
    encoded = [line.encode() for line in lines]
    assert encoded == sorted(encoded)
    path = tmp_path / "index"
    path.write_text(rendered.index)
    check = subprocess.run(["sort", "-c", str(path)], env={**os.environ, "LC_ALL": "C"},
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # The check itself can fail: a swapped pair is reported.
    swapped = lines[:]
    swapped[0], swapped[1] = swapped[1], swapped[0]
    path.write_text("\n".join(swapped) + "\n")
    assert subprocess.run(["sort", "-c", str(path)], env={**os.environ, "LC_ALL": "C"},
                          capture_output=True).returncode != 0


def test_index_lines_are_fingerprint_then_cache_line(big_render) -> None:
    items, rendered = big_render
    cache = set(rendered.cache.splitlines()[1:])
    for line in rendered.index.splitlines():
        fp, rest = line.split(" ", 1)
        assert fp.startswith("SHA256:") and len(fp) == 50
        assert rest in cache


@pytest.mark.skipif(not os.access(LOOK, os.X_OK), reason=f"{LOOK} (bsdextrautils) not installed")
def test_look_finds_exactly_one_fingerprint(big_render, tmp_path: Path) -> None:
    items, _ = big_render
    # One key also appears as a manual line: merged, one line carrying both grants.
    doubled = items[1234].keys[0]
    rendered = render(items, ("22",), [ManualLine.at("/keys/admin:1", ('permitopen="x:22"',), doubled)])
    path = tmp_path / "index"
    path.write_text(rendered.index)
    lines = rendered.index.splitlines()
    assert len(lines) == 2000
    for pick in (0, 1, 999, 1998, 1999, 1234):
        wanted = items[pick].keys[0]
        expect = [line for line in lines if line.startswith(wanted.fingerprint + " ")]
        assert len(expect) == 1
        result = subprocess.run([LOOK, "--", wanted.fingerprint + " ", str(path)],
                                env={**os.environ, "LC_ALL": "C"}, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == expect
        assert f'permitopen="{items[pick].target.name}:22"' in result.stdout
        assert ('permitopen="x:22"' in result.stdout) == (pick == 1234)
    unknown = make_key(b"\xff" * 32).fingerprint
    miss = subprocess.run([LOOK, "--", unknown + " ", str(path)],
                          env={**os.environ, "LC_ALL": "C"}, capture_output=True, text=True)
    assert miss.returncode == 1
    assert miss.stdout == ""


@pytest.mark.skipif(not os.access(LOOK, os.X_OK), reason=f"{LOOK} (bsdextrautils) not installed")
def test_authorized_keys_command_prints_lines_without_fingerprint(big_render,
                                                                  tmp_path: Path) -> None:
    items, rendered = big_render
    path = tmp_path / "index.d"
    path.mkdir()
    for name, shard in rendered.shards.items():
        (path / name).write_text(shard.index)
    # 2000 keys spread over the shards, each shard sorted, together the whole index.
    assert sum(1 for s in rendered.shards.values() if s.lines) > 32
    assert "".join((path / name).read_text() for name in SHARD_NAMES) == rendered.index
    for pick in (0, 777, 1999):
        key = items[pick].keys[0]
        out = subprocess.run(["sh", str(KEYS_COMMAND), str(path), key.fingerprint],
                             capture_output=True, text=True, check=True).stdout
        [line] = out.splitlines()
        name = items[pick].target.name
        assert line == (f'restrict,port-forwarding,permitopen="{name}:22",'
                        f'permitopen="{items[pick].target.address}:22" {key.line()} {name}')
    missing = subprocess.run(["sh", str(KEYS_COMMAND), str(tmp_path / "nope"), key.fingerprint],
                             capture_output=True, text=True)
    assert (missing.returncode, missing.stdout) == (0, "")


# --- hosts block ------------------------------------------------------------------------

def test_hosts_block_contents() -> None:
    web = served("web", "a", "172.18.0.5", ("web", "aaaaaaaaaaaa", "172.18.0.5", "10.1.0.5",
                                            "web-alias"), (K1,))
    db = served("db", "b", "172.18.0.6", ("db",), (K2,))
    no_keys = served("cache", "c", "172.18.0.7", ("cache",), ())
    no_addr = served("ext", "d", "", ("ext",), (K3,))
    only_ips = served("ips", "e", "172.18.0.9", ("172.18.0.9",), (K3,))
    block = render_hosts_block([web, db, no_keys, no_addr, only_ips])
    assert block == (f"{HOSTS_BEGIN}\n"
                     "172.18.0.6\tdb\n"
                     "172.18.0.5\tweb aaaaaaaaaaaa web-alias\n"
                     f"{HOSTS_END}\n")
    assert render([web, db, no_keys, no_addr, only_ips], ("22",)).hosts_block == block


def test_hosts_block_leaves_out_only_names_spelled_as_four_numbers() -> None:
    # A name of four dotted numbers would read as an address in /etc/hosts; any other
    # dotted name is a name.
    names = ("web", "10.1.0.5", "1.2.3", "1.2.3.4.5", "a.b.c.d", "1.2.3.x", "1..2.3", "db.internal")
    web = served("web", "a", "172.18.0.5", names, (K1,))
    assert render_hosts_block([web]) == (
        f"{HOSTS_BEGIN}\n172.18.0.5\tweb 1.2.3 1.2.3.4.5 a.b.c.d 1.2.3.x 1..2.3 db.internal\n{HOSTS_END}\n")


def test_splice_appends_when_absent_and_keeps_other_lines() -> None:
    hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n172.18.0.2\tproxy\n"
    block = f"{HOSTS_BEGIN}\n172.18.0.5\tweb\n{HOSTS_END}\n"
    assert splice_hosts_block(hosts, block) == hosts + block


def test_splice_adds_missing_final_newline() -> None:
    block = f"{HOSTS_BEGIN}\n{HOSTS_END}\n"
    assert splice_hosts_block("127.0.0.1 localhost", block) == "127.0.0.1 localhost\n" + block
    assert splice_hosts_block("", block) == block


def test_splice_replaces_existing_block() -> None:
    old = f"{HOSTS_BEGIN}\n172.18.0.5\told-name\n172.18.0.6\tgone\n{HOSTS_END}\n"
    hosts = "127.0.0.1\tlocalhost\n" + old + "10.0.0.1\tadmin-added\n"
    new = f"{HOSTS_BEGIN}\n172.18.0.5\tweb\n{HOSTS_END}\n"
    result = splice_hosts_block(hosts, new)
    assert result == "127.0.0.1\tlocalhost\n10.0.0.1\tadmin-added\n" + new
    assert "old-name" not in result and "gone" not in result
    assert result.count(HOSTS_BEGIN) == 1 and result.count(HOSTS_END) == 1


def test_splice_is_idempotent() -> None:
    hosts = "127.0.0.1\tlocalhost\n# comment\n\n10.0.0.1 x\n"
    block = f"{HOSTS_BEGIN}\n172.18.0.5\tweb\n172.18.0.6\tdb\n{HOSTS_END}\n"
    once = splice_hosts_block(hosts, block)
    assert splice_hosts_block(once, block) == once
    assert splice_hosts_block(splice_hosts_block(once, block), block) == once
    empty = f"{HOSTS_BEGIN}\n{HOSTS_END}\n"
    shrunk = splice_hosts_block(once, empty)
    assert shrunk == hosts + empty
    assert splice_hosts_block(shrunk, empty) == shrunk


def test_stray_end_marker_kept() -> None:
    hosts = f"127.0.0.1 localhost\n{HOSTS_END}\n"
    block = f"{HOSTS_BEGIN}\n{HOSTS_END}\n"
    assert splice_hosts_block(hosts, block) == hosts + block


# --- manual lines -------------------------------------------------------------------------

def test_manual_lines_keep_admin_options_after_base() -> None:
    key = make_key(10, comment="alice@laptop")
    line = ManualLine.at(origin="/keys/admin:3",
                      options=("restrict", 'permitopen="db:5432"', "no-pty", "port-forwarding",
                               'from="10.0.0.0/8"'),
                      key=key)
    [(fp, text)] = render_manual([line])
    assert fp == key.fingerprint
    assert text == (f'restrict,port-forwarding,permitopen="db:5432",no-pty,from="10.0.0.0/8" '
                    f"{key.line()} alice@laptop")
    assert text.count("restrict") == 1
    assert text.count("port-forwarding") == 1


def test_manual_line_without_options_or_comment() -> None:
    key = make_key(11)
    [(_, text)] = render_manual([ManualLine.at("f:1", (), key)])
    assert text == f"{BASE_OPTIONS} {key.line()}"


def test_manual_lines_in_render() -> None:
    shared = K1
    manual = ManualLine.at("/keys/a:1", ('permitopen="x:22"',), make_key(20, "bob"))
    dup = ManualLine.at("/keys/a:2", ('permitopen="y:22"',), shared)
    web = served("web", "a", "172.18.0.5", ("web",), (shared,))
    rendered = render([web], ("22",), [manual, dup])
    lines = rendered.cache.splitlines()[1:]
    # sshd applies only the first line matching a key: a key both discovered and in an
    # admin file is one line with the union of both grants.
    assert lines == sorted([
        f'restrict,port-forwarding,permitopen="web:22",permitopen="y:22" {shared.line()} web',
        f'restrict,port-forwarding,permitopen="x:22" {manual.key.line()} bob',
    ])
    index = rendered.index.splitlines()
    assert index == sorted(index)
    assert len(index) == 2
    assert sum(1 for i in index if i.startswith(shared.fingerprint + " ")) == 1
    assert {fp: owner_names(o) for fp, o in rendered.owners.items()} == {
        shared.fingerprint: ("/keys/a:2", "web"), manual.key.fingerprint: ("/keys/a:1",)}


def test_real_ssh_keygen_key(tmp_path: Path) -> None:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        pytest.skip("ssh-keygen not installed")
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "me@host", "-f",
                    str(tmp_path / "k")], check=True)
    key_type, blob_b64, comment = (tmp_path / "k.pub").read_text().split()
    fp = subprocess.run([keygen, "-lf", str(tmp_path / "k.pub")], check=True,
                        capture_output=True, text=True).stdout.split()[1]
    key = make_key(base64.b64decode(blob_b64)[-32:])
    assert key.blob_b64 == blob_b64 and key.fingerprint == fp
    rendered = render([served("web", "a", "172.18.0.5", ("web",), (key,))], ("22",))
    assert rendered.index == (f'{fp} restrict,port-forwarding,permitopen="web:22" '
                              f"ssh-ed25519 {blob_b64} web\n")


# --- hosts block: each name once in the whole file (issue 15) ---------------------------

def test_hosts_block_writes_each_folded_name_once() -> None:
    # resolve_aliases never grants one folded name twice; the block holds anyway.
    web = served("web", "a", "172.18.0.5", ("web", "WEB", "Box"), (K1,))
    imp = served("imp", "b", "172.18.0.6", ("imp", "box", "Web"), (K2,))
    block = render_hosts_block([web, imp])
    assert block == f"{HOSTS_BEGIN}\n172.18.0.6\timp box Web\n{HOSTS_END}\n"
    web_only = served("web", "a", "172.18.0.5", ("web", "WEB", "Web", "aaaaaaaaaaaa"), (K1,))
    assert render_hosts_block([web_only]) == \
        f"{HOSTS_BEGIN}\n172.18.0.5\tweb aaaaaaaaaaaa\n{HOSTS_END}\n"


def test_hosts_block_leaves_out_names_pinned_outside_it() -> None:
    linked = served("linked", "a", "172.18.0.5", ("linked", "aaaaaaaaaaaa"), (K1,))
    only = served("only", "b", "172.18.0.6", ("ONLY",), (K2,))
    block = render_hosts_block([linked, only], frozenset({"linked", "only"}))
    assert block == f"{HOSTS_BEGIN}\n172.18.0.5\taaaaaaaaaaaa\n{HOSTS_END}\n"
    assert render([linked, only], ("22",), pinned_elsewhere=frozenset({"linked", "only"})
                  ).hosts_block == block


def test_unmanaged_hosts_entries() -> None:
    hosts = ("127.0.0.1\tlocalhost\n"
             "# 10.0.0.1 commented\n"
             "\n"
             "::1 localhost ip6-localhost  # trailing comment\n"
             "10.0.0.5\n"
             f"{HOSTS_BEGIN}\n172.18.0.5\tweb\n{HOSTS_END}\n"
             "10.0.0.9   db-1 DB-1.corp\n")
    assert unmanaged_hosts_entries(hosts) == (
        ("127.0.0.1", ("localhost",)),
        ("::1", ("localhost", "ip6-localhost")),
        ("10.0.0.9", ("db-1", "DB-1.corp")),
    )


def test_unmanaged_hosts_entries_round_trip_with_splice() -> None:
    hosts = "127.0.0.1 localhost\n10.0.0.9 db-1\n"
    block = render_hosts_block([served("web", "a", "172.18.0.5", ("web",), (K1,))])
    assert unmanaged_hosts_entries(splice_hosts_block(hosts, block)) == \
        unmanaged_hosts_entries(hosts)


def test_read_unmanaged_hosts(tmp_path: Path) -> None:
    from watcher.cache import read_unmanaged_hosts
    path = tmp_path / "hosts"
    assert read_unmanaged_hosts(path) == ()
    block = render_hosts_block([served("web", "a", "172.18.0.5", ("web",), (K1,))])
    path.write_bytes(b"10.0.0.9 db-1 caf\xe9\n" + block.encode())
    assert read_unmanaged_hosts(path) == (("10.0.0.9", ("db-1", "caf\udce9")),)


@pytest.mark.parametrize("address", ["172.18.0.5\n10.0.0.1", "172.18.0.5 ", "172.18.0.5\tevil",
                                     "fd00::5", "172.018.0.5", "web"])
def test_hosts_block_row_only_for_a_plain_ipv4_address(address: str) -> None:
    t = served("web", "a", address, ("web",), (K1,))
    assert render_hosts_block([t]) == f"{HOSTS_BEGIN}\n{HOSTS_END}\n"


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.ip_addresses(v=4).map(str), st.text(alphabet="0123456789.:abf \n", max_size=20),
                 st.lists(st.integers(0, 999), min_size=3, max_size=5).map(lambda p: ".".join(map(str, p))),
                 st.lists(st.integers(0, 255), min_size=4, max_size=4).map(lambda p: ".".join(f"{o:03d}" for o in p))))
def test_plain_ipv4_is_what_ipaddress_writes(text: str) -> None:
    try:
        wanted = str(ipaddress.IPv4Address(text)) == text
    except ValueError:
        wanted = False
    assert _ipv4(text) == wanted
