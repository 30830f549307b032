"""watcher.cache: atomic replacement of the key files, in-place edit of the hosts file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from watcher import cache
from watcher.cache import (SHARD_DATA, ShardFiles, atomic_write, read_bytes, read_index, update_hosts_block,
                           write_blocks, write_if_changed)
from watcher.index_layout import groups
from watcher.render import HOSTS_BEGIN, HOSTS_END, SHARD_NAMES, HostsBlock


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def strict_umask():
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_read_bytes(tmp_path: Path) -> None:
    assert read_bytes(tmp_path / "missing") is None
    (tmp_path / "f").write_bytes(b"abc")
    assert read_bytes(tmp_path / "f") == b"abc"


def test_atomic_write_creates_with_mode_0644(tmp_path: Path, strict_umask) -> None:
    path = tmp_path / "sub" / "dir" / "authorized_keys.index"
    atomic_write(path, b"line\n")
    assert path.read_bytes() == b"line\n"
    assert mode_of(path) == 0o644
    assert sorted(os.listdir(path.parent)) == ["authorized_keys.index"]


def test_atomic_write_other_mode(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    atomic_write(path, b"x", mode=0o600)
    assert mode_of(path) == 0o600
    atomic_write(path, b"y", mode=0o640)
    assert mode_of(path) == 0o640


def test_atomic_write_replaces_content_with_a_new_inode(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    atomic_write(path, b"old content that is longer\n")
    first = path.stat().st_ino
    atomic_write(path, b"new\n")
    assert path.read_bytes() == b"new\n"
    assert path.stat().st_ino != first  # renamed over, never rewritten in place
    assert mode_of(path) == 0o644
    assert os.listdir(tmp_path) == ["cache"]


def test_atomic_write_reader_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    atomic_write(path, b"old\n")
    with open(path, "rb") as reader:
        atomic_write(path, b"new\n")
        assert reader.read() == b"old\n"
    assert path.read_bytes() == b"new\n"


def test_atomic_write_failure_leaves_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "cache"
    atomic_write(path, b"old\n")

    def boom(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write(path, b"new\n")
    assert os.listdir(tmp_path) == ["cache"]
    assert path.read_bytes() == b"old\n"


def test_write_if_changed(tmp_path: Path) -> None:
    path = tmp_path / "index"
    assert write_if_changed(path, b"a\n") is True
    inode = path.stat().st_ino
    mtime = path.stat().st_mtime_ns
    assert write_if_changed(path, b"a\n") is False
    assert path.stat().st_ino == inode
    assert path.stat().st_mtime_ns == mtime
    assert write_if_changed(path, b"b\n") is True
    assert path.read_bytes() == b"b\n"
    assert path.stat().st_ino != inode
    assert mode_of(path) == 0o644
    assert write_if_changed(path, b"") is True
    assert path.read_bytes() == b""
    assert write_if_changed(path, b"") is False
    assert os.listdir(tmp_path) == ["index"]


def block(*rows: str) -> HostsBlock:
    return HostsBlock.of(rows)


def text(*rows: str) -> str:
    return "\n".join([HOSTS_BEGIN, *rows, HOSTS_END]) + "\n"


def update(hosts: Path, block: HostsBlock, head: bytes | None = None) -> bool:
    changed, written_head = update_hosts_block(hosts, block, head)
    with open(hosts, "rb") as file:  # not Path.read_bytes, which a test forbids the writer
        assert file.read() == written_head + b"".join(block.pieces())
    return changed


BASE_HOSTS = ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
              "172.18.0.2\tproxy\n")


def test_update_hosts_block_appends_in_place(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(BASE_HOSTS)
    os.chmod(hosts, 0o644)
    inode = hosts.stat().st_ino
    assert update(hosts, block("172.18.0.5\tweb")) is True
    assert hosts.read_text() == BASE_HOSTS + text("172.18.0.5\tweb")
    assert hosts.stat().st_ino == inode
    assert mode_of(hosts) == 0o644
    assert os.listdir(tmp_path) == ["hosts"]


def test_update_hosts_block_longer_then_shorter(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(BASE_HOSTS)
    inode = hosts.stat().st_ino
    rows = [f"172.18.{i}.5\tname-{i} alias-{i}" for i in range(200)]
    assert update(hosts, block("172.18.0.5\tweb")) is True
    assert update(hosts, block(*rows)) is True
    assert hosts.read_text() == BASE_HOSTS + text(*rows)
    assert update(hosts, block("172.18.0.5\tweb")) is True
    assert hosts.read_bytes() == (BASE_HOSTS + text("172.18.0.5\tweb")).encode()  # truncated: no padding left
    assert update(hosts, block()) is True
    assert hosts.read_text() == BASE_HOSTS + text()
    assert hosts.stat().st_ino == inode


def test_update_hosts_block_idempotent(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(BASE_HOSTS)
    wanted = block("172.18.0.5\tweb", "172.18.0.6\tdb")
    assert update(hosts, wanted) is True
    mtime = hosts.stat().st_mtime_ns
    content = hosts.read_bytes()
    assert update(hosts, wanted) is False
    assert update(hosts, HostsBlock((b"172.18.0.5\tweb\n", b"172.18.0.6\tdb\n"))) is False  # cut otherwise
    assert hosts.read_bytes() == content
    assert hosts.stat().st_mtime_ns == mtime


def test_update_hosts_block_replaces_block_in_the_middle(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + text("172.18.0.9\told") + "10.0.0.1 admin\n")
    assert update(hosts, block("172.18.0.5\tweb")) is True
    assert hosts.read_text() == ("127.0.0.1 localhost\n10.0.0.1 admin\n"
                                 + text("172.18.0.5\tweb"))


def test_update_hosts_block_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        update_hosts_block(tmp_path / "nope", block())


def test_update_hosts_block_keeps_non_utf8_lines_byte_for_byte(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    original = b"127.0.0.1 localhost\n10.0.0.1 caf\xe9 # latin-1 comment\n"
    hosts.write_bytes(original)
    assert update(hosts, block("172.18.0.5\tweb")) is True
    assert hosts.read_bytes() == original + text("172.18.0.5\tweb").encode()
    assert update(hosts, block("172.18.0.5\tweb")) is False
    assert update(hosts, block()) is True
    assert hosts.read_bytes() == original + text().encode()


def test_update_hosts_block_with_its_head_known_does_not_read_the_file(tmp_path: Path, monkeypatch) -> None:
    """The writer that knows the file holds what it wrote passes the head it got back: the
    file is written as a splice would make it, without reading it; a block of more chunks
    than one writev takes is written whole."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + text("172.18.0.9\told") + "10.0.0.1 admin\n")
    changed, head = update_hosts_block(hosts, block("172.18.0.5\tweb"))
    assert changed and head == b"127.0.0.1 localhost\n10.0.0.1 admin\n"
    rows = [f"172.18.{i // 256}.{i % 256}\tt{i}" for i in range(3000)]
    many = HostsBlock(tuple(f"{row}\n".encode() for row in rows))
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} was read"))
    assert update(hosts, many, head) is True
    assert hosts.read_text() == "127.0.0.1 localhost\n10.0.0.1 admin\n" + text(*rows)
    assert update(hosts, block("172.18.0.5\tweb"), head) is True  # shorter: padded, then cut
    assert hosts.read_text() == "127.0.0.1 localhost\n10.0.0.1 admin\n" + text("172.18.0.5\tweb")


