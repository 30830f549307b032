"""Served targets + keys -> the bytes sshd and the resolver read. Pure.

Three outputs, always rendered together from the same state:
- the authorized_keys cache (the documented, human-readable file),
- the index sshd's AuthorizedKeysCommand searches: the same lines, each prefixed by the key's
  fingerprint and sorted, so one `look` (binary search) answers a login in O(log n). It is
  split into shards by the fingerprint's first base64 character (64 files): a change to one
  key rewrites one shard, 1/64 of the index, not all of it,
- the hosts block that pins every granted name to the target's address.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import AbstractSet, Iterable, Iterator, Mapping, Sequence

from .model import ManualLine, Owner, PublicKey, Target, owners_sorted
from .multimap import IdMultimap
from .pacing import many
from .targets import fold

BASE_OPTIONS = "restrict,port-forwarding"
HOSTS_BEGIN = "# BEGIN ssh-proxy targets (managed by the watcher; edits are overwritten)"
HOSTS_END = "# END ssh-proxy targets"
CACHE_HEADER = "# ssh-proxy authorized keys: rendered by the watcher, do not edit\n"
_HOSTS_HEAD = f"{HOSTS_BEGIN}\n".encode()
_HOSTS_TAIL = f"{HOSTS_END}\n".encode()


@dataclass(frozen=True, slots=True)
class ServedTarget:
    """A permitted target whose keys are known, with its resolved aliases."""

    target: Target
    aliases: tuple[str, ...]
    keys: tuple[PublicKey, ...]


ANY_DEST = "any"
"""The destination of a line without permitopen (sshd_config's PermitOpen governs): its own
element, never a superset of named ones. No permitopen value is spelled so (they hold ':')."""

GrantElement = tuple[tuple[str, ...], str]
"""(conditions, destination): options that decide whether a line applies, and one
permitopen value ("host:port") or ANY_DEST."""


_B64 = "+/0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # ASCII order
_FILE_CHAR = {c: "," if c == "/" else c for c in _B64}  # ',' sorts between '+' and '0' as '/' does
SHARD_NAMES = tuple(_FILE_CHAR[c] for c in _B64)
"""Index shard file names, in fingerprint order (and in C-locale name order, so `cat *`
gives the whole index sorted): a fingerprint's first base64 character (after "SHA256:"),
'/' spelled ',' (sshd/authorized-keys-command maps it the same way). 64 shards: 4096 made
a churn flush at 100k keys touch ~900 small files, which cost more than rewriting 64."""
SHARD_SET = frozenset(SHARD_NAMES)
_SHARD_OF = _FILE_CHAR


def index_shard(fingerprint: str) -> str:
    """The shard file a fingerprint's index lines live in."""
    body = fingerprint.split(":", 1)[-1]
    return _SHARD_OF.get(body[:1], SHARD_NAMES[0])


BLOCK_BYTES = 16 * 1024
"""An index shard is kept as blocks of this many bytes to twice as many, each of whole keys'
lines. A change makes again only the blocks of the keys it touches and shares the others
with the shard before it. With each shard one string (~375 KB at 100k keys), a churn flush,
which changes a few lines in each of the 64 shards, copied the whole index (~23 MB) into a
new generation while the one before was still referenced. B6 at 100k keys, alternated
runs: CPU per event -5%, peak RSS -7 MiB (bench/ANALYSIS.md, round 15)."""


@dataclass(frozen=True, slots=True, eq=False)
class Shard:
    """One index shard: its lines ("<fingerprint> <authorized_keys line>") in fingerprint
    order, as the file's bytes (UTF-8) cut into blocks (BLOCK_BYTES) at key boundaries, and
    how many lines. Equal shards hold the same bytes, however they are cut.

    Kept as bytes, not as text: written as they are, where encoding the 64 shards of a
    churn flush at 100k keys (~24 MB) held the loop for ~20 ms per flush. Edits splice bytes
    too (`splice`); the text is decoded only where a reader wants it."""

    blocks: tuple[bytes, ...] = ()
    lines: int = 0
    # Each block's first fingerprint: where a key's lines are is a bisect away.
    firsts: tuple[bytes, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "firsts", tuple(block[:block.index(b" ")] for block in self.blocks))

    @classmethod
    def of(cls, data: bytes, lines: int, block: int | None = None) -> Shard:
        """The shard of these lines (sorted, whole), cut into blocks (None: BLOCK_BYTES)."""
        return cls(tuple(cut_blocks(data, block)), lines) if data else EMPTY_SHARD

    @property
    def data(self) -> bytes:
        """The file's bytes, joined (the shard's writers write its blocks as they are)."""
        return b"".join(self.blocks)

    @property
    def index(self) -> str:
        """The lines as text."""
        return self.data.decode()

    def cache_chunks(self) -> Iterator[bytes]:
        """The same lines as the cache shows them (no fingerprint), a block at a time:
        derived each time the cache is written (paced), not kept: at 100k keys the kept copy
        was ~19 MB, and under churn every shard had changed by the next write anyway."""
        for block in self.blocks:
            yield b"\n".join([line[line.index(b" ") + 1:] for line in block.split(b"\n")[:-1]]) + b"\n"

    def block_of(self, fp: bytes) -> int:
        """The block where `fp`'s lines are or would go."""
        return max(0, bisect.bisect_right(self.firsts, fp) - 1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Shard):
            return NotImplemented
        return self.lines == other.lines and same_bytes(self.blocks, other.blocks)

    def __hash__(self) -> int:
        return hash((self.lines, self.data))


def same_bytes(a: tuple[bytes, ...], b: tuple[bytes, ...]) -> bool:
    """Whether two runs of chunks hold the same bytes, however they are cut (the same
    chunks, as after an edit that left them, compare without joining)."""
    return a == b or b"".join(a) == b"".join(b)


def cut_blocks(data: bytes, size: int | None = None) -> list[bytes]:
    """Sorted index lines cut into blocks of `size` (None: BLOCK_BYTES) to 2 * `size` bytes
    (a shorter one only if it is all; a key with more lines than that makes its block
    longer), each starting where a key's lines start, so that a key's lines are in one block."""
    size = size or BLOCK_BYTES
    blocks: list[bytes] = []
    start = 0
    while len(data) - start > 2 * size:
        at = data.index(b"\n", start + size - 1) + 1  # the first line starting after `size` bytes
        line = data.rfind(b"\n", 0, at - 1) + 1
        at = _part_end(data, data[line:data.index(b" ", line)], at)  # past the key's other lines
        if len(data) - at < size:  # the key's lines were most of it: no short block after it
            break
        blocks.append(data[start:at])
        start = at
    if start < len(data):
        blocks.append(data[start:] if start else data)
    return blocks


EMPTY_SHARD = Shard()


@dataclass(frozen=True, slots=True, eq=False)
class HostsBlock:
    """The managed block of the hosts file: its rows (`<address>\t<names>`, each line
    ending in a newline) as chunks of whole lines in UTF-8, between the BEGIN and END
    markers. Equal blocks hold the same rows, however they are cut.

    Kept and written as chunks, never joined: at 100k targets the block is ~4 MB, and a
    churn flush that joined it, read the hosts file back, spliced it in and encoded it made
    five such copies (the peaks of B6's RSS; bench/ANALYSIS.md, round 16)."""

    chunks: tuple[bytes, ...] = ()
    size: int = field(init=False, repr=False)  # bytes of the rows

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", sum(map(len, self.chunks)))

    @classmethod
    def of(cls, rows: Iterable[str]) -> HostsBlock:
        """The block of these rows (without their newlines), as one chunk."""
        data = _rows_bytes(rows)
        return cls((data,) if data else ())

    def pieces(self) -> tuple[bytes, ...]:
        """The block's bytes as written: the markers and the chunks between them."""
        return (_HOSTS_HEAD, *self.chunks, _HOSTS_TAIL)

    @property
    def text(self) -> str:
        return b"".join(self.pieces()).decode()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HostsBlock):
            return NotImplemented
        return self.size == other.size and same_bytes(self.chunks, other.chunks)

    def __hash__(self) -> int:
        return hash(b"".join(self.chunks))


