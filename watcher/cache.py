"""Writes the rendered files. The only module that writes what sshd reads.

Readers (sshd, `look`) must never see a partial file: write a temp file in the same
directory, set its mode (mkstemp makes 0600, which sshd's StrictModes and the unprivileged
AuthorizedKeysCommandUser could not read), fsync, rename over the old one, fsync the directory
(the derived files, rebuilt at every start, skip the fsyncs).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .index_layout import groups, parse_group_name
from .index_recent import RECENT_NAME, overlay
from .render import SHARD_NAMES, SHARD_SET, HostsBlock, splice_hosts_block, unmanaged_hosts_entries


def read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def atomic_write(path: Path, data: bytes | Iterable[bytes], mode: int = 0o644,
                 durable: bool = True) -> None:
    """durable=False: no fsync (files rebuilt at every start; readers still never see a
    partial file). `data` may come in chunks, so that a big file is never one string."""
    with replacing(path, mode, durable) as fd:
        with os.fdopen(fd, "wb", closefd=False) as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                handle.writelines(data)
    os.close(fd)


@contextlib.contextmanager
def replacing(path: Path, mode: int = 0o644, durable: bool = True) -> Iterator[int]:
    """A new file, written through the fd yielded, that replaces `path` whole when the block
    ends (see atomic_write); if the block raises, it is removed and `path` is left as it
    was. The fd stays open after the rename: the caller closes it (or keeps reading it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        yield fd
        os.fchmod(fd, mode)
        if durable:
            os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written (a write may take fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_blocks(fd: int, blocks: Sequence[bytes]) -> None:
    """Every byte of `blocks`, in order: one writev per IOV_MAX blocks, os.write for what a
    short write left."""
    for at in range(0, len(blocks), _IOV_MAX):
        group = blocks[at:at + _IOV_MAX]
        done = os.writev(fd, group)
        for block in group:
            if done >= len(block):
                done -= len(block)
                continue
            write_all(fd, memoryview(block)[done:])
            done = 0


_IOV_MAX = 1024  # Linux's limit on the buffers of one writev


def holds(path: Path, blocks: Sequence[bytes]) -> bool:
    """Whether the file at `path` holds exactly these bytes, compared a block at a time (an
    index group at 100k keys is ~360 KB; one of a few groups, megabytes: never joined)."""
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size != sum(map(len, blocks)):
                return False
            return all(handle.read(len(block)) == block for block in blocks)
    except FileNotFoundError:
        return False


def write_if_changed(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> bool:
    """Atomically replace `path` unless it already holds exactly `data`. True if written."""
    if read_bytes(path) == data:
        return False
    atomic_write(path, data, mode, durable)
    return True


def update_hosts_block(path: Path, block: HostsBlock, head: bytes | None = None) -> tuple[bool, bytes]:
    """Rewrite the managed block of a hosts file in place; returns whether the file changed,
    and what precedes the block in it now (the file's own lines, the block always last).

    `head`: that part as this writer last wrote it, when the caller knows the file still
    holds exactly what it wrote (its stamp unchanged): the file is then not read (at 100k
    targets it is ~4 MB, on every change). Otherwise it is read, and the managed lines are
    dropped wherever they are.

    In place, not by rename: Docker bind-mounts /etc/hosts into the container, and a rename
    over a mount point fails. Written from the start in as few writes as the kernel takes
    (writev), then padded with blank lines up to the old size and truncated: a reader in
    between sees new entries and harmless blank lines, and where the writes have not reached
    yet the old bytes, as with one write() of the whole file (the kernel copies it page by
    page either way). Not fsynced: the block is derived, written again at every start.
    """
    pieces = block.pieces()
    size = sum(map(len, pieces))
    if head is None:
        raw = path.read_bytes()
        # surrogateescape: bytes we do not own go back exactly as they were.
        head = splice_hosts_block(raw.decode("utf-8", errors="surrogateescape"), "").encode(
            "utf-8", errors="surrogateescape")
        if raw == b"".join((head, *pieces)):
            return False, head
        old_size = len(raw)
    else:
        old_size = os.stat(path).st_size
    size += len(head)
    fd = os.open(path, os.O_WRONLY)
    try:
        write_blocks(fd, (head, *pieces, b"\n" * max(0, old_size - size)))
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    # What lies outside the block is the head: noted now, so the next render does not read
    # the file and parse the 100k lines of the block again to find it out.
    stamp = file_stamp(path)
    if stamp is not None:
        _unmanaged_memo[path] = (stamp, unmanaged_hosts_entries(head.decode("utf-8", errors="surrogateescape")))
    return True, head


def file_stamp(path: Path) -> tuple[int, ...] | None:
    """What changes when a file is replaced or written (None: it does not exist)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


_unmanaged_memo: dict[Path, tuple[tuple[int, ...], tuple[tuple[str, tuple[str, ...]], ...]]] = {}


def read_unmanaged_hosts(path: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`(address, names)` of the hosts file's lines outside the managed block (none when
    the file does not exist). Parsed again only when the file changed (it is read before
    every render; with 100k names pinned it is large)."""
    stamp = file_stamp(path)
    memo = _unmanaged_memo.get(path)
    if memo is not None and stamp is not None and memo[0] == stamp:
        return memo[1]
    data = read_bytes(path)
    if data is None:
        _unmanaged_memo.pop(path, None)
        return ()
    entries = unmanaged_hosts_entries(data.decode("utf-8", errors="surrogateescape"))
    if stamp is not None:
        _unmanaged_memo[path] = (stamp, entries)
    return entries


def shrink_in_place(path: Path, allowed: bytes) -> bool:
    """Drop, in place, every line of `path` that `allowed` does not also have; True if any.

    For a full disk: a new file cannot be written, but the old one can be overwritten with
    fewer bytes (no new blocks needed). Keeping only the lines the old and the new render
    agree on serves no grant the new render withdrew (fail closed); what it adds waits for
    space. The kept lines keep their order (the index stays sorted for `look`).
    """
    current = read_bytes(path)
    if current is None:
        return False
    wanted = set(allowed.splitlines(keepends=True))
    kept = b"".join(line for line in current.splitlines(keepends=True) if line in wanted)
    if kept == current:
        return False
    fd = os.open(path, os.O_WRONLY)
    try:
        # Overwrite, then cut: a reader in between sees the kept lines and a tail of old
        # bytes that starts mid-line, which `look` cannot take for a fingerprint's line.
        os.write(fd, kept)
        os.ftruncate(fd, len(kept))
        try:
            os.fsync(fd)
        except OSError:
            pass  # readers see the page cache already; durability waits for the next write
    finally:
        os.close(fd)
    return True


SHARD_DATA = ".data"
"""The index directory's subdirectory of the group files' versions (hidden: `ls index.d`
shows the shard names)."""

_KEPT_VERSIONS = 2
"""A group file's versions kept on disk: the current one and the one before, which a reader
that resolved the link just before the swap still opens (a path lookup takes microseconds;
a group changes at most once per flush)."""


class ShardFiles:
    """The index files sshd's AuthorizedKeysCommand reads. Each shard name is a symlink to
    its group's file (`index_layout`), and each group file a symlink `.g<count>.<n>` to its
    current version `.data/<group>.<token>.<n>`; a new version replaces it by renaming a new
    link over the old one (the pattern of Kubernetes' atomic volume writer).

    Why not a file renamed over the old one: ext4 (and overlayfs on it) starts writing the
    new file to disk on every rename over an existing file (auto_da_alloc), which made the
    64 renames of a flush at 100k keys ~30 ms of its ~75 ms. A renamed link has no data to
    write, and a version replaced before the kernel flushed it is deleted without ever
    reaching the disk (the index is derived: written again at every start).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / SHARD_DATA
        self._versions: dict[str, list[str]] = {}  # file -> names in .data, oldest first
        self._dir = str(directory)
        self._token = secrets.token_hex(4)  # this writer's part of a version's name
        self._counter = itertools.count()
        # The group count the shard names link to (None: not known to be one layout), and
        # the group files of layouts before it, removed once no reader can still be on its
        # way to one (at the next use()).
        self.count: int | None = None
        self._retired: set[str] = set()

    def prepare(self) -> None:
        """At start: the directories, readable by sshd's AuthorizedKeysCommandUser (nobody);
        entries of an earlier run that are neither a shard name nor a group file (a temp
        link, a stray) removed, versions nothing links to removed, and the layout the shard
        names link to noted (a restart with the same keys rewrites nothing)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        linked: dict[str, str] = {}
        counts: set[int | None] = set()
        for entry in os.scandir(self.directory):
            if entry.name == SHARD_DATA and entry.is_dir(follow_symlinks=False):
                continue
            # The file of recent changes is kept too, until the first write replaces the groups.
            is_group = parse_group_name(entry.name) is not None
            if entry.name not in SHARD_SET and not is_group and entry.name != RECENT_NAME:
                _remove_entry(entry)
                continue
            target = os.readlink(entry.path) if entry.is_symlink() else ""
            head, _, version = target.rpartition("/")
            if head == SHARD_DATA:
                linked[entry.name] = version
            if entry.name in SHARD_SET:
                counts.add(parse_group_name(target))
            elif entry.name != RECENT_NAME:
                self._retired.add(entry.name)  # until use() finds it in the layout
        self.data.mkdir(exist_ok=True)
        self.data.chmod(0o755)
        kept = set(linked.values())
        for entry in os.scandir(self.data):
            if entry.name not in kept:
                _remove_entry(entry)
        self._versions = {name: [version] for name, version in linked.items()}
        found = counts.pop() if len(counts) == 1 else None
        if found is not None and all(
                os.path.islink(self.directory / name) for name in SHARD_NAMES):
            self.count = found

    def use(self, count: int) -> None:
        """Link every shard name to its group of `count` groups (once their files are
        written): a reader follows the old layout or the new one, each whole. The group
        files of the layout before go at the next call."""
        current = {name for name, _ in groups(count)}
        for name in self._retired - current:
            self.remove(name)
        self._retired = set()
        if count == self.count:
            return
        for group, names in groups(count):
            for name in names:
                self._link(name, group)
        if self.count is not None:
            self._retired = {name for name, _ in groups(self.count)} - current
        self.count = count

    def _link(self, name: str, to: str) -> None:
        """Shard name `name` a link to group file `to` (renamed over whatever it was)."""
        with contextlib.suppress(OSError):
            if os.readlink(f"{self._dir}/{name}") == to:
                return
        self._point(name, to)
        for version in self._versions.pop(name, ()):  # an earlier layout's own version
            self._drop(version)

    def _point(self, name: str, target: str) -> None:
        """`name` a symlink to `target`: a new link renamed over whatever `name` was, so a
        reader finds the old or the new; no temporary link is left if it fails."""
        link = f"{self._dir}/.{name}.link"
        try:
            try:
                os.symlink(target, link)
            except FileExistsError:  # left by a write that failed half-way
                os.unlink(link)
                os.symlink(target, link)
            os.replace(link, f"{self._dir}/{name}")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
            raise

    def write(self, name: str, data: bytes | Sequence[bytes]) -> None:
        """Make `data` (bytes, or blocks of them) file `name`'s content (a group's); readers see the
        old or the new, whole.

        Plain os calls, a version named by a counter: tempfile.mkstemp's random names and a
        file object made a shard write ~210 us of CPU against ~100 (side by side; a churn
        flush writes up to 64 of them)."""
        version, fd = self._new_version(name)
        try:
            try:
                os.fchmod(fd, 0o644)  # whatever the umask: nobody (sshd's keys command) reads it
                if isinstance(data, bytes):
                    write_all(fd, data)
                else:
                    write_blocks(fd, data)
            finally:
                os.close(fd)
            self._point(name, f"{SHARD_DATA}/{version}")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._version_path(version))
            raise
        versions = self._versions.setdefault(name, [])
        versions.append(version)
        while len(versions) > _KEPT_VERSIONS:
            self._drop(versions.pop(0))

    def _new_version(self, name: str) -> tuple[str, int]:
        """A new, empty version file of shard `name`, open for writing. Named by this
        writer's token and a counter; O_EXCL: never an existing file (prepare() removes
        what an earlier run left, and a name taken anyway is skipped)."""
        while True:
            version = f"{name}.{self._token}.{next(self._counter)}"
            try:
                return version, os.open(self._version_path(version),
                                        os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue

    def remove(self, name: str) -> bool:
        """No file `name` (a group of a layout no shard name links to any more); True if
        there was one. Its versions go at once."""
        try:
            os.unlink(self.directory / name)
            removed = True
        except FileNotFoundError:
            removed = False
        for version in self._versions.pop(name, ()):
            self._drop(version)
        return removed

    def _drop(self, version: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._version_path(version))

    def _version_path(self, version: str) -> str:
        return f"{self._dir}/{SHARD_DATA}/{version}"  # str: a Path join costs more than a syscall here


def index_files(directory: Path) -> list[Path]:
    """The files the shard names lead to, each once, in fingerprint order (the shard names
    of a group all lead to its file): what sshd reads, file by file."""
    files = dict.fromkeys(Path(os.path.realpath(directory / name)) for name in SHARD_NAMES)
    return list(files)


def read_index(directory: Path) -> bytes:
    """The index as sshd's keys command answers it, in order: the group files' lines, the
    keys of the file of recent changes answered from it (a missing file holds no keys)."""
    base = b"".join(data for data in map(read_bytes, index_files(directory)) if data is not None)
    return overlay(base, read_bytes(directory / RECENT_NAME) or b"")


def _remove_entry(entry: os.DirEntry) -> None:
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path)
    else:
        os.unlink(entry.path)
