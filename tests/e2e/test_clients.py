"""Full SSH compatibility through the proxy, with the ProxyCommand form of the README
(and the ProxyJump form): ssh, scp, sftp, rsync, -L tunnels, sshfs, X11.

One proxy for the whole module; the target is started after it, so every test here also
proves that the proxy discovered the target from the Docker events stream.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shlex
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from helpers import (
    PROXY_USER,
    KeyPair,
    Proxy,
    SshClient,
    Target,
    docker,
    fetch,
    free_port,
    log_mark,
    make_keypair,
    module_containers,
    port_open,
    run_proxy_container,
    run_target_container,
    sshfs_mount,
    unique_name,
    wait_for_event,
    wait_for_login,
    wait_until,
)

TWO_MIB = 2 * 1024 * 1024


# --------------------------------------------------------------------------- small helpers


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_listing(root: Path) -> dict[str, str]:
    """relative path -> "file <sha256> <mode>" / "link <target>" / "dir <mode>" of a local tree."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"link {os.readlink(path)}"
        elif path.is_dir():
            out[rel] = f"dir {path.stat().st_mode & 0o7777:o}"
        else:
            out[rel] = f"file {sha256_file(path)} {path.stat().st_mode & 0o7777:o}"
    return out


REMOTE_LISTING = r"""cd "$1" && find . -mindepth 1 | sort | while read -r p; do
  r="${p#./}"
  if [ -L "$p" ]; then echo "$r|link $(readlink "$p")";
  elif [ -d "$p" ]; then echo "$r|dir $(stat -c %a "$p")";
  else echo "$r|file $(sha256sum "$p" | cut -d' ' -f1) $(stat -c %a "$p")"; fi
done"""


def remote_tree_listing(target: Target, root: str) -> dict[str, str]:
    proc = target.exec(["sh", "-c", REMOTE_LISTING, "sh", root], check=True)
    return dict(line.split("|", 1) for line in proc.stdout.splitlines())


# --------------------------------------------------------------------------- module fixtures


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, KeyPair]:
    directory = tmp_path_factory.mktemp("client-keys")
    return {name: make_keypair(directory, name) for name in ("workspace", "exec-only")}


@pytest.fixture(scope="module")
def proxy(request, proxy_image, test_network, session_id) -> Iterator[Proxy]:
    """One ssh-proxy for the module, started like conftest's start_proxy."""
    with module_containers(request) as started:
        yield run_proxy_container(test_network, session_id, name=unique_name("ssh-proxy-test-clients"),
                                  image=proxy_image, track=started.append)


@pytest.fixture(scope="module")
def workspace(request, proxy, keys, target_image, test_network, session_id) -> Iterator[Target]:
    """A target serving GET /publickey, started after the proxy (found by event), with a
    hostname that differs from its container name."""
    suffix = secrets.token_hex(3)
    with module_containers(request) as started:
        yield run_target_container(f"cli-ws-{suffix}", keys["workspace"], test_network, session_id,
                                   image=target_image, hostname=f"cli-host-{suffix}", track=started.append)


@pytest.fixture(scope="module")
def client(proxy, keys, workspace) -> SshClient:
    """The README's ProxyCommand client for the workspace, once a login works."""
    c = SshClient(proxy_port=proxy, key=keys["workspace"])
    wait_for_login(c, workspace.name, deadline=20)
    return c


# --------------------------------------------------------------------------- tests


def test_ssh_command_on_target_discovered_after_proxy(proxy, keys, workspace, client):
    mark = log_mark(proxy)
    proc = client.ssh(workspace.name, "hostname", check=True)
    expected = docker("inspect", "-f", "{{.Config.Hostname}}", workspace.id).stdout.strip()
    assert expected == workspace.hostname
    assert proc.stdout.strip() == expected
    fp = keys["workspace"].fingerprint
    wait_for_event(proxy, mark, event="accepted", fp=fp, target=workspace.name)
    wait_for_event(proxy, mark, event="tunnel", fp=fp, dest=f"{workspace.name}:22", target=workspace.name)
    wait_for_event(proxy, mark, event="closed", fp=fp, target=workspace.name)
    # The hostname and the IP are aliases too.
    for alias in (workspace.hostname, workspace.ip, workspace.id[:12]):
        assert client.ssh(alias, "hostname", check=True).stdout.strip() == expected, alias


