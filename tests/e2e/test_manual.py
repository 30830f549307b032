"""MANUAL_AUTH_FILE=true end to end: admin-maintained key files, hot-reloaded, with the real
image, the real sshd and the real OpenSSH client; and admin files next to discovery.

Manual proxies run WITHOUT the Docker socket (conftest's start_proxy always mounts it), so
this module starts them itself (same labels, network and port publishing as start_proxy)
with a host directory bind-mounted at /etc/ssh/authorized_keys.d.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import pytest

from helpers import (
    KeyPair,
    Proxy,
    SshClient,
    Target,
    make_keypair,
    module_containers,
    run_proxy_container,
    run_target_container,
    unique_name,
    wait_for_login,
    wait_until,
)

KEYS_DIR = "/etc/ssh/authorized_keys.d"
SEED = "/etc/ssh/authorized_keys_cache"
DELAYS: dict[str, float] = {}


# --------------------------------------------------------------------------- starters


class Env:
    """What the module shares: keys, targets A and B, and manual proxies."""

    def __init__(self, root: Path, proxy_image: str, target_image: str, network: str,
                 session_id: str, started: list[Target | Proxy]) -> None:
        self.root = root
        self.proxy_image = proxy_image
        self.target_image = target_image
        self.network = network
        self.session_id = session_id
        self.keys_root = root / "client-keys"
        self.started = started
        """Every container this module starts (removed when the module ends)."""
        self.tag = secrets.token_hex(3)

    def key(self, name: str) -> KeyPair:
        return make_keypair(self.keys_root, f"{name}-{secrets.token_hex(3)}")

    def target(self, label: str, pubkey: str) -> Target:
        """A test target without /publickey (as start_target(..., serve_publickey=False)), but
        module-scoped: the manual tests share it."""
        return run_target_container(f"mt-{label}-{self.tag}", pubkey, self.network, self.session_id,
                                    image=self.target_image, serve_publickey=False, track=self.started.append)

    def proxy(self, env: Mapping[str, str] | None = None,
              volumes: Sequence[str] = ()) -> Proxy:
        """Like conftest's start_proxy, without the Docker socket."""
        return run_proxy_container(self.network, self.session_id, name=unique_name("ssh-proxy-test-manual"),
                                   image=self.proxy_image, env={"MANUAL_AUTH_FILE": "true", **(env or {})},
                                   volumes=volumes, docker_socket=False, track=self.started.append)


@pytest.fixture(scope="module")
def env(request, tmp_path_factory, proxy_image, target_image, test_network,
        session_id) -> Iterator[Env]:
    with module_containers(request) as started:
        yield Env(tmp_path_factory.mktemp("manual"), proxy_image, target_image, test_network, session_id,
                  started)
    if DELAYS:
        print("\nhost-side change-to-login delays (manual proxy):")
        for label, delay in DELAYS.items():
            print(f"  {label:<32} {delay:.2f} s")


class Manual:
    """The module's main manual proxy: keys dir + read-only seed file, targets A and B,
    key K authorised on A (its pubkey) and, at the proxy, only for permitopen=A:22."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.keys_dir = env.root / "keys.d"
        self.keys_dir.mkdir()
        os.chmod(self.keys_dir, 0o755)
        self.seed = env.root / "seed"
        self.seed_key = env.key("seed1")
        self.seed.write_text(self.seed_key.public + "\n")
        os.chmod(self.seed, 0o644)
        self.k = env.key("k")
        self.a = env.target("a", self.k.public)
        self.b = env.target("b", self.k.public)
        self.proxy = env.proxy({"SSH_PERMIT_TARGET_HOST": "*"},
                               [f"{self.keys_dir}:{KEYS_DIR}", f"{self.seed}:{SEED}:ro"])

    def write(self, name: str, text: str) -> Path:
        path = self.keys_dir / name
        path.write_text(text)
        path.chmod(0o644)
        return path


@pytest.fixture(scope="module")
def m(env: Env) -> Manual:
    return Manual(env)


def tunnel(proxy: Proxy, key: KeyPair, dest: str, timeout: float = 20) -> subprocess.CompletedProcess:
    """`ssh -W dest -i key limited-user@127.0.0.1 -p PORT` with stdin at EOF: success is the
    destination's SSH banner on stdout."""
    return SshClient(proxy_port=proxy, key=key, connect_timeout=5).direct_proxy(
        opts=["-W", dest], timeout=timeout)


