"""watcher.targets: which targets are served and which aliases each one is granted."""

from __future__ import annotations

import itertools

import pytest
from dataclasses import replace

from watcher.config import Settings, load_settings
from watcher.model import ManualLine, PublicKey, Target
from watcher.targets import (
    AliasBook,
    AliasPlan,
    GrantedNames,
    ProxyIdentity,
    Reservation,
    ReservedNames,
    alias_problem,
    container_reservations,
    fold,
    hosts_file_reservations,
    is_permitted,
    permitopen_hosts,
    permitopen_reservations,
    proxy_reservations,
    resolve_aliases,
    valid_name,
)

PROXY = ProxyIdentity(names=frozenset({"ssh-proxy", "0123456789ab", "proxy-host"}),
                      addresses=frozenset({"172.18.0.2"}), container_id="0123456789ab" + "c" * 52)


def target(name: str, idc: str, address: str = "", hostname: str = "",
           aliases: tuple[str, ...] = (), labels: dict[str, str] | None = None,
           started_at: str = "") -> Target:
    return Target(id=idc * 64, name=name, address=address, hostname=hostname, aliases=aliases,
                  labels=tuple(sorted((labels or {}).items())), started_at=started_at)


def settings(**env: str) -> Settings:
    return load_settings(env)


# --- is_permitted -----------------------------------------------------------------------

def test_everything_permitted_by_default() -> None:
    assert is_permitted(target("anything", "a"), Settings()) == ""


@pytest.mark.parametrize("patterns, name, permitted", [
    ("workspace-*", "workspace-1", True),
    ("workspace-*", "workspace-", True),
    ("workspace-*", "my-workspace-1", False),
    ("workspace-*", "Workspace-1", False),  # case-sensitive
    ("db-?", "db-1", True),
    ("db-?", "db-10", False),
    ("db-[0-9]", "db-7", True),
    ("db-[0-9]", "db-x", False),
    ("db-[!0-9]", "db-x", True),
    ("db-1", "db-1", True),
    ("db-1", "db-12", False),
    ("db-1,web-*", "web-a", True),
    ("db-1,web-*", "db-1", True),
    ("db-1,web-*", "cache", False),
])
def test_host_globs(patterns: str, name: str, permitted: bool) -> None:
    reason = is_permitted(target(name, "a"), settings(SSH_PERMIT_TARGET_HOST=patterns))
    if permitted:
        assert reason == ""
    else:
        assert reason == f"name does not match SSH_PERMIT_TARGET_HOST={patterns}"


def test_labels_equal_present_missing_wrong() -> None:
    conf = settings(SSH_TARGET_LABELS="ssh-proxy=on,team")
    assert is_permitted(target("t", "a", labels={"ssh-proxy": "on", "team": "x"}), conf) == ""
    assert is_permitted(target("t", "a", labels={"ssh-proxy": "on", "team": ""}), conf) == ""
    assert is_permitted(target("t", "a", labels={"ssh-proxy": "on", "team": "x", "o": "1"}),
                        conf) == ""
    assert (is_permitted(target("t", "a", labels={"ssh-proxy": "on"}), conf)
            == "label 'team' missing (SSH_TARGET_LABELS)")
    assert (is_permitted(target("t", "a", labels={"team": "x"}), conf)
            == "label 'ssh-proxy' missing (SSH_TARGET_LABELS)")
    assert (is_permitted(target("t", "a", labels={"ssh-proxy": "off", "team": "x"}), conf)
            == "label ssh-proxy='off' is not 'on' (SSH_TARGET_LABELS)")
    assert (is_permitted(target("t", "a", labels={"ssh-proxy": "", "team": "x"}), conf)
            == "label ssh-proxy='' is not 'on' (SSH_TARGET_LABELS)")


def test_label_equal_to_empty_value() -> None:
    conf = settings(SSH_TARGET_LABELS="k=")
    assert is_permitted(target("t", "a", labels={"k": ""}), conf) == ""
    assert "is not ''" in is_permitted(target("t", "a", labels={"k": "v"}), conf)