def test_hosts_blocks_are_equal_by_their_rows_however_cut() -> None:
    one = HostsBlock.of(["10.0.0.1\ta", "10.0.0.2\tb"])
    assert one == HostsBlock((b"10.0.0.1\ta\n", b"", b"10.0.0.2\tb\n"))
    assert hash(one) == hash(HostsBlock((b"10.0.0.1\ta\n", b"10.0.0.2\tb\n")))
    assert one != HostsBlock.of(["10.0.0.1\ta"]) and one != HostsBlock.of(["10.0.0.1\ta", "10.0.0.2\tc"])
    assert HostsBlock.of([]) == HostsBlock() and HostsBlock().text == text()
    assert one.text == text("10.0.0.1\ta", "10.0.0.2\tb") and one.size == len("10.0.0.1\ta\n10.0.0.2\tb\n")


def test_unmanaged_entries_after_a_block_update_equal_a_fresh_parse(tmp_path: Path) -> None:
    """update_hosts_block notes what lies outside the block it wrote; what read_unmanaged_hosts
    then answers is what parsing the file from scratch gives."""
    from watcher.cache import _unmanaged_memo, read_unmanaged_hosts
    from watcher.render import unmanaged_hosts_entries
    hosts = tmp_path / "hosts"
    hosts.write_text(BASE_HOSTS + text("10.0.0.9\told") + "10.0.0.1\tadmin\n")
    _, head = update_hosts_block(hosts, block(*(f"172.18.{i // 256}.{i % 256}\tt{i}" for i in range(300))))
    assert update(hosts, block("172.18.0.5\tweb"), head)  # the head known
    for _ in range(2):
        fresh = unmanaged_hosts_entries(hosts.read_text())
        assert read_unmanaged_hosts(hosts) == fresh
        assert ("10.0.0.1", ("admin",)) in fresh and all(a != "172.18.0.5" for a, _ in fresh)
        _unmanaged_memo.clear()  # and parsed again from the file