@dataclass(frozen=True)
class Rendered:
    # shard name -> its part of the index (every name of SHARD_NAMES, empty ones included)
    shards: Mapping[str, Shard]
    hosts: HostsBlock
    # fingerprint -> the targets (names) and admin lines the key opens: for the access log,
    # which names them with owner_names.
    owners: Mapping[str, tuple[Owner, ...]] = field(default_factory=dict)
    # fingerprint -> what sshd gives the key (see grant_set). The incremental renderer
    # derives it from the index lines (IndexGrants) instead of keeping 100k sets.
    grants: Mapping[str, frozenset[GrantElement]] = field(default_factory=dict)
    # Fingerprints whose lines may differ from the previous render (None: any of them):
    # what the revocation diff needs to look at.
    changed: frozenset[str] | None = None
    # For the `changed` fingerprints: their owners before this render (absent: none). The
    # incremental renderer updates `owners` in place, so what they were is kept here.
    owners_before: Mapping[str, tuple[Owner, ...]] = field(default_factory=dict)
    # For the `changed` fingerprints that had lines and whose lines changed: (index lines
    # before, after; "" for none). The revocation diff parses the grants of these only (a
    # key that had no lines lost nothing).
    parts_changed: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def hosts_block(self) -> str:
        """The hosts block as text (joined: for tests and people, not for the writer)."""
        return self.hosts.text

    @property
    def index(self) -> str:
        """The whole index, sorted by fingerprint (the shards in order)."""
        return "".join(self.shards.get(name, EMPTY_SHARD).index for name in SHARD_NAMES)

    @property
    def cache(self) -> str:
        return b"".join(self.cache_chunks()).decode()

    def cache_chunks(self) -> Iterator[bytes]:
        """The cache's bytes a block of a shard at a time (~20 MB at 100k keys: written so,
        never joined)."""
        yield CACHE_HEADER.encode()
        for name in SHARD_NAMES:
            yield from self.shards.get(name, EMPTY_SHARD).cache_chunks()

    @property
    def keys_served(self) -> int:
        """Lines in the index."""
        return sum(shard.lines for shard in self.shards.values())


def shards_of(lines: Iterable[tuple[str, str]]) -> dict[str, Shard]:
    """(fingerprint, line) in fingerprint order -> every shard."""
    index: dict[str, list[str]] = {}
    for fp, line in lines:
        index.setdefault(index_shard(fp), []).append(f"{fp} {line}\n")
    return {name: Shard.of("".join(index[name]).encode(), len(index[name]))
            if name in index else EMPTY_SHARD for name in SHARD_NAMES}