def test_host_checked_before_labels() -> None:
    conf = settings(SSH_PERMIT_TARGET_HOST="db-*", SSH_TARGET_LABELS="x")
    assert is_permitted(target("web", "a"), conf).startswith("name does not match")
    assert is_permitted(target("db-1", "a"), conf) == "label 'x' missing (SSH_TARGET_LABELS)"
    assert is_permitted(target("db-1", "a", labels={"x": "anything"}), conf) == ""


# --- alias_problem --------------------------------------------------------------------

@pytest.mark.parametrize("alias", ["web", "web-1", "web_1", "db.internal", "a", "A1",
                                   "10.0.0.5", "172.18.0.3", "x" * 63, "1.2.3.4"])
def test_good_aliases(alias: str) -> None:
    assert alias_problem(alias, PROXY) == ""


@pytest.mark.parametrize("alias", ["127.0.0.1", "127.1.2.3", "0.0.0.0", "::1", "::",
                                   "224.0.0.1", "169.254.1.1", "fe80::1"])
def test_special_addresses(alias: str) -> None:
    assert alias_problem(alias, PROXY) == "loopback, unspecified, multicast or link-local address"


@pytest.mark.parametrize("alias", ["2001:db8::1", "fd00::5", "::ffff:10.0.0.1"])
def test_ipv6_not_granted(alias: str) -> None:
    assert alias_problem(alias, PROXY) == \
        "IPv6 addresses are not granted (containers here have IPv4 only)"


@pytest.mark.parametrize("alias", ["localhost", "LOCALHOST", "LocalHost", "localhost.localdomain",
                                   "ip6-localhost", "ip6-loopback", "localhost4", "localhost6",
                                   "foo.localhost", "a.b.LOCALHOST"])
def test_loopback_names(alias: str) -> None:
    assert alias_problem(alias, PROXY) == "loopback name"


@pytest.mark.parametrize("alias", ["ssh-proxy", "SSH-PROXY", "0123456789ab", "proxy-host"])
def test_proxy_names(alias: str) -> None:
    assert alias_problem(alias, PROXY) == "name of the proxy itself"


def test_proxy_address() -> None:
    assert alias_problem("172.18.0.2", PROXY) == "address of the proxy itself"
    assert alias_problem("172.18.0.2", ProxyIdentity()) == ""


@pytest.mark.parametrize("alias", ["", "a b", "a'b", 'a"b', "a:b", "db:22", "-web", "web-",
                                   "web.", ".web", "a/b", "a,b", "a\nb", "a=b", "x" * 254,
                                   "wéb", "[::1]", "a\tb", "a*"])
def test_invalid_names(alias: str) -> None:
    assert alias_problem(alias, PROXY) == "not a valid host name"


@pytest.mark.parametrize("alias", ["1.2.3", "1", "123", "1.2.3.4.5", "127.1", "010.0.0.1",
                                   "256.1.1.1", "2130706433"])
def test_digits_only_that_is_not_an_address(alias: str) -> None:
    assert alias_problem(alias, PROXY) == "looks like an address but is not one"


# Regression: glibc parses these inet_aton forms as 127.0.0.1 before reading /etc/hosts.
@pytest.mark.parametrize("alias", ["0x7f000001", "0x7f.0.0.1", "0x7F.1", "0xa.0x1"])
def test_hex_inet_aton_forms_are_refused(alias: str) -> None:
    assert alias_problem(alias, PROXY) == "looks like an address but is not one"


# --- resolve_aliases ------------------------------------------------------------------

def test_name_id_ip_and_soft_aliases_granted() -> None:
    t = replace(target("web", "a", address="172.18.0.5", hostname="webhost",
                       aliases=("web-alias",)), addresses=("10.1.0.5",))
    plan = resolve_aliases([t], PROXY)
    assert plan.aliases == {t.id: ("web", "aaaaaaaaaaaa", "172.18.0.5", "10.1.0.5", "web-alias",
                                   "webhost")}
    assert plan.refused == ()


@pytest.mark.parametrize("field", ["hostname", "aliases"])
def test_ip_shaped_soft_alias_never_granted(field: str) -> None:
    # A hostname or network alias spelled as an address (of a non-target, of the gateway)
    # would open that address: only the engine-reported own IPs are granted.
    value = "172.17.0.4" if field == "hostname" else ("172.17.0.4",)
    t = replace(target("evil", "a", address="172.18.0.5"), **{field: value})
    plan = resolve_aliases([t], PROXY)
    assert plan.aliases[t.id] == ("evil", "aaaaaaaaaaaa", "172.18.0.5")
    assert plan.refused == (("evil", "172.17.0.4", "an address that is not the target's own"),)