def _versions(directory: Path) -> list[str]:
    return sorted(os.listdir(directory / SHARD_DATA))


def test_a_shard_is_a_link_to_its_version_and_the_one_before_is_kept(tmp_path: Path, strict_umask) -> None:
    files = ShardFiles(tmp_path / "index.d")
    files.prepare()
    files.write("A", b"SHA256:A1 one\n")
    first = os.readlink(tmp_path / "index.d" / "A")
    files.write("A", b"SHA256:A1 two\n")
    second = os.readlink(tmp_path / "index.d" / "A")
    assert (tmp_path / "index.d" / "A").read_bytes() == b"SHA256:A1 two\n"
    assert first != second and second.startswith(SHARD_DATA + "/")
    # The version before stays for a reader that resolved the link just before the swap.
    assert _versions(tmp_path / "index.d") == sorted(v.rpartition("/")[2] for v in (first, second))
    files.write("A", b"SHA256:A1 three\n")
    assert first.rpartition("/")[2] not in _versions(tmp_path / "index.d")
    assert len(_versions(tmp_path / "index.d")) == 2
    # sshd's AuthorizedKeysCommandUser (nobody) reads them, whatever the umask.
    assert mode_of(tmp_path / "index.d" / "A") == 0o644
    assert mode_of(tmp_path / "index.d") == mode_of(tmp_path / "index.d" / SHARD_DATA) == 0o755
    assert sorted(os.listdir(tmp_path / "index.d")) == [SHARD_DATA, "A"]  # no link left aside


def test_a_shard_written_in_blocks_is_their_bytes_in_order(tmp_path: Path) -> None:
    files = ShardFiles(tmp_path)
    files.prepare()
    files.write("A", (b"SHA256:A1 one\n", b"SHA256:A2 two\n", b"SHA256:A3 three\n"))
    assert (tmp_path / "A").read_bytes() == b"SHA256:A1 one\nSHA256:A2 two\nSHA256:A3 three\n"


@pytest.mark.parametrize("short", [0, 3, 14, 20])
def test_write_blocks_finishes_what_a_short_writev_left(tmp_path: Path, monkeypatch, short: int) -> None:
    """writev may write fewer bytes than asked (a signal, a nearly full disk): the rest follows,
    from the middle of the block where it stopped."""
    real = os.writev

    def writev(fd: int, buffers) -> int:
        return real(fd, [b"".join(buffers)[:short]]) if short else 0
    monkeypatch.setattr(cache.os, "writev", writev)
    blocks = [b"first block\n", b"second\n", b"", b"third one\n"]
    with open(tmp_path / "f", "wb") as handle:
        write_blocks(handle.fileno(), blocks)
    assert (tmp_path / "f").read_bytes() == b"".join(blocks)


def test_write_blocks_writes_more_blocks_than_one_writev_takes(tmp_path: Path) -> None:
    blocks = [f"{n}\n".encode() for n in range(2500)]  # IOV_MAX is 1024
    with open(tmp_path / "f", "wb") as handle:
        write_blocks(handle.fileno(), blocks)
    assert (tmp_path / "f").read_bytes() == b"".join(blocks)


