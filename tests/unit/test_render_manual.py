"""Manual key lines in the rendered outputs, and the settings that go with manual mode.

- render(..., scope_manual=True) (discovery + admin files): an admin line without its own
  permitopen may open exactly the currently served targets, and nothing without targets.
- render(..., scope_manual=False) (MANUAL_AUTH_FILE=true): lines stay as the admin wrote
  them; sshd_config's PermitOpen is the host check, so SSH_PERMIT_TARGET_HOST must be `*`
  or exact hosts, never a glob.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct

import pytest

from watcher.config import ConfigError, RunMode, Settings, check_manual_mode, load_settings
from watcher.keys import parse_authorized_keys_line
from watcher.model import ManualLine, PublicKey, Target, owner_names
from watcher.render import BASE_OPTIONS, ServedTarget, render, render_manual
from watcher.sshd import permit_open


def make_key(seed: int, comment: str = "") -> PublicKey:
    raw = hashlib.sha256(f"manual-{seed}".encode()).digest()
    blob = b"".join(struct.pack(">I", len(p)) + p for p in (b"ssh-ed25519", raw))
    fp = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return PublicKey("ssh-ed25519", base64.b64encode(blob).decode(), comment, fp, 256)


def served(name: str, address: str, aliases: tuple[str, ...], *keys: PublicKey) -> ServedTarget:
    return ServedTarget(Target(id=name.encode().hex().ljust(64, "0"), name=name, address=address),
                        aliases, tuple(keys))


KA, KB, KM, KN = make_key(1), make_key(2), make_key(10, "admin"), make_key(11, "ops")
WEB = served("web", "172.18.0.5", ("web", "5745422d3030", "172.18.0.5"), KA)
DB = served("db", "172.18.0.6", ("db", "172.18.0.6"), KB)
ALIASES = ("web", "5745422d3030", "172.18.0.5", "db", "172.18.0.6")


def manual(key: PublicKey, *options: str, origin: str = "/etc/ssh/authorized_keys.d/a.pub:1"
           ) -> ManualLine:
    return ManualLine.at(origin, tuple(options), key)


def lines_for(text: str, key: PublicKey) -> list[str]:
    """The lines of an index or cache that carry `key` (index: fingerprint prefix dropped)."""
    out = []
    for line in text.splitlines():
        if line.startswith(key.fingerprint + " "):
            line = line.split(" ", 1)[1]
        if f" {key.line()}" in f" {line}":
            out.append(line)
    return out


def options_of(line: str) -> list[str]:
    """Split an options field the way sshd does (commas outside double quotes)."""
    field = line.split(" ", 1)[0]
    return re.findall(r'(?:[^,"]|"[^"]*")+', field)


def permitopens(line: str) -> set[str]:
    return {o for o in options_of(line) if o.startswith("permitopen=")}


def only_line(rendered_text: str, key: PublicKey) -> str:
    found = lines_for(rendered_text, key)
    assert len(found) == 1, f"expected one line for {key.comment or key.fingerprint}: {found}"
    return found[0]


# --------------------------------------------------------------------------- scoping

def test_line_without_permitopen_gets_every_served_target_alias_and_port() -> None:
    rendered = render([WEB, DB], ("22", "2222"), [manual(KM)], scope_manual=True)
    for text in (rendered.index, rendered.cache):
        line = only_line(text, KM)
        assert options_of(line)[0:2] == ["restrict", "port-forwarding"]
        assert permitopens(line) == {f'permitopen="{a}:{p}"' for a in ALIASES
                                     for p in ("22", "2222")}
        assert line.endswith(f"{KM.line()} admin")


def test_scope_follows_the_served_targets() -> None:
    one = render([WEB], ("22",), [manual(KM)], scope_manual=True)
    assert permitopens(only_line(one.index, KM)) == {
        'permitopen="web:22"', 'permitopen="5745422d3030:22"', 'permitopen="172.18.0.5:22"'}
    # db stopped, web stays; then a target with no keys yet is not served: no scope from it.
    pending = served("pending", "172.18.0.9", ("pending", "172.18.0.9"))
    two = render([WEB, pending], ("22",), [manual(KM)], scope_manual=True)
    assert not any("pending" in o or "172.18.0.9" in o for o in permitopens(only_line(two.index, KM)))


def test_port_star_scope() -> None:
    rendered = render([DB], ("*",), [manual(KM)], scope_manual=True)
    assert permitopens(only_line(rendered.index, KM)) == {'permitopen="db:*"',
                                                          'permitopen="172.18.0.6:*"'}


def test_line_with_own_permitopen_keeps_only_its_own() -> None:
    line = manual(KM, 'permitopen="backup-1:22"', 'from="10.0.0.0/8"')
    rendered = render([WEB, DB], ("22",), [line], scope_manual=True)
    text = only_line(rendered.index, KM)
    assert permitopens(text) == {'permitopen="backup-1:22"'}
    assert options_of(text) == ["restrict", "port-forwarding", 'permitopen="backup-1:22"',
                                'from="10.0.0.0/8"']


def test_no_served_targets_means_no_forwarding() -> None:
    rendered = render([], ("22",), [manual(KM, 'from="10.0.0.0/8"')], scope_manual=True)
    text = only_line(rendered.index, KM)
    assert options_of(text) == ["restrict", 'from="10.0.0.0/8"']
    assert "port-forwarding" not in text
    assert "permitopen" not in text


def test_no_served_targets_drops_admin_port_forwarding_too() -> None:
    """An admin's own `port-forwarding` must not sneak an unscoped line back in."""
    rendered = render([], ("22",), [manual(KM, "restrict", "port-forwarding")], scope_manual=True)
    text = only_line(rendered.index, KM)
    assert options_of(text) == ["restrict"]