def test_alias_book_keeps_refusals_only_for_targets_that_have_some() -> None:
    # At 100k targets an entry per target (nearly all without a refusal) was a 4 MB table.
    owner = target("db", "a", address="172.18.0.5")
    borrower = target("evil", "b", address="172.18.0.6", hostname="db")
    book = AliasBook(PROXY)
    book.update({owner.id: owner, borrower.id: borrower})
    assert book.refused == {borrower.id: (("evil", "db", "belongs to target db"),)}
    assert book.plan().refused == (("evil", "db", "belongs to target db"),)
    book.update({borrower.id: replace(borrower, hostname="")})  # it no longer asks for "db"
    assert book.refused == {}
    assert book.plan() == resolve_aliases([owner, replace(borrower, hostname="")], PROXY)


def test_granted_names_reads_who_each_name_is_granted_to_from_the_book() -> None:
    owner = target("DB", "a", address="172.18.0.5", aliases=("db-alias",))
    borrower = target("evil", "b", address="172.18.0.6", hostname="db")  # asks for the owner's name
    book = AliasBook(PROXY)
    book.update({owner.id: owner, borrower.id: borrower})
    names = GrantedNames(book)
    assert dict(names) == {fold(a): tid for tid, aliases in book.aliases.items() for a in aliases}
    assert names["db"] == names.get("db") == owner.id  # folded: the resolver ignores case
    assert names.get("db-alias") == owner.id and names.get("evil") == borrower.id
    assert "db" in names and "nobody" not in names and 5 not in names
    assert names.get("nobody") is None and names.get("nobody", "-") == "-"
    with pytest.raises(KeyError):
        names["nobody"]
    book.update({owner.id: None})  # gone: its names with it; the name it held is free now
    assert names.get("db") == borrower.id
    assert names.get("db-alias") is None and len(names) == sum(map(len, book.aliases.values()))


def test_target_without_address() -> None:
    t = target("web", "a")
    assert resolve_aliases([t], PROXY).aliases == {t.id: ("web", "aaaaaaaaaaaa")}


def test_duplicate_alias_of_one_target_listed_once() -> None:
    t = target("web", "a", address="172.18.0.5", hostname="web", aliases=("web", "x", "x"))
    plan = resolve_aliases([t], PROXY)
    assert plan.aliases[t.id] == ("web", "aaaaaaaaaaaa", "172.18.0.5", "x")
    assert plan.refused == ()


def test_hostname_equal_to_other_targets_name() -> None:
    owner = target("db", "a", address="172.18.0.5")
    borrower = target("evil", "b", address="172.18.0.6", hostname="db")
    plan = resolve_aliases([owner, borrower], PROXY)
    assert plan.aliases[owner.id] == ("db", "aaaaaaaaaaaa", "172.18.0.5")
    assert plan.aliases[borrower.id] == ("evil", "bbbbbbbbbbbb", "172.18.0.6")
    assert plan.refused == (("evil", "db", "belongs to target db"),)


def test_network_alias_equal_to_other_targets_name_or_address() -> None:
    owner = target("db", "a", address="172.18.0.5")
    borrower = target("zz", "b", address="172.18.0.6", aliases=("db", "aaaaaaaaaaaa"))
    plan = resolve_aliases([owner, borrower], PROXY)
    assert plan.aliases[owner.id] == ("db", "aaaaaaaaaaaa", "172.18.0.5")
    assert plan.aliases[borrower.id] == ("zz", "bbbbbbbbbbbb", "172.18.0.6")
    assert set(plan.refused) == {("zz", "db", "belongs to target db"),
                                 ("zz", "aaaaaaaaaaaa", "belongs to target db")}


def test_shared_network_alias_refused_for_both() -> None:
    one = target("one", "a", address="172.18.0.5", aliases=("shared", "own1"))
    two = target("two", "b", address="172.18.0.6", aliases=("shared", "own2"))
    plan = resolve_aliases([one, two], PROXY)
    assert plan.aliases[one.id] == ("one", "aaaaaaaaaaaa", "172.18.0.5", "own1")
    assert plan.aliases[two.id] == ("two", "bbbbbbbbbbbb", "172.18.0.6", "own2")
    assert plan.refused == (("one", "shared", "also claimed by two"),
                            ("two", "shared", "also claimed by one"))


