"""A target cannot take a name that leads somewhere else (issue 15, items 1 and 3).

One proxy for the module, serving only containers named `hj<tag>-*` with this module's
label, and an admin key file whose permitopen names a host `adm<tag>-db`:

- `hj<tag>-ws-a`: the victim, a plain target;
- `hj<tag>-imp`: an impostor whose hostname is the victim's name in upper case (hosts
  lookups ignore case, and /etc/host.conf's `multi on` returns every matching line);
- `db<tag>`: a container the proxy does not serve (SSH_PERMIT_TARGET_HOST excludes it),
  resolvable by Docker DNS on the shared network;
- `hj<tag>-t`: a target whose hostname is that container's name;
- `hj<tag>-c`: a target whose hostname is the host of the admin key's permitopen.

Each impostor keeps its own name, id and address; the name it tries to borrow is refused,
shown in status.json, and never pinned in the proxy's /etc/hosts.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from helpers import (
    KeyPair,
    Proxy,
    SshClient,
    Target,
    docker,
    log_mark,
    make_keypair,
    module_containers,
    run_proxy_container,
    run_target_container,
    unique_name,
    wait_for_event,
    wait_for_login,
    wait_for_status,
)

HIJACK_LABEL = "ssh-proxy-name-hijack"
KEYS_DIR = "/etc/ssh/authorized_keys.d"
BEGIN = "# BEGIN ssh-proxy targets"
END = "# END ssh-proxy targets"


class World:
    def __init__(self, tag: str, keys: dict[str, KeyPair]) -> None:
        self.tag = tag
        self.keys = keys
        self.admin_host = f"adm{tag}-db"
        self.containers: dict[str, Target] = {}
        self.proxy: Proxy | None = None


@pytest.fixture(scope="module")
def world(request, tmp_path_factory, proxy_image, target_image, test_network,
          session_id) -> Iterator[World]:
    tag = secrets.token_hex(3)
    root = tmp_path_factory.mktemp("name-hijack")
    keys = {n: make_keypair(root / "keys", n) for n in ("victim", "imp", "db", "t", "c", "admin")}
    w = World(tag, keys)
    keys_dir = root / "keys.d"
    keys_dir.mkdir()
    os.chmod(keys_dir, 0o755)
    admin_file = keys_dir / "admin.pub"
    admin_file.write_text(f'permitopen="{w.admin_host}:5432" {keys["admin"].public}\n')
    admin_file.chmod(0o644)
    label = {HIJACK_LABEL: tag}
    with module_containers(request) as started:
        def run(name: str, key: KeyPair, **kwargs) -> Target:
            return run_target_container(name, key, test_network, session_id, image=target_image,
                                        labels=label, track=started.append, **kwargs)

        w.proxy = run_proxy_container(
            test_network, session_id, name=unique_name("ssh-proxy-test-hijack"), image=proxy_image,
            env={"SSH_PERMIT_TARGET_HOST": f"hj{tag}-*", "SSH_TARGET_LABELS": f"{HIJACK_LABEL}={tag}"},
            volumes=[f"{keys_dir}:{KEYS_DIR}:ro"], track=started.append)
        victim = run(f"hj{tag}-ws-a", keys["victim"])
        w.containers = {
            "victim": victim,
            "imp": run(f"hj{tag}-imp", keys["imp"], hostname=victim.name.upper()),
            "db": run(f"db{tag}", keys["db"]),
            "t": run(f"hj{tag}-t", keys["t"], hostname=f"db{tag}"),
            "c": run(f"hj{tag}-c", keys["c"], hostname=w.admin_host),
        }
        for who in ("imp", "t", "c"):
            wait_for_login(client(w, who), w.containers[who].name, deadline=30)
        # Not a login to the victim: where its name leads is what the first test checks.
        wait_for_status(w.proxy, lambda d: any(t["name"] == victim.name and t["key_status"] == "ok"
                                               for t in d.get("targets", [])), deadline=30)
        yield w


def client(w: World, who: str) -> SshClient:
    assert w.proxy is not None
    return SshClient(proxy_port=w.proxy, key=w.keys[who])


def stdio_forward(w: World, who: str, dest: str) -> subprocess.CompletedProcess:
    c = client(w, who)
    return c.run(c.direct_argv(opts=["-W", dest]), input="", timeout=30, text=False)


def assert_tunnel_refused(w: World, who: str, dest: str) -> None:
    assert w.proxy is not None
    mark = log_mark(w.proxy)
    proc = stdio_forward(w, who, dest)
    assert proc.stdout == b"", f"-W {dest} with {who}'s key relayed {proc.stdout[:200]!r}"
    assert proc.returncode == 255, proc.stderr.decode(errors="replace")
    wait_for_event(w.proxy, mark, event="tunnel-denied", fp=w.keys[who].fingerprint, dest=dest)


def hosts_block(w: World) -> str:
    assert w.proxy is not None
    text = w.proxy.read_file("/etc/hosts")
    return text[text.index(BEGIN):text.index(END)]


def granted(doc: dict, name: str) -> list[str]:
    return next(t["aliases"] for t in doc.get("targets", []) if t["name"] == name)


def refusal(doc: dict, name: str, alias: str) -> str:
    """The reason status.json gives for refusing `alias` to target `name` ("" if not)."""
    return next((r for t, a, r in doc.get("refused_aliases", []) if t == name and a == alias), "")


def test_name_differing_only_in_case_is_not_granted(world):
    victim, imp = world.containers["victim"], world.containers["imp"]
    doc = wait_for_status(world.proxy, lambda d: refusal(d, imp.name, imp.hostname), deadline=20)
    assert refusal(doc, imp.name, imp.hostname) == f"belongs to target {victim.name}"
    assert imp.hostname not in granted(doc, imp.name)
    assert victim.name in granted(doc, victim.name)
    block = hosts_block(world).lower()
    assert block.count(victim.name) == 1, block
    assert f"{victim.ip}\t{victim.name}" in block, block
    # The victim's own key reaches the real victim, every time.
    for _ in range(3):
        proc = client(world, "victim").ssh(victim.name, "hostname", timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == victim.hostname
    # The impostor's key opens the victim by no spelling of its name.
    for dest in (victim.name, imp.hostname):
        assert_tunnel_refused(world, "imp", f"{dest}:22")


def test_hostname_of_a_non_permitted_container_is_not_granted(world):
    t, db = world.containers["t"], world.containers["db"]
    doc = wait_for_status(world.proxy, lambda d: refusal(d, t.name, db.name), deadline=20)
    assert "db" in refusal(doc, t.name, db.name) and "not served" in refusal(doc, t.name, db.name)
    assert db.name not in granted(doc, t.name)
    assert db.name not in hosts_block(world).lower()
    # The name still resolves through Docker's DNS, to the container that bears it (and,
    # as Docker registers hostnames as network aliases, maybe to `t` too: not the proxy's).
    resolved = world.proxy.exec(["getent", "ahostsv4", db.name]).stdout.split()
    assert db.ip in resolved, resolved
    assert_tunnel_refused(world, "t", f"{db.name}:22")


def test_host_of_an_admin_permitopen_is_not_granted(world):
    c = world.containers["c"]
    doc = wait_for_status(world.proxy, lambda d: refusal(d, c.name, world.admin_host), deadline=20)
    assert "permitopen" in refusal(doc, c.name, world.admin_host)
    assert world.admin_host not in granted(doc, c.name)
    assert world.admin_host not in hosts_block(world).lower()
    assert_tunnel_refused(world, "c", f"{world.admin_host}:22")