def test_served_targets_without_aliases_give_no_forwarding() -> None:
    bare = served("bare", "", (), KA)
    rendered = render([bare], ("22",), [manual(KM)], scope_manual=True)
    assert options_of(only_line(rendered.index, KM)) == ["restrict"]


def test_scope_manual_false_leaves_lines_unscoped() -> None:
    rendered = render([WEB, DB], ("22",), [manual(KM), manual(KN, 'permitopen="db-1:22"')],
                      scope_manual=False)
    assert options_of(only_line(rendered.index, KM)) == ["restrict", "port-forwarding"]
    assert options_of(only_line(rendered.index, KN)) == ["restrict", "port-forwarding",
                                                         'permitopen="db-1:22"']
    assert render([], ("22",), [manual(KM)]).index == render([], ("22",), [manual(KM)],
                                                             scope_manual=False).index


@pytest.mark.parametrize("scope_manual", [True, False])
@pytest.mark.parametrize("targets", [[], [WEB]], ids=["no-targets", "targets"])
@pytest.mark.parametrize("admin_options", [
    (), ("restrict",), ("port-forwarding",), ("restrict", "port-forwarding"),
    ("port-forwarding", "restrict", 'permitopen="x:22"'),
])
def test_base_options_never_duplicated(scope_manual, targets, admin_options) -> None:
    rendered = render(targets, ("22",), [manual(KM, *admin_options)], scope_manual=scope_manual)
    text = only_line(rendered.index, KM)
    opts = options_of(text)
    assert opts.count("restrict") == 1, opts
    assert opts.count("port-forwarding") <= 1, opts
    assert opts[0] == "restrict"
    # Whatever is rendered is a line our own strict parser (and so sshd) accepts.
    options, key = parse_authorized_keys_line(text)
    assert key.fingerprint == KM.fingerprint
    assert len(options) == len(opts)


def test_discovered_and_manual_keys_merge() -> None:
    """Index: every discovered and every manual key, sorted by fingerprint, one line each."""
    rendered = render([WEB, DB], ("22",), [manual(KM), manual(KN, 'permitopen="x:22"')],
                      scope_manual=True)
    lines = rendered.index.splitlines()
    assert len(lines) == 4
    assert lines == sorted(lines)
    for key in (KA, KB, KM, KN):
        assert len(lines_for(rendered.index, key)) == 1
    assert permitopens(only_line(rendered.index, KA)) == {
        'permitopen="web:22"', 'permitopen="5745422d3030:22"', 'permitopen="172.18.0.5:22"'}
    assert owner_names(rendered.owners[KM.fingerprint]) == ("/etc/ssh/authorized_keys.d/a.pub:1",)


def test_render_manual_direct() -> None:
    assert render_manual([manual(KM)], None) == [(KM.fingerprint, f"{BASE_OPTIONS} {KM.line()} admin")]
    assert render_manual([manual(KM)], []) == [(KM.fingerprint, f"restrict {KM.line()} admin")]
    assert render_manual([manual(KM)], ['permitopen="a:22"']) == [
        (KM.fingerprint, f'{BASE_OPTIONS},permitopen="a:22" {KM.line()} admin')]


# --------------------------------------------------------------------------- settings

def manual_env(hosts: str, **extra: str) -> dict[str, str]:
    return {"MANUAL_AUTH_FILE": "true", "SSH_PERMIT_TARGET_HOST": hosts, **extra}


@pytest.mark.parametrize(("hosts", "expected"), [
    ("*", ("*",)),
    ("workspace-a", ("workspace-a",)),
    ("workspace-a,db-1", ("workspace-a", "db-1")),
    (" workspace-a , db-1 ", ("workspace-a", "db-1")),
    ("10.0.0.5", ("10.0.0.5",)),
    ("db-1,*", ("*",)),
])
def test_manual_mode_accepts_any_or_exact_hosts(hosts: str, expected: tuple[str, ...]) -> None:
    settings = load_settings(manual_env(hosts))
    assert (settings.mode is RunMode.MANUAL) is True
    assert settings.permit_hosts == expected
    check_manual_mode(settings)  # no error