def test_shared_hostname_refused_for_all_three() -> None:
    ts = [target(n, c, address=f"172.18.0.{i}", hostname="app")
          for i, (n, c) in enumerate([("a1", "a"), ("a2", "b"), ("a3", "c")], start=5)]
    plan = resolve_aliases(ts, PROXY)
    for t in ts:
        assert "app" not in plan.aliases[t.id]
    assert plan.refused == (("a1", "app", "also claimed by a2, a3"),
                            ("a2", "app", "also claimed by a1, a3"),
                            ("a3", "app", "also claimed by a1, a2"))


def test_bad_aliases_refused_with_reason() -> None:
    t = target("web", "a", address="172.18.0.5", hostname="localhost",
               aliases=("127.0.0.1", "ssh-proxy", "a b", "1.2.3", "2001:db8::1", "172.18.0.2"))
    plan = resolve_aliases([t], PROXY)
    assert plan.aliases[t.id] == ("web", "aaaaaaaaaaaa", "172.18.0.5")
    assert plan.refused == (
        ("web", "127.0.0.1", "loopback, unspecified, multicast or link-local address"),
        ("web", "ssh-proxy", "name of the proxy itself"),
        ("web", "a b", "not a valid host name"),
        ("web", "1.2.3", "looks like an address but is not one"),
        ("web", "2001:db8::1", "IPv6 addresses are not granted (containers here have IPv4 only)"),
        ("web", "172.18.0.2", "address of the proxy itself"),
        ("web", "localhost", "loopback name"),
    )


def test_target_named_like_the_proxy_gets_no_name() -> None:
    t = target("ssh-proxy", "a", address="172.18.0.5")
    plan = resolve_aliases([t], PROXY)
    assert plan.aliases[t.id] == ("aaaaaaaaaaaa", "172.18.0.5")
    assert plan.refused == (("ssh-proxy", "ssh-proxy", "name of the proxy itself"),)


def test_without_pin_names_soft_aliases_refused() -> None:
    t = replace(target("web", "a", address="172.18.0.5", hostname="webhost",
                       aliases=("web-alias",)), addresses=("10.1.0.5",))
    plan = resolve_aliases([t], PROXY, pin_names=False)
    assert plan.aliases[t.id] == ("web", "aaaaaaaaaaaa", "172.18.0.5", "10.1.0.5")
    reason = "hosts file not writable: only names that resolve by themselves"
    assert plan.refused == (("web", "web-alias", reason), ("web", "webhost", reason))


def test_resolution_is_deterministic_regardless_of_order() -> None:
    ts = [
        target("db", "a", address="172.18.0.5", hostname="db-host", aliases=("shared",)),
        target("evil", "b", address="172.18.0.6", hostname="db", aliases=("shared", "e1")),
        target("web", "c", address="172.18.0.7", hostname="web-host", aliases=("w1",)),
        target("cache", "d", address="172.18.0.8", aliases=("db-host",)),
    ]
    expected = resolve_aliases(ts, PROXY)
    assert expected.aliases[ts[0].id] == ("db", "aaaaaaaaaaaa", "172.18.0.5")
    assert expected.aliases[ts[3].id] == ("cache", "dddddddddddd", "172.18.0.8")
    for order in itertools.permutations(ts):
        plan = resolve_aliases(list(order), PROXY)
        assert plan == expected
        assert list(plan.aliases.items()) == list(expected.aliases.items())
        assert plan.refused == expected.refused


def test_accepts_any_iterable_and_empty() -> None:
    assert resolve_aliases(iter([]), PROXY) == AliasPlan(aliases={}, refused=())
    t = target("web", "a")
    assert resolve_aliases((x for x in [t]), PROXY).aliases == {t.id: ("web", "aaaaaaaaaaaa")}


