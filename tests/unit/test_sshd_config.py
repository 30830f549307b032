"""watcher.sshd (PermitOpen, the rendered sshd_config checked by the real sshd) and
watcher.status.health_problems."""

from __future__ import annotations

from dataclasses import replace

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from watcher.cache import ShardFiles
from watcher.config import RunMode, Settings, load_settings
from watcher.errors import WatcherError
from watcher.model import ManualLine, PublicKey
from watcher.render import index_shard, render as render_keys
from watcher.sshd import SshdPaths, ensure_host_keys, permit_open, render_sshd_config
from watcher.snapshot import SourceStatus, StatusDocument, WatcherState
from watcher.status import STALE_AFTER, health_problems

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = (REPO / "sshd" / "sshd_config.template").read_text()
KEYS_COMMAND = REPO / "sshd" / "authorized-keys-command"
SSHD = "/usr/sbin/sshd"


# --- PermitOpen -------------------------------------------------------------------------

@pytest.mark.parametrize("env, enforced, expected", [
    ({}, False, "any"),
    ({}, True, "any"),
    ({"SSH_PERMIT_TARGET_PORT": "22"}, False, "*:22"),
    ({"SSH_PERMIT_TARGET_PORT": "22,2222"}, False, "*:22 *:2222"),
    ({"SSH_PERMIT_TARGET_HOST": "db-1,web", "SSH_PERMIT_TARGET_PORT": "22"}, False, "*:22"),
    ({"SSH_PERMIT_TARGET_HOST": "db-1,web"}, False, "any"),
    ({"SSH_PERMIT_TARGET_HOST": "db-1,web", "SSH_PERMIT_TARGET_PORT": "22,80"}, True,
     "db-1:22 db-1:80 web:22 web:80"),
    ({"SSH_PERMIT_TARGET_HOST": "db-1"}, True, "db-1:*"),
    ({"SSH_PERMIT_TARGET_HOST": "*", "SSH_PERMIT_TARGET_PORT": "5432"}, True, "*:5432"),
])
def test_permit_open(env: dict[str, str], enforced: bool, expected: str) -> None:
    """`enforced`: sshd is the host check (manual mode, no discovery)."""
    mode = RunMode.MANUAL if enforced else RunMode.DOCKER
    assert permit_open(replace(load_settings(env), mode=mode)) == expected


# --- rendered sshd_config ------------------------------------------------------------------

def paths_in(directory: Path) -> SshdPaths:
    return SshdPaths(template=REPO / "sshd" / "sshd_config.template",
                     config=directory / "sshd_config",
                     host_key_dir=directory / "host_keys",
                     keys_command=directory / "libexec" / "authorized-keys-command",
                     keys_command_user="nobody",
                     index_dir=directory / "authorized_keys.index.d")


def test_render_sshd_config_contents(tmp_path: Path) -> None:
    paths = paths_in(tmp_path)
    keys = [tmp_path / "host_keys" / "ssh_host_ed25519_key",
            tmp_path / "host_keys" / "ssh_host_rsa_key"]
    text = render_sshd_config(TEMPLATE, load_settings({"SSH_PERMIT_TARGET_PORT": "22"}),
                              paths, keys)
    lines = text.splitlines()
    for expected in [
        f"HostKey {keys[0]}",
        f"HostKey {keys[1]}",
        "AllowUsers limited-user",
        f"AuthorizedKeysCommand {paths.keys_command} {paths.index_dir} %f",
        "AuthorizedKeysCommandUser nobody",
        "AuthorizedKeysFile none",
        "PermitOpen *:22",
        "AllowTcpForwarding local",
        "PermitTTY no",
        "X11Forwarding no",
        "AllowAgentForwarding no",
        "AllowStreamLocalForwarding no",
        "PermitTunnel no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "AuthenticationMethods publickey",
        "PermitRootLogin no",
        "GatewayPorts no",
        "MaxStartups 512:50:1024",
        "PerSourceMaxStartups 256",
        "PerSourceNetBlockSize 32:64",
    ]:
        assert expected in lines, expected
    assert sum(1 for line in lines if line.startswith("ForceCommand /")) == 1
    assert "$" not in text.replace("%f", "")  # every placeholder substituted
    assert sum(1 for line in lines if line.startswith("HostKey ")) == 2
    assert sum(1 for line in lines if line.startswith("PermitOpen ")) == 1
    assert not [line for line in lines if line.startswith("UnusedConnectionTimeout")]