def test_scp_upload_and_download_2mib(client, workspace, tmp_path):
    up = tmp_path / "up.bin"
    up.write_bytes(os.urandom(TWO_MIB))
    client.run(client.scp_argv(str(up), client.remote(workspace.name, "/tmp/scp-up.bin")), check=True)
    remote_sum = workspace.exec(["sha256sum", "/tmp/scp-up.bin"], check=True).stdout.split()[0]
    assert remote_sum == sha256_file(up)

    workspace.exec(f"head -c {TWO_MIB} /dev/urandom >/tmp/scp-down.bin", check=True)
    remote_sum = workspace.exec(["sha256sum", "/tmp/scp-down.bin"], check=True).stdout.split()[0]
    down = tmp_path / "down.bin"
    client.run(client.scp_argv(client.remote(workspace.name, "/tmp/scp-down.bin"), str(down)), check=True)
    assert down.stat().st_size == TWO_MIB
    assert sha256_file(down) == remote_sum


def test_sftp_batch_put_ls_get(client, workspace, tmp_path):
    local = tmp_path / "sftp-local.bin"
    local.write_bytes(os.urandom(256 * 1024))
    back = tmp_path / "sftp-back.bin"
    batch = (f"mkdir /tmp/sftp-dir\n"
             f"put {local} /tmp/sftp-dir/put.bin\n"
             f"ls -l /tmp/sftp-dir\n"
             f"get /tmp/sftp-dir/put.bin {back}\n")
    proc = client.run(client.sftp_argv(workspace.name, opts=["-b", "-"]), input=batch, check=True)
    assert re.search(r"^\S+\s+.*\b262144\b.*put\.bin$", proc.stdout, re.M), proc.stdout
    assert sha256_file(back) == sha256_file(local)
    remote_sum = workspace.exec(["sha256sum", "/tmp/sftp-dir/put.bin"], check=True).stdout.split()[0]
    assert remote_sum == sha256_file(local)