def test_ip_alias_equal_to_other_targets_address_not_granted() -> None:
    # Two targets whose engine-reported IPs collide (overlapping subnets on two networks).
    borrower = replace(target("aaa", "a", address="10.0.0.2"), addresses=("10.0.0.9",))
    owner = target("bbb", "b", address="10.0.0.9")
    plan = resolve_aliases([borrower, owner], ProxyIdentity())
    # A contested authoritative alias is refused for every claimant (regression: it used to
    # go to the target whose name sorts first, here the borrower).
    assert plan.aliases[borrower.id] == ("aaa", "aaaaaaaaaaaa", "10.0.0.2")
    assert plan.aliases[owner.id] == ("bbb", "bbbbbbbbbbbb")
    assert plan.refused == (("aaa", "10.0.0.9", "also claimed by bbb"),
                            ("bbb", "10.0.0.9", "also claimed by aaa"))


def test_soft_alias_of_target_without_address_not_granted() -> None:
    t = Target(id="e" * 64, name="hostnet", address="", hostname="intranet.corp",
               aliases=("net-alias",))
    plan = resolve_aliases([t], ProxyIdentity(), pin_names=True)
    assert "intranet.corp" not in plan.aliases[t.id]
    assert "net-alias" not in plan.aliases[t.id]


# --- issue 15.2: validation by full match; no whitespace or control character, ever -----

@pytest.mark.parametrize("alias", [
    "victim\n", "victim\r", "victim\r\n", "\nvictim", "vic\ntim", "victim\x00", "victim\x0b",
    "victim\x0c", "victim\x1b", "victim\x7f", "victim\x85", "victim\u2028", " victim", "victim ",
    "victim\t", "vic tim", "victim\u00a0", "x" * 253 + "\n", "ｖｉｃｔｉｍ",
])
def test_names_with_whitespace_or_control_characters_refused(alias: str) -> None:
    assert not valid_name(alias)
    assert alias_problem(alias, PROXY) == "not a valid host name"


def test_longest_name_is_253_characters_exactly() -> None:
    assert valid_name("x" * 253)
    assert not valid_name("x" * 254)
    assert not valid_name("x" * 252 + "\n")


@pytest.mark.parametrize("field", ["hostname", "aliases"])
def test_trailing_newline_alias_refused_and_victim_keeps_its_name(field: str) -> None:
    victim = target("victim", "a", address="172.18.0.5")
    value = "victim\n" if field == "hostname" else ("victim\n",)
    evil = replace(target("evil", "b", address="172.18.0.6"), **{field: value})
    plan = resolve_aliases([victim, evil], PROXY)
    assert plan.aliases[victim.id] == ("victim", "aaaaaaaaaaaa", "172.18.0.5")
    assert plan.aliases[evil.id] == ("evil", "bbbbbbbbbbbb", "172.18.0.6")
    assert plan.refused == (("evil", "victim\n", "not a valid host name"),)


@pytest.mark.parametrize("name", ["web\n", "web\nssh-ed25519 AAAA", "web x", "web\t", ""])
def test_target_with_an_invalid_name_is_granted_nothing(name: str) -> None:
    t = target(name, "a", address="172.18.0.5", hostname="fine")
    plan = resolve_aliases([t], PROXY)
    assert plan.aliases[t.id] == ()
    assert {r for _, _, r in plan.refused} == {"the target's own name is not a valid host name"}


# --- issue 15.1: names compare case-insensitively ---------------------------------------

@pytest.mark.parametrize("spelling", ["WS-A", "Ws-A", "ws-A", "WS-a"])
@pytest.mark.parametrize("field", ["hostname", "aliases"])
def test_soft_name_differing_only_in_case_from_a_target_name(spelling: str, field: str) -> None:
    victim = target("ws-a", "b", address="172.18.0.5")
    value = spelling if field == "hostname" else (spelling,)
    imp = replace(target("imp", "a", address="172.18.0.6"), **{field: value})
    for order in ([victim, imp], [imp, victim]):
        plan = resolve_aliases(order, PROXY)
        assert plan.aliases[victim.id] == ("ws-a", "bbbbbbbbbbbb", "172.18.0.5")
        assert plan.aliases[imp.id] == ("imp", "aaaaaaaaaaaa", "172.18.0.6")
        assert plan.refused == (("imp", spelling, "belongs to target ws-a"),)


