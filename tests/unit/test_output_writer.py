"""The writer's cache file: streamed a block of a shard at a time once it knows the file, compared
first when it does not; either way the file is the render's cache, byte for byte."""

from __future__ import annotations

from pathlib import Path

from watcher.app import OutputWriter, Paths
from watcher.cache import read_index
from watcher.config import RunMode
from watcher.render import render
from watcher.sshd import SshdPaths

from test_revocation import make_key, served


def _writer(tmp_path: Path) -> OutputWriter:
    paths = Paths(cache=tmp_path / "authorized_keys_cache", hosts=tmp_path / "hosts",
                  access_log=tmp_path / "access.log", status=tmp_path / "status.json",
                  keys_dir=tmp_path / "keys.d", sshd=SshdPaths(index_dir=tmp_path / "index.d"))
    return OutputWriter(paths, RunMode.DOCKER, pin_names=False)


def test_the_cache_file_is_the_render_s_cache_in_every_write(tmp_path: Path) -> None:
    writer = _writer(tmp_path)
    keys = [make_key(("writer", n)) for n in range(40)]  # keys in many shards
    first = render([served(f"t{n}", str(n % 10), f"172.18.0.{n + 2}", key) for n, key in enumerate(keys)], ("22",))
    assert _cheap(writer)(first)
    assert writer.paths.cache.read_text() == first.cache
    second = render([served(f"t{n}", str(n % 10), f"172.18.0.{n + 2}", key)
                     for n, key in enumerate(keys[:25])], ("22",))
    assert _cheap(writer)(second)  # streamed: the writer knows the file holds `first`
    assert writer.paths.cache.read_text() == second.cache
    writer.paths.cache.write_text("someone else's edit\n")
    third = render([served("t0", "0", "172.18.0.2", keys[0])], ("22",))
    assert _cheap(writer)(third)  # not known: compared, then replaced
    assert writer.paths.cache.read_text() == third.cache


def test_a_render_of_the_same_sizes_but_other_lines_is_written_and_an_equal_one_is_not(tmp_path: Path) -> None:
    # The writer remembers what it wrote by each shard's length and hash, not its text.
    writer = _writer(tmp_path)
    key = make_key(("writer", "same"))
    first = render([served("web", "1", "172.18.0.2", key)], ("22",))
    other = render([served("wex", "1", "172.18.0.2", key)], ("22",))  # the same lengths
    assert [len(s.index) for s in first.shards.values()] == [len(s.index) for s in other.shards.values()]
    assert _cheap(writer)(first)
    assert _cheap(writer)(other)
    assert writer.paths.cache.read_text() == other.cache
    assert not _cheap(writer)(render([served("wex", "1", "172.18.0.2", key)], ("22",)))  # equal, new objects
    assert writer.paths.cache.read_text() == other.cache


def _renders(count: int) -> list:
    keys = [make_key(("writer", n)) for n in range(20)]
    return [render([served(f"t{n}", str(n % 10), f"172.18.0.{n + 2}", key)
                    for n, key in enumerate(keys[:20 - r])], ("22",)) for r in range(count)]


def _cheap(writer: OutputWriter) -> OutputWriter:
    """The cache is written by the caller, at once, whatever the last write cost on a busy
    machine (over pacing.CHEAP it would go to the cache thread and land a moment later) and
    however recent it was (CACHE_EVERY)."""
    writer._cache_pacer.cost = 0.0
    writer._cache_pacer.done_at = -1e9
    return writer


def _costly(writer: OutputWriter, wait: float) -> None:
    """As at 100k keys: the last cache write took long, so it is paced and written aside."""
    writer._cache_pacer.cost = 1.0
    writer._cache_pacer.done_at = writer._cache_pacer.clock() - 10.0 + wait  # due in `wait` s