@pytest.mark.parametrize("hosts", ["workspace-*", "db-?", "[ab]x", "db-1,web-*", "!db-1"])
def test_manual_mode_refuses_globs(hosts: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(manual_env(hosts))
    message = str(info.value)
    assert "SSH_PERMIT_TARGET_HOST" in message
    assert "MANUAL_AUTH_FILE" in message
    assert re.search(r"list the hosts exactly", message, re.IGNORECASE), message
    assert "permitopen" in message  # the other way out: '*' plus per-key permitopen


def test_check_manual_mode_on_settings_directly() -> None:
    with pytest.raises(ConfigError, match="SSH_PERMIT_TARGET_HOST"):
        check_manual_mode(Settings(permit_hosts=("workspace-*",), mode=RunMode.MANUAL))
    check_manual_mode(Settings(permit_hosts=("workspace-*",), mode=RunMode.DOCKER))
    check_manual_mode(Settings(permit_hosts=("a", "b"), mode=RunMode.MANUAL))


@pytest.mark.parametrize("hosts", ["workspace-*", "db-?", "[ab]x", "db-1,web-*"])
def test_discovery_mode_keeps_globs(hosts: str) -> None:
    settings = load_settings({"MANUAL_AUTH_FILE": "false", "SSH_PERMIT_TARGET_HOST": hosts})
    assert (settings.mode is RunMode.MANUAL) is False
    assert settings.permit_hosts == tuple(h.strip() for h in hosts.split(","))
    assert load_settings({"SSH_PERMIT_TARGET_HOST": hosts}).permit_hosts == settings.permit_hosts


# --------------------------------------------------------------------------- sshd PermitOpen

@pytest.mark.parametrize(("env", "enforced", "expected"), [
    (manual_env("a,b", SSH_PERMIT_TARGET_PORT="22,2222"), True, "a:22 a:2222 b:22 b:2222"),
    (manual_env("a"), True, "a:*"),
    (manual_env("a,b", SSH_PERMIT_TARGET_PORT="22"), True, "a:22 b:22"),
    (manual_env("*"), True, "any"),
    (manual_env("*", SSH_PERMIT_TARGET_PORT="22"), True, "*:22"),
    # With discovery the host list is in each key's own permitopen: only ports here.
    ({"SSH_PERMIT_TARGET_HOST": "a,b", "SSH_PERMIT_TARGET_PORT": "22"}, False, "*:22"),
    ({"SSH_PERMIT_TARGET_HOST": "web-*"}, False, "any"),
])
def test_permit_open(env: dict[str, str], enforced: bool, expected: str) -> None:
    settings = load_settings(env)
    assert (settings.mode is RunMode.MANUAL) is enforced
    assert permit_open(settings) == expected


@pytest.mark.parametrize("admin_host", ["aaa-db", "zzz-db"])
def test_key_both_discovered_and_manual_keeps_both_grants(admin_host: str) -> None:
    """sshd applies only the first line that matches a key: a key both discovered and in
    an admin file must get one line granting both (regression: one grant was lost,
    depending on sort order)."""
    rendered = render([WEB, DB], ("22",), [manual(KA, f'permitopen="{admin_host}:22"')],
                      scope_manual=True)
    first = next(line.split(" ", 1)[1] for line in rendered.index.splitlines()
                 if line.startswith(KA.fingerprint + " "))  # what `look` hands sshd first
    assert {'permitopen="web:22"', f'permitopen="{admin_host}:22"'} <= permitopens(first), first


@pytest.mark.parametrize("scope_manual", [True, False])
def test_same_key_in_two_admin_lines_with_from_stays_usable(scope_manual: bool) -> None:
    lines = [manual(KA, 'from="10.0.0.0/8"', 'permitopen="db:22"', origin="/k/a.pub:1"),
             manual(KA, 'from="192.168.0.0/16"', 'permitopen="web:22"', origin="/k/b.pub:1")]
    rendered = render([WEB] if scope_manual else [], ("22",), lines, scope_manual=scope_manual)
    for text in lines_for(rendered.index, KA):
        froms = [o for o in options_of(text) if o.startswith("from=")]
        assert len(froms) <= 1, f"sshd refuses this line: {text}"
    # And a client from 192.168.x still gets a line that lets it reach web (as with two
    # separate authorized_keys lines, where sshd skips the one whose from= does not match).
    usable = [t for t in lines_for(rendered.index, KA)
              if 'permitopen="web:22"' in t and 'from="10.0.0.0/8"' not in t]
    assert usable, rendered.index
