"""The writer's cache file: streamed a shard at a time once it knows the file, compared
first when it does not; either way the file is the render's cache, byte for byte."""

from __future__ import annotations

from pathlib import Path

from watcher.app import OutputWriter, Paths
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
    assert writer(first)
    assert writer.paths.cache.read_text() == first.cache
    second = render([served(f"t{n}", str(n % 10), f"172.18.0.{n + 2}", key)
                     for n, key in enumerate(keys[:25])], ("22",))
    assert writer(second)  # streamed: the writer knows the file holds `first`
    assert writer.paths.cache.read_text() == second.cache
    writer.paths.cache.write_text("someone else's edit\n")
    third = render([served("t0", "0", "172.18.0.2", keys[0])], ("22",))
    assert writer(third)  # not known: compared, then replaced
    assert writer.paths.cache.read_text() == third.cache