def test_soft_name_differing_only_in_case_from_a_short_id() -> None:
    owner = target("db", "a", address="172.18.0.5")
    imp = target("imp", "b", address="172.18.0.6", aliases=("AAAAAAAAAAAA",))
    plan = resolve_aliases([owner, imp], PROXY)
    assert plan.aliases[owner.id] == ("db", "aaaaaaaaaaaa", "172.18.0.5")
    assert plan.refused == (("imp", "AAAAAAAAAAAA", "belongs to target db"),)


def test_container_names_differing_only_in_case_are_ambiguous_for_both() -> None:
    lower = target("ws-a", "a", address="172.18.0.5")
    upper = target("WS-A", "b", address="172.18.0.6")
    third = target("other", "c", address="172.18.0.7", hostname="Ws-a")
    expected = None
    for order in itertools.permutations([lower, upper, third]):
        plan = resolve_aliases(list(order), PROXY)
        assert plan.aliases[lower.id] == ("aaaaaaaaaaaa", "172.18.0.5")
        assert plan.aliases[upper.id] == ("bbbbbbbbbbbb", "172.18.0.6")
        assert plan.aliases[third.id] == ("other", "cccccccccccc", "172.18.0.7")
        assert set(plan.refused) == {
            ("WS-A", "WS-A", "ambiguous: target ws-a has the same name but for case"),
            ("ws-a", "ws-a", "ambiguous: target WS-A has the same name but for case"),
            ("other", "Ws-a", "belongs to target WS-A, ws-a"),
        }
        expected = expected or plan
        assert plan == expected


def test_soft_names_differing_only_in_case_refused_for_both() -> None:
    one = target("one", "a", address="172.18.0.5", hostname="box")
    two = target("two", "b", address="172.18.0.6", aliases=("BOX",))
    plan = resolve_aliases([one, two], PROXY)
    assert plan.aliases[one.id] == ("one", "aaaaaaaaaaaa", "172.18.0.5")
    assert plan.aliases[two.id] == ("two", "bbbbbbbbbbbb", "172.18.0.6")
    assert plan.refused == (("one", "box", "also claimed by two"),
                            ("two", "BOX", "also claimed by one"))


def test_own_name_in_another_case_is_granted_once() -> None:
    t = target("web", "a", address="172.18.0.5", hostname="WEB", aliases=("Web", "AAAAAAAAAAAA"))
    plan = resolve_aliases([t], PROXY)
    assert plan.aliases[t.id] == ("web", "aaaaaaaaaaaa", "172.18.0.5")
    assert plan.refused == ()


def test_fold() -> None:
    assert fold("WS-A.Example") == "ws-a.example"
    already = "ws-a.example"
    assert fold(already) is already  # tables keyed by folded names share the target's string
    # Not ASCII: only the ASCII letters fold (the resolver's rule), whatever str.lower does.
    assert fold("\u212aEY-\u00c9") == "\u212aey-\u00c9"
    assert fold("\u0130X") == "\u0130x"  # str.lower would give "i\u0307x"


# --- issue 15.3: names seen elsewhere (ReservedNames) -----------------------------------

def outsider(name: str, idc: str, address: str = "172.18.0.50", hostname: str = "",
             aliases: tuple[str, ...] = ()) -> Target:
    return target(name, idc, address=address, hostname=hostname, aliases=aliases)


def test_reserved_names_fold_and_keep_every_distinct_reason() -> None:
    r1, r2 = Reservation("one"), Reservation("two", hard=True)
    names = ReservedNames.of([("DB-1", r1), ("db-1", r2), ("Db-1", r1)])
    assert names.entries == {"db-1": (r1, r2)}
    t = target("web", "a", address="172.18.0.5")
    assert names.conflict("dB-1", t, authoritative=False) == "one"
    assert names.conflict("db-1", t, authoritative=True) == "two"
    assert names.conflict("db-2", t, authoritative=False) == ""
    assert ReservedNames().conflict("db-1", t, authoritative=True) == ""


def test_non_served_containers_name_refused_to_a_soft_claim() -> None:
    t = target("web", "a", address="172.18.0.5", hostname="db-1", aliases=("DB-1.internal",))
    other = outsider("db-1", "f", hostname="db-host", aliases=("db-1.internal",))
    plan = resolve_aliases([t], PROXY, reserved=ReservedNames.of(container_reservations([other])))
    assert plan.aliases[t.id] == ("web", "aaaaaaaaaaaa", "172.18.0.5")
    assert plan.refused == (
        ("web", "DB-1.internal", "network alias of container db-1, which is not served"),
        ("web", "db-1", "name of container db-1, which is not served"),
    )