def test_one_source_cannot_take_the_slots_below_random_early_drop() -> None:
    from watcher.sshd import MAX_STARTUPS, PER_SOURCE_MAX_STARTUPS

    start, _rate, full = (int(part) for part in MAX_STARTUPS.split(":"))
    assert 200 <= PER_SOURCE_MAX_STARTUPS  # a burst of 200 logins from one address is served
    assert PER_SOURCE_MAX_STARTUPS < start  # one source alone never triggers a random drop
    assert 2 * PER_SOURCE_MAX_STARTUPS <= start < full


def test_render_sshd_config_any_and_keys_user(tmp_path: Path) -> None:
    paths = SshdPaths(keys_command=Path("/x/cmd"), keys_command_user="sshkeys",
                      index_dir=Path("/y/index.d"))
    text = render_sshd_config(TEMPLATE, Settings(), paths, [Path("/k/a")])
    lines = text.splitlines()
    assert "PermitOpen any" in lines
    assert "AuthorizedKeysCommand /x/cmd /y/index.d %f" in lines
    assert "AuthorizedKeysCommandUser sshkeys" in lines
    assert "HostKey /k/a" in lines


def test_ensure_host_keys_generates_once(tmp_path: Path) -> None:
    directory = tmp_path / "host_keys"
    keys = ensure_host_keys(directory)
    assert [k.name for k in keys] == ["ssh_host_ed25519_key", "ssh_host_ecdsa_key",
                                      "ssh_host_rsa_key"]
    contents = [k.read_bytes() for k in keys]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key.with_suffix(".pub").exists()
    keys[0].chmod(0o644)
    again = ensure_host_keys(directory)
    assert again == keys
    assert [k.read_bytes() for k in again] == contents  # reused, not regenerated
    assert stat.S_IMODE(keys[0].stat().st_mode) == 0o600


def _read_only(monkeypatch, directory: Path) -> None:
    """As a read-only mount looks to access(2) (root ignores mode bits, not a read-only fs)."""
    real = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, mode: False if Path(p) == directory and mode & os.W_OK
                        else real(p, mode))


def test_read_only_host_keys_used_as_they_are(tmp_path: Path, monkeypatch) -> None:
    """A Kubernetes Secret: 0400 files on a read-only mount, maybe not every type."""
    directory = tmp_path / "host_keys"
    made = ensure_host_keys(directory)
    made[1].unlink()
    made[2].unlink()
    made[0].chmod(0o400)
    before = made[0].read_bytes()
    _read_only(monkeypatch, directory)
    assert ensure_host_keys(directory) == [made[0]]
    assert made[0].read_bytes() == before and stat.S_IMODE(made[0].stat().st_mode) == 0o400
    assert not made[1].exists() and not made[2].exists()  # nothing generated


def test_read_only_without_host_keys_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    directory = tmp_path / "host_keys"
    directory.mkdir()
    _read_only(monkeypatch, directory)
    with pytest.raises(WatcherError) as info:
        ensure_host_keys(directory)
    assert str(directory) in str(info.value) and "read-only" in str(info.value)
    assert list(directory.iterdir()) == []


def _safe_for_sshd(path: Path) -> bool:
    """sshd's rule for AuthorizedKeysCommand: it and every parent root-owned, not g/o-writable."""
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_uid != 0 or st.st_mode & 0o022:
            return False
    return True