def test_a_removed_shard_takes_its_versions_with_it(tmp_path: Path) -> None:
    files = ShardFiles(tmp_path)
    files.prepare()
    files.write("b", b"SHA256:b1 x\n")
    files.write("b", b"SHA256:b1 y\n")
    assert files.remove("b")
    assert not (tmp_path / "b").exists() and _versions(tmp_path) == []
    assert not files.remove("b")


def test_prepare_removes_what_is_no_shard_and_versions_no_shard_links_to(tmp_path: Path) -> None:
    earlier = ShardFiles(tmp_path)
    earlier.prepare()
    earlier.write("c", b"SHA256:c1 kept\n")
    earlier.write("d", b"SHA256:d1 old\n")
    earlier.write("d", b"SHA256:d1 new\n")  # leaves the old version of d behind
    (tmp_path / "authorized_keys.index").write_text("stale\n")
    (tmp_path / ".e.link").symlink_to("nowhere")
    (tmp_path / "stray-dir").mkdir()
    (tmp_path / "e").write_text("SHA256:e1 a shard file of an older layout\n")
    (tmp_path / SHARD_DATA / "orphan").write_text("x")
    files = ShardFiles(tmp_path)
    files.prepare()
    linked = sorted(os.readlink(tmp_path / n).rpartition("/")[2] for n in ("c", "d"))
    assert sorted(os.listdir(tmp_path)) == [SHARD_DATA, "c", "d", "e"]
    assert _versions(tmp_path) == linked
    assert (tmp_path / "d").read_bytes() == b"SHA256:d1 new\n"
    files.write("e", b"SHA256:e1 now a link\n")  # the older layout's file is replaced
    assert (tmp_path / "e").is_symlink() and (tmp_path / "e").read_bytes() == b"SHA256:e1 now a link\n"


def test_a_failed_shard_write_leaves_the_shard_and_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    import errno
    files = ShardFiles(tmp_path)
    files.prepare()
    files.write("f", b"SHA256:f1 served\n")
    real = os.symlink

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "symlink", full)
    with pytest.raises(OSError):
        files.write("f", b"SHA256:f1 lost\n")
    monkeypatch.setattr(os, "symlink", real)
    assert (tmp_path / "f").read_bytes() == b"SHA256:f1 served\n"
    assert sorted(os.listdir(tmp_path)) == [SHARD_DATA, "f"] and len(_versions(tmp_path)) == 1


def test_a_link_left_aside_and_a_taken_version_name_do_not_stop_a_shard_write(tmp_path: Path) -> None:
    files = ShardFiles(tmp_path)
    files.prepare()
    files.write("g", b"SHA256:g1 one\n")
    (tmp_path / ".g.link").symlink_to("nowhere")  # a write that failed half-way
    taken = f"g.{files._token}.1"  # the next version's name, as if a file held it already
    (tmp_path / SHARD_DATA / taken).write_text("not ours\n")
    files.write("g", b"SHA256:g1 two\n")
    assert (tmp_path / "g").read_bytes() == b"SHA256:g1 two\n"
    assert os.readlink(tmp_path / "g") != f"{SHARD_DATA}/{taken}"
    assert (tmp_path / SHARD_DATA / taken).read_text() == "not ours\n"
    assert sorted(os.listdir(tmp_path)) == [SHARD_DATA, "g"]


def test_two_writers_of_one_directory_never_share_a_version_name(tmp_path: Path) -> None:
    first, second = ShardFiles(tmp_path), ShardFiles(tmp_path)
    first.prepare()
    first.write("h", b"SHA256:h1 first\n")
    second.write("i", b"SHA256:i1 second\n")
    second.write("h", b"SHA256:h1 second\n")
    assert (tmp_path / "i").read_bytes() == b"SHA256:i1 second\n"
    assert (tmp_path / "h").read_bytes() == b"SHA256:h1 second\n"
    assert len(_versions(tmp_path)) == 3


