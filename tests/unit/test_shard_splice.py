"""A key's index lines live only in its shard's text: splicing them, finding them and
reading their grants back from them (watcher/render.py)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from watcher.render import (ANY_DEST, EMPTY_SHARD, IndexGrants, Shard, changed_parts, cut_blocks,
                            grant_set, grants_of_parts, index_shard, manual_grants, merge_grants, part_grants,
                            part_of, render, shards_of, splice)

from test_revocation import FROM, KA, KB, make_key, manual, served

# Fingerprints of one shard (same first character), sorted in a way that a prefix of one
# is another: "SHA256:Ab" < "SHA256:Ab0" < "SHA256:Ac".
FPS = ["SHA256:A", "SHA256:Ab", "SHA256:Ab0", "SHA256:Ac", "SHA256:Az", "SHA256:A+"]
PART = st.lists(st.sampled_from(['restrict x', 'restrict,port-forwarding y', 'restrict z c']),
                min_size=0, max_size=3)


def text_of(parts: dict[str, list[str]]) -> str:
    return "".join(f"{fp} {line}\n" for fp in sorted(parts) for line in parts[fp])


def shard_of(parts: dict[str, list[str]]) -> Shard:
    text = text_of(parts)
    return Shard.of(text.encode(), text.count("\n"))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FPS), PART), st.dictionaries(st.sampled_from(FPS), PART))
def test_splice_equals_the_shard_rendered_from_scratch(old: dict, change: dict) -> None:
    old = {fp: lines for fp, lines in old.items() if lines}
    new = {**old, **change}
    new = {fp: lines for fp, lines in new.items() if lines}
    shard, before = splice(shard_of(old), {fp: "".join(f"{fp} {line}\n" for line in lines)
                                           for fp, lines in change.items()})
    assert shard == shard_of(new)
    assert before == {fp: "".join(f"{fp} {line}\n" for line in old.get(fp, [])) for fp in change}
    for fp in FPS:
        assert part_of(shard, fp) == "".join(f"{fp} {line}\n" for line in new.get(fp, []))


def assert_whole_keys_per_block(shard: Shard) -> None:
    """Every block is whole lines and starts a key: no key's lines are in two blocks."""
    fps = [[line.split(b" ", 1)[0] for line in block.split(b"\n")[:-1]] for block in shard.blocks]
    for block, keys in zip(shard.blocks, fps):
        assert keys and block.endswith(b"\n")
        assert keys == sorted(keys)
    for before, after in zip(fps, fps[1:]):
        assert before[-1] < after[0]
    assert shard.firsts == tuple(keys[0] for keys in fps)
    assert shard.lines == sum(map(len, fps))


# 20 keys of one shard, each with 1-3 lines of ~30 bytes: blocks of 40-100 bytes hold one to a
# few keys, so splices cut, merge and drop blocks.
MANY_FPS = [f"SHA256:A{c}" for c in "0123456789abcdefghij"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(MANY_FPS), PART), st.dictionaries(st.sampled_from(MANY_FPS), PART),
       st.sampled_from([1, 40, 100, 200]))
