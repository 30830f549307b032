"""watcher.cache: atomic replacement of the key files, in-place edit of the hosts file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from watcher.cache import atomic_write, read_bytes, update_hosts_block, write_if_changed
from watcher.render import HOSTS_BEGIN, HOSTS_END


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


def block(*rows: str) -> str:
    return "\n".join([HOSTS_BEGIN, *rows, HOSTS_END]) + "\n"


BASE_HOSTS = ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
              "172.18.0.2\tproxy\n")


def test_update_hosts_block_appends_in_place(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(BASE_HOSTS)
    os.chmod(hosts, 0o644)
    inode = hosts.stat().st_ino
    assert update_hosts_block(hosts, block("172.18.0.5\tweb")) is True
    assert hosts.read_text() == BASE_HOSTS + block("172.18.0.5\tweb")
    assert hosts.stat().st_ino == inode
    assert mode_of(hosts) == 0o644
    assert os.listdir(tmp_path) == ["hosts"]


def test_update_hosts_block_longer_then_shorter(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(BASE_HOSTS)
    inode = hosts.stat().st_ino
    small = block("172.18.0.5\tweb")
    large = block(*(f"172.18.{i}.5\tname-{i} alias-{i}" for i in range(200)))
    assert update_hosts_block(hosts, small) is True
    assert update_hosts_block(hosts, large) is True
    assert hosts.read_text() == BASE_HOSTS + large
    assert update_hosts_block(hosts, small) is True
    assert hosts.read_bytes() == (BASE_HOSTS + small).encode()  # truncated: no padding left
    assert update_hosts_block(hosts, block()) is True
    assert hosts.read_text() == BASE_HOSTS + block()
    assert hosts.stat().st_ino == inode


def test_update_hosts_block_idempotent(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(BASE_HOSTS)
    wanted = block("172.18.0.5\tweb", "172.18.0.6\tdb")
    assert update_hosts_block(hosts, wanted) is True
    mtime = hosts.stat().st_mtime_ns
    content = hosts.read_bytes()
    assert update_hosts_block(hosts, wanted) is False
    assert update_hosts_block(hosts, wanted) is False
    assert hosts.read_bytes() == content
    assert hosts.stat().st_mtime_ns == mtime


def test_update_hosts_block_replaces_block_in_the_middle(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + block("172.18.0.9\told") + "10.0.0.1 admin\n")
    assert update_hosts_block(hosts, block("172.18.0.5\tweb")) is True
    assert hosts.read_text() == ("127.0.0.1 localhost\n10.0.0.1 admin\n"
                                 + block("172.18.0.5\tweb"))


def test_update_hosts_block_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        update_hosts_block(tmp_path / "nope", block())


def test_update_hosts_block_keeps_non_utf8_lines_byte_for_byte(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    original = b"127.0.0.1 localhost\n10.0.0.1 caf\xe9 # latin-1 comment\n"
    hosts.write_bytes(original)
    assert update_hosts_block(hosts, block("172.18.0.5\tweb")) is True
    assert hosts.read_bytes() == original + block("172.18.0.5\tweb").encode()
    assert update_hosts_block(hosts, block("172.18.0.5\tweb")) is False
    assert update_hosts_block(hosts, block()) is True
    assert hosts.read_bytes() == original + block().encode()


def test_unmanaged_entries_after_a_block_update_equal_a_fresh_parse(tmp_path: Path) -> None:
    """update_hosts_block notes what lies outside the block it wrote; what read_unmanaged_hosts
    then answers is what parsing the file from scratch gives."""
    from watcher.cache import _unmanaged_memo, read_unmanaged_hosts
    from watcher.render import unmanaged_hosts_entries
    hosts = tmp_path / "hosts"
    hosts.write_text(BASE_HOSTS + block("10.0.0.9\told") + "10.0.0.1\tadmin\n")
    first = block(*(f"172.18.{i // 256}.{i % 256}\tt{i}" for i in range(300)))
    assert update_hosts_block(hosts, first)
    assert update_hosts_block(hosts, block("172.18.0.5\tweb"), first)  # the tail fast path
    for _ in range(2):
        fresh = unmanaged_hosts_entries(hosts.read_text())
        assert read_unmanaged_hosts(hosts) == fresh
        assert ("10.0.0.1", ("admin",)) in fresh and all(a != "172.18.0.5" for a, _ in fresh)
        _unmanaged_memo.clear()  # and parsed again from the file