def test_use_links_every_shard_name_to_its_group_and_retires_the_old_groups_a_call_later(tmp_path: Path) -> None:
    files = ShardFiles(tmp_path)
    files.prepare()
    assert files.count is None
    for group, names in groups(4):
        files.write(group, b"".join(f"SHA256:{n}1 in {group}\n".encode() for n in names))
    files.use(4)
    assert files.count == 4
    assert all(os.readlink(tmp_path / name) == group for group, names in groups(4) for name in names)
    assert (tmp_path / "A").read_bytes().count(b"\n") == 16  # the group's file, whole
    files.write(".g1.00", b"SHA256:A1 one file\n")
    files.use(1)
    assert all(os.readlink(tmp_path / name) == ".g1.00" for name in SHARD_NAMES)
    assert (tmp_path / ".g4.00").exists()  # for a reader that resolved "A" just before
    files.use(1)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == [SHARD_DATA, ".g1.00"]
    assert _versions(tmp_path) == [os.readlink(tmp_path / ".g1.00").rpartition("/")[2]]
    assert sorted(os.listdir(tmp_path)) == sorted([SHARD_DATA, ".g1.00", *SHARD_NAMES])  # no link left aside


def test_prepare_finds_the_layout_on_disk_and_keeps_its_groups(tmp_path: Path) -> None:
    earlier = ShardFiles(tmp_path)
    earlier.prepare()
    for group, _ in groups(2):
        earlier.write(group, f"SHA256:x {group}\n".encode())
    earlier.use(2)
    earlier.write(".g1.00", b"SHA256:x written, not linked yet\n")  # stopped before use(1)
    files = ShardFiles(tmp_path)
    files.prepare()
    assert files.count == 2
    assert (tmp_path / "A").read_bytes() == b"SHA256:x .g2.00\n"
    files.use(2)  # the same layout: nothing relinked; the stray group goes
    assert not (tmp_path / ".g1.00").exists()
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == [SHARD_DATA, ".g2.00", ".g2.01"]
    assert len(_versions(tmp_path)) == 2


def test_an_index_of_an_earlier_layout_is_relinked_and_its_versions_dropped(tmp_path: Path) -> None:
    """An earlier watcher linked each shard name to a version of its own, and before that
    wrote plain files: both are replaced by links to the groups."""
    earlier = ShardFiles(tmp_path)
    earlier.prepare()
    earlier.write("A", b"SHA256:A1 old\n")  # a shard name linked to its own version
    (tmp_path / "b").write_text("SHA256:b1 a plain file\n")
    files = ShardFiles(tmp_path)
    files.prepare()
    assert files.count is None
    files.write(".g1.00", b"SHA256:A1 new\nSHA256:b1 new\n")
    files.use(1)
    assert (tmp_path / "A").read_bytes() == (tmp_path / "b").read_bytes() == b"SHA256:A1 new\nSHA256:b1 new\n"
    assert _versions(tmp_path) == [os.readlink(tmp_path / ".g1.00").rpartition("/")[2]]


def test_read_index_reads_each_group_file_once_in_order(tmp_path: Path) -> None:
    files = ShardFiles(tmp_path)
    files.prepare()
    assert read_index(tmp_path) == b""
    for group, names in groups(2):
        files.write(group, f"SHA256:{names[0]}1 {group}\n".encode())
    files.use(2)
    assert read_index(tmp_path) == b"SHA256:+1 .g2.00\nSHA256:U1 .g2.01\n"


def test_holds_compares_a_file_with_blocks_without_joining_them(tmp_path: Path) -> None:
    path = tmp_path / "group"
    assert not cache.holds(path, ())  # no file
    path.write_bytes(b"")
    assert cache.holds(path, ()) and cache.holds(path, (b"",))
    path.write_bytes(b"SHA256:a 1\nSHA256:b 2\n")
    assert cache.holds(path, (b"SHA256:a 1\n", b"SHA256:b 2\n"))
    assert cache.holds(path, (b"SHA256:a 1\nSHA256:b 2\n",))
    assert not cache.holds(path, (b"SHA256:a 1\n", b"SHA256:b 3\n"))  # same size, other bytes
    assert not cache.holds(path, (b"SHA256:a 1\n",))  # shorter
    assert not cache.holds(path, (b"SHA256:a 1\n", b"SHA256:b 2\n", b"x"))  # longer