@pytest.fixture
def sshd_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory where sshd would accept the keys command (tmp_path is under /tmp, mode 1777)."""
    if not os.access(SSHD, os.X_OK):
        pytest.skip(f"{SSHD} not installed")
    if _safe_for_sshd(tmp_path):
        yield tmp_path
        return
    if os.geteuid() != 0:
        pytest.skip("sshd -t: tmp_path has a group/world-writable parent and we are not root "
                    "to make a root-owned 0755 directory elsewhere")
    for base in ("/run", "/var/lib", "/root"):
        if Path(base).is_dir() and _safe_for_sshd(Path(base)) and os.access(base, os.W_OK):
            directory = Path(tempfile.mkdtemp(prefix="ssh-proxy-test-", dir=base))
            directory.chmod(0o755)
            try:
                yield directory
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            return
    pytest.skip("no root-owned, non-writable directory available for the keys command")


def _render_to(directory: Path, settings: Settings) -> SshdPaths:
    paths = paths_in(directory)
    paths.keys_command.parent.mkdir(mode=0o755)
    shutil.copyfile(KEYS_COMMAND, paths.keys_command)
    paths.keys_command.chmod(0o755)
    host_keys = ensure_host_keys(paths.host_key_dir)
    paths.config.write_text(render_sshd_config(TEMPLATE, settings, paths, host_keys))
    return paths


@pytest.fixture
def privsep_dir() -> Iterator[None]:
    """sshd -t insists on its privilege separation directory (the watcher creates it too)."""
    path = Path("/run/sshd")
    created = False
    if not path.is_dir():
        if os.geteuid() != 0:
            pytest.skip("sshd -t needs /run/sshd, which is missing and we are not root")
        path.mkdir(mode=0o755, parents=True)
        created = True
    yield
    if created:
        try:
            path.rmdir()  # only if still empty: someone else may have started using it
        except OSError:
            pass


def _sshd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SSHD, *args], capture_output=True, text=True, timeout=30)


def test_real_sshd_accepts_rendered_config(sshd_dir: Path, privsep_dir) -> None:
    paths = _render_to(sshd_dir, load_settings({"SSH_PERMIT_TARGET_PORT": "22,2222"}))
    assert _safe_for_sshd(paths.keys_command)
    result = _sshd("-t", "-f", str(paths.config))
    assert result.returncode == 0, result.stderr
    effective = _sshd("-T", "-f", str(paths.config), "-C",
                      "user=limited-user,host=client,addr=192.0.2.1")
    assert effective.returncode == 0, effective.stderr
    lines = set(effective.stdout.splitlines())
    for expected in [
        "allowusers limited-user",
        f"authorizedkeyscommand {paths.keys_command} {paths.index_dir} %f",
        "authorizedkeyscommanduser nobody",
        "permitopen *:22 *:2222",
        "allowtcpforwarding local",
        "permittty no",
        "x11forwarding no",
        "allowagentforwarding no",
        "allowstreamlocalforwarding no",
        "permittunnel no",
        "passwordauthentication no",
        "authenticationmethods publickey",
        "maxstartups 512:50:1024",
        "persourcemaxstartups 256",
        "persourcenetblocksize 32:64",
        "unusedconnectiontimeout none",  # idle `ssh -N -L` tunnels stay up (README)
        "logingracetime 30",
    ]:
        assert expected in lines, expected
    for key in ("ed25519", "ecdsa", "rsa"):
        assert f"hostkey {paths.host_key_dir}/ssh_host_{key}_key" in lines


def test_real_sshd_rejects_a_broken_config(sshd_dir: Path, privsep_dir) -> None:
    paths = _render_to(sshd_dir, Settings())
    text = paths.config.read_text()
    assert "PermitOpen any\n" in text
    paths.config.write_text(text.replace("PermitOpen any\n", "PermitOpen db:notaport\n"))
    result = _sshd("-t", "-f", str(paths.config))
    assert result.returncode != 0
    assert "PermitOpen bad port number" in result.stderr


def test_keys_command_runs_from_its_safe_copy(sshd_dir: Path) -> None:
    paths = _render_to(sshd_dir, Settings())
    fp = "SHA256:" + "A" * 43
    paths.index_dir.mkdir()
    (paths.index_dir / "A").write_text(f"{'SHA256:' + 'A' * 42 + '0'} other\n{fp} restrict,port-forwarding "
                                       "ssh-ed25519 AAAA web\n")
    out = subprocess.run([str(paths.keys_command), str(paths.index_dir), fp], capture_output=True,
                         text=True, timeout=10)
    assert (out.returncode, out.stdout) == (0, "restrict,port-forwarding ssh-ed25519 AAAA web\n")


@pytest.mark.parametrize("first", ["A", "z", "0", "/", "+"])
def test_keys_command_reads_the_fingerprints_shard(sshd_dir: Path, first: str) -> None:
    """Each fingerprint is looked up in the shard render.index_shard names, and only there
    (written as the watcher writes it: a link to its current version)."""
    paths = _render_to(sshd_dir, Settings())
    fp = f"SHA256:{first}{'b' * 42}"
    rendered = render_keys([], ("22",), [ManualLine.at("f:1", (), _key_with_fingerprint(fp))])
    files = ShardFiles(paths.index_dir)
    files.prepare()
    for name, shard in rendered.shards.items():
        if shard.index:
            files.write(name, shard.index.encode())
    assert [n for n, s in rendered.shards.items() if s.lines] == [index_shard(fp)]
    out = subprocess.run([str(paths.keys_command), str(paths.index_dir), fp], capture_output=True,
                         text=True, timeout=10)
    assert out.returncode == 0 and out.stdout.endswith(" f\n") and "restrict" in out.stdout, out
    # The same line in any other shard is never read.
    (paths.index_dir / index_shard(fp)).write_text("")
    for other in ("_", "-", "b" if index_shard(fp) != "b" else "c"):
        (paths.index_dir / other).write_text(rendered.index)
    out = subprocess.run([str(paths.keys_command), str(paths.index_dir), fp], capture_output=True,
                         text=True, timeout=10)
    assert (out.returncode, out.stdout) == (0, "")


@pytest.mark.parametrize("group_bytes", [None, 0], ids=["one group file", "a file per shard"])
def test_keys_command_finds_each_key_through_the_writers_group_files(sshd_dir: Path, monkeypatch,
                                                                    group_bytes: int | None) -> None:
    """As the watcher writes the index (each shard name a link to its group's file, which
    holds other shards' lines too), each key's lines are found, and only its own."""
    from watcher import index_layout
    from watcher.app import OutputWriter, Paths
    if group_bytes is not None:
        monkeypatch.setattr(index_layout, "GROUP_BYTES", group_bytes)
    paths = _render_to(sshd_dir, Settings())
    fps = [f"SHA256:{first}{n:02d}{'c' * 40}" for first in "+/09AZaz" for n in range(3)]
    lines = [ManualLine.at(f"f:{n}", (), PublicKey("ssh-ed25519", f"AAAA{n:03d}", "f", fp, 256))
             for n, fp in enumerate(fps)]
    writer = OutputWriter(Paths(cache=sshd_dir / "cache", hosts=sshd_dir / "hosts", sshd=paths),
                          RunMode.MANUAL, pin_names=False)
    assert writer(render_keys([], ("22",), lines))
    assert all((paths.index_dir / name).is_symlink() for name in ("+", ",", "0", "z"))
    for fp in fps[::4] + [f"SHA256:A99{'c' * 40}"]:
        out = subprocess.run([str(paths.keys_command), str(paths.index_dir), fp], capture_output=True,
                             text=True, timeout=10)
        assert out.returncode == 0, out
        assert out.stdout.count("\n") == (fp in fps) and "SHA256" not in out.stdout, out
        assert out.stdout == ("" if fp not in fps else
                              f"restrict,port-forwarding ssh-ed25519 AAAA{fps.index(fp):03d} f\n"), out
    assert writer(render_keys([], ("22",), []))  # no keys: the files are empty, and read so
    out = subprocess.run([str(paths.keys_command), str(paths.index_dir), fps[0]], capture_output=True,
                         text=True, timeout=10)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def _key_with_fingerprint(fp: str) -> PublicKey:
    return PublicKey("ssh-ed25519", "AAAA", "f", fp, 256)


@pytest.mark.parametrize("fingerprint", ["SHA256:", "nocolon", "SHA256:.x", "SHA256:*", "SHA256:-a",
                                         "SHA256:,a", "SHA256:_a"])
def test_keys_command_answers_nothing_for_a_malformed_fingerprint(sshd_dir: Path, fingerprint: str) -> None:
    paths = _render_to(sshd_dir, Settings())
    paths.index_dir.mkdir()
    for name in ("-", "_", "n", "a", ",", "+"):
        (paths.index_dir / name).write_text(f"{fingerprint} restrict ssh-ed25519 AAAA x\n")
    out = subprocess.run([str(paths.keys_command), str(paths.index_dir), fingerprint],
                         capture_output=True, text=True, timeout=10)
    assert (out.returncode, out.stdout) == (0, "")


# --- health_problems ----------------------------------------------------------------------

NOW = 1_700_000_000.0
BANNER = True  # sshd listens on :22


def healthy_doc(source: SourceStatus = SourceStatus("docker", connected=True),
                **changes) -> StatusDocument:
    doc = StatusDocument(heartbeat=NOW - 2, mode="docker", sshd_pid=42,
                         state=WatcherState(source=source))
    return replace(doc, **changes)


def test_healthy() -> None:
    assert health_problems(healthy_doc(), NOW, BANNER) == []
    assert health_problems(healthy_doc(heartbeat=NOW - STALE_AFTER), NOW, BANNER) == []


def test_stale_heartbeat() -> None:
    assert STALE_AFTER == 30.0
    assert health_problems(healthy_doc(heartbeat=NOW - 31), NOW, BANNER) == [
        "watcher heartbeat is stale"]
    assert health_problems(healthy_doc(heartbeat=0.0),
                           NOW, BANNER) == ["watcher heartbeat is stale"]


@pytest.mark.parametrize("pid", [None, 0])
def test_no_sshd_pid(pid) -> None:
    assert health_problems(healthy_doc(sshd_pid=pid), NOW, BANNER) == ["sshd is not running"]


def test_not_listening() -> None:
    assert health_problems(healthy_doc(), NOW, False) == ["sshd does not listen on port 22"]


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0200A8C0:0016 0100A8C0:C350 01 00000000:00000000 00:00000000 00000000     0        0 0 1
   3: 0200A8C0:2328 0100A8C0:C351 01 00000000:00000000 00:00000000 00000000     0        0 0 1
"""


def test_listening_ports_reads_only_listen_sockets() -> None:
    from watcher.status import listening_ports

    # 0x0016 = 22 and 0x1F90 = 8080 listen; 0x2328 = 9000 is an established connection only.
    assert listening_ports(PROC_NET_TCP) == {22, 8080}
    assert listening_ports("") == set()


def test_docker_disconnected() -> None:
    doc = healthy_doc(source=SourceStatus("docker", connected=False,
                                             error="Error while fetching server API version"))
    assert health_problems(doc, NOW, BANNER) == [
        "docker source is not connected: Error while fetching server API version"]
    assert health_problems(healthy_doc(source=SourceStatus()), NOW, BANNER) == [
        "docker source is not connected: connecting"]
    # Manual mode has no platform to depend on.
    assert health_problems(healthy_doc(mode="manual", source=SourceStatus()), NOW, BANNER) == []


def test_kubernetes_disconnected_fails_readiness_not_liveness() -> None:
    doc = healthy_doc(mode="kubernetes", source=SourceStatus(
        "kubernetes", connected=False, error="cannot reach the Kubernetes API"))
    assert health_problems(doc, NOW, BANNER) == [
        "kubernetes source is not connected: cannot reach the Kubernetes API"]
    assert health_problems(doc, NOW, BANNER, require_source=False) == []
    assert health_problems(healthy_doc(mode="kubernetes", source=SourceStatus(connected=True)),
                           NOW, BANNER) == []
    # Liveness still needs the watcher and sshd.
    assert health_problems(replace(doc, sshd_pid=None), NOW, BANNER, require_source=False) == [
        "sshd is not running"]


def test_everything_wrong_at_once() -> None:
    doc = healthy_doc(heartbeat=NOW - 600, sshd_pid=None,
                      source=SourceStatus(connected=False, error="boom"))
    assert health_problems(doc, NOW, False) == [
        "watcher heartbeat is stale", "sshd is not running", "sshd does not listen on port 22",
        "docker source is not connected: boom"]