def test_rsync_tree_both_ways(client, workspace, tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.txt").write_text("top\n")
    (src / "a" / "b" / "deep.bin").write_bytes(os.urandom(70_000))
    (src / "a" / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "a" / "script.sh").chmod(0o750)
    (src / "a" / "link").symlink_to("b/deep.bin")
    client.run(client.rsync_argv("-a", f"{src}/", client.remote(workspace.name, "/tmp/rsync-up/")),
               check=True)
    assert remote_tree_listing(workspace, "/tmp/rsync-up") == tree_listing(src)

    workspace.exec("mkdir -p /tmp/rsync-down/x/y && echo one >/tmp/rsync-down/one.txt"
                   " && head -c 50000 /dev/urandom >/tmp/rsync-down/x/y/r.bin"
                   " && chmod 640 /tmp/rsync-down/one.txt && ln -s x/y/r.bin /tmp/rsync-down/l", check=True)
    dst = tmp_path / "dst"
    client.run(client.rsync_argv("-a", client.remote(workspace.name, "/tmp/rsync-down/"), f"{dst}/"),
               check=True)
    assert tree_listing(dst) == remote_tree_listing(workspace, "/tmp/rsync-down")
    assert (dst / "one.txt").read_text() == "one\n"


def test_local_forward_to_service_inside_target(proxy, keys, client, workspace):
    port = free_port()
    mark = log_mark(proxy)
    tunnel = subprocess.Popen(
        client.ssh_argv(workspace.name, opts=["-N", "-o", "ExitOnForwardFailure=yes",
                                              "-L", f"127.0.0.1:{port}:127.0.0.1:8000"]),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if not wait_until(lambda: port_open("127.0.0.1", port) or tunnel.poll() is not None, 20):
            pytest.fail("the -L tunnel did not open within 20 s")
        assert tunnel.poll() is None, f"ssh -L exited {tunnel.returncode}: {tunnel.stderr.read()}"
        assert fetch(f"http://127.0.0.1:{port}/hello.txt") == (200, f"hello from {workspace.hostname}\n".encode())
        # a second request over the same tunnel
        assert fetch(f"http://127.0.0.1:{port}/hello.txt")[0] == 200
    finally:
        tunnel.terminate()
        tunnel.wait(timeout=10)
    wait_for_event(proxy, mark, event="tunnel", fp=keys["workspace"].fingerprint,
                   dest=f"{workspace.name}:22")


def test_sshfs_read_and_write(client, workspace, tmp_path):
    workspace.exec("echo 'written in the target' >/srv/www/from-target.txt", check=True)
    with sshfs_mount(client, workspace.name, "/srv/www", tmp_path / "mnt") as mnt:
        assert (mnt / "hello.txt").read_text() == f"hello from {workspace.hostname}\n"
        assert (mnt / "from-target.txt").read_text() == "written in the target\n"
        (mnt / "from-host.txt").write_text("written through sshfs\n")
        listing = sorted(p.name for p in mnt.iterdir())
        assert {"hello.txt", "from-target.txt", "from-host.txt"} <= set(listing)
    # unmounted: the mountpoint is an empty local directory again
    assert not os.path.ismount(tmp_path / "mnt")
    assert list((tmp_path / "mnt").iterdir()) == []
    assert workspace.exec(["cat", "/srv/www/from-host.txt"], check=True).stdout == "written through sshfs\n"


@pytest.mark.parametrize("flag", ["-X", "-Y"])
def test_x11_forwarding_xdpyinfo(client, workspace, xvfb_display, flag):
    proc = client.ssh(workspace.name, "echo DISPLAY=$DISPLAY; xdpyinfo", opts=[flag],
                      env={"DISPLAY": xvfb_display}, check=True)
    out = proc.stdout
    assert re.search(r"^DISPLAY=localhost:\d+\.0$", out, re.M), out
    assert re.search(r"^name of display:\s+localhost:\d+\.0$", out, re.M), out
    assert re.search(r"^screen #0:$", out, re.M), out
    # the host's Xvfb (-screen 0 640x480x24), not some other display
    assert re.search(r"dimensions:\s+640x480 pixels", out), out
    assert "X11 forwarding request failed" not in proc.stderr


def test_exec_only_target_key_read_by_docker_exec(proxy, keys, start_target):
    target = start_target(f"cli-exec-{secrets.token_hex(3)}", keys["exec-only"], serve_publickey=False)
    assert not port_open(target.ip, 8080)
    c = SshClient(proxy_port=proxy, key=keys["exec-only"])
    wait_for_login(c, target.name, deadline=20)
    assert c.ssh(target.name, "hostname", check=True).stdout.strip() == target.name
    mark = log_mark(proxy)
    c.ssh(target.name, "true", check=True)
    wait_for_event(proxy, mark, event="accepted", fp=keys["exec-only"].fingerprint, target=target.name)


def test_proxyjump_with_config_file(proxy, keys, workspace, client, tmp_path):
    key = keys["workspace"].private
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        f"Host 127.0.0.1\n"
        f"    User {PROXY_USER}\n"
        f"    IdentityFile {key}\n"
        f"Host *\n"
        f"    IdentitiesOnly yes\n"
        f"    IdentityAgent none\n"
        f"    StrictHostKeyChecking no\n"
        f"    UserKnownHostsFile /dev/null\n"
        f"    BatchMode yes\n"
        f"    LogLevel ERROR\n"
        f"    ConnectTimeout 10\n")
    argv = ["ssh", "-F", str(cfg), "-J", f"{PROXY_USER}@127.0.0.1:{proxy.port}", "-i", str(key),
            f"root@{workspace.name}", "hostname"]
    mark = log_mark(proxy)
    proc = SshClient.run(argv, timeout=60)
    assert proc.returncode == 0, f"`{shlex.join(argv)}` exited {proc.returncode}: {proc.stderr}"
    assert proc.stdout.strip() == workspace.hostname
    wait_for_event(proxy, mark, event="tunnel", fp=keys["workspace"].fingerprint,
                   dest=f"{workspace.name}:22", target=workspace.name)