def test_non_served_containers_name_in_another_case_takes_a_targets_name() -> None:
    # Docker allows container names that differ only in case: neither may be pinned.
    t = target("ws-a", "a", address="172.18.0.5")
    other = outsider("WS-A", "f")
    plan = resolve_aliases([t], PROXY, reserved=ReservedNames.of(container_reservations([other])))
    assert plan.aliases[t.id] == ("aaaaaaaaaaaa", "172.18.0.5")
    assert plan.refused == (("ws-a", "ws-a", "name of container WS-A, which is not served"),)


def test_non_served_containers_soft_names_do_not_take_a_targets_own_name() -> None:
    t = target("web", "a", address="172.18.0.5")
    other = outsider("db", "f", hostname="WEB", aliases=("web",))
    plan = resolve_aliases([t], PROXY, reserved=ReservedNames.of(container_reservations([other])))
    assert plan.aliases[t.id] == ("web", "aaaaaaaaaaaa", "172.18.0.5")
    assert plan.refused == ()


def test_non_served_containers_id_and_address_reserved() -> None:
    other = replace(outsider("db", "f", address="172.18.0.50"), addresses=("10.9.0.50",))
    t = target("web", "a", address="172.18.0.5", aliases=("FFFFFFFFFFFF",))
    reserved = ReservedNames.of(container_reservations([other]))
    plan = resolve_aliases([t], PROXY, reserved=reserved)
    assert plan.refused == (("web", "FFFFFFFFFFFF", "id of container db, which is not served"),)
    for ip in ("172.18.0.50", "10.9.0.50"):
        assert reserved.conflict(ip, t, authoritative=True) == \
            "address of container db, which is not served"


def test_containers_the_proxy_cannot_reach_reserve_nothing() -> None:
    other = outsider("db-1", "f", address="", hostname="db-host")
    assert list(container_reservations([other])) == []


def test_container_reservations_are_sorted() -> None:
    a, b = outsider("a", "1", address="10.0.0.1"), outsider("b", "2", address="10.0.0.2")
    assert list(container_reservations([b, a])) == list(container_reservations([a, b]))


@pytest.mark.parametrize("options, hosts", [
    (('permitopen="db-1:5432"',), ["db-1"]),
    (('permitopen="DB-1:*"', 'permitopen="10.0.0.5:22"'), ["DB-1", "10.0.0.5"]),
    (('permitopen="[2001:db8::1]:22"',), ["2001:db8::1"]),
    (('from="10.0.0.0/8"', "no-pty", 'expiry-time="20300101"'), []),
])
def test_permitopen_hosts(options: tuple[str, ...], hosts: list[str]) -> None:
    assert list(permitopen_hosts(options)) == hosts


def _manual(origin: str, *options: str) -> ManualLine:
    return ManualLine.at(origin, options, PublicKey("ssh-ed25519", "AAAA", "", "SHA256:x", 256))


def test_admin_permitopen_host_refused_as_a_soft_name_only() -> None:
    admin = _manual("/etc/ssh/authorized_keys.d/admin.pub:3", 'permitopen="DB-1:5432"',
                    'permitopen="web:22"')
    t = target("web", "a", address="172.18.0.5", hostname="db-1")
    plan = resolve_aliases([t], PROXY, reserved=ReservedNames.of(permitopen_reservations([admin])))
    # The target's own name stays: an admin key that opens a target by name is the usual case.
    assert plan.aliases[t.id] == ("web", "aaaaaaaaaaaa", "172.18.0.5")
    assert plan.refused == (
        ("web", "db-1", "host of a permitopen in /etc/ssh/authorized_keys.d/admin.pub:3"),)


HOSTS = (("127.0.0.1", ("localhost",)), ("172.18.0.2", ("proxy.example.org", "proxy")),
         ("10.0.0.5", ("DB-1", "db-1.corp")), ("10.0.0.6", ("db-1",)),
         ("172.18.0.5", ("linked",)))