def _eventually(check, timeout: float = 5.0) -> bool:
    import time
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_costly_cache_is_written_by_its_own_thread_after_the_index(tmp_path: Path, monkeypatch) -> None:
    """The index write returns without waiting for the cache (for people); the cache
    follows, never ahead of the index, and ends as the newest render's."""
    import threading
    from watcher import app
    writers: list[str] = []
    real = app._write_cache_file
    writer = _writer(tmp_path)

    def write_cache_file(path: Path, *rest: object) -> bool:
        if path == writer.paths.cache:  # not a cache-writer thread another test left behind
            writers.append(threading.current_thread().name)
        return real(path, *rest)
    monkeypatch.setattr(app, "_write_cache_file", write_cache_file)
    first, second = _renders(2)
    _cheap(writer)(first)  # cheap so far: written at once, by the caller
    assert writers == [threading.current_thread().name]
    _costly(writer, wait=0.0)
    assert writer(second)
    assert _eventually(lambda: writer.paths.cache.read_text() == second.cache)
    assert writers[1:] == ["cache-writer"]
    writer.close()


def test_close_writes_the_cache_that_is_still_due(tmp_path: Path) -> None:
    writer = _writer(tmp_path)
    first, second, third = _renders(3)
    _cheap(writer)(first)
    _costly(writer, wait=60.0)  # not due for a minute
    writer(second)
    writer(third)
    assert writer.paths.cache.read_text() == first.cache
    index = read_index(writer.paths.sshd.index_dir).decode()
    assert index == third.index  # the index is written at once; the cache waits its turn
    writer.close()
    assert writer.paths.cache.read_text() == third.cache
    assert writer._cache_thread is not None and not writer._cache_thread.is_alive()


def test_a_failed_cache_write_aside_is_logged_and_retried(tmp_path: Path, monkeypatch, caplog) -> None:
    import errno
    from watcher import app
    real = app._write_cache_file
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def flaky(*args):
        if failures:
            raise failures.pop()
        return real(*args)

    writer = _writer(tmp_path)
    first, second = _renders(2)
    _cheap(writer)(first)
    assert writer.paths.cache.read_text() == first.cache
    monkeypatch.setattr(app, "_write_cache_file", flaky)
    _costly(writer, wait=0.0)
    writer(second)
    assert _eventually(lambda: "No space left on device" in caplog.text)
    assert writer.paths.cache.read_text() == first.cache
    writer.retry()  # the supervisor's heartbeat
    assert writer.paths.cache.read_text() == second.cache
    writer.close()


def test_the_hosts_file_is_read_only_when_someone_else_wrote_it(tmp_path: Path, monkeypatch) -> None:
    """The writer keeps what precedes its block: while the file is as it left it, a new block
    is written without reading the file; a line someone added meanwhile is read and kept."""
    writer = _writer(tmp_path)
    writer.pin_names = True
    hosts = writer.paths.hosts
    hosts.write_text("127.0.0.1\tlocalhost\n")
    keys = [make_key(("hosts", n)) for n in range(3)]
    renders = [render([served(f"t{n}", str(n), f"172.18.0.{n + 2}", key) for n, key in enumerate(keys[:count])],
                      ("22",)) for count in (1, 3, 2)]
    reads: list[Path] = []
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or read_bytes(self))
    assert _cheap(writer)(renders[0])
    assert reads.count(hosts) == 1  # the first time: what else is in it
    assert _cheap(writer)(renders[1])
    assert hosts.read_text() == "127.0.0.1\tlocalhost\n" + renders[1].hosts_block
    assert reads.count(hosts) == 1
    with open(hosts, "a") as file:
        file.write("10.0.0.1\tadded-later\n")
    assert _cheap(writer)(renders[2])
    assert reads.count(hosts) == 2
    assert hosts.read_text() == "127.0.0.1\tlocalhost\n10.0.0.1\tadded-later\n" + renders[2].hosts_block


def test_a_cheap_cache_is_written_at_most_once_a_second_and_the_last_render_s_follows(tmp_path: Path) -> None:
    """Under a stream of flushes the cache (for people) is not written at each: the first at
    once, then what is due a second after it, by the cache thread; the index at every flush."""
    import time
    writer = _writer(tmp_path)
    first, second, third = _renders(3)
    assert writer(first)  # nothing written before: due at once
    started = time.monotonic()
    writer(second)
    writer(third)
    assert read_index(writer.paths.sshd.index_dir).decode() == third.index
    assert writer.paths.cache.read_text() == first.cache
    assert _eventually(lambda: writer.paths.cache.read_text() == third.cache)
    assert time.monotonic() - started >= 0.9  # CACHE_EVERY, less the time between the writes
    writer.close()