def test_splice_in_small_blocks_equals_the_shard_rendered_from_scratch(old: dict, change: dict,
                                                                       block: int) -> None:
    old = {fp: lines for fp, lines in old.items() if lines}
    new = {fp: lines for fp, lines in {**old, **change}.items() if lines}
    text = text_of(old)
    start = Shard.of(text.encode(), text.count("\n"), block)
    shard, before = splice(start, {fp: "".join(f"{fp} {line}\n" for line in lines)
                                   for fp, lines in change.items()}, block)
    assert shard.data.decode() == text_of(new)
    assert shard == shard_of(new)
    assert_whole_keys_per_block(shard)
    # Emptied or nearly emptied blocks do not pile up: one is merged into the block after it.
    assert all(len(b) >= block // 4 for b in shard.blocks[:-1])
    assert before == {fp: "".join(f"{fp} {line}\n" for line in old.get(fp, [])) for fp in change}
    for fp in MANY_FPS:
        assert part_of(shard, fp) == "".join(f"{fp} {line}\n" for line in new.get(fp, []))
    # Blocks without a changed key are the shard's before, shared (not copied).
    changed = {start.block_of(fp.encode()) for fp in change}
    kept = [b for i, b in enumerate(start.blocks) if i not in changed and i - 1 not in changed]
    assert all(any(b is c for c in shard.blocks) for b in kept)


def test_a_nearly_emptied_block_is_merged_into_the_next() -> None:
    text = "".join(f"{fp} restrict x\n" for fp in MANY_FPS)  # 21 bytes a key
    shard = Shard.of(text.encode(), 20, 100)
    assert [len(b) for b in shard.blocks] == [105, 105, 105, 105]
    gone = {fp: "" for fp in MANY_FPS[1:5]}  # 4 of the first block's 5 keys
    after, _ = splice(shard, gone, 100)
    assert [len(b) for b in after.blocks] == [126, 105, 105]
    assert after.blocks[1:] == shard.blocks[2:] and after.blocks[1] is shard.blocks[2]
    emptied, _ = splice(after, {MANY_FPS[0]: ""} | {fp: "" for fp in MANY_FPS[5:10]}, 100)
    assert emptied.blocks == shard.blocks[2:]


def test_a_block_is_cut_where_a_key_starts() -> None:
    many = "".join(f"SHA256:Ab line-{n}\n" for n in range(5))  # one key, ~110 bytes
    text = f"SHA256:Aa one\n{many}SHA256:Ac two\nSHA256:Ad three\n"
    blocks = cut_blocks(text.encode(), 10)
    assert blocks == [b"SHA256:Aa one\n", many.encode(), b"SHA256:Ac two\n", b"SHA256:Ad three\n"]
    assert cut_blocks(text.encode(), 1000) == [text.encode()]
    assert cut_blocks(b"", 10) == []


def test_shards_are_equal_when_their_bytes_are_however_cut() -> None:
    text = "".join(f"{fp} restrict x\n" for fp in MANY_FPS).encode()
    small, whole = Shard.of(text, 20, 40), Shard.of(text, 20)
    assert len(small.blocks) > 1 and len(whole.blocks) == 1
    assert small == whole and hash(small) == hash(whole)
    assert small != Shard.of(text[:-len(b"SHA256:Aj restrict x\n")], 19)


def test_splice_of_nothing_is_the_same_text() -> None:
    shard = shard_of({"SHA256:Ab": ["restrict x"]})
    assert splice(shard, {}) == (shard, {})
    assert splice(shard, {"SHA256:Ab": ""})[0] is EMPTY_SHARD


def test_changed_parts_names_only_the_keys_whose_lines_differ() -> None:
    one = shards_of([("SHA256:Ab", "restrict x"), ("SHA256:Ac", "restrict y"), ("SHA256:Bq", "restrict z")])
    two = shards_of([("SHA256:Ab", "restrict x"), ("SHA256:Ac", "restrict w"), ("SHA256:Ad", "restrict v")])
    assert changed_parts(one, two) == {
        "SHA256:Ac": ("SHA256:Ac restrict y\n", "SHA256:Ac restrict w\n"),
        "SHA256:Ad": ("", "SHA256:Ad restrict v\n"),
        "SHA256:Bq": ("SHA256:Bq restrict z\n", "")}
    assert changed_parts(one, dict(one)) == {}


def test_grants_of_parts_leave_out_keys_that_had_no_lines() -> None:
    before, after = grants_of_parts({
        "SHA256:Ab": ('SHA256:Ab restrict,port-forwarding,permitopen="web:22" k\n', ""),
        "SHA256:Ad": ("", 'SHA256:Ad restrict,port-forwarding,permitopen="db:22" k\n')})
    assert before == {"SHA256:Ab": frozenset({((), "web:22")})}
    assert after == {"SHA256:Ab": frozenset()}


# Options as admins write them: quoted commas, an escaped quote, flags, several from=.
TRICKY = [(), (FROM,), ('from="10.0.0.0/8,!10.1.0.0/16"', 'permitopen="db:5432"'),
          ('no-agent-forwarding', 'expiry-time="20991231"'), ('permitopen="a:1"', 'permitopen="b:2"'),
          ('environment="A=a\\",b c"',), ('from="192.168.0.0/16"', 'no-pty')]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([KA, KB]), st.sampled_from(TRICKY)), max_size=4),
       st.sampled_from([None, [], ['permitopen="web:22"', 'permitopen="web:80"']]),
       st.booleans())
def test_grants_read_back_from_the_lines_equal_the_grants_rendered(lines: list, scope, with_target: bool) -> None:
    """part_grants(the lines of a key) == grant_set() of the grants they came from, which is
    what render() reports and the revocation diff compared before the lines were kept alone."""
    admin = [manual(key, *options) for key, options in lines]
    targets = [served("web", "1", "172.18.0.11", KA)] if with_target else []
    rendered = render(targets, ("22",), admin, scope_manual=scope is not None)
    for fp, grants in rendered.grants.items():
        assert part_grants(part_of(rendered.shards[index_shard(fp)], fp)) == grants
    assert IndexGrants(rendered.shards) == rendered.grants
    merged = merge_grants(manual_grants(admin, scope))
    for grant in merged:
        own = frozenset().union(*(grant_set(g) for g in merged if g.key == grant.key))
        assert part_grants("".join(f"{grant.key.fingerprint} {g.line()}\n"
                                   for g in merged if g.key == grant.key)) == own


def test_grants_read_back_from_lines_without_tunnels_or_permitopen() -> None:
    assert part_grants("SHA256:x restrict ssh-ed25519 AAAA c\n") == frozenset()
    assert part_grants("SHA256:x restrict,port-forwarding ssh-ed25519 AAAA c\n") == {((), ANY_DEST)}
    assert part_grants('SHA256:x restrict,port-forwarding,from="a,b",permitopen="h:1" ssh-ed25519 AAAA\n') \
        == {(('from="a,b"',), "h:1")}


def test_index_grants_of_an_absent_key_is_a_key_error() -> None:
    grants = IndexGrants(render([served("web", "1", "172.18.0.11", KA)], ("22",)).shards)
    assert list(grants) == [KA.fingerprint] and len(grants) == 1
    assert grants.get(make_key("absent").fingerprint) is None