def test_hosts_file_names_refused_to_soft_and_authoritative_claims() -> None:
    reserved = ReservedNames.of(hosts_file_reservations(HOSTS))
    soft = target("web", "a", address="172.18.0.5", hostname="db-1.CORP")
    named = target("db-1", "b", address="172.18.0.6")
    plan = resolve_aliases([soft, named], PROXY, reserved=reserved)
    assert plan.aliases[soft.id] == ("web", "aaaaaaaaaaaa", "172.18.0.5")
    assert plan.aliases[named.id] == ("bbbbbbbbbbbb", "172.18.0.6")
    assert plan.refused == (
        ("db-1", "db-1", "in the hosts file outside the managed block (-> 10.0.0.5, 10.0.0.6)"),
        ("web", "db-1.CORP", "in the hosts file outside the managed block (-> 10.0.0.5)"),
    )


def test_hosts_file_name_that_already_leads_to_the_target_is_no_conflict() -> None:
    # e.g. `docker run --link`: the line maps the name to this very target.
    reserved = ReservedNames.of(hosts_file_reservations(HOSTS))
    owner = target("linked", "a", address="172.18.0.5")
    other = target("other", "b", address="172.18.0.7", aliases=("LINKED",))
    plan = resolve_aliases([owner, other], PROXY, reserved=reserved)
    assert plan.aliases[owner.id] == ("linked", "aaaaaaaaaaaa", "172.18.0.5")
    assert plan.refused == (
        ("other", "LINKED", "in the hosts file outside the managed block (-> 172.18.0.5)"),)


def test_proxy_fqdn_refused() -> None:
    reserved = ReservedNames.of(proxy_reservations(["proxy.example.org", ""]))
    t = target("web", "a", address="172.18.0.5", hostname="Proxy.Example.Org")
    named = target("proxy.example.org", "b", address="172.18.0.6")
    plan = resolve_aliases([t, named], PROXY, reserved=reserved)
    assert plan.refused == (
        ("proxy.example.org", "proxy.example.org", "name of the proxy itself"),
        ("web", "Proxy.Example.Org", "name of the proxy itself"),
    )


def test_every_source_together_is_independent_of_order() -> None:
    ts = [
        target("ws-a", "a", address="172.18.0.5", hostname="db-1"),
        target("imp", "b", address="172.18.0.6", hostname="WS-A", aliases=("adm-db", "free")),
        target("WS-B", "c", address="172.18.0.7", aliases=("proxy.example.org",)),
        target("ws-b", "d", address="172.18.0.8", hostname="linked"),
    ]
    others = [outsider("db-1", "e", address="172.18.0.40"), outsider("x", "f", address="172.18.0.41")]
    reserved = ReservedNames.of(itertools.chain(
        container_reservations(others),
        permitopen_reservations([_manual("admin:1", 'permitopen="adm-db:22"')]),
        hosts_file_reservations(HOSTS),
        proxy_reservations(["proxy.example.org"])))
    expected = resolve_aliases(ts, PROXY, reserved=reserved)
    assert expected.aliases == {
        ts[0].id: ("ws-a", "aaaaaaaaaaaa", "172.18.0.5"),
        ts[1].id: ("imp", "bbbbbbbbbbbb", "172.18.0.6", "free"),
        ts[2].id: ("cccccccccccc", "172.18.0.7"),
        ts[3].id: ("dddddddddddd", "172.18.0.8"),
    }
    for order in itertools.permutations(ts):
        assert resolve_aliases(list(order), PROXY, reserved=reserved) == expected


def test_reserved_names_with_leaves_the_original_unchanged() -> None:
    base = ReservedNames.of([("a", Reservation("first"))])
    more = base.with_([("A", Reservation("second")), ("b", Reservation("third"))])
    assert base.entries == {"a": (Reservation("first"),)}
    assert more.entries == {"a": (Reservation("first"), Reservation("second")),
                            "b": (Reservation("third"),)}


def test_fold_is_ascii_only_as_the_resolver() -> None:
    assert fold("WS-A.Example_1") == "ws-a.example_1"
    assert fold("\u212aey") == "\u212aey"  # Kelvin sign: str.lower() would make it "key"
    other = target("other", "b", address="172.18.0.6", aliases=("\u212aey",))
    t = target("web", "a", address="172.18.0.5", hostname="key")
    assert resolve_aliases([t, other], PROXY).aliases[t.id][-1] == "key"
