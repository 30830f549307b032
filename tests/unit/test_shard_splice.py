"""A key's index lines live only in its shard's text: splicing them, finding them and
reading their grants back from them (watcher/render.py)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from watcher.render import (ANY_DEST, EMPTY_SHARD, IndexGrants, Shard, changed_parts, grant_set,
                            grants_of_parts, index_shard, manual_grants, merge_grants, part_grants, part_of,
                            render, shards_of, splice)

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
    return Shard(text.encode(), text.count("\n")) if text else EMPTY_SHARD


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