def tunnel_ok(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == 0 and proc.stdout.startswith("SSH-2.0-")


def wait_tunnel(proxy: Proxy, key: KeyPair, dest: str, want: bool, label: str,
                deadline: float = 5.0) -> float:
    """Polls until the tunnel works (want=True) or is refused (False); returns the delay."""
    started = time.monotonic()
    last = None
    while True:
        last = tunnel(proxy, key, dest)
        if tunnel_ok(last) == want:
            delay = time.monotonic() - started
            DELAYS[label] = delay
            return delay
        if time.monotonic() - started > deadline:
            pytest.fail(f"{label}: tunnel to {dest} still {'refused' if want else 'open'} after "
                        f"{deadline} s; exit {last.returncode}, stderr: {last.stderr.strip()}\n"
                        f"proxy logs (tail):\n{proxy.logs()[-3000:]}", pytrace=False)
        time.sleep(0.1)


def in_container_delay(proxy: Proxy, fingerprint: str, present: bool,
                       action: Callable[[], None], label: str, deadline: int = 10) -> float:
    """Seconds from `action` (a change on the host) until the proxy's index has (or no longer
    has) `fingerprint`, measured by a loop inside the container (host and container share
    the kernel clock). Only that it happens (within `deadline`) is asserted: how fast is
    measured by bench/manual_load.py, side by side, not here."""
    negate = "" if present else "! "  # `!` may only begin a pipeline
    script = (f'end=$(( $(date +%s) + {deadline} )); echo ready; '
              f'while [ "$(date +%s)" -lt "$end" ]; do '
              f'if {negate}cat /etc/ssh/authorized_keys.index.d/* | grep -qF -- "{fingerprint} "; then '
              f'date +%s.%N; exit 0; fi; sleep 0.02; done; exit 1')
    watch = subprocess.Popen(["docker", "exec", proxy.id, "sh", "-c", script],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert watch.stdout is not None and watch.stdout.readline().strip() == "ready"
        started = time.time()
        action()
        out, err = watch.communicate(timeout=deadline + 10)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, f"{label}: index never {'had' if present else 'lost'} " \
                                  f"{fingerprint} within {deadline} s ({err.strip()})"
    delay = float(out.strip()) - started
    DELAYS[f"{label} (in container)"] = delay  # reported; the speed is bench/manual_load.py's
    return delay


def refused_login(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == 255 and "Permission denied" in proc.stderr


def denied_tunnel(proc: subprocess.CompletedProcess) -> bool:
    """Logged in, but the channel was refused (not an auth failure)."""
    return (proc.returncode == 255 and "Permission denied" not in proc.stderr
            and "stdio forwarding failed" in proc.stderr and not proc.stdout)


# --------------------------------------------------------------------------- tests

def test_starts_without_docker_socket_healthy(m: Manual) -> None:
    p = m.proxy
    assert p.exec(["test", "-e", "/var/run/docker.sock"]).returncode != 0
    assert p.exec(["test", "-e", "/root/.kube/config"]).returncode != 0
    assert wait_until(lambda: p.exec(["watcher", "health"]).returncode == 0, 15, interval=0.5), \
        f"watcher health: {p.exec(['watcher', 'health']).stdout}\n{p.logs()}"
    logs = p.logs()
    assert re.search(r"level=info .*ready: mode=manual", logs), logs
    assert "level=error" not in logs, logs
    assert not re.search(r"docker|kube", "\n".join(l for l in logs.splitlines()
                                                   if "level=warning" in l), re.I), logs
    assert '"mode": "manual"' in p.read_file("/run/ssh-proxy/status.json")


def test_add_remove_key_file(m: Manual) -> None:
    user = m.env.key("user")
    # Not authorised yet.
    assert refused_login(tunnel(m.proxy, user, f"{m.a.name}:22"))
    path = m.keys_dir / "user.pub"
    in_container_delay(m.proxy, user.fingerprint, True,
                       lambda: m.write("user.pub", user.public + "\n"), "add file")
    wait_tunnel(m.proxy, user, f"{m.a.name}:22", True, "add file -> accepted")
    in_container_delay(m.proxy, user.fingerprint, False, path.unlink, "delete file")
    wait_tunnel(m.proxy, user, f"{m.a.name}:22", False, "delete file -> refused")
    assert refused_login(tunnel(m.proxy, user, f"{m.a.name}:22"))


def test_rename_save(m: Manual) -> None:
    old, new = m.env.key("old"), m.env.key("new")
    m.write("team.keys", old.public + "\n")
    wait_tunnel(m.proxy, old, f"{m.a.name}:22", True, "team.keys created")

    def save() -> None:
        swap = m.write(".team.keys.swp", new.public + "\n")
        os.replace(swap, m.keys_dir / "team.keys")
    in_container_delay(m.proxy, new.fingerprint, True, save, "rename-save")
    wait_tunnel(m.proxy, new, f"{m.a.name}:22", True, "rename-save -> new accepted")
    assert refused_login(tunnel(m.proxy, old, f"{m.a.name}:22"))
    (m.keys_dir / "team.keys").unlink()


def test_broken_line_among_good_ones(m: Manual) -> None:
    g1, g2, bad = m.env.key("good1"), m.env.key("good2"), m.env.key("bad")
    m.write("mixed.pub", f"# admins\n{g1.public}\ncommand=\"/bin/sh\" {bad.public}\n{g2.public}\n")
    wait_tunnel(m.proxy, g1, f"{m.a.name}:22", True, "mixed file: good line 1")
    assert tunnel_ok(tunnel(m.proxy, g2, f"{m.a.name}:22"))
    assert refused_login(tunnel(m.proxy, bad, f"{m.a.name}:22"))
    time.sleep(1.5)  # several poll rounds: still reported once
    expected = f"manual key line rejected: {KEYS_DIR}/mixed.pub:3: option 'command' grants more than tunnels"
    reported = [l for l in m.proxy.logs().splitlines() if "manual key line rejected" in l]
    assert len(reported) == 1 and expected in reported[0], reported
    assert "level=warning" in reported[0]
    (m.keys_dir / "mixed.pub").unlink()
    wait_tunnel(m.proxy, g1, f"{m.a.name}:22", False, "mixed file deleted")


def test_access_log_names_an_admin_line_where_it_is_now(m: Manual) -> None:
    """Lines inserted above a key move it: the key keeps working throughout, and the access
    log names its line as the file has it now."""
    first, second = m.env.key("above"), m.env.key("moved")
    origin = re.escape(f"{KEYS_DIR}/moved.pub")

    def logged(line: int) -> bool:
        return re.search(rf"fp={re.escape(second.fingerprint)} .*target={origin}:{line}(\s|$)",
                         m.proxy.access_log(), re.M) is not None

    m.write("moved.pub", second.public + "\n")
    wait_tunnel(m.proxy, second, f"{m.a.name}:22", True, "moved.pub: the key on line 1")
    assert wait_until(lambda: logged(1), 5), m.proxy.access_log()
    m.write("moved.pub", f"# admins\n{first.public}\n{second.public}\n")
    wait_tunnel(m.proxy, first, f"{m.a.name}:22", True, "moved.pub: a key inserted above")
    assert tunnel_ok(tunnel(m.proxy, second, f"{m.a.name}:22"))
    assert wait_until(lambda: logged(3), 5), m.proxy.access_log()
    (m.keys_dir / "moved.pub").unlink()
    wait_tunnel(m.proxy, second, f"{m.a.name}:22", False, "moved.pub deleted")


def test_admin_from_option_is_enforced(m: Manual) -> None:
    """from= is kept: a key limited to another client address cannot log in from here."""
    elsewhere, here = m.env.key("from-elsewhere"), m.env.key("from-here")
    m.write("from.pub", f'from="203.0.113.7" {elsewhere.public}\n'
                        f'from="*,!203.0.113.7" {here.public}\n')
    wait_tunnel(m.proxy, here, f"{m.a.name}:22", True, "from= key")
    index = m.proxy.read_index()
    assert f'from="203.0.113.7" ssh-ed25519' in index, index
    assert refused_login(tunnel(m.proxy, elsewhere, f"{m.a.name}:22"))
    (m.keys_dir / "from.pub").unlink()


def test_same_key_in_two_files_with_from(m: Manual) -> None:
    """With plain authorized_keys, sshd skips a line whose from= does not match and uses
    the next one: the key must still work from here."""
    k = m.env.key("two-from")
    m.write("from-a.pub", f'from="203.0.113.7",permitopen="{m.b.name}:22" {k.public}\n')
    m.write("from-b.pub", f'from="*",permitopen="{m.a.name}:22" {k.public}\n')
    try:
        assert wait_until(lambda: k.fingerprint in m.proxy.read_index(), 5)
        time.sleep(0.5)  # both files are in
        proc = tunnel(m.proxy, k, f"{m.a.name}:22")
        assert tunnel_ok(proc), (proc.returncode, proc.stderr,
                                 m.proxy.read_index())
    finally:
        for name in ("from-a.pub", "from-b.pub"):
            (m.keys_dir / name).unlink()


def test_admin_permitopen_is_honoured_and_not_widened(m: Manual) -> None:
    m.write("k.pub", f'permitopen="{m.a.name}:22" {m.k.public}\n')
    wait_tunnel(m.proxy, m.k, f"{m.a.name}:22", True, "permitopen key -> A")
    # A full login to A through the proxy (ProxyCommand), K also authorised on A.
    client = SshClient(proxy_port=m.proxy, key=m.k)
    assert client.ssh(m.a.name, "hostname", check=True, timeout=30).stdout.strip() == m.a.name
    # Not to B, not to the proxy itself, not to A on another port or by its IP.
    for dest in (f"{m.b.name}:22", "localhost:22", "127.0.0.1:22", f"{m.proxy.name}:22",
                 f"{m.a.ip}:22", f"{m.a.name}:8000"):
        proc = tunnel(m.proxy, m.k, dest)
        assert denied_tunnel(proc), (dest, proc.returncode, proc.stdout[:80], proc.stderr)
    assert wait_until(lambda: len(re.findall(r"event=tunnel-denied", m.proxy.access_log())) >= 6, 5), \
        m.proxy.access_log()
    log = m.proxy.access_log()
    assert re.search(rf"event=tunnel-denied .*dest={re.escape(m.b.name)}:22", log), log
    (m.keys_dir / "k.pub").unlink()


def test_seed_file_in_place_overwrite(m: Manual) -> None:
    wait_tunnel(m.proxy, m.seed_key, f"{m.a.name}:22", True, "seed key at start")
    second = m.env.key("seed2")
    inode = m.seed.stat().st_ino

    def overwrite() -> None:
        with open(m.seed, "r+") as handle:  # in place: same inode, as `cat >` would
            handle.truncate(0)
            handle.write(f"# rotated\n{second.public}\n")
    in_container_delay(m.proxy, second.fingerprint, True, overwrite, "seed in-place overwrite")
    wait_tunnel(m.proxy, second, f"{m.a.name}:22", True, "seed overwrite -> new accepted")
    wait_tunnel(m.proxy, m.seed_key, f"{m.a.name}:22", False, "seed overwrite -> old refused")
    assert m.seed.stat().st_ino == inode
    assert m.seed.read_text() == f"# rotated\n{second.public}\n"
    assert m.proxy.read_file(SEED) == f"# rotated\n{second.public}\n"
    assert "Read-only file system" not in m.proxy.logs()


def test_exact_permit_target_host(env: Env, m: Manual) -> None:
    """SSH_PERMIT_TARGET_HOST=<A> with a key without permitopen: sshd's PermitOpen lets it
    reach A only. The key is in a writable seed file, which the watcher must not rewrite."""
    user = env.key("exact")
    seed = env.root / "exact-seed"
    content = f"# seed, admin-maintained\n{user.public}\n"
    seed.write_text(content)
    os.chmod(seed, 0o644)
    keys_dir = env.root / "exact.d"
    keys_dir.mkdir()
    proxy = env.proxy({"SSH_PERMIT_TARGET_HOST": m.a.name},
                      [f"{keys_dir}:{KEYS_DIR}", f"{seed}:{SEED}"])
    wait_tunnel(proxy, user, f"{m.a.name}:22", True, "exact host -> A")
    for dest in (f"{m.b.name}:22", "localhost:22", f"{m.a.ip}:22"):
        proc = tunnel(proxy, user, dest)
        assert denied_tunnel(proc), (dest, proc.returncode, proc.stderr)
    # A change in the keys directory re-renders; the seed file stays the admin's.
    other = env.key("exact-other")
    (keys_dir / "o.pub").write_text(other.public + "\n")
    wait_tunnel(proxy, other, f"{m.a.name}:22", True, "exact host: dir key")
    assert seed.read_text() == content
    assert proxy.read_file(SEED) == content


def test_glob_permit_target_host_refused(run_proxy_expect_exit) -> None:
    code, logs = run_proxy_expect_exit(env={"MANUAL_AUTH_FILE": "true",
                                            "SSH_PERMIT_TARGET_HOST": "workspace-*"}, timeout=20)
    assert code == 2, logs
    lines = [l for l in logs.splitlines() if "SSH_PERMIT_TARGET_HOST" in l]
    assert len(lines) == 1, logs
    assert "workspace-*" in lines[0]
    assert re.search(r"list the hosts", lines[0], re.I), lines[0]
    assert "sshd started" not in logs


def test_admin_keys_alongside_discovery(start_proxy, start_target, keypair, tmp_path) -> None:
    """Discovery + an admin key file: the admin key (no permitopen) reaches discovered
    targets only; the target's own key still works (merged)."""
    token = secrets.token_hex(4)
    own, admin = keypair("own"), keypair("admin")
    t = start_target(f"mt-disc-{token}", own, labels={"ssh-proxy-manual": token})
    keys_dir = tmp_path / "keys.d"
    keys_dir.mkdir()
    (keys_dir / "admin.pub").write_text(admin.public + "\n")
    proxy = start_proxy(env={"SSH_TARGET_LABELS": f"ssh-proxy-manual={token}"},
                        volumes=[f"{keys_dir}:{KEYS_DIR}"])
    wait_for_login(SshClient(proxy_port=proxy, key=own), t.name, deadline=30)
    wait_tunnel(proxy, admin, f"{t.name}:22", True, "discovery: admin key -> target", deadline=10)
    assert tunnel_ok(tunnel(proxy, own, f"{t.name}:22"))
    for dest in ("nowhere:22", f"{proxy.name}:22", "localhost:22"):
        proc = tunnel(proxy, admin, dest)
        assert denied_tunnel(proc), (dest, proc.returncode, proc.stderr)
    # Neither overwrote the other: both keys are in the index.
    index = proxy.read_index()
    assert own.fingerprint in index and admin.fingerprint in index, index
    # The directory is hot-reloaded with discovery too: deleting the file revokes the admin
    # key only.
    (keys_dir / "admin.pub").unlink()
    wait_tunnel(proxy, admin, f"{t.name}:22", False, "discovery: admin file deleted")
    assert refused_login(tunnel(proxy, admin, f"{t.name}:22"))
    assert tunnel_ok(tunnel(proxy, own, f"{t.name}:22"))
    assert "level=error" not in proxy.logs()


def test_admin_key_with_discovery_but_no_targets_opens_nothing(m: Manual, start_proxy,
                                                                 keypair, tmp_path) -> None:
    """With discovery on and nothing discovered, an admin key without permitopen logs in
    but may open no tunnel at all (not even to a host on the proxy's network)."""
    admin = keypair("admin-alone")
    keys_dir = tmp_path / "keys.d"
    keys_dir.mkdir()
    (keys_dir / "admin.pub").write_text(admin.public + "\n")
    proxy = start_proxy(env={"SSH_TARGET_LABELS": f"ssh-proxy-manual=none-{secrets.token_hex(4)}"},
                        volumes=[f"{keys_dir}:{KEYS_DIR}"])
    index = proxy.read_index()
    assert f"{admin.fingerprint} restrict ssh-ed25519" in index, index
    for dest in (f"{m.a.name}:22", f"{m.a.ip}:22", "localhost:22"):
        proc = tunnel(proxy, admin, dest)
        assert denied_tunnel(proc), (dest, proc.returncode, proc.stderr)


def test_key_both_discovered_and_admin_keeps_both_grants(m: Manual, start_proxy, start_target,
                                                         keypair, tmp_path) -> None:
    """A target's published key also granted by an admin file opens both (sshd applies only
    the first matching line, so they must be one line; regression: the target's own key
    lost its own target)."""
    token = secrets.token_hex(4)
    shared = keypair("shared")
    t = start_target(f"mt-disc2-{token}", shared, labels={"ssh-proxy-manual": token})
    keys_dir = tmp_path / "keys.d"
    keys_dir.mkdir()
    proxy = start_proxy(env={"SSH_TARGET_LABELS": f"ssh-proxy-manual={token}"},
                        volumes=[f"{keys_dir}:{KEYS_DIR}"])
    wait_tunnel(proxy, shared, f"{t.name}:22", True, "shared key: discovered", deadline=30)
    # The admin also grants the same key a tunnel to A (not a discovered target).
    (keys_dir / "shared.pub").write_text(f'permitopen="{m.a.name}:22" {shared.public}\n')
    assert wait_until(lambda: f'permitopen="{m.a.name}:22"' in proxy.read_index(), 5), proxy.read_index()
    results = {dest: tunnel_ok(tunnel(proxy, shared, dest))
               for dest in (f"{t.name}:22", f"{m.a.name}:22")}
    assert results == {f"{t.name}:22": True, f"{m.a.name}:22": True}, results