def _seek(data: bytes, fp: bytes, lo: int, hi: int) -> int:
    """Offset of the first index line in data[lo:hi] (both line starts) whose fingerprint is
    not below `fp`, or hi: a binary search over the lines, which are sorted by fingerprint
    (ASCII: bytes sort as the text does)."""
    while lo < hi:
        start = max(lo, data.rfind(b"\n", lo, (lo + hi) // 2) + 1)
        if data[start:data.index(b" ", start)] < fp:
            lo = data.index(b"\n", start) + 1
        else:
            hi = start
    return lo


def _part_end(data: bytes, fp: bytes, start: int) -> int:
    """The end of `fp`'s lines that begin at `start` (start itself when it has none)."""
    head = fp + b" "
    while data.startswith(head, start):
        start = data.index(b"\n", start) + 1
    return start


def part_of(shard: Shard, fp: str) -> str:
    """A fingerprint's lines in a shard's index ("" if it has none)."""
    return part_bytes(shard, fp).decode()


def part_bytes(shard: Shard, fp: str) -> bytes:
    """A fingerprint's lines in a shard's index, as its bytes (b"" if it has none)."""
    if not shard.blocks:
        return b""
    key = fp.encode()
    data = shard.blocks[shard.block_of(key)]
    start = _seek(data, key, 0, len(data))
    return data[start:_part_end(data, key, start)]


def splice(shard: Shard, parts: Mapping[str, str], block: int | None = None) -> tuple[Shard, dict[str, str]]:
    """The shard with each fingerprint's lines replaced by `parts[fp]` ("": none), and the
    lines each had before. Only the blocks holding a changed fingerprint are made again
    (the others are shared with `shard`); lines of other fingerprints are copied, never
    parsed: one pass over each such block, plus a binary search per changed fingerprint."""
    if not parts:
        return shard, {}
    block = block or BLOCK_BYTES
    blocks = list(shard.blocks) or [b""]
    by_block: dict[int, dict[str, str]] = {}
    for fp, part in parts.items():
        by_block.setdefault(shard.block_of(fp.encode()), {})[fp] = part
    before: dict[str, str] = {}
    lines = shard.lines
    for i in sorted(by_block, reverse=True):  # from the last: blocks before i keep their place
        data, added, was = _splice_block(blocks[i], by_block[i])
        before.update(was)
        lines += added
        if len(data) < block // 4 and i + 1 < len(blocks):  # too small: one with the next
            blocks[i:i + 2] = cut_blocks(data + blocks[i + 1], block)
        else:
            blocks[i:i + 1] = cut_blocks(data, block)
    return (Shard(tuple(blocks), lines) if blocks else EMPTY_SHARD), before


def _splice_block(data: bytes, parts: Mapping[str, str]) -> tuple[bytes, int, dict[str, str]]:
    """One block with each fingerprint's lines replaced by `parts[fp]`: (the new bytes, lines
    added (negative: removed), the lines each fingerprint had before)."""
    pieces: list[bytes] = []
    before: dict[str, str] = {}
    added = 0
    pos = 0
    for fp in sorted(parts):
        key = fp.encode()
        start = _seek(data, key, pos, len(data))
        end = _part_end(data, key, start)
        old, new = data[start:end], parts[fp]
        before[fp] = old.decode()
        added += new.count("\n") - old.count(b"\n")
        pieces += (data[pos:start], new.encode())
        pos = end
    pieces.append(data[pos:])
    return b"".join(pieces), added, before


def changed_parts(old: Mapping[str, Shard], new: Mapping[str, Shard]) -> dict[str, tuple[str, str]]:
    """fingerprint -> (lines in `old`, lines in `new`) for each fingerprint whose lines differ
    between two renders ("": none). A shard that is the same object or text is skipped."""
    out: dict[str, tuple[str, str]] = {}
    for name in SHARD_NAMES:
        a, b = old.get(name, EMPTY_SHARD), new.get(name, EMPTY_SHARD)
        if a is b or a == b:
            continue
        was, now = _parts_by_fp(a.index), _parts_by_fp(b.index)
        for fp in was.keys() | now.keys():
            if was.get(fp, "") != now.get(fp, ""):
                out[fp] = (was.get(fp, ""), now.get(fp, ""))
    return out


def _parts_by_fp(text: str) -> dict[str, str]:
    parts: dict[str, list[str]] = {}
    for line in text.splitlines(keepends=True):
        parts.setdefault(line[:line.index(" ")], []).append(line)
    return {fp: "".join(lines) for fp, lines in parts.items()}


def part_grants(part: str) -> frozenset[GrantElement]:
    """What a fingerprint's index lines give it, read back from the lines: grant_set() of
    the grants they were rendered from (tests/unit/test_shard_splice.py holds them equal)."""
    elements: set[GrantElement] = set()
    for line in part.splitlines():
        options = _split_options(line[line.index(" ") + 1:])
        if options[1:2] != ["port-forwarding"]:
            continue  # "restrict" alone: no tunnels
        conditions = tuple(o for o in options[2:] if not o.startswith("permitopen="))
        dests = [o[len("permitopen="):].strip('"') for o in options[2:] if o.startswith("permitopen=")]
        elements.update((conditions, dest) for dest in (dests or [ANY_DEST]))
    return frozenset(elements)


_OPTION = re.compile(r'[^=,"\s]+(?:="(?:\\"|[^"])*")?')
"""One option of a rendered line: a name, or name="value" (in the value, \\" is a literal
quote, as sshd reads it)."""


def _split_options(text: str) -> list[str]:
    """The options field at the start of a rendered line, split at the commas between them."""
    options: list[str] = []
    pos = 0
    while (match := _OPTION.match(text, pos)) is not None:
        options.append(match.group())
        pos = match.end()
        if not text.startswith(",", pos):
            break
        pos += 1
    return options


def grants_of_parts(parts: Mapping[str, tuple[str, str]]) -> tuple[dict[str, frozenset[GrantElement]],
                                                                    dict[str, frozenset[GrantElement]]]:
    """(grants before, grants after) of the fingerprints that had lines before: of
    changed_parts() or Rendered.parts_changed. A key without lines before lost nothing."""
    before = {fp: part_grants(old) for fp, (old, _) in parts.items() if old}
    return before, {fp: part_grants(parts[fp][1]) for fp in before}


class IndexGrants(Mapping):
    """fingerprint -> grants, read from the index lines of a render's shards on demand."""

    def __init__(self, shards: Mapping[str, Shard]) -> None:
        self.shards = shards

    def __getitem__(self, fp: str) -> frozenset[GrantElement]:
        part = part_of(self.shards.get(index_shard(fp), EMPTY_SHARD), fp)
        if not part:
            raise KeyError(fp)
        return part_grants(part)

    def __iter__(self) -> Iterator[str]:
        for name in SHARD_NAMES:
            yield from _parts_by_fp(self.shards.get(name, EMPTY_SHARD).index)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def permitopen_options(aliases: Iterable[str], ports: Iterable[str]) -> list[str]:
    return [f'permitopen="{alias}:{port}"' for alias in aliases for port in ports]


def _key_line(options: list[str], key: PublicKey, comment: str) -> str:
    return f"{','.join(options)} {key.line()} {comment}".rstrip()


@dataclass
class Grant:
    """What one key may do, from one source or merged from several."""

    key: PublicKey
    options: list[str]  # besides restrict/port-forwarding, in order (permitopen included)
    tunnels: bool = True  # port-forwarding on
    unscoped: bool = False  # no permitopen of its own: sshd_config's PermitOpen governs
    names: list[str] = field(default_factory=list)  # targets, for the line's comment

    def line(self) -> str:
        options = [BASE_OPTIONS if self.tunnels else "restrict", *self.options]
        comment = ",".join(self.names) if self.names else self.key.comment
        return _key_line(options, self.key, comment)


def discovered_grants(served: Iterable[ServedTarget], ports: tuple[str, ...]) -> list[Grant]:
    """One grant per distinct key; a key shared by targets opens all of them."""
    by_blob: dict[str, tuple[PublicKey, list[ServedTarget]]] = {}
    for item in sorted(served, key=lambda s: (s.target.name, s.target.id)):
        if not item.aliases:
            continue
        for key in item.keys:
            by_blob.setdefault(key.blob_b64, (key, []))[1].append(item)
    grants = []
    for key, items in by_blob.values():
        aliases = [a for item in items for a in item.aliases]
        grants.append(Grant(key, permitopen_options(dict.fromkeys(aliases), ports),
                            names=[item.target.name for item in items]))
    return grants


def manual_grants(lines: Iterable[ManualLine], scope: list[str] | None = None) -> list[Grant]:
    """Admin lines keep their own options; the proxy's base options always come first.

    `scope`: permitopen options given to a line that has none of its own (with discovery:
    every served target, so an admin key cannot reach what was not discovered); an empty
    scope leaves such a line no forwarding at all. None: sshd_config's PermitOpen governs.
    """
    grants = []
    for item in lines:
        own = [o for o in item.options if o not in ("restrict", "port-forwarding")]
        if any(o.startswith("permitopen=") for o in own):
            grants.append(Grant(item.key, own))
        elif scope is None:
            grants.append(Grant(item.key, own, unscoped=True))
        elif scope:
            grants.append(Grant(item.key, [*own, *scope]))
        else:
            grants.append(Grant(item.key, own, tunnels=False))
    return grants


def _conditions(grant: Grant) -> tuple[str, ...]:
    """Options that decide whether a line applies at all (from=, expiry-time, no-* ...)."""
    return tuple(o for o in grant.options if not o.startswith("permitopen="))


def grant_set(grant: Grant) -> frozenset[GrantElement]:
    """What one rendered line gives its key: a (conditions, destination) pair per tunnel
    destination; nothing for a line without tunnels."""
    if not grant.tunnels:
        return frozenset()
    conditions = _conditions(grant)
    if grant.unscoped:
        return frozenset({(conditions, ANY_DEST)})
    return frozenset((conditions, o[len("permitopen="):].strip('"'))
                     for o in grant.options if o.startswith("permitopen="))


def merge_grants(grants: Iterable[Grant]) -> list[Grant]:
    """The lines for each key, so that no source's grant is lost.

    sshd applies only the first line that matches a key, moving on when that line's
    conditions (from=, expiry-time) do not hold. So per key: one line per set of
    conditions, each also carrying the unconditional grants (a target's own, an admin
    line without conditions), conditional lines first, the unconditional line last.
    Two `from=` never share a line (sshd refuses such a line).
    """
    groups: dict[tuple[str, tuple[str, ...]], Grant] = {}
    for grant in grants:
        slot = (grant.key.blob_b64, _conditions(grant))
        have = groups.get(slot)
        if have is None:
            groups[slot] = Grant(grant.key, list(grant.options), grant.tunnels,
                                 grant.unscoped, list(grant.names))
            continue
        _absorb(have, grant)
    plain = {blob: g for (blob, conds), g in groups.items() if not conds}
    for (blob, conds), grant in groups.items():
        if conds and blob in plain:
            _absorb(grant, plain[blob])
    for grant in groups.values():
        if grant.unscoped:
            grant.options = [o for o in grant.options if not o.startswith("permitopen=")]
    conditional = [g for (_, conds), g in groups.items() if conds]
    return conditional + list(plain.values())


def _absorb(into: Grant, other: Grant) -> None:
    into.options = list(dict.fromkeys(into.options + other.options))
    into.tunnels = into.tunnels or other.tunnels
    into.unscoped = into.unscoped or other.unscoped
    into.names = list(dict.fromkeys(into.names + other.names))


def render_discovered(served: Iterable[ServedTarget], ports: tuple[str, ...]) -> list[tuple[str, str]]:
    """(fingerprint, line) per distinct key of the discovered targets."""
    return [(g.key.fingerprint, g.line()) for g in discovered_grants(served, ports)]


def render_manual(lines: Iterable[ManualLine],
                  scope: list[str] | None = None) -> list[tuple[str, str]]:
    """(fingerprint, line) per admin line, unmerged (see manual_grants)."""
    return [(g.key.fingerprint, g.line()) for g in manual_grants(lines, scope)]


def render_hosts_block(served: Iterable[ServedTarget],
                       pinned_elsewhere: frozenset[str] = frozenset()) -> str:
    """`<address> <names...>` for each target with names; IP aliases need no entry.

    Each name at most once in the whole file, compared folded (the resolver ignores
    case): names already pinned outside the block (`pinned_elsewhere`, folded) are left out.
    """
    return hosts_block(hosts_rows(served, pinned_elsewhere))


def hosts_rows(served: Iterable[ServedTarget], pinned_elsewhere: AbstractSet[str] = frozenset()) -> list[str]:
    """The hosts block's rows (see render_hosts_block), in order of (name, id)."""
    rows = []
    written: set[str] = set()
    for item in sorted(served, key=lambda s: (s.target.name, s.target.id)):
        row = hosts_row(item, written, pinned_elsewhere)
        if row:
            rows.append(row)
    return rows


def _rows_bytes(rows: Iterable[str]) -> bytes:
    """Hosts rows as lines, in UTF-8 (a chunk of a HostsBlock)."""
    return "".join([row + "\n" for row in rows]).encode()


def hosts_block(rows: Iterable[str]) -> str:
    return "\n".join([HOSTS_BEGIN, *rows, HOSTS_END]) + "\n"


HOSTS_CHUNK = 8
"""Targets per group of the hosts block kept joined (IncrementalRender; up to twice as many
before a group is split). A target that restarts leaves the block (its key is gone) and
comes back a flush or more later (its new key fetched): each time its group's rows are made
again. At 100k targets and 480 such restarts per flush, the loop's CPU per flush was ~480 ms
with 64 and one list of every id, ~250 ms with groups of 16, ~150-170 ms with 8 (4: no
better); bench/ANALYSIS.md, round 11."""


def hosts_row(item: ServedTarget, written: set[str], pinned: AbstractSet[str] = frozenset()) -> str:
    """One target's hosts line ("" for none), leaving out names in `written` or `pinned`
    (folded); the names it writes are added to `written`."""
    if not (_ipv4(item.target.address) and item.keys):
        return ""  # no address, or one that is not plainly an IPv4 address: no row
    names = []
    for alias in item.aliases:
        folded = fold(alias)
        if not _looks_like_ip(alias) and folded not in written and folded not in pinned:
            written.add(folded)
            names.append(alias)
    return f"{item.target.address}\t{' '.join(names)}" if names else ""


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def _ipv4(text: str) -> bool:
    """An IPv4 address written as ipaddress writes it (no leading zeros, nothing around it):
    a regex, as ipaddress takes ~17 us and this runs for every target a change touches."""
    return _IPV4.fullmatch(text) is not None


def _looks_like_ip(text: str) -> bool:
    # The count first: most names have no three dots, and it is one pass in C.
    return text.count(".") == 3 and all(part.isdigit() for part in text.split("."))


def render(served: Iterable[ServedTarget], ports: tuple[str, ...],
           manual: Iterable[ManualLine] = (), scope_manual: bool = False,
           pinned_elsewhere: frozenset[str] = frozenset()) -> Rendered:
    served = list(served)
    manual = list(manual)
    scope = None
    if scope_manual:
        aliases = [a for item in sorted(served, key=lambda s: (s.target.name, s.target.id))
                   if item.keys for a in item.aliases]
        scope = permitopen_options(dict.fromkeys(aliases), ports)
    merged = merge_grants(discovered_grants(served, ports) + manual_grants(manual, scope))
    # (fingerprint, conditional first, line): `look` needs the index sorted by fingerprint
    # only; within one fingerprint the order is the order sshd tries the lines in.
    lines = sorted((g.key.fingerprint, not _conditions(g), g.line()) for g in merged)
    grants: dict[str, frozenset[GrantElement]] = {}
    for grant in merged:
        fp = grant.key.fingerprint
        grants[fp] = grants.get(fp, frozenset()) | grant_set(grant)
    owners: dict[str, list[Owner]] = {}
    for item in served:
        if item.aliases:
            for key in item.keys:
                owners.setdefault(key.fingerprint, []).append(item.target.name)
    for item in manual:
        owners.setdefault(item.key.fingerprint, []).append(item)
    return Rendered(shards=shards_of((fp, line) for fp, _, line in lines),
                    hosts=HostsBlock.of(hosts_rows(served, pinned_elsewhere)),
                    owners={fp: owners_sorted(set(v)) for fp, v in owners.items()},
                    grants=grants)


class IncrementalRender:
    """render(), kept up to date target by target: a change re-renders only the key lines
    of the keys it touches, the index shards they live in and the hosts row of the targets
    it touches.

    The outputs are byte for byte what render() gives for the same state (the property
    tests hold it to that). A key's lines are kept only in its shard's text, where a change
    splices them (splice): the lines are the bulk of the state at 100k keys, and a second
    copy per key cost ~330 bytes. Grants are read back from the lines (IndexGrants) for
    the same reason. Granted aliases are unique across targets (resolve_aliases refuses
    contested names), so a target's hosts row depends on that target and
    `pinned_elsewhere` only. `owners` is updated in place (copying 100k entries per change
    would cost more than the change): a Rendered carries what the changed fingerprints
    had before.
    """

    def __init__(self, ports: tuple[str, ...], scope_manual: bool = False) -> None:
        self.ports = ports
        self.scope_manual = scope_manual
        self.reset((), frozenset())

    def reset(self, manual: Iterable[ManualLine], pinned_elsewhere: frozenset[str]) -> None:
        """Forget every target; serve `manual` (rendered by the next update). The owners
        and grants maps are new objects: a Rendered handed out before keeps its own."""
        self.pinned_elsewhere = pinned_elsewhere
        self._served: dict[str, ServedTarget] = {}
        self._by_fp = IdMultimap()  # fingerprint -> ids of targets with that key
        self._manual: dict[str, list[ManualLine]] = {}  # fingerprint -> its lines, in order
        for line in manual:
            self._manual.setdefault(line.key.fingerprint, []).append(line)
        # Fingerprints of admin lines without permitopen: their scope is every served alias.
        self._scoped = {fp for fp, lines in self._manual.items() if _is_scoped(lines)}
        self._scope: list[str] | None = [] if self.scope_manual else None
        self._scope_stale = False  # targets changed while no line needed the scope
        self._shards: dict[str, Shard] = dict.fromkeys(SHARD_NAMES, EMPTY_SHARD)
        self._keys = 0  # fingerprints in the index
        self._owners: dict[str, tuple[Owner, ...]] = {}
        self._owners_before: dict[str, tuple[Owner, ...]] = {}
        # The served targets in order of (name, id), in groups of about HOSTS_CHUNK, and
        # the hosts block's rows of each group joined (`_chunks`): a change re-joins the
        # groups of the targets it touched, not the 100k rows of the block (~30 ms per
        # flush at 100k), and a target that leaves or joins shifts its group's list, not a
        # list of 100k ids (~20 us each, twice per restart). Group i holds the targets
        # whose order key is in [_bounds[i-1], _bounds[i]): bounds are keys, not
        # positions, so the other groups stay as they are. Ids, not (name, id, row)
        # tuples, which cost ~150 bytes per target at 100k.
        self._groups: list[list[str]] = [[]]
        self._bounds: list[tuple[str, str]] = []
        self._chunks: list[bytes] = [b""]
        self._hosts = HostsBlock()
        self._pending_fps: set[str] = set(self._manual)
        self._bulk = False

    def change_manual(self, removed: Iterable[ManualLine], added: Iterable[ManualLine],
                      manual: Iterable[ManualLine]) -> None:
        """Admin lines edited in one place: `removed` (old lines, one contiguous run) gave
        way to `added`; `manual` is every line now (read only for a key that also has lines
        outside the edit, which is rare). Rendered by the next update."""
        removed, added = list(removed), list(added)
        gone = set(removed)  # the very lines the engine holds (lines compare by identity)
        by_fp: dict[str, list[ManualLine]] = {}
        for line in added:
            by_fp.setdefault(line.key.fingerprint, []).append(line)
        fps = {line.key.fingerprint for line in removed} | set(by_fp)
        for fp in fps:
            kept = [line for line in self._manual.get(fp, ()) if line not in gone]
            new = by_fp.get(fp, [])
            if kept and new:  # where the new lines go among the kept ones: ask the whole list
                lines = [line for line in manual if line.key.fingerprint == fp]
            else:
                lines = kept or new
            if lines:
                self._manual[fp] = lines
            else:
                self._manual.pop(fp, None)
            if lines and _is_scoped(lines):
                self._scoped.add(fp)
            else:
                self._scoped.discard(fp)
        if self._scope is not None and self._scoped and self._scope_stale:
            self._scope = self._current_scope()
            self._scope_stale = False
            fps |= self._scoped
        self._pending_fps |= fps

    def manual_lines(self, fingerprint: str) -> list[ManualLine]:
        return self._manual.get(fingerprint, [])

    def manual_fingerprints(self) -> list[str]:
        return list(self._manual)

    def owners_in_flight(self) -> Mapping[str, tuple[Owner, ...]]:
        """Fingerprint -> its owners before the last update changed them (from any thread:
        noted before each change), until forget_owners_before."""
        return self._owners_before

    def forget_owners_before(self) -> None:
        """The last update is written: its owners are the owners now."""
        self._owners_before = {}

    def update(self, changed: dict[str, ServedTarget | None]) -> Rendered:
        """Apply changed targets (None, or no keys: not served) and render."""
        fps = self._pending_fps
        self._pending_fps = set()
        self._owners_before = {}
        rows_changed = False
        touched: list[tuple[str, str]] = []  # order keys of the hosts rows added, moved or gone
        # Many changes (a full render, a resync): re-sort once instead of inserting each.
        self._bulk = many(len(changed) + len(fps), len(self._served) + self._keys)
        for tid, item in changed.items():
            old = self._served.get(tid)
            if item is not None and not item.keys:
                item = None
            if not self._bulk:
                self._place(tid, old, item)  # while _served still has `old`: the order's key
            if old is not None:
                if item is None:
                    del self._served[tid]  # else replaced in place (see Reconciler._worlds)
                for key in old.keys:
                    fps.add(key.fingerprint)
                    self._by_fp.discard(key.fingerprint, tid)
            if item is not None:
                self._served[tid] = item
                for key in item.keys:
                    fps.add(key.fingerprint)
                    self._by_fp.add(key.fingerprint, tid)
            if self._bulk:
                rows_changed = True  # every chunk is joined again below
                continue
            if (old is not None and item is not None and old.target.name == item.target.name
                    and old.target.address == item.target.address and old.aliases == item.aliases):
                continue  # the same row in the same place (a new key): nothing to re-join
            row, was = self._row(item), self._row(old)
            if row != was or (row and (old is None or old.target.name != item.target.name)):
                rows_changed = True
                touched += [(t.target.name, tid) for t in (old, item) if t is not None]
        if self._bulk:
            self._regroup()
        if self._scope is not None and changed:
            if self._scoped:
                scope = self._current_scope()
                if scope != self._scope:
                    self._scope = scope
                    fps |= self._scoped
            else:
                self._scope_stale = True
        parts_changed = self._render_shards(fps)
        if rows_changed:
            self._hosts = self._join_hosts(touched)
        shards = dict(self._shards)
        return Rendered(shards=shards, hosts=self._hosts, owners=self._owners,
                        grants=IndexGrants(shards), changed=frozenset(fps),
                        owners_before=self._owners_before, parts_changed=parts_changed)

    def _order_key(self, tid: str) -> tuple[str, str]:
        return self._served[tid].target.name, tid

    def _place(self, tid: str, old: ServedTarget | None, new: ServedTarget | None) -> None:
        """Keep the groups in order; untouched when the name stays."""
        if old is not None and new is not None and old.target.name == new.target.name:
            return
        if old is not None:
            at = (old.target.name, tid)
            group = self._groups[bisect.bisect_right(self._bounds, at)]
            del group[bisect.bisect_left(group, at, key=self._order_key)]
        if new is not None:
            at = (new.target.name, tid)
            group = self._groups[bisect.bisect_right(self._bounds, at)]
            group.insert(bisect.bisect_left(group, at, key=self._order_key), tid)

    def _regroup(self) -> None:
        """Every served target sorted again and grouped, every group's rows joined."""
        order, size = sorted(self._served, key=self._order_key), HOSTS_CHUNK
        self._groups = [order[at:at + size] for at in range(0, len(order), size)] or [[]]
        self._bounds = [self._order_key(group[0]) for group in self._groups[1:]]
        self._chunks = [self._rows_text(group) for group in self._groups]

    def _join_hosts(self, touched: Iterable[tuple[str, str]]) -> HostsBlock:
        """The hosts block, re-joining only the groups that hold a `touched` order key."""
        groups, bounds, chunks, size = self._groups, self._bounds, self._chunks, HOSTS_CHUNK
        # From the last group down: a split or a removal changes the indexes after it only.
        for i in sorted({bisect.bisect_right(bounds, k) for k in touched}, reverse=True):
            ids = groups[i]
            if len(ids) > 2 * size:  # grown by inserts: split
                parts = [ids[at:at + size] for at in range(0, len(ids), size)]
                groups[i:i + 1] = parts
                bounds[i:i] = [self._order_key(part[0]) for part in parts[1:]]
                chunks[i:i + 1] = [self._rows_text(part) for part in parts]
            elif not ids and i:  # emptied: its keys fall to the group before it again
                del groups[i], bounds[i - 1], chunks[i]
            else:
                chunks[i] = self._rows_text(ids)
        return HostsBlock(tuple(chunks))

    def _row(self, item: ServedTarget | None) -> str:
        """A served target's hosts row: made again when its chunk is joined, not kept (a
        pure function of the target and the names pinned elsewhere, fixed until reset)."""
        return hosts_row(item, set(), self.pinned_elsewhere) if item is not None else ""

    def _rows_text(self, ids: Iterable[str]) -> bytes:
        served, row_of = self._served, self._row
        return _rows_bytes(row for row in (row_of(served[tid]) for tid in ids) if row)

    def _current_scope(self) -> list[str]:
        return permitopen_options(dict.fromkeys(
            a for group in self._groups for tid in group for a in self._served[tid].aliases), self.ports)

    def _render_shards(self, fps: set[str]) -> dict[str, tuple[str, str]]:
        """Re-render the lines of `fps` and splice them into their shards, a shard at a time
        (a full render at 100k keys never holds every key's lines twice); returns (before,
        after) of each fingerprint that had lines which changed."""
        by_shard: dict[str, list[str]] = {}
        for fp in fps:
            by_shard.setdefault(index_shard(fp), []).append(fp)
        changed: dict[str, tuple[str, str]] = {}
        for name, group in by_shard.items():
            parts = {fp: self._render_fp(fp) for fp in group}
            self._shards[name], before = splice(self._shards[name], parts)
            for fp, old in before.items():
                new = parts[fp]
                self._keys += bool(new) - bool(old)
                if old and old != new:
                    changed[fp] = (old, new)
        return changed

    def _render_fp(self, fp: str) -> str:
        """Every line of one fingerprint, rendered again as render() would ("": none)."""
        if fp not in self._owners_before and fp in self._owners:
            self._owners_before[fp] = self._owners[fp]
        tids = self._by_fp.get(fp)
        if len(tids) == 1 and not self._manual.get(fp):
            line = self._render_one(fp, self._served[tids[0]])
            if line is not None:
                return line
        items = sorted((self._served[tid] for tid in tids),
                       key=lambda s: (s.target.name, s.target.id))
        grants = [g for g in discovered_grants(items, self.ports) if g.key.fingerprint == fp]
        manual = self._manual.get(fp, [])
        grants += manual_grants(manual, self._scope)
        if not grants:
            self._owners.pop(fp, None)
            return ""
        lines = [line for _, line in sorted((not _conditions(g), g.line()) for g in merge_grants(grants))]
        names: set[Owner] = {item.target.name for item in items if item.aliases}
        names.update(manual)
        if names:
            self._owners[fp] = owners_sorted(names)
        else:
            self._owners.pop(fp, None)
        return "".join(f"{fp} {line}\n" for line in lines)

    def _render_one(self, fp: str, item: ServedTarget) -> str | None:
        """The lines of a key that one target holds once and no admin line names, as the
        general path renders them, without its grouping and merging (most keys under churn;
        None: not such a key)."""
        keys = [key for key in item.keys if key.fingerprint == fp]
        if len(keys) != 1:
            return None
        if not item.aliases:
            self._owners.pop(fp, None)
            return ""
        self._owners[fp] = (item.target.name,)
        grant = Grant(keys[0], permitopen_options(dict.fromkeys(item.aliases), self.ports),
                      names=[item.target.name])
        return f"{fp} {grant.line()}\n"


def _is_scoped(lines: Iterable[ManualLine]) -> bool:
    return any(not _has_permitopen(m.options) for m in lines)


def changed_span(old: Sequence, new: Sequence) -> tuple[int, int, int]:
    """(start, old_end, new_end): `old[start:old_end]` became `new[start:new_end]` and the
    rest is equal. Slices are compared in C (an object is equal to itself at once), halving
    the span each step: a one-line edit of 100k lines costs no Python work per line."""
    limit = min(len(old), len(new))
    lo, hi = 0, limit  # the common prefix is at least lo, at most hi long
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if old[lo:mid] == new[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    start = lo
    lo, hi = 0, limit - start  # the same for the common suffix, never overlapping the prefix
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if old[len(old) - mid:len(old) - lo] == new[len(new) - mid:len(new) - lo]:
            lo = mid
        else:
            hi = mid - 1
    return start, len(old) - lo, len(new) - lo


def _has_permitopen(options: Iterable[str]) -> bool:
    return any(o.startswith("permitopen=") for o in options)


def splice_hosts_block(hosts: str, block: str) -> str:
    """Replace (or append) the managed block in a hosts file, keeping every other line."""
    lines = hosts.splitlines(keepends=True)
    out: list[str] = []
    inside = False
    for line in lines:
        stripped = line.rstrip("\n")
        if stripped == HOSTS_BEGIN:
            inside = True
            continue
        if stripped == HOSTS_END and inside:
            inside = False
            continue
        if not inside:
            out.append(line)
    if out and not out[-1].endswith("\n"):
        out[-1] += "\n"
    return "".join(out) + block


def unmanaged_hosts_entries(hosts: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`(address, names)` of every hosts-file line outside the managed block (comments and
    blank lines skipped): names that already resolve before the block is read."""
    entries = []
    inside = False
    for line in hosts.splitlines():
        if line == HOSTS_BEGIN:
            inside = True
            continue
        if line == HOSTS_END and inside:
            inside = False
            continue
        fields = line.split("#", 1)[0].split()
        if not inside and len(fields) >= 2:
            entries.append((fields[0], tuple(fields[1:])))
    return tuple(entries)
